//! A small HTTP/1.1 keep-alive client for Sourced, used by integration tests and the benchmark.
//!
//! One [`Client`] owns one TCP connection (hyper's low-level `http1` connection, no pool).
//! Requests on it run one at a time (`&mut self`), each bounded by a timeout that covers
//! connecting, sending and reading the whole response body.
//!
//! Reconnecting: when the server has closed the connection (an idle keep-alive timeout, a
//! restart), the next request opens a new one, once. A request is re-sent on the new
//! connection only when that is safe: hyper handed it back unsent, or the method is
//! idempotent (`GET`, `HEAD`, `PUT`, `DELETE`, `OPTIONS`) and the connection broke before an
//! answer. A `POST` or `PATCH` that may have reached the server is never
//! sent twice; the caller gets the error and decides.

#![warn(missing_docs)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HOST, HeaderName, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// How long one request may take, connecting included, unless [`Client::with_timeout`] says
/// otherwise.
pub const TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);

/// The largest response body the client reads; a larger one is an error, not a buffer that
/// grows without limit.
pub const RESPONSE_BODY_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Why a request failed. HTTP error statuses (4xx, 5xx) are not errors: they come back as a
/// [`Response`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The TCP connection could not be opened.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The server's address.
        addr: SocketAddr,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The request (connecting, sending, reading the body) took longer than the timeout.
    /// The connection is dropped; the next request opens a new one.
    #[error("request timed out after {} ms", .timeout.as_millis())]
    Timeout {
        /// The timeout that was exceeded.
        timeout: Duration,
    },
    /// The method, path or a header is not valid HTTP.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The HTTP exchange failed (the connection broke, the response was malformed).
    #[error("HTTP error: {0}")]
    Http(#[from] hyper::Error),
    /// The response body is larger than [`RESPONSE_BODY_BYTES_MAX`].
    #[error("response body larger than {RESPONSE_BODY_BYTES_MAX} bytes")]
    BodyTooLarge,
    /// A body could not be encoded to, or decoded from, JSON.
    #[error("JSON error: {0}")]
    Json(#[from] serde_json::Error),
}

/// A complete response: status, headers and the whole body.
#[derive(Clone, Debug)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers in the order received, names in lower case; a repeated header appears
    /// once per value.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl Response {
    /// The first value of a header (`name` is matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.as_str())
    }

    /// The body as JSON. Lenient on purpose, for tests that assert on the value: an empty
    /// body, or one that is not JSON, gives `Value::Null` (never a panic). Use
    /// [`Response::try_json`] to tell those cases apart.
    pub fn json(&self) -> serde_json::Value {
        self.try_json().unwrap_or(serde_json::Value::Null)
    }

    /// The body as JSON: `Value::Null` for an empty body, an error when it is not JSON.
    pub fn try_json(&self) -> Result<serde_json::Value, ClientError> {
        if self.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        Ok(serde_json::from_slice(&self.body)?)
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// An open connection to a server and what is needed to open it again.
#[derive(Debug)]
struct Connection {
    sender: SendRequest<Full<Bytes>>,
    /// Drives the connection; aborted when the connection is replaced or the client dropped.
    driver: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// An HTTP/1.1 client over one keep-alive connection (see the crate docs for reconnects).
#[derive(Debug)]
pub struct Client {
    addr: SocketAddr,
    /// The `host` header sent with every request that does not set its own.
    host: HeaderValue,
    timeout: Duration,
    connection: Option<Connection>,
}

impl Client {
    /// Opens a connection to `addr` (bounded by [`TIMEOUT_DEFAULT`]).
    pub async fn connect(addr: SocketAddr) -> Result<Client, ClientError> {
        let host = HeaderValue::from_str(&addr.to_string())
            .map_err(|error| ClientError::InvalidRequest(format!("host header: {error}")))?;
        let mut client = Client { addr, host, timeout: TIMEOUT_DEFAULT, connection: None };
        let timeout = client.timeout;
        let connection =
            tokio::time::timeout(timeout, open(addr)).await.map_err(|_| ClientError::Timeout { timeout })??;
        client.connection = Some(connection);
        Ok(client)
    }

    /// Sets the timeout of every later request (connecting, sending and reading the body).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The timeout of each request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sends one request and reads the whole response. `headers` are sent as given, after a
    /// `host` header unless they contain one; `body` goes with a `content-length`.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, ClientError> {
        let request = RequestParts::new(method, path, headers, body, &self.host)?;
        let timeout = self.timeout;
        match tokio::time::timeout(timeout, self.exchange(&request)).await {
            Ok(result) => result,
            Err(_elapsed) => {
                // The request may be half-sent: the connection is in an unknown state.
                self.connection = None;
                Err(ClientError::Timeout { timeout })
            }
        }
    }

    /// `GET path`.
    pub async fn get(&mut self, path: &str) -> Result<Response, ClientError> {
        self.request("GET", path, &[], None).await
    }

    /// Sends `body` as JSON, with `content-type: application/json` unless `headers` set a
    /// content type (e.g. `application/json-patch+json`).
    pub async fn send_json(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &serde_json::Value,
    ) -> Result<Response, ClientError> {
        let bytes = serde_json::to_vec(body)?;
        if headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("content-type")) {
            return self.request(method, path, headers, Some(&bytes)).await;
        }
        let mut all = Vec::with_capacity(headers.len() + 1);
        all.push(("content-type", "application/json"));
        all.extend_from_slice(headers);
        self.request(method, path, &all, Some(&bytes)).await
    }

    /// Sends on the current connection, reconnecting once if the server closed it.
    async fn exchange(&mut self, request: &RequestParts) -> Result<Response, ClientError> {
        let mut reconnected = false;
        let open_and_ready = match &mut self.connection {
            Some(connection) => connection.sender.ready().await.is_ok(),
            None => false,
        };
        if !open_and_ready {
            self.connection = None;
            self.connection = Some(open(self.addr).await?);
            reconnected = true;
        }
        // At most two attempts: the second only on a fresh connection.
        loop {
            let Some(connection) = self.connection.as_mut() else {
                unreachable!("a connection is opened before every attempt");
            };
            match connection.sender.try_send_request(request.build()).await {
                Ok(response) => return read_response(response).await,
                Err(error) => {
                    let unsent = error.message().is_some();
                    let error = error.into_error();
                    self.connection = None;
                    let broken = !error.is_parse() && !error.is_user();
                    let retry_safe = unsent || (broken && request.idempotent());
                    if reconnected || !retry_safe {
                        return Err(ClientError::Http(error));
                    }
                    self.connection = Some(open(self.addr).await?);
                    reconnected = true;
                }
            }
        }
    }
}

/// Opens a TCP connection and runs the HTTP/1 handshake on it.
async fn open(addr: SocketAddr) -> Result<Connection, ClientError> {
    let stream = TcpStream::connect(addr).await.map_err(|source| ClientError::Connect { addr, source })?;
    // Requests are small and latency matters more than packet count.
    stream.set_nodelay(true).map_err(|source| ClientError::Connect { addr, source })?;
    let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
    let driver = tokio::spawn(async move {
        // The error, if any, reaches the caller through the pending request.
        let _ = connection.await;
    });
    Ok(Connection { sender, driver })
}

/// Reads the whole body of a response, bounded by [`RESPONSE_BODY_BYTES_MAX`].
async fn read_response(response: hyper::Response<hyper::body::Incoming>) -> Result<Response, ClientError> {
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, RESPONSE_BODY_BYTES_MAX).collect().await.map_err(|error| {
        match error.downcast::<hyper::Error>() {
            Ok(error) => ClientError::Http(*error),
            Err(_too_large) => ClientError::BodyTooLarge,
        }
    })?;
    let headers = parts
        .headers
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), String::from_utf8_lossy(value.as_bytes()).into_owned()))
        .collect();
    Ok(Response { status: parts.status.as_u16(), headers, body: body.to_bytes() })
}

/// A validated request that can be built again for a retry (the body is shared, not copied).
struct RequestParts {
    method: Method,
    path: hyper::Uri,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
}

impl RequestParts {
    fn new(
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        host: &HeaderValue,
    ) -> Result<RequestParts, ClientError> {
        let invalid =
            |what: &str, error: &dyn std::fmt::Display| ClientError::InvalidRequest(format!("{what}: {error}"));
        let method = Method::from_bytes(method.as_bytes()).map_err(|error| invalid("method", &error))?;
        if !path.starts_with('/') {
            return Err(ClientError::InvalidRequest(format!("path must start with '/': {path:?}")));
        }
        let path = path.parse::<hyper::Uri>().map_err(|error| invalid("path", &error))?;
        let mut parsed = Vec::with_capacity(headers.len() + 1);
        if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
            parsed.push((HOST, host.clone()));
        }
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|error| invalid("header name", &error))?;
            let value = HeaderValue::from_str(value).map_err(|error| invalid("header value", &error))?;
            parsed.push((name, value));
        }
        let body = body.map(Bytes::copy_from_slice).unwrap_or_default();
        Ok(RequestParts { method, path, headers: parsed, body })
    }

    fn idempotent(&self) -> bool {
        matches!(self.method, Method::GET | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS)
    }

    fn build(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.path.clone();
        let headers = request.headers_mut();
        for (name, value) in &self.headers {
            headers.append(name.clone(), value.clone());
        }
        request
    }
}

#[cfg(test)]
mod tests;
