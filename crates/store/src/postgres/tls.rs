//! TLS to PostgreSQL, with libpq's `sslmode` values in the URL (`?sslmode=verify-full`) and
//! `sslrootcert` for the roots to trust.
//!
//! tokio-postgres knows `disable`, `prefer` and `require` only, and never looks at the server's
//! certificate itself: the connector does. So [`split_url`] takes `sslmode` and `sslrootcert`
//! off the URL, hands tokio-postgres the mode it knows, and [`connector`] builds a rustls
//! (ring) connector whose certificate check is the mode's:
//!
//! | `sslmode` | encrypted | the certificate is checked |
//! |---|---|---|
//! | `disable` | no | — |
//! | `prefer` (the default, as libpq's) | if the server offers it | no (yes with `sslrootcert`, as `verify-ca`) |
//! | `require` | yes | no (yes with `sslrootcert`, as `verify-ca`) |
//! | `verify-ca` | yes | chain to a trusted root |
//! | `verify-full` | yes | chain, and the host name (or address) the URL connects to |
//!
//! The roots are the PEM file `sslrootcert` names, or the system's (`sslrootcert=system`, and
//! the default for the `verify-*` modes). Handshake signatures are always verified; only
//! trusting the certificate's holder is the mode's choice.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::StoreError;

/// `sslmode`, libpq's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it.
    Prefer,
    /// TLS, any certificate.
    Require,
    /// TLS, a certificate chaining to a trusted root.
    VerifyCa,
    /// As `VerifyCa`, and naming the host connected to.
    VerifyFull,
}

/// What the URL asks of TLS.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSettings {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslrootcert`: a PEM file; `None` for the system's roots.
    pub root_cert: Option<PathBuf>,
}

/// Takes `sslmode` and `sslrootcert` off `url`'s query: the URL tokio-postgres gets, with the
/// mode it knows, and what the connector must do.
pub fn split_url(url: &str) -> Result<(String, TlsSettings), StoreError> {
    let mut settings = TlsSettings { mode: SslMode::Prefer, root_cert: None };
    let Some((base, query)) = url.split_once('?') else { return Ok((url.to_owned(), settings)) };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "sslmode" => {
                settings.mode = match value {
                    "disable" => SslMode::Disable,
                    "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(StoreError::invalid_request(format!(
                            "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                        )));
                    }
                }
            }
            "sslrootcert" => {
                let path = percent_decode(value)?;
                settings.root_cert = (path != "system").then(|| PathBuf::from(path));
            }
            _ => kept.push(pair),
        }
    }
    // The mode tokio-postgres knows: whether to ask for TLS, and whether it must be had.
    kept.push(match settings.mode {
        SslMode::Disable => "sslmode=disable",
        SslMode::Prefer => "sslmode=prefer",
        SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => "sslmode=require",
    });
    Ok((format!("{base}?{}", kept.join("&")), settings))
}

fn percent_decode(value: &str) -> Result<String, StoreError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = value.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
                out.push(hex.ok_or_else(|| StoreError::invalid_request("sslrootcert: a bad %-escape"))?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).map_err(|_| StoreError::invalid_request("sslrootcert: not UTF-8"))
}

/// The connector for `settings` (unused by tokio-postgres with `disable`).
pub fn connector(settings: &TlsSettings) -> Result<MakeRustlsConnect, StoreError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let check = match (settings.mode, &settings.root_cert) {
        (SslMode::Disable, _) | (SslMode::Prefer | SslMode::Require, None) => None,
        (SslMode::VerifyFull, _) => Some(true),
        _ => Some(false),
    };
    let webpki = match check {
        None => None,
        Some(_) => {
            let roots = Arc::new(roots(settings.root_cert.as_ref())?);
            let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| StoreError::invalid_request(format!("sslrootcert: {e}")))?;
            Some(verifier)
        }
    };
    let verifier = Arc::new(ModeVerifier {
        webpki,
        check_name: check == Some(true),
        algorithms: provider.signature_verification_algorithms,
    });
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::backend(format!("TLS: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(MakeRustlsConnect::new(config))
}

fn roots(file: Option<&PathBuf>) -> Result<rustls::RootCertStore, StoreError> {
    let mut store = rustls::RootCertStore::empty();
    match file {
        Some(path) => {
            let bad = |why: String| StoreError::invalid_request(format!("sslrootcert={}: {why}", path.display()));
            let pem = std::fs::read(path).map_err(|e| bad(format!("cannot read the file: {e}")))?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                store.add(cert.map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
            }
            if store.is_empty() {
                return Err(bad("holds no CERTIFICATE".into()));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = store.add(cert);
            }
            if store.is_empty() {
                return Err(StoreError::invalid_request(
                    "the system has no CA certificates to verify the server with: give sslrootcert=FILE",
                ));
            }
        }
    }
    Ok(store)
}

/// The certificate check of a mode: none, the chain, or the chain and the name.
#[derive(Debug)]
struct ModeVerifier {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    check_name: bool,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for ModeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = &self.webpki else { return Ok(ServerCertVerified::assertion()) };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            // webpki checks the name after the chain: this error means the chain is good.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_and_sslrootcert_are_taken_off_the_url() {
        let cases = [
            ("postgres://u@h/db", "postgres://u@h/db", SslMode::Prefer, None),
            ("postgres://u@h/db?sslmode=disable", "postgres://u@h/db?sslmode=disable", SslMode::Disable, None),
            (
                "postgres://u@h/db?options=-csearch_path%3Dx&sslmode=verify-full&sslrootcert=%2Ftmp%2Fca%20one.pem",
                "postgres://u@h/db?options=-csearch_path%3Dx&sslmode=require",
                SslMode::VerifyFull,
                Some("/tmp/ca one.pem"),
            ),
            (
                "postgres://u@h/db?sslmode=verify-ca&sslrootcert=system",
                "postgres://u@h/db?sslmode=require",
                SslMode::VerifyCa,
                None,
            ),
            (
                "postgres://u@h/db?sslrootcert=/ca.pem",
                "postgres://u@h/db?sslmode=prefer",
                SslMode::Prefer,
                Some("/ca.pem"),
            ),
        ];
        for (url, passed, mode, root) in cases {
            let (got, settings) = split_url(url).unwrap();
            assert_eq!(got, passed, "{url}");
            assert_eq!(settings.mode, mode, "{url}");
            assert_eq!(settings.root_cert.as_deref(), root.map(std::path::Path::new), "{url}");
        }
        let err = split_url("postgres://u@h/db?sslmode=allow-everything").unwrap_err().to_string();
        assert!(err.contains("sslmode=allow-everything is not one of"), "{err}");
    }
}
