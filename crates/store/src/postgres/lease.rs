//! Runner leases on PostgreSQL (one runner per process manager across the cluster, SPEC §4.5):
//! a session advisory lock, `pg_try_advisory_lock`, held on a connection of its own.
//!
//! Not a pooled connection: a session lock lives as long as its session, and a pool hands the
//! session to other work, keeps it after the lease is dropped, or replaces it without telling
//! anyone. Here the lock and its connection live and die together: a task per lease drives the
//! connection and pings it every [`LEASE_PING_MS`] (within the connect timeout). When the
//! connection ends or a ping fails, the lease is marked lost at once, and the runner stops
//! acting before its next step. When the holding process dies (kill -9), the server ends its
//! session and the lock goes with it; another process's next try takes it.
//!
//! The key is one 64-bit number, a hash of the schema and the runner's name: two schemas on
//! one server never block each other, and the key space of one-key locks is apart from the
//! two-key locks of the migrations (`pg_advisory_xact_lock(int4, int4)`).

use super::*;
use std::sync::atomic::AtomicBool;
use tokio::sync::oneshot;

use crate::RunnerLease;

/// How often a held lease checks that its connection answers.
pub(super) const LEASE_PING_MS: u64 = 1_000;

/// What takes leases: where their connections go, and the tasks holding them.
pub(super) struct Leases {
    config: tokio_postgres::Config,
    connector: tokio_postgres_rustls::MakeRustlsConnect,
    schema: String,
    /// Connecting, taking the lock, a ping and the unlock each wait at most this long.
    timeout: Duration,
    /// Set when the store closes: every lease is given up.
    closed: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

/// The advisory lock key of runner `name` in `schema` (see the module documentation): the
/// holder is `SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 AND
/// (classid::int8 << 32 | objid::int8) = <key, as unsigned>`.
pub fn lease_key(schema: &str, name: &str) -> i64 {
    i64::from_ne_bytes(crate::fnv1a(format!("sourced runner\0{schema}\0{name}").as_bytes()).to_ne_bytes())
}

impl Leases {
    pub(super) fn new(
        config: tokio_postgres::Config,
        connector: tokio_postgres_rustls::MakeRustlsConnect,
        schema: &str,
        timeout: Duration,
    ) -> Leases {
        Leases {
            config,
            connector,
            schema: schema.to_owned(),
            timeout,
            closed: watch::channel(false).0,
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Opens a connection and tries the lock on it: the lease, or `None` (the connection is
    /// closed again) when another session holds it.
    pub(super) async fn take(&self, name: &str) -> Result<Option<RunnerLease>, StoreError> {
        if *self.closed.borrow() {
            return Err(StoreError::Closed);
        }
        let key = lease_key(&self.schema, name);
        let timed_out = || StoreError::unavailable("PostgreSQL: taking a runner lease timed out");
        let (client, connection) = tokio::time::timeout(self.timeout, self.config.connect(self.connector.clone()))
            .await
            .map_err(|_| timed_out())?
            .map_err(pg_err)?;
        let driver = tokio::spawn(connection);
        let params: [&(dyn ToSql + Sync); 1] = [&key];
        let tried = tokio::time::timeout(self.timeout, client.query_one("SELECT pg_try_advisory_lock($1)", &params));
        let granted = match tried.await {
            Ok(Ok(row)) => row.try_get::<_, bool>(0).map_err(pg_err),
            Ok(Err(e)) => Err(pg_err(e)),
            Err(_) => Err(timed_out()),
        };
        let granted = match granted {
            Ok(g) => g,
            Err(e) => {
                driver.abort();
                return Err(e);
            }
        };
        if !granted {
            // Dropping the client ends the session; the driver task then finishes by itself.
            return Ok(None);
        }
        let lost = Arc::new(AtomicBool::new(false));
        let (holder, given_up) = oneshot::channel::<()>();
        let hold = Hold { client, driver, key, lost: Arc::clone(&lost), timeout: self.timeout };
        let task = tokio::spawn(hold.run(given_up, self.closed.subscribe()));
        let mut tasks = self.tasks.lock().expect("the leases lock is never poisoned");
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
        tracing::debug!(runner = name, key, "took a runner lease");
        Ok(Some(RunnerLease::new(lost, Box::new(holder))))
    }

    /// Gives up every lease (unlocking) and waits for their connections to close.
    pub(super) async fn close(&self) {
        self.closed.send_replace(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().expect("the leases lock is never poisoned"));
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// One held lease: its connection, the task driving it, and the flag its [`RunnerLease`] reads.
struct Hold {
    client: tokio_postgres::Client,
    driver: JoinHandle<Result<(), tokio_postgres::Error>>,
    key: i64,
    lost: Arc<AtomicBool>,
    timeout: Duration,
}

impl Hold {
    /// Pings the connection until the lease is given up (dropped, or the store closed) or the
    /// connection fails; marks the lease lost, unlocks when the connection still answers, and
    /// closes it.
    async fn run(mut self, mut given_up: oneshot::Receiver<()>, mut closed: watch::Receiver<bool>) {
        let connection_ended = loop {
            tokio::select! {
                _ = &mut given_up => break false,
                _ = closed.wait_for(|c| *c) => break false,
                ended = &mut self.driver => {
                    let why = ended.map_or_else(|e| e.to_string(), |r| r.err().map_or("closed".into(), |e| e.to_string()));
                    tracing::warn!(key = self.key, reason = why, "a runner lease's connection ended: the lease is lost");
                    break true;
                }
                () = tokio::time::sleep(Duration::from_millis(LEASE_PING_MS)) => {}
            }
            if !matches!(tokio::time::timeout(self.timeout, self.client.simple_query("SELECT 1")).await, Ok(Ok(_))) {
                tracing::warn!(key = self.key, "a runner lease's connection does not answer: the lease is lost");
                self.lost.store(true, Ordering::SeqCst);
                self.driver.abort();
                return;
            }
        };
        self.lost.store(true, Ordering::SeqCst);
        if connection_ended {
            return;
        }
        let params: [&(dyn ToSql + Sync); 1] = [&self.key];
        let unlock = self.client.query_one("SELECT pg_advisory_unlock($1)", &params);
        let _ = tokio::time::timeout(self.timeout, unlock).await;
        drop(self.client);
        if tokio::time::timeout(self.timeout, &mut self.driver).await.is_err() {
            self.driver.abort();
        }
    }
}
