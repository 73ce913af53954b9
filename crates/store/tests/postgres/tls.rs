//! TLS to PostgreSQL (`sslmode`, `sslrootcert`; issue 16). On the shared server: `disable` and
//! `require` decide whether the store's connections are encrypted (`pg_stat_ssl`). On a server
//! this test starts itself (initdb and pg_ctl of the installed PostgreSQL, its own directory
//! and port) with a certificate made here: `verify-full` takes it with the right CA and the
//! right name, refuses another CA and another name; `verify-ca` takes another name.

use std::path::{Path, PathBuf};
use std::process::Command;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

use super::*;

/// Appends one event and reads it back, so the writer's and the readers' connections exist.
async fn exercise(store: &PostgresStore) {
    let id = Uuid::new_v4();
    let k = key("acme", &format!("tls-{}", id.simple()));
    appended(store, request(&k, ExpectedVersion::NoStream, cmd(id.as_u128()), 1)).await;
    assert!(feed(store, "acme").await.iter().any(|e| e.target_id == k.id));
}

/// Whether every backend connection of `application` is encrypted, and how many there are.
async fn encrypted(client: &tokio_postgres::Client, application: &str) -> (bool, i64) {
    let row = client
        .query_one(
            "SELECT coalesce(bool_and(s.ssl), false), count(*) FROM pg_stat_ssl s \
             JOIN pg_stat_activity a USING (pid) WHERE a.application_name = $1",
            &[&application],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_decides_whether_the_stores_connections_are_encrypted() {
    let Some(scratch) = Scratch::new().await else { return };
    let admin = scratch.client().await;
    let server_ssl = admin.query_one("SHOW ssl", &[]).await.unwrap().get::<_, String>(0) == "on";
    for mode in ["disable", "prefer", "require"] {
        let name = format!("sourced_tls_{mode}_{}", Uuid::new_v4().simple());
        let url = with_param(&scratch.url_named(&name), &format!("sslmode={mode}"));
        let store = match PostgresStore::connect(&url, PostgresOptions::default()).await {
            Ok(store) => store,
            Err(e) if mode == "require" && !server_ssl => {
                assert!(e.to_string().to_lowercase().contains("tls") || e.to_string().contains("SSL"), "{e}");
                continue;
            }
            Err(e) => panic!("sslmode={mode}: {e}"),
        };
        exercise(&store).await;
        let (ssl, connections) = encrypted(&admin, &name).await;
        assert!(connections > 0, "sslmode={mode}: no connection named {name}");
        assert_eq!(ssl, mode != "disable" && server_ssl, "sslmode={mode} (server ssl={server_ssl})");
        drop(store);
    }
}

// ---------------------------------------------------------------------------------------------
// A server of the test's own

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().unwrap();
    let pem = params.self_signed(&key).unwrap().pem();
    Ca { issuer: Issuer::new(params, key), pem }
}

fn leaf(ca: &Ca, names: &[&str]) -> (String, String) {
    let mut params = CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "sourced test database");
    let key = KeyPair::generate().unwrap();
    (params.signed_by(&key, &ca.issuer).unwrap().pem(), key.serialize_pem())
}

/// A PostgreSQL server in a temporary directory, stopped (immediately) when dropped.
struct OwnServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

/// Runs a PostgreSQL program as the `postgres` user when this is root (the server refuses
/// root), else as this user.
fn pg_command(bin: &Path, program: &str) -> Command {
    let path = bin.join(program);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn checked(what: &str, out: std::io::Result<std::process::Output>) -> Result<(), String> {
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!("{what}: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))),
        Err(e) => Err(format!("{what}: {e}")),
    }
}

impl OwnServer {
    /// initdb and start with TLS on, serving `cert`/`key`; `Err` says what is missing.
    async fn start(cert: &str, key: &str) -> Result<OwnServer, String> {
        let bindir = Command::new("pg_config").arg("--bindir").output().map_err(|e| format!("pg_config: {e}"))?;
        let bin = PathBuf::from(String::from_utf8_lossy(&bindir.stdout).trim());
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        let port = free_port().await;
        let server = OwnServer { dir, bin, port };
        server.write_certificate(cert, key)?;
        if is_root() {
            checked("chown", Command::new("chown").args(["-R", "postgres:"]).arg(server.dir.path()).output())?;
        }
        checked(
            "initdb",
            pg_command(&server.bin, "initdb")
                .args(["-U", "postgres", "--auth=trust", "--no-sync", "-D"])
                .arg(&data)
                .output(),
        )?;
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c ssl=on -c ssl_cert_file={} -c ssl_key_file={} -c fsync=off",
            server.dir.path().display(),
            server.dir.path().join("server.crt").display(),
            server.dir.path().join("server.key").display(),
        );
        checked(
            "pg_ctl start",
            pg_command(&server.bin, "pg_ctl")
                .args(["-w", "-t", "60", "-D"])
                .arg(&data)
                .args(["-l"])
                .arg(server.dir.path().join("log"))
                .args(["-o", &options, "start"])
                .output(),
        )?;
        Ok(server)
    }

    fn write_certificate(&self, cert: &str, key: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let (c, k) = (self.dir.path().join("server.crt"), self.dir.path().join("server.key"));
        std::fs::write(&c, cert).map_err(|e| e.to_string())?;
        std::fs::write(&k, key).map_err(|e| e.to_string())?;
        std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
        if is_root() {
            checked("chown", Command::new("chown").arg("postgres:").arg(&c).arg(&k).output())?;
        }
        Ok(())
    }

    /// Serves another certificate (PostgreSQL reads it again on reload).
    fn swap_certificate(&self, cert: &str, key: &str) -> Result<(), String> {
        self.write_certificate(cert, key)?;
        checked(
            "pg_ctl reload",
            pg_command(&self.bin, "pg_ctl").arg("-D").arg(self.dir.path().join("data")).arg("reload").output(),
        )
    }

    fn url(&self, host: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{params}", self.port)
    }

    fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = pg_command(&self.bin, "pg_ctl")
            .args(["-D"])
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "stop"])
            .output();
    }
}

async fn connects(url: &str) -> Result<(), String> {
    let options = PostgresOptions { connect_timeout_ms: 5_000, ..PostgresOptions::default() };
    match PostgresStore::connect(url, options).await {
        Ok(store) => {
            exercise(&store).await;
            Ok(())
        }
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            Err(text)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_chain_and_the_name_on_a_server_of_its_own() {
    let (trusted, stranger) = (ca("Sourced test DB CA"), ca("Some other CA"));
    let (cert, key) = leaf(&trusted, &["localhost", "127.0.0.1"]);
    let server = match OwnServer::start(&cert, &key).await {
        Ok(s) => s,
        Err(why) if required() => {
            panic!("cannot start a PostgreSQL server of the test's own (SOURCED_REQUIRE_POSTGRES=1): {why}")
        }
        Err(why) => {
            eprintln!("SKIP: cannot start a PostgreSQL server of the test's own: {why}");
            return;
        }
    };
    let ca_file = server.file("ca.pem", &trusted.pem);
    let other_file = server.file("other.pem", &stranger.pem);
    let full = |host: &str, roots: &str| server.url(host, &format!("sslmode=verify-full&sslrootcert={roots}"));

    connects(&full("localhost", &ca_file)).await.unwrap();
    connects(&full("127.0.0.1", &ca_file)).await.unwrap();
    let refused = connects(&full("localhost", &other_file)).await.unwrap_err();
    assert!(refused.contains("certificate") && refused.contains("UnknownIssuer"), "{refused}");
    // require without roots encrypts and trusts any certificate, as libpq's does.
    connects(&server.url("127.0.0.1", "sslmode=require")).await.unwrap();
    // require with roots checks the chain (libpq: as verify-ca).
    let refused = connects(&server.url("127.0.0.1", &format!("sslmode=require&sslrootcert={other_file}"))).await;
    assert!(refused.is_err(), "require with sslrootcert checks the chain");

    // A certificate of the trusted CA for another name: verify-full refuses, verify-ca takes it.
    let (cert, key) = leaf(&trusted, &["db.internal"]);
    server.swap_certificate(&cert, &key).unwrap();
    let mut refused = Ok(());
    for _ in 0..50 {
        // The reload is asynchronous in the server: wait (bounded) until it serves the new one.
        refused = connects(&full("127.0.0.1", &ca_file)).await;
        if refused.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refused = refused.unwrap_err();
    assert!(refused.contains("not valid for name"), "{refused}");
    connects(&server.url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca_file}"))).await.unwrap();
}
