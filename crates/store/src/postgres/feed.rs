//! Live notifications across processes: the LISTEN task and the feed of the commit listener
//! (see the module documentation of `postgres`).

use super::*;

/// Events one read of the feed takes.
pub(super) const FEED_PAGE_EVENTS: usize = 1_000;
/// How often the feed reads the store without a notification (the safety net).
pub(super) const FEED_POLL_MS: u64 = 1_000;
/// Bounds of the wait before reconnecting the LISTEN connection (doubling from the first).
pub(super) const LISTEN_BACKOFF_MS: (u64, u64) = (100, 5_000);

/// What feeds the commit listener: the position fed so far, and the LISTEN task.
pub(super) struct Feed {
    /// The schema's notification channel: `sourced_commits_` and 16 hex digits.
    pub(super) channel: String,
    /// Where the dedicated LISTEN connection goes (the pool's settings).
    config: tokio_postgres::Config,
    /// Its TLS (`sslmode` of the URL).
    connector: tokio_postgres_rustls::MakeRustlsConnect,
    listener: OnceLock<Arc<dyn CommitListener>>,
    /// The highest position passed to the listener (or known to it as its head). Held across
    /// a read and the listener calls that follow, so feeds never interleave.
    fed: tokio::sync::Mutex<u64>,
    /// The highest head any notification announced.
    notified: AtomicU64,
    /// Wakes the LISTEN task: a notification came.
    wake: Notify,
    pub(super) stop: watch::Sender<bool>,
    task: Mutex<Option<JoinHandle<()>>>,
    runtime: tokio::runtime::Handle,
}

impl Feed {
    /// A feed for `schema` whose listener will hear commits after `head`.
    pub(super) fn new(
        schema: &str,
        config: tokio_postgres::Config,
        connector: tokio_postgres_rustls::MakeRustlsConnect,
        head: u64,
        runtime: tokio::runtime::Handle,
    ) -> Feed {
        Feed {
            channel: format!("sourced_commits_{:016x}", crate::fnv1a(schema.as_bytes())),
            config,
            connector,
            listener: OnceLock::new(),
            fed: tokio::sync::Mutex::new(head),
            notified: AtomicU64::new(0),
            wake: Notify::new(),
            stop: watch::channel(false).0,
            task: Mutex::new(None),
            runtime,
        }
    }

    /// Registers the one commit listener and starts the LISTEN task; `false` when a listener
    /// is already set.
    pub(super) fn start(self: &Arc<Self>, listener: Arc<dyn CommitListener>, pool: Pool) -> bool {
        if self.listener.set(listener).is_err() {
            return false;
        }
        let task = self.runtime.spawn(listen_loop(Arc::clone(self), pool));
        *self.task.lock().expect("the feed task mutex is poisoned") = Some(task);
        true
    }

    /// Ends the LISTEN task, if any.
    pub(super) async fn stop(&self) {
        self.stop.send_replace(true);
        let task = self.task.lock().expect("the feed task mutex is poisoned").take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// After this process's writer committed `batch`: feeds what other processes committed
    /// below it (read from the store), then the batch's own events. Called before any append of
    /// the batch is acknowledged. When the read fails the LISTEN task is woken to retry, and the
    /// batch is acknowledged anyway (its events reach the listener from that task's read).
    pub(super) async fn feed_local(&self, pool: &Pool, batch: &[Job], results: &[Result<Written, StoreError>]) {
        let Some(listener) = self.listener.get() else { return };
        // The batch's positions: contiguous, from its first appended event to its last.
        let mut span: Option<(u64, u64)> = None;
        for (job, result) in batch.iter().zip(results) {
            if let Ok(Written::Appended { first_position, .. }) = result {
                let last = first_position.0 + job.request.events.len() as u64 - 1;
                span = Some((span.map_or(first_position.0, |(first, _)| first), last));
            }
        }
        let Some((first, head)) = span else { return };
        let mut fed = self.fed.lock().await;
        if *fed >= head {
            return;
        }
        if !listener.wants_events() {
            listener.committed(Position(head), Vec::new());
            *fed = head;
            return;
        }
        if *fed + 1 < first
            && let Err(e) = feed_from_store(pool, listener.as_ref(), &mut fed, Some(first - 1)).await
        {
            tracing::warn!(error = %e, "cannot read other processes' commits for the live feed; retrying later");
            self.wake.notify_one();
            return;
        }
        let events: Vec<RecordedEvent> =
            committed_events(batch, results).into_iter().filter(|e| e.position.0 > *fed).collect();
        if events.first().map(|e| e.position.0) != Some(*fed + 1) {
            // Cannot happen (the read above stops only at `first - 1`); the store is the truth.
            tracing::error!(fed = *fed, first, "the live feed would skip positions; reading the store instead");
            self.wake.notify_one();
            return;
        }
        listener.committed(Position(head), events);
        *fed = head;
    }

    /// One pass of the LISTEN task: feeds everything committed after the fed position. With no
    /// one wanting events, only the head moves: the notified one, or (`poll`) the counter's.
    async fn feed_pass(&self, pool: &Pool, poll: bool) -> Result<(), StoreError> {
        let Some(listener) = self.listener.get() else { return Ok(()) };
        let mut fed = self.fed.lock().await;
        let notified = self.notified.load(Ordering::SeqCst);
        if !poll && notified <= *fed {
            return Ok(());
        }
        if !listener.wants_events() {
            let head = if notified > *fed {
                notified
            } else {
                let client = pool.get().await.map_err(pool_err)?;
                select_head(&client).await.map_err(pg_err)?
            };
            if head > *fed {
                listener.committed(Position(head), Vec::new());
                *fed = head;
            }
            return Ok(());
        }
        feed_from_store(pool, listener.as_ref(), &mut fed, None).await
    }
}

/// Reads the events after `*fed` (up to `upto`, or all) in position order across tenants and
/// passes them to `listener` page by page, moving `*fed` along. Positions must continue `*fed`
/// exactly (they are gap-free, and a visible position implies every lower one is visible).
pub(super) async fn feed_from_store(
    pool: &Pool,
    listener: &dyn CommitListener,
    fed: &mut u64,
    upto: Option<u64>,
) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(pool_err)?;
    loop {
        let limit = upto.map_or(FEED_PAGE_EVENTS as u64, |u| u.saturating_sub(*fed).min(FEED_PAGE_EVENTS as u64));
        if limit == 0 {
            return Ok(());
        }
        let page = read_global(&client, Position(*fed), limit as usize).await?;
        let Some(last) = page.last().map(|e| e.position.0) else { return Ok(()) };
        if page.first().map(|e| e.position.0) != Some(*fed + 1) || last != *fed + page.len() as u64 {
            return Err(StoreError::corrupt(format!(
                "the live feed read positions {:?}..={last} after position {fed}",
                page.first().map(|e| e.position.0)
            )));
        }
        let full = page.len() as u64 == limit;
        listener.committed(Position(last), page);
        *fed = last;
        if !full {
            return Ok(());
        }
    }
}

/// The LISTEN task: one dedicated connection, reconnected with backoff; a feed pass after each
/// (re)connect, on each notification and on a timer.
async fn listen_loop(feed: Arc<Feed>, pool: Pool) {
    let mut stop = feed.stop.subscribe();
    let mut backoff_ms = LISTEN_BACKOFF_MS.0;
    let mut ticks = tokio::time::interval(Duration::from_millis(FEED_POLL_MS));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !*stop.borrow() {
        match listen(&feed).await {
            Ok((client, mut driver)) => {
                tracing::debug!(channel = %feed.channel, "listening for commits of other processes");
                backoff_ms = LISTEN_BACKOFF_MS.0;
                let mut poll = true;
                loop {
                    if let Err(e) = feed.feed_pass(&pool, poll).await {
                        tracing::warn!(error = %e, "the live feed cannot read the store; retrying");
                    }
                    poll = tokio::select! {
                        _ = stop.changed() => break,
                        ended = &mut driver => {
                            let reason = ended.unwrap_or_else(|e| e.to_string());
                            tracing::warn!(reason, "the LISTEN connection ended; reconnecting");
                            break;
                        }
                        _ = feed.wake.notified() => false,
                        _ = ticks.tick() => true,
                    };
                }
                drop(client);
                driver.abort();
            }
            Err(e) => tracing::warn!(error = %e, backoff_ms, "cannot LISTEN for commits; retrying"),
        }
        // Disconnected: the timer's pass still runs through the pool, then a wait.
        if let Err(e) = feed.feed_pass(&pool, true).await {
            tracing::debug!(error = %e, "the live feed cannot read the store");
        }
        tokio::select! {
            _ = stop.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(backoff_ms)) => {}
        }
        backoff_ms = (backoff_ms * 2).min(LISTEN_BACKOFF_MS.1);
    }
}

/// Opens the dedicated connection, starts the task that drives it (recording notifications and
/// waking the feed), and `LISTEN`s. The task's result says why the connection ended.
pub(super) async fn listen(
    feed: &Arc<Feed>,
) -> Result<(tokio_postgres::Client, JoinHandle<String>), tokio_postgres::Error> {
    let (client, mut connection) = feed.config.connect(feed.connector.clone()).await?;
    let sink = Arc::clone(feed);
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if let Ok(head) = n.payload().parse::<u64>() {
                        sink.notified.fetch_max(head, Ordering::SeqCst);
                    }
                    sink.wake.notify_one();
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return e.to_string(),
                None => return "closed by the server".to_owned(),
            }
        }
    });
    if let Err(e) = client.batch_execute(&format!("LISTEN {}", feed.channel)).await {
        driver.abort();
        return Err(e);
    }
    Ok((client, driver))
}
