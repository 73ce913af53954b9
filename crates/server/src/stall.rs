//! Deadlines on sockets, enforced below HTTP.
//!
//! Writes: a deadline on blocked writes, for responses that stream (SSE). hyper pulls a
//! streaming body only while it can write, so a client that stops reading leaves the stream
//! idle but holds its connection, task and subscription forever; nothing at the body level can
//! notice. So the listener ([`GuardedListener`]) wraps every accepted socket in a [`GuardedIo`],
//! and a handler that streams arms the connection's [`StallGuard`] (given to it as
//! `ConnectInfo`): from then on, a write that stays blocked for the timeout fails, hyper drops
//! the connection, and the stream and its subscription with it. Unarmed connections (plain
//! requests, WebSockets, which have their own timeout and close frame) are not affected.
//!
//! Reads: while no request is in flight on a connection ([`track_requests`] counts them, from
//! the parsed head until the response body is dropped), a socket that sends nothing for
//! `IDLE_TIMEOUT_MS` (a new one, or one kept alive) fails its read, and so does one whose next
//! request head is not complete `HEADER_READ_TIMEOUT_MS` after its first byte; hyper then
//! closes it. Bodies have their own deadline where they are read (`http::read_body`, 408). A
//! connection whose response was 101 (a WebSocket) is never timed here again.
//!
//! hyper answers a request it cannot parse by itself, with a bare 400 (431, 414) and no body;
//! [`GuardedIo`] writes that status as a problem instead (`replace_bare_error`).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Sleep;

use crate::state::LiveState;

/// One connection's write deadline; disarmed (0) until a streaming handler arms it.
#[derive(Clone, Debug, Default)]
pub struct StallGuard(Arc<GuardState>);

#[derive(Debug, Default)]
struct GuardState {
    timeout_ms: AtomicU64,
    /// Counts the connection in `slow_clients_closed` when the deadline passes.
    live: OnceLock<Arc<LiveState>>,
    /// Requests in flight: from the parsed head until the response body is dropped.
    in_flight: AtomicUsize,
    /// Requests handed to the service so far (each answers with one response head).
    requests: AtomicU64,
    /// Bumped each time the connection becomes idle, so the reader arms a fresh deadline.
    idle_epoch: AtomicU64,
    /// The response was 101: the socket belongs to a WebSocket now.
    upgraded: AtomicBool,
    /// The task last parked reading, woken when the connection becomes idle so it arms its
    /// deadline.
    reader: Mutex<Option<Waker>>,
    /// The client's address (rate limits of callers without a principal).
    peer: OnceLock<SocketAddr>,
}

impl StallGuard {
    /// The client's address.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.0.peer.get().copied()
    }

    /// From now on, a write blocked for `timeout` closes the connection.
    pub fn arm(&self, timeout: Duration, live: Arc<LiveState>) {
        let _ = self.0.live.set(live);
        self.0.timeout_ms.store(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1), Ordering::Relaxed);
    }

    fn request_started(&self) {
        self.0.in_flight.fetch_add(1, Ordering::SeqCst);
        self.0.requests.fetch_add(1, Ordering::SeqCst);
    }

    fn request_finished(&self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle_epoch.fetch_add(1, Ordering::SeqCst);
            if let Some(w) = self.0.reader.lock().ok().and_then(|mut w| w.take()) {
                w.wake();
            }
        }
    }

    fn timeout(&self) -> Option<Duration> {
        match self.0.timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// How long a connection may keep the server waiting for a request (see the module docs).
#[derive(Clone, Copy, Debug)]
pub struct ReadTimeouts {
    /// A connection with no request in flight that sends nothing.
    pub idle: Duration,
    /// A request head, from its first byte.
    pub header: Duration,
}

/// The listener `start` serves on: accepted sockets (plain, or TLS once their handshake is
/// done, `tls.rs`) wrapped in [`GuardedIo`]s.
#[derive(Debug)]
pub struct GuardedListener {
    incoming: Incoming,
    timeouts: ReadTimeouts,
    local: SocketAddr,
}

#[derive(Debug)]
enum Incoming {
    Plain(TcpListener),
    Tls(crate::tls::Handshaken),
}

impl GuardedListener {
    /// Plain HTTP on `listener`.
    pub fn plain(listener: TcpListener, timeouts: ReadTimeouts) -> io::Result<GuardedListener> {
        Ok(GuardedListener { local: listener.local_addr()?, incoming: Incoming::Plain(listener), timeouts })
    }

    /// HTTPS on `listener`: each handshake within the header-read timeout.
    pub fn tls(
        listener: TcpListener,
        timeouts: ReadTimeouts,
        certs: Arc<crate::tls::Certificates>,
    ) -> io::Result<GuardedListener> {
        let local = listener.local_addr()?;
        let handshaken = crate::tls::spawn_acceptor(listener, certs, timeouts.header);
        Ok(GuardedListener { local, incoming: Incoming::Tls(handshaken), timeouts })
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GuardedIo, SocketAddr) {
        let (io, addr) = match &mut self.incoming {
            Incoming::Plain(listener) => {
                let (io, addr) = axum::serve::Listener::accept(listener).await;
                // Small frames (WebSocket replies and events, SSE events) must not wait for
                // Nagle's algorithm: with it, a stream of events to a subscriber stalls for
                // tens of ms. (The TLS acceptor sets it before its handshake.)
                if let Err(e) = io.set_nodelay(true) {
                    tracing::debug!(error = %e, "cannot set TCP_NODELAY");
                }
                (crate::tls::Transport::Plain(io), addr)
            }
            Incoming::Tls(handshaken) => match handshaken.recv().await {
                Some(done) => done,
                // The acceptor ends only once this listener is dropped.
                None => std::future::pending().await,
            },
        };
        let io = GuardedIo {
            inner: io,
            guard: StallGuard::default(),
            blocked: None,
            tripped: false,
            timeouts: self.timeouts,
            read_deadline: None,
            armed_epoch: 0,
            in_head: false,
            replacement: None,
            heads: 0,
            head_pending: false,
            writes: 0,
            armed_writes: 0,
        };
        (io, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }
}

impl Connected<IncomingStream<'_, GuardedListener>> for StallGuard {
    fn connect_info(stream: IncomingStream<'_, GuardedListener>) -> Self {
        let guard = stream.io().guard.clone();
        let _ = guard.0.peer.set(*stream.remote_addr());
        guard
    }
}

/// A connection (TCP, or TLS over it) whose writes fail once blocked longer than its armed guard allows.
#[derive(Debug)]
pub struct GuardedIo {
    inner: crate::tls::Transport,
    guard: StallGuard,
    /// Running while a write is blocked; reset by any progress.
    blocked: Option<Pin<Box<Sleep>>>,
    tripped: bool,
    timeouts: ReadTimeouts,
    /// While no request is in flight: when the read fails (idle, or the head's deadline).
    read_deadline: Option<Pin<Box<Sleep>>>,
    /// The idle period `read_deadline` was armed for.
    armed_epoch: u64,
    /// Bytes of a request head have arrived in this idle period.
    in_head: bool,
    /// A problem response written in place of hyper's own bare response to an unparsable
    /// request, and how much of it is written.
    replacement: Option<(Vec<u8>, usize)>,
    /// Final response heads written for requests the service answered, and whether the write
    /// under way starts one.
    heads: u64,
    head_pending: bool,
    /// Writes that made progress, and how many there were when `read_deadline` was armed: a
    /// connection still taking a response is not idle.
    writes: u64,
    armed_writes: u64,
}

impl GuardedIo {
    /// After the inner write returned `Pending`: still pending, or the deadline's error.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let Some(timeout) = self.guard.timeout() else {
            self.blocked = None;
            return Poll::Pending;
        };
        let sleep = self.blocked.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(()) => {
                if !self.tripped {
                    self.tripped = true;
                    if let Some(live) = self.guard.0.live.get() {
                        live.slow_clients_closed.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(
                        timeout_ms = timeout.as_millis() as u64,
                        "closing a streaming client that stopped reading"
                    );
                }
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the client read nothing for {} ms", timeout.as_millis()),
                )))
            }
        }
    }

    /// hyper answers a request it cannot parse (a bad request line or header, a head or URI too
    /// large) by itself, with a bare 400/431/414 and no body, before any service sees it. A
    /// response head (a write that starts with `HTTP/1.1 `; bodies here never do) beyond one per
    /// request the service was given is such an answer: it is replaced by the same status as a
    /// problem (and hyper's bytes are taken as written). `None`: not one.
    fn replace_bare_error(
        &mut self,
        first: &[u8],
        total: usize,
        cx: &mut Context<'_>,
    ) -> Option<Poll<io::Result<usize>>> {
        if self.replacement.is_none() {
            let state = &self.guard.0;
            if state.upgraded.load(Ordering::SeqCst) || !first.starts_with(b"HTTP/1.1 ") {
                return None;
            }
            // 1xx heads (100 Continue) are interim: the final head follows.
            if first.get(9) == Some(&b'1') {
                return None;
            }
            if self.heads < state.requests.load(Ordering::SeqCst) {
                // Counted once it is written (a write that is pending comes again).
                self.head_pending = true;
                return None;
            }
            if first.get(9) != Some(&b'4') {
                return None;
            }
            let status = first
                .get(9..12)
                .and_then(|code| std::str::from_utf8(code).ok())
                .and_then(|code| code.parse::<u16>().ok())
                .and_then(|code| axum::http::StatusCode::from_u16(code).ok())?;
            self.replacement = Some((bare_error_problem(status), 0));
        }
        let (bytes, written) = self.replacement.as_mut().expect("set above");
        while *written < bytes.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Some(Poll::Ready(Err(io::ErrorKind::WriteZero.into()))),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Some(Poll::Ready(Err(e))),
                Poll::Pending => return Some(Poll::Pending),
            }
        }
        Some(Poll::Ready(Ok(total)))
    }

    /// After a write: bytes that went out count as activity (see `poll_read`); a response head
    /// that went out counts against the requests the service was given.
    fn wrote(&mut self, n: usize) {
        if n > 0 {
            self.writes += 1;
            if std::mem::take(&mut self.head_pending) {
                self.heads += 1;
            }
        }
    }

    fn progressed<T>(&mut self, r: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match r {
            Poll::Pending => self.stalled(cx),
            ready => {
                self.blocked = None;
                ready
            }
        }
    }
}

impl AsyncRead for GuardedIo {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        let state = &this.guard.0;
        if state.upgraded.load(Ordering::SeqCst) {
            this.read_deadline = None;
            return r;
        }
        if state.in_flight.load(Ordering::SeqCst) > 0 {
            if r.is_pending()
                && let Ok(mut w) = state.reader.lock()
            {
                *w = Some(cx.waker().clone());
            }
            return r;
        }
        let epoch = state.idle_epoch.load(Ordering::SeqCst);
        if this.read_deadline.is_none() || this.armed_epoch != epoch {
            this.armed_epoch = epoch;
            this.in_head = false;
            this.armed_writes = this.writes;
            this.read_deadline = Some(Box::pin(tokio::time::sleep(this.timeouts.idle)));
        }
        match &r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                if !this.in_head {
                    this.in_head = true;
                    this.read_deadline = Some(Box::pin(tokio::time::sleep(this.timeouts.header)));
                }
                return r;
            }
            Poll::Ready(_) => return r,
            Poll::Pending => {}
        }
        if let Ok(mut w) = state.reader.lock() {
            *w = Some(cx.waker().clone());
        }
        let deadline = this.read_deadline.as_mut().expect("armed above");
        match deadline.as_mut().poll(cx) {
            Poll::Pending => Poll::Pending,
            // Not idle: the client took some of a response since. The wait starts again.
            Poll::Ready(()) if !this.in_head && this.writes != this.armed_writes => {
                this.armed_writes = this.writes;
                let again = this.read_deadline.insert(Box::pin(tokio::time::sleep(this.timeouts.idle)));
                let _ = again.as_mut().poll(cx);
                Poll::Pending
            }
            Poll::Ready(()) => {
                let (what, after) = if this.in_head {
                    ("the request head is incomplete", this.timeouts.header)
                } else {
                    ("the connection sent nothing", this.timeouts.idle)
                };
                tracing::debug!(timeout_ms = after.as_millis() as u64, "closing a connection: {what}");
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{what} after {} ms", after.as_millis()),
                )))
            }
        }
    }
}

/// The whole response, as a problem, that replaces hyper's bare one of this status.
fn bare_error_problem(status: axum::http::StatusCode) -> Vec<u8> {
    let body = crate::problem::Problem::unparsable_request(status).body().to_string();
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    [head.into_bytes(), body.into_bytes()].concat()
}

/// Middleware: counts the requests in flight on their connection (so its read deadlines wait
/// while the server works), and marks a connection upgraded (101) so they never apply again.
/// Requests without a [`StallGuard`] (driven in process) pass through.
pub async fn track_requests(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    let Some(guard) = req.extensions().get::<ConnectInfo<StallGuard>>().map(|c| c.0.clone()) else {
        return next.run(req).await;
    };
    guard.request_started();
    let finished = InFlight(guard.clone());
    let res = next.run(req).await;
    if res.status() == axum::http::StatusCode::SWITCHING_PROTOCOLS {
        guard.0.upgraded.store(true, Ordering::SeqCst);
    }
    // The request is in flight until hyper has taken (or dropped) the whole body.
    res.map(|body| axum::body::Body::new(TrackedBody { inner: body, _in_flight: finished }))
}

/// A response body that ends its request's time in flight when dropped; otherwise the body
/// itself (its size hint too, so a known length stays a Content-Length).
struct TrackedBody {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Ends a request's time in flight when dropped.
struct InFlight(StallGuard);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.request_finished();
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if let Some(r) = this.replace_bare_error(buf, buf.len(), cx) {
            return r;
        }
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.wrote(n);
        }
        this.progressed(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &b[..]);
        let total = bufs.iter().map(|b| b.len()).sum();
        if let Some(r) = this.replace_bare_error(first, total, cx) {
            return r;
        }
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.wrote(n);
        }
        this.progressed(r, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.progressed(r, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
