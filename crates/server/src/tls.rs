//! HTTPS and WSS (SPEC §8): the certificate chain and key of `TLS_CERT` and `TLS_KEY` (PEM),
//! served with rustls (ring), read again on `SIGHUP`.
//!
//! The handshake happens before HTTP, in a task of its own per connection
//! ([`spawn_acceptor`]), so a slow client never holds up the accept loop; it is bounded by
//! the header-read timeout and by [`TLS_HANDSHAKES_MAX`] at once. A finished handshake hands
//! a [`Transport`] to the listener of `stall.rs`, which then sees plain HTTP bytes, so its
//! deadlines and replacement problems work the same on both.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

pub use crate::limits::{TLS_ACCEPTED_QUEUE_MAX, TLS_CHAIN_CERTS_MAX, TLS_HANDSHAKES_MAX};

/// Why a certificate or key cannot be served; names the setting and the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read or holds no usable PEM item.
    #[error("{setting}={}: {why}", path.display())]
    File {
        /// `TLS_CERT` or `TLS_KEY`.
        setting: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// rustls refuses the pair (a key that does not fit the certificate, an unsupported key).
    #[error("TLS_CERT={} and TLS_KEY={}: {why}", cert.display(), key.display())]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls' reason.
        why: String,
    },
}

/// The files a certificate is read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM: the server's certificate first, then its chain.
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The certificate being served; [`Certificates::reload`] swaps in a new one.
pub struct Certificates {
    files: TlsFiles,
    current: RwLock<Arc<ServerConfig>>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certificates").field("files", &self.files).finish_non_exhaustive()
    }
}

impl Certificates {
    /// Reads the pair now: a deployment with a broken certificate does not start.
    pub fn load(files: TlsFiles) -> Result<Certificates, TlsError> {
        let config = server_config(&files)?;
        Ok(Certificates { files, current: RwLock::new(Arc::new(config)) })
    }

    /// Reads the files again; on success new connections get the new certificate (open ones
    /// keep theirs), on failure the one being served stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = Arc::new(server_config(&self.files)?);
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = config;
        Ok(())
    }

    /// The files it reads.
    pub fn files(&self) -> &TlsFiles {
        &self.files
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.current.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn file_error(setting: &'static str, path: &Path, why: impl std::fmt::Display) -> TlsError {
    TlsError::File { setting, path: path.to_owned(), why: why.to_string() }
}

fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let cert_pem = std::fs::read(&files.cert)
        .map_err(|e| file_error("TLS_CERT", &files.cert, format!("cannot read the file: {e}")))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .take(TLS_CHAIN_CERTS_MAX + 1)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error("TLS_CERT", &files.cert, format!("not a PEM certificate chain: {e}")))?;
    if chain.is_empty() {
        return Err(file_error("TLS_CERT", &files.cert, "holds no CERTIFICATE"));
    }
    if chain.len() > TLS_CHAIN_CERTS_MAX {
        return Err(file_error("TLS_CERT", &files.cert, format!("a chain holds at most {TLS_CHAIN_CERTS_MAX}")));
    }
    let key_pem = std::fs::read(&files.key)
        .map_err(|e| file_error("TLS_KEY", &files.key, format!("cannot read the file: {e}")))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| file_error("TLS_KEY", &files.key, format!("holds no PEM private key: {e}")))?;
    let pair = |why: String| TlsError::Pair { cert: files.cert.clone(), key: files.key.clone(), why };
    let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| pair(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| pair(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// A connection's byte stream below HTTP: plain TCP, or TLS over it.
#[derive(Debug)]
pub enum Transport {
    /// `http://`, `ws://`.
    Plain(TcpStream),
    /// `https://`, `wss://`, after the handshake.
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Transport {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Transport {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Transport::Plain(s) => s.is_write_vectored(),
            Transport::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connections whose handshake is done, in the order they finished.
pub(crate) type Handshaken = mpsc::Receiver<(Transport, SocketAddr)>;

/// Accepts on `listener` and runs each handshake in its own task (at most
/// [`TLS_HANDSHAKES_MAX`] at once, each within `timeout`); the finished ones come out of the
/// receiver. The task ends when the receiver is dropped (the server stops).
pub(crate) fn spawn_acceptor(listener: TcpListener, certs: Arc<Certificates>, timeout: Duration) -> Handshaken {
    let (tx, rx) = mpsc::channel(TLS_ACCEPTED_QUEUE_MAX);
    let permits = Arc::new(Semaphore::new(TLS_HANDSHAKES_MAX));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = tx.closed() => return,
                p = permits.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let (tcp, addr) = tokio::select! {
                _ = tx.closed() => return,
                r = listener.accept() => match r {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        accept_failed(&e).await;
                        continue;
                    }
                },
            };
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "cannot set TCP_NODELAY");
            }
            let acceptor = certs.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                let done = tokio::time::timeout(timeout, acceptor.accept(tcp)).await;
                drop(permit);
                match done {
                    Ok(Ok(tls)) => {
                        let _ = tx.send((Transport::Tls(Box::new(tls)), addr)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(peer = %addr, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                }
            });
        }
    });
    rx
}

/// As axum's own accept loop does: errors of one connection are skipped, others (out of file
/// descriptors) wait a second before the next try.
async fn accept_failed(e: &io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accept failed; trying again in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
