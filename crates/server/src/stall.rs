//! A deadline on blocked writes, for responses that stream (SSE). hyper pulls a streaming body
//! only while it can write, so a client that stops reading leaves the stream idle but holds its
//! connection, task and subscription forever; nothing at the body level can notice. So the
//! listener ([`GuardedListener`]) wraps every accepted socket in a [`GuardedIo`], and a handler
//! that streams arms the connection's [`StallGuard`] (given to it as `ConnectInfo`): from then
//! on, a write that stays blocked for the timeout fails, hyper drops the connection, and the
//! stream and its subscription with it. Unarmed connections (plain requests, WebSockets, which
//! have their own timeout and close frame) are not affected.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

use crate::ws::LiveState;

/// One connection's write deadline; disarmed (0) until a streaming handler arms it.
#[derive(Clone, Debug, Default)]
pub struct StallGuard(Arc<GuardState>);

#[derive(Debug, Default)]
struct GuardState {
    timeout_ms: AtomicU64,
    /// Counts the connection in `slow_clients_closed` when the deadline passes.
    live: OnceLock<Arc<LiveState>>,
}

impl StallGuard {
    /// From now on, a write blocked for `timeout` closes the connection.
    pub fn arm(&self, timeout: Duration, live: Arc<LiveState>) {
        let _ = self.0.live.set(live);
        self.0.timeout_ms.store(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX).max(1), Ordering::Relaxed);
    }

    fn timeout(&self) -> Option<Duration> {
        match self.0.timeout_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// The listener `start` serves on: a [`TcpListener`] whose sockets are [`GuardedIo`]s.
#[derive(Debug)]
pub struct GuardedListener(pub TcpListener);

impl axum::serve::Listener for GuardedListener {
    type Io = GuardedIo;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (GuardedIo, SocketAddr) {
        let (io, addr) = axum::serve::Listener::accept(&mut self.0).await;
        // Small frames (WebSocket replies and events, SSE events) must not wait for Nagle's
        // algorithm: with it, a stream of events to a subscriber stalls for tens of ms.
        if let Err(e) = io.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        (GuardedIo { inner: io, guard: StallGuard::default(), blocked: None, tripped: false }, addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }
}

impl Connected<IncomingStream<'_, GuardedListener>> for StallGuard {
    fn connect_info(stream: IncomingStream<'_, GuardedListener>) -> Self {
        stream.io().guard.clone()
    }
}

/// A TCP stream whose writes fail once blocked longer than its armed guard allows.
#[derive(Debug)]
pub struct GuardedIo {
    inner: TcpStream,
    guard: StallGuard,
    /// Running while a write is blocked; reset by any progress.
    blocked: Option<Pin<Box<Sleep>>>,
    tripped: bool,
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
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.progressed(r, cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
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
