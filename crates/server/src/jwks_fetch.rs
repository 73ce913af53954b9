//! `JWT_JWKS=https://…` (SPEC §8.1): the verification keys fetched from the identity
//! provider, with a timeout, kept, and fetched again aside from requests.
//!
//! [`RemoteJwks`] is a [`KeySource`]: it answers from the keys it has and never blocks a
//! request. A token naming a `kid` it does not know is refused (`key-unknown`) and wakes the
//! refresher, which fetches again at most once per `JWT_JWKS_UNKNOWN_KID_SECS` (a minute); the keys are
//! also fetched every `JWT_JWKS_REFRESH_SECS`. A failed fetch keeps the keys it has. The first
//! fetch happens at start ([`RemoteJwks::start`]) and a failure stops start-up, like a broken
//! JWKS file.
//!
//! The client is hyper's HTTP/1.1 over rustls (ring), trusting `JWT_JWKS_CA_FILE` when given,
//! else the system's roots; only `https` URLs are accepted, redirects are not followed, and the
//! body is read up to [`JWKS_BYTES_MAX`].

use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use sourced_auth::StaticKeys;
use sourced_auth::jwks::{JwtKey, KeySource};
use tokio::sync::Notify;

pub use crate::limits::JWKS_BYTES_MAX;

/// Keys fetched from an https URL.
pub struct RemoteJwks {
    url: Uri,
    host: String,
    port: u16,
    tls: Arc<ClientConfig>,
    timeout: Duration,
    refresh_every: Duration,
    unknown_kid_every: Duration,
    keys: RwLock<Option<Arc<StaticKeys>>>,
    last_fetch: Mutex<Option<Instant>>,
    wake: Notify,
}

impl std::fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJwks").field("url", &self.url).finish_non_exhaustive()
    }
}

/// How a [`RemoteJwks`] fetches.
#[derive(Clone, Debug)]
pub struct FetchSettings {
    /// The whole fetch: connect, handshake, response.
    pub timeout: Duration,
    /// Between two scheduled fetches.
    pub refresh_every: Duration,
    /// Shortest time between two fetches caused by unknown kids.
    pub unknown_kid_every: Duration,
    /// PEM roots to trust instead of the system's.
    pub ca_file: Option<std::path::PathBuf>,
}

impl RemoteJwks {
    /// Checks the URL and reads the roots; fetches nothing yet.
    pub fn new(url: &str, settings: &FetchSettings) -> Result<RemoteJwks, String> {
        let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        if uri.scheme_str() != Some("https") {
            return Err("a JWKS URL must be https:// (keys over plain HTTP could be replaced on the way)".into());
        }
        let host = uri.host().ok_or("the URL names no host")?.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let roots = roots(settings.ca_file.as_deref())?;
        let tls = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(RemoteJwks {
            url: uri,
            host,
            port,
            tls: Arc::new(tls),
            timeout: settings.timeout,
            refresh_every: settings.refresh_every,
            unknown_kid_every: settings.unknown_kid_every,
            keys: RwLock::new(None),
            last_fetch: Mutex::new(None),
            wake: Notify::new(),
        })
    }

    /// Fetches the keys once (an error stops start-up), then keeps them fresh in a task of
    /// its own for as long as the source lives.
    pub async fn start(self: &Arc<Self>) -> Result<(), String> {
        self.refresh().await?;
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(this) = weak.upgrade() else { return };
                let every = this.refresh_every;
                let woken = tokio::select! {
                    _ = tokio::time::sleep(every) => false,
                    _ = this.wake.notified() => true,
                };
                if woken {
                    // At most one fetch per period for unknown kids, however many arrive.
                    let since = this.since_last_fetch();
                    if since < this.unknown_kid_every {
                        tokio::time::sleep(this.unknown_kid_every - since).await;
                    }
                }
                match this.refresh().await {
                    Ok(()) => tracing::info!(url = %this.url, "JWT_JWKS fetched again"),
                    Err(e) => {
                        tracing::warn!(url = %this.url, error = %e, "JWT_JWKS fetch failed; keeping the keys held")
                    }
                }
            }
        });
        Ok(())
    }

    /// The URL it fetches.
    pub fn url(&self) -> String {
        self.url.to_string()
    }

    fn since_last_fetch(&self) -> Duration {
        let last = *self.last_fetch.lock().unwrap_or_else(|e| e.into_inner());
        last.map_or(Duration::MAX, |t| t.elapsed())
    }

    /// Fetches and swaps in the keys; on failure the held ones stay.
    pub async fn refresh(&self) -> Result<(), String> {
        *self.last_fetch.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        let text = tokio::time::timeout(self.timeout, self.fetch())
            .await
            .map_err(|_| format!("no answer within {} s", self.timeout.as_secs_f64()))??;
        let keys = StaticKeys::from_jwks(&text)?;
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(keys));
        Ok(())
    }

    async fn fetch(&self) -> Result<String, String> {
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
        let name = ServerName::try_from(self.host.clone()).map_err(|e| format!("host {:?}: {e}", self.host))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("HTTP: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let path = self.url.path_and_query().map_or("/", |p| p.as_str());
        let authority = self.url.authority().map_or(self.host.as_str(), |a| a.as_str());
        let req = Request::get(path)
            .header("host", authority)
            .header("accept", "application/json, application/jwk-set+json")
            .header("user-agent", concat!("sourced/", env!("CARGO_PKG_VERSION")))
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let res = send.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
        if res.status() != StatusCode::OK {
            return Err(format!("answered {} (expected 200; redirects are not followed)", res.status()));
        }
        let body = Limited::new(res.into_body(), JWKS_BYTES_MAX)
            .collect()
            .await
            .map_err(|e| format!("reading the body (at most {JWKS_BYTES_MAX} bytes): {e}"))?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| "the body is not UTF-8".to_owned())
    }
}

impl KeySource for RemoteJwks {
    fn key(&self, kid: Option<&str>) -> Option<Arc<JwtKey>> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()?;
        let found = keys.key(kid);
        if found.is_none() && kid.is_some() {
            self.wake.notify_one();
        }
        found
    }
}

fn roots(ca_file: Option<&std::path::Path>) -> Result<rustls::RootCertStore, String> {
    let mut store = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("JWT_JWKS_CA_FILE {}: {e}", path.display()))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("JWT_JWKS_CA_FILE {}: {e}", path.display()))?;
                store.add(cert).map_err(|e| format!("JWT_JWKS_CA_FILE {}: {e}", path.display()))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = store.add(cert);
            }
        }
    }
    if store.is_empty() {
        return Err("no CA certificate to trust: give JWT_JWKS_CA_FILE, or install the system's roots".into());
    }
    Ok(store)
}
