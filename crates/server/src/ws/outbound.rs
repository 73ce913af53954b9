//! The outbound queue and the writer that drains it, with the event linger (`EVENT_LINGER`).

use super::*;

/// A message for the writer, or a subscription's run of event frames taken at one wake.
#[derive(Debug)]
pub(super) struct Outbound {
    pub(super) message: Message,
    /// Further frames that go out right after `message` (per-event frames of one wake; empty
    /// otherwise, without allocating). One queue slot holds them all, so a subscription costs
    /// the queue and the writer one hand-over per wake, whatever its framing.
    pub(super) more: Vec<Message>,
    /// A subscription's event (or caught-up marker): may wait [`EVENT_LINGER`] for company.
    pub(super) event: bool,
}

impl Outbound {
    pub(super) fn reply(message: Message) -> Outbound {
        Outbound { message, more: Vec::new(), event: false }
    }

    pub(super) fn event(message: Message) -> Outbound {
        Outbound { message, more: Vec::new(), event: true }
    }

    /// Feeds every message to `sink`; returns how many.
    pub(super) async fn feed<S>(self, sink: &mut S) -> Result<usize, S::Error>
    where
        S: Sink<Message> + Unpin,
    {
        let n = 1 + self.more.len();
        sink.feed(self.message).await?;
        for m in self.more {
            sink.feed(m).await?;
        }
        Ok(n)
    }
}

/// The writer: takes queued messages and writes them, flushing when the queue is empty or
/// after [`WRITE_BATCH_MAX`] (events may linger first, see [`EVENT_LINGER`]). A client that
/// takes nothing for `slow` is closed with 1008.
pub(super) async fn write_loop<S>(
    mut sink: S,
    mut queue: mpsc::Receiver<Outbound>,
    slow: Duration,
    stats: Arc<LiveState>,
) where
    S: Sink<Message> + Unpin + Send + 'static,
    S::Error: std::fmt::Display + Send,
{
    let mut last_flush: Option<tokio::time::Instant> = None;
    while let Some(first) = queue.recv().await {
        stats.outbound_high_water.fetch_max(queue.len() + 1, Ordering::Relaxed);
        let mut closing = matches!(first.message, Message::Close(_));
        let written = tokio::time::timeout(slow, async {
            let mut only_events = first.event;
            let mut n = first.feed(&mut sink).await?;
            let mut lingered = false;
            // A message that ended a linger early, taken first by the loop below.
            let mut woke: Option<Outbound> = None;
            loop {
                while !closing && n < WRITE_BATCH_MAX {
                    let Some(m) = woke.take().or_else(|| queue.try_recv().ok()) else { break };
                    closing = matches!(m.message, Message::Close(_));
                    only_events &= m.event;
                    n += m.feed(&mut sink).await?;
                }
                let linger_until = last_flush.map(|at| at + EVENT_LINGER);
                match linger_until {
                    Some(until) if only_events && !lingered && !closing && n < WRITE_BATCH_MAX => {
                        // Wait for company until `until`, but a reply that comes meanwhile
                        // ends the wait: replies never linger.
                        tokio::select! {
                            biased;
                            m = queue.recv() => match m {
                                Some(m) => woke = Some(m),
                                None => break,
                            },
                            () = tokio::time::sleep_until(until) => lingered = true,
                        }
                    }
                    _ => break,
                }
            }
            stats.flushes.fetch_add(1, Ordering::Relaxed);
            stats.messages_written.fetch_add(n as u64, Ordering::Relaxed);
            sink.flush().await
        })
        .await;
        last_flush = Some(tokio::time::Instant::now());
        match written {
            Ok(Ok(())) if closing => return,
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "WebSocket write failed");
                return;
            }
            Err(_) => {
                stats.slow_clients_closed.fetch_add(1, Ordering::Relaxed);
                tracing::info!(timeout_ms = slow.as_millis() as u64, "closing a WebSocket client that stopped reading");
                let reason = format!("the client read nothing for {} ms", slow.as_millis());
                let frame = Message::Close(Some(CloseFrame { code: close_code::POLICY, reason: reason.into() }));
                let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, sink.send(frame)).await;
                return;
            }
        }
    }
    let _ = tokio::time::timeout(CLOSE_FLUSH_TIMEOUT, sink.close()).await;
}

/// Queues one JSON message; fails only when the writer has gone.
pub(super) async fn send(out: &mpsc::Sender<Outbound>, v: Value) -> Result<(), ()> {
    out.send(Outbound::reply(Message::Text(v.to_string().into()))).await.map_err(|_| ())
}
