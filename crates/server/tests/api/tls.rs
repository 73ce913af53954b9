//! HTTPS and WSS (SPEC §8, issue 16) against the `sourced` binary, with real clients: curl with
//! `--cacert`, and Python's `websockets` over `wss://`. The CA and the certificates are made
//! here (rcgen); `SIGHUP` swaps the certificate, and a broken one is not taken.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use serde_json::Value;
use tempfile::TempDir;
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::common::spawn_sourced_logged;

/// A certificate authority made for one test.
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

/// A server certificate for `localhost` and 127.0.0.1 signed by `ca`: (chain PEM, key PEM).
fn leaf(ca: &Ca) -> (String, String) {
    let mut params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "sourced test server");
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

struct Files {
    dir: TempDir,
}

impl Files {
    fn new() -> Files {
        Files { dir: tempfile::tempdir().unwrap() }
    }
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, text).unwrap();
        p
    }
    /// Writes `ca`'s PEM as `<name>.pem` and a leaf it signed as the server's files.
    fn issue(&self, ca: &Ca, name: &str) {
        self.write(&format!("{name}.pem"), &ca.pem);
        let (cert, key) = leaf(ca);
        self.write("server.crt", &cert);
        self.write("server.key", &key);
    }
}

async fn serve(
    files: &Files,
    extra: &[(&str, &str)],
) -> (tokio::process::Child, SocketAddr, UnboundedReceiver<String>) {
    let mut env = vec![
        ("EVENT_STORE_URL".to_owned(), format!("sqlite://{}", files.path("db.sqlite").display())),
        ("TLS_CERT".to_owned(), files.path("server.crt").display().to_string()),
        ("TLS_KEY".to_owned(), files.path("server.key").display().to_string()),
    ];
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    spawn_sourced_logged(&env).await
}

/// curl with these arguments; its status code (`-w`) is the last line of stdout.
async fn curl(args: &[&str]) -> Output {
    tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .await
        .expect("curl runs (the TLS tests use it as a real client)")
}

fn status(out: &Output) -> Option<u16> {
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).lines().last()?.parse().ok()
}

fn cacert(files: &Files, name: &str) -> String {
    files.path(&format!("{name}.pem")).display().to_string()
}

#[tokio::test]
async fn curl_is_served_over_https_and_refused_without_the_ca_or_over_plain_http() {
    let files = Files::new();
    files.issue(&ca("Sourced test CA 1"), "ca1");
    let (_child, addr, _log) = serve(&files, &[]).await;
    let base = format!("https://localhost:{}", addr.port());
    let ca1 = cacert(&files, "ca1");
    let resolve = format!("localhost:{}:127.0.0.1", addr.port());

    let ready = curl(&["--cacert", &ca1, "--resolve", &resolve, &format!("{base}/readyz")]).await;
    assert_eq!(status(&ready), Some(200), "{ready:?}");
    // By address too (the certificate names 127.0.0.1), with HTTP/1.1 and with HTTP/2 (ALPN).
    for version in ["--http1.1", "--http2"] {
        let body = r#"{"lines":[]}"#;
        let created = curl(&[
            "--cacert",
            &ca1,
            version,
            "-X",
            "POST",
            "-H",
            "content-type: application/json",
            "-d",
            body,
            &format!("https://127.0.0.1:{}/order", addr.port()),
        ])
        .await;
        assert_eq!(status(&created), Some(201), "{version}: {created:?}");
    }
    let h2 = curl(&[
        "--cacert",
        &ca1,
        "--http2",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        &format!("{base}/readyz"),
        "--resolve",
        &resolve,
    ])
    .await;
    assert_eq!(String::from_utf8_lossy(&h2.stdout), "2", "HTTP/2 by ALPN (the last -w wins): {h2:?}");
    // A client that does not trust the CA fails its handshake (curl: 60, peer certificate).
    let untrusted = curl(&[&format!("https://127.0.0.1:{}/readyz", addr.port())]).await;
    assert_eq!(untrusted.status.code(), Some(60), "{untrusted:?}");
    // Plain HTTP to the TLS port gets no HTTP answer, and the server goes on serving.
    let plain = curl(&[&format!("http://127.0.0.1:{}/readyz", addr.port())]).await;
    assert_eq!(status(&plain), None, "{plain:?}");
    let again = curl(&["--cacert", &ca1, &format!("https://127.0.0.1:{}/readyz", addr.port())]).await;
    assert_eq!(status(&again), Some(200), "{again:?}");
}

/// The Python the tests run: `SOURCED_TEST_PYTHON` (CI: a virtualenv with `websockets`), else
/// `python3`; `None` (skip) when it lacks `websockets`, unless `SOURCED_REQUIRE_PYTHON=1`.
async fn python_with_websockets() -> Option<String> {
    let python = std::env::var("SOURCED_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let ok = tokio::process::Command::new(&python)
        .args(["-c", "import websockets"])
        .output()
        .await
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(python);
    }
    assert!(
        std::env::var("SOURCED_REQUIRE_PYTHON").as_deref() != Ok("1"),
        "{python} cannot import websockets (SOURCED_REQUIRE_PYTHON=1; .ci/run installs it)"
    );
    eprintln!("skipped: {python} has no `websockets` module (pip install websockets, or set SOURCED_TEST_PYTHON)");
    None
}

const WSS_CLIENT: &str = r#"
import asyncio, json, ssl, sys
import websockets

async def main(url, cafile):
    context = ssl.create_default_context(cafile=cafile)
    async with websockets.connect(url, ssl=context, open_timeout=10) as ws:
        await ws.send(json.dumps({"op": "command", "command": {
            "id": "7a1c3c4e-0b7e-4f57-9a53-6a8d1c2b3e4f", "type": "create",
            "targetName": "order", "targetId": "over-wss", "body": {"lines": []}}}))
        reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
        print(json.dumps(reply))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;

#[tokio::test]
async fn python_websockets_sends_a_command_over_wss() {
    let Some(python) = python_with_websockets().await else { return };
    let files = Files::new();
    files.issue(&ca("Sourced test CA 1"), "ca1");
    let (_child, addr, _log) = serve(&files, &[]).await;
    let url = format!("wss://localhost:{}/ws", addr.port());
    let out = tokio::process::Command::new(&python)
        .args(["-c", WSS_CLIENT, &url, &cacert(&files, "ca1")])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(reply["op"], "result", "{reply}");
    assert_eq!(reply["version"], 1, "{reply}");
    // The same document over HTTPS.
    let got =
        curl(&["--cacert", &cacert(&files, "ca1"), &format!("https://127.0.0.1:{}/order/over-wss", addr.port())]).await;
    assert_eq!(status(&got), Some(200), "{got:?}");
}

async fn hangup(child: &tokio::process::Child) {
    let pid = child.id().unwrap().to_string();
    let sent = tokio::process::Command::new("kill").args(["-HUP", &pid]).status().await.unwrap();
    assert!(sent.success());
}

/// Waits (bounded) for a log line whose message contains `text`.
async fn logged(log: &mut UnboundedReceiver<String>, text: &str) -> Value {
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(line) = log.recv().await {
            if let Ok(v) = serde_json::from_str::<Value>(&line)
                && v["fields"]["message"].as_str().is_some_and(|m| m.contains(text))
            {
                return v;
            }
        }
        panic!("sourced exited before logging {text:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("no log line {text:?} within 20 s"))
}

#[tokio::test]
async fn sighup_swaps_the_certificate_and_keeps_it_when_the_new_one_is_broken() {
    let files = Files::new();
    files.issue(&ca("Sourced test CA 1"), "ca1");
    let (child, addr, mut log) = serve(&files, &[]).await;
    let url = format!("https://127.0.0.1:{}/readyz", addr.port());
    let (ca1, ca2) = (cacert(&files, "ca1"), cacert(&files, "ca2"));
    assert_eq!(status(&curl(&["--cacert", &ca1, &url]).await), Some(200));

    files.issue(&ca("Sourced test CA 2"), "ca2");
    hangup(&child).await;
    logged(&mut log, "TLS certificate reloaded").await;
    assert_eq!(status(&curl(&["--cacert", &ca2, &url]).await), Some(200));
    let old = curl(&["--cacert", &ca1, &url]).await;
    assert_eq!(old.status.code(), Some(60), "the old CA no longer fits: {old:?}");

    // A key that is not PEM: the reload is refused, named, and the served certificate stays.
    files.write("server.key", "not a key\n");
    hangup(&child).await;
    let refused = logged(&mut log, "TLS certificate not reloaded").await;
    let error = refused["fields"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("TLS_KEY="), "{refused}");
    assert_eq!(status(&curl(&["--cacert", &ca2, &url]).await), Some(200));
}

#[tokio::test]
async fn a_handshake_that_never_comes_is_closed_at_the_header_timeout_and_others_are_served() {
    let files = Files::new();
    files.issue(&ca("Sourced test CA 1"), "ca1");
    let (_child, addr, _log) = serve(&files, &[("HEADER_READ_TIMEOUT_MS", "1000")]).await;
    // 50 sockets that never send a ClientHello, and 50 that send half of one.
    let mut silent = Vec::new();
    for i in 0..100 {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            use tokio::io::AsyncWriteExt;
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await.unwrap();
        }
        silent.push(s);
    }
    let ready = curl(&["--cacert", &cacert(&files, "ca1"), &format!("https://127.0.0.1:{}/readyz", addr.port())]).await;
    assert_eq!(status(&ready), Some(200), "served while 100 handshakes stall: {ready:?}");
    for (i, mut s) in silent.into_iter().enumerate() {
        let mut buf = [0u8; 64];
        let closed = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "socket {i} still open 15 s after a 1 s handshake timeout");
    }
}

fn resolve(pairs: &[(&str, &Path)]) -> String {
    let env: Vec<(String, String)> = pairs.iter().map(|(k, p)| ((*k).to_owned(), p.display().to_string())).collect();
    let raw = sourced_server::config::RawArgs::from_pairs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    match sourced_server::Config::resolve(&raw) {
        Ok(_) => "accepted".to_owned(),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_broken_certificate_setting_stops_start_up_with_a_line_naming_it() {
    let files = Files::new();
    let ca1 = ca("Sourced test CA 1");
    files.issue(&ca1, "ca1");
    let (cert, key) = (files.path("server.crt"), files.path("server.key"));
    let missing = files.path("nowhere.pem");
    let garbage = files.write("garbage.pem", "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n");
    let empty = files.write("empty.pem", "");
    let (_, other_key) = leaf(&ca1);
    let other_key = files.write("other.key", &other_key);
    let cases: &[(&[(&str, &Path)], &str)] = &[
        (&[("TLS_CERT", &cert), ("TLS_KEY", &key)], "accepted"),
        (&[("TLS_CERT", &cert)], "invalid TLS_KEY"),
        (&[("TLS_KEY", &key)], "invalid TLS_CERT"),
        (&[("TLS_CERT", &missing), ("TLS_KEY", &key)], "cannot read"),
        (&[("TLS_CERT", &cert), ("TLS_KEY", &missing)], "invalid TLS_KEY"),
        (&[("TLS_CERT", &garbage), ("TLS_KEY", &key)], "not a PEM certificate chain"),
        (&[("TLS_CERT", &empty), ("TLS_KEY", &key)], "holds no CERTIFICATE"),
        (&[("TLS_CERT", &cert), ("TLS_KEY", &empty)], "holds no PEM private key"),
        (&[("TLS_CERT", &cert), ("TLS_KEY", &other_key)], "does not fit TLS_CERT"),
    ];
    for (pairs, expected) in cases {
        let got = resolve(pairs);
        assert!(got.contains(expected), "{pairs:?}: expected {expected:?}, got {got:?}");
        assert_eq!(got.lines().count(), 1, "one line: {got}");
    }
}

// ---------------------------------------------------------------------------------------------
// JWT_JWKS=https://… : the keys fetched from an identity provider over TLS.

/// An ES256 key made for one test, with its JWK.
struct EcKey {
    pair: ring::signature::EcdsaKeyPair,
    kid: &'static str,
}

impl EcKey {
    fn new(kid: &'static str) -> EcKey {
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        EcKey { pair: EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap(), kid }
    }

    fn jwk(&self) -> Value {
        use ring::signature::KeyPair as _;
        let point = self.pair.public_key().as_ref(); // 0x04 || x || y
        serde_json::json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": b64(&point[1..33]), "y": b64(&point[33..65])})
    }

    /// A token for principal `ops` of tenant acme, valid for an hour.
    fn token(&self) -> String {
        let exp = chrono::Utc::now().timestamp() + 3600;
        let header = b64(serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": self.kid}).to_string().as_bytes());
        let claims = serde_json::json!({"iss": "https://idp.test", "aud": "sourced", "sub": "ops", "tenant": "acme",
            "roles": ["ops"], "exp": exp});
        let message = format!("{header}.{}", b64(claims.to_string().as_bytes()));
        let sig = self.pair.sign(&ring::rand::SystemRandom::new(), message.as_bytes()).unwrap();
        format!("{message}.{}", b64(sig.as_ref()))
    }
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn jwks(keys: &[&EcKey]) -> String {
    serde_json::json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

/// An https server answering every request with the JWKS it holds now, counting them.
struct Idp {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

async fn idp(ca: &Ca, body: String) -> Idp {
    use rustls::pki_types::pem::PemObject;
    let (cert, key) = leaf(ca);
    let chain =
        rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (body, hits) = (Arc::new(Mutex::new(body)), Arc::new(AtomicUsize::new(0)));
    let (b, h) = (body.clone(), hits.clone());
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, b, h) = (acceptor.clone(), b.clone(), h.clone());
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let body = b.lock().unwrap().clone();
                let reply = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(reply.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Idp { addr, body, hits, task }
}

/// `sourced` trusting `ca` for its JWKS at `idp`, with one type and an `ops` role.
async fn serve_with_idp(files: &Files, idp_addr: SocketAddr) -> (tokio::process::Child, SocketAddr) {
    let artifacts = files.path("artifacts");
    std::fs::create_dir_all(artifacts.join("types/order")).unwrap();
    std::fs::write(artifacts.join("types/order/schema.json"), r#"{"type": "object"}"#).unwrap();
    std::fs::write(artifacts.join("permissions.yaml"), "roles:\n  ops:\n    - {types: [\"*\"], actions: [\"*\"]}\n")
        .unwrap();
    let env: Vec<(String, String)> = [
        ("EVENT_STORE_URL", format!("sqlite://{}", files.path("db.sqlite").display())),
        ("ARTIFACTS", artifacts.display().to_string()),
        ("AUTH", "jwt".to_owned()),
        ("JWT_JWKS", format!("https://localhost:{}/.well-known/jwks.json", idp_addr.port())),
        ("JWT_JWKS_CA_FILE", cacert(files, "idp-ca")),
        ("JWT_JWKS_UNKNOWN_KID_SECS", "1".to_owned()),
        ("JWT_ISSUER", "https://idp.test".to_owned()),
        ("JWT_AUDIENCE", "sourced".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    crate::common::spawn_sourced_with(&env, None).await
}

async fn list_orders(addr: SocketAddr, token: &str) -> (u16, Value) {
    let res = get_with_token(addr, "/order", token).await;
    (res.0, serde_json::from_str(&res.1).unwrap_or(Value::Null))
}

/// A GET over plain HTTP with a bearer token: (status, body).
async fn get_with_token(addr: SocketAddr, path: &str, token: &str) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-H", &format!("authorization: Bearer {token}"), "-H", "x-tenant: acme"])
        .args(["-w", "\n%{http_code}", &format!("http://{addr}{path}")])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.parse().unwrap_or(0), body.to_owned())
}

#[tokio::test]
async fn jwks_by_https_url_is_fetched_at_start_refreshed_on_an_unknown_kid_and_kept_when_the_idp_is_down() {
    let files = Files::new();
    let idp_ca = ca("Sourced test IdP CA");
    files.write("idp-ca.pem", &idp_ca.pem);
    let (a, b) = (EcKey::new("key-a"), EcKey::new("key-b"));
    let provider = idp(&idp_ca, jwks(&[&a])).await;
    let (_child, addr) = serve_with_idp(&files, provider.addr).await;
    assert_eq!(provider.hits.load(Ordering::SeqCst), 1, "fetched once at start");
    assert_eq!(list_orders(addr, &a.token()).await.0, 200);

    // The provider rotates: a token signed with the new key is refused until the refetch
    // its unknown kid causes (at most one per JWT_JWKS_UNKNOWN_KID_SECS, 1 s here).
    *provider.body.lock().unwrap() = jwks(&[&a, &b]);
    let (status, problem) = list_orders(addr, &b.token()).await;
    assert_eq!((status, problem["type"].as_str()), (401, Some("urn:sourced:problem:token-unknown-kid")), "{problem}");
    let mut accepted = false;
    for _ in 0..100 {
        if list_orders(addr, &b.token()).await.0 == 200 {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(accepted, "the new key is fetched within 10 s");

    // A flood of unknown kids fetches at most once per period.
    let before = provider.hits.load(Ordering::SeqCst);
    let stranger = EcKey::new("key-unknown-to-all");
    for _ in 0..30 {
        assert_eq!(list_orders(addr, &stranger.token()).await.0, 401);
    }
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let fetched = provider.hits.load(Ordering::SeqCst) - before;
    assert!(fetched <= 3, "30 unknown kids over ~3 s caused {fetched} fetches");

    // The provider goes away: the keys held stay in use.
    provider.task.abort();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(list_orders(addr, &b.token()).await.0, 200);
    assert_eq!(list_orders(addr, &a.token()).await.0, 200);
}

#[tokio::test]
async fn a_jwks_url_that_cannot_be_fetched_stops_start_up_naming_it() {
    let files = Files::new();
    let idp_ca = ca("Sourced test IdP CA");
    files.write("idp-ca.pem", &idp_ca.pem);
    // A port where nothing listens (bound, then closed).
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    // And an IdP whose certificate the CA file does not vouch for.
    let other = idp(&ca("Some other CA"), jwks(&[&EcKey::new("k")])).await;
    for (port, expected) in [(dead.port(), "cannot connect"), (other.addr.port(), "TLS")] {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sourced"))
            .env_clear()
            .env("LISTEN", "127.0.0.1:0")
            .env("EVENT_STORE_URL", format!("sqlite://{}", files.path(&format!("{port}.sqlite")).display()))
            .env("AUTH", "jwt")
            .env("JWT_JWKS", format!("https://localhost:{port}/jwks.json"))
            .env("JWT_JWKS_CA_FILE", cacert(&files, "idp-ca"))
            .env("JWT_JWKS_TIMEOUT_SECS", "5")
            .env("JWT_ISSUER", "https://idp.test")
            .env("JWT_AUDIENCE", "sourced")
            .output()
            .await
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("JWT_JWKS") && stderr.contains(expected), "{expected}: {stderr}");
    }
    // Plain http is refused before anything is fetched.
    let raw = sourced_server::config::RawArgs::from_pairs([
        ("AUTH", "jwt"),
        ("JWT_JWKS", "http://localhost:1/jwks.json"),
        ("JWT_ISSUER", "i"),
        ("JWT_AUDIENCE", "a"),
    ]);
    let err = sourced_server::Config::resolve(&raw).unwrap_err().to_string();
    assert!(err.contains("must be https://"), "{err}");
}
