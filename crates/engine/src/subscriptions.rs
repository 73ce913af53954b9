//! Live subscriptions (SPEC §6): a [`Hub`] that the store's writer feeds with committed events
//! in position order, and [`Subscription`]s that read the store to catch up and then follow the
//! hub, handing over without gaps or duplicates.
//!
//! How a subscription never skips and never repeats an event:
//! - The hub only ever carries events in strictly increasing position order, because its one
//!   producer is the store's commit listener, called by the single writer after each durable
//!   commit and before any append of that commit is acknowledged (see `CommitListener`).
//! - A subscription takes its hub receiver *before* its store reads. Every event is either
//!   committed before a read begins (then that read returns it: an acknowledged append is
//!   visible to `read_all`) or after (then the hub sends it after the receiver exists, so the
//!   receiver has it). Events seen both ways are dropped by position: only positions above the
//!   last one delivered pass.
//! - A subscription from now ([`Start::Now`]) reads the store's head ([`EventStore::head`], O(1),
//!   no event read) *after* its receiver exists, at its first poll: every event at or below
//!   the head was committed before, and every event above it is committed after that read began
//!   and so reaches the receiver (the SQLite writer moves the head before the listener hears
//!   of the commit; on PostgreSQL the head is the committed counter, and the feed passes every
//!   later commit to the hub). With a fed hub it goes live at once, reading no event at all.
//! - When the receiver lags (the shared live buffer overwrote events it had not taken), the
//!   subscription takes a fresh receiver and goes back to reading the store from its last
//!   position; the store is the truth, the hub only a shortcut. Memory per subscription is one
//!   store page; the live buffer is shared and bounded.
//! - With a store that has no commit listener, the engine sends only wake-ups after its
//!   appends, and subscriptions read every event from the store.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::broadcast;

use sourced_core::{AggregateId, Position, RecordedEvent, TenantId, TypeName};
use sourced_store::{CommitListener, EventStore, StoreError};

/// Events one catch-up read asks the store for.
pub const CATCH_UP_PAGE_EVENTS: usize = 256;
pub use crate::limits::LIVE_BUFFER_EVENTS_MAX;

/// A committed event as subscribers share it: serialized to its wire JSON at most once, by
/// the first subscriber that sends it, however many subscribers send it.
#[derive(Debug)]
pub struct SharedEvent {
    event: RecordedEvent,
    json: std::sync::OnceLock<Result<Arc<str>, String>>,
}

impl SharedEvent {
    /// Wraps an event.
    pub fn new(event: RecordedEvent) -> SharedEvent {
        SharedEvent { event, json: std::sync::OnceLock::new() }
    }

    /// The event's wire JSON (SPEC §2.5), made on first use and kept.
    pub fn json(&self) -> Result<Arc<str>, String> {
        self.json.get_or_init(|| serde_json::to_string(&self.event).map(Arc::from).map_err(|e| e.to_string())).clone()
    }
}

impl std::ops::Deref for SharedEvent {
    type Target = RecordedEvent;

    fn deref(&self) -> &RecordedEvent {
        &self.event
    }
}

impl PartialEq for SharedEvent {
    fn eq(&self, other: &SharedEvent) -> bool {
        self.event == other.event
    }
}

/// What the hub carries.
#[derive(Clone, Debug)]
enum Live {
    /// A committed event; events arrive in strictly increasing position order.
    Event(Arc<SharedEvent>),
    /// Something was committed; read the store (stores without a commit listener).
    Wake,
}

/// The live buffer between the store's writer and the subscriptions.
#[derive(Debug)]
pub struct Hub {
    sender: broadcast::Sender<Live>,
    /// Whether the store feeds the hub with events (else the engine sends wake-ups).
    fed: AtomicBool,
}

impl Hub {
    /// A hub whose live buffer keeps `capacity` events (clamped to 1 ..= [`LIVE_BUFFER_EVENTS_MAX`]).
    pub fn new(capacity: usize) -> Arc<Hub> {
        let (sender, _) = broadcast::channel(capacity.clamp(1, LIVE_BUFFER_EVENTS_MAX));
        Arc::new(Hub { sender, fed: AtomicBool::new(false) })
    }

    /// Registers the hub as the store's commit listener; `false` when the store cannot feed it.
    pub(crate) fn attach(self: &Arc<Self>, store: &dyn EventStore) -> bool {
        let fed = store.set_commit_listener(self.clone());
        self.fed.store(fed, Ordering::SeqCst);
        fed
    }

    /// Whether the store feeds the hub with events.
    pub fn is_fed(&self) -> bool {
        self.fed.load(Ordering::SeqCst)
    }

    /// Receivers (subscriptions) alive now.
    pub fn receivers(&self) -> usize {
        self.sender.receiver_count()
    }

    /// Events in the live buffer that some subscription has not taken yet: the backlog of the
    /// slowest one, at most the buffer's capacity (beyond it, it reads the store again).
    pub fn backlog(&self) -> usize {
        self.sender.len()
    }

    /// Tells subscriptions that something was committed (stores that do not feed the hub).
    pub(crate) fn wake(&self) {
        if !self.is_fed() {
            let _ = self.sender.send(Live::Wake);
        }
    }
}

impl CommitListener for Hub {
    fn wants_events(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    fn committed(&self, _head: Position, events: Vec<RecordedEvent>) {
        for e in events {
            // No receiver is not an error: a subscription that starts later reads the store.
            let _ = self.sender.send(Live::Event(Arc::new(SharedEvent::new(e))));
        }
    }
}

/// Which events a subscription wants, within its tenant.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionFilter {
    /// Only events of this aggregate type.
    pub target_name: Option<TypeName>,
    /// Only events of aggregates with this id.
    pub target_id: Option<AggregateId>,
    /// Only events of these types (the ones the subscriber may read); `None`: every type.
    pub types: Option<std::sync::Arc<std::collections::BTreeSet<TypeName>>>,
}

impl SubscriptionFilter {
    /// Whether `e` passes (the tenant is checked separately).
    pub fn matches(&self, e: &RecordedEvent) -> bool {
        self.target_name.as_ref().is_none_or(|t| *t == e.target_name)
            && self.target_id.as_ref().is_none_or(|i| *i == e.target_id)
            && self.types.as_ref().is_none_or(|types| types.contains(&e.target_name))
    }
}

/// Where a subscription starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Start {
    /// From the tenant's first event.
    Beginning,
    /// After this position (what a reconnecting subscriber last saw).
    After(Position),
    /// After the last event committed when the subscription starts.
    Now,
}

/// What a subscription yields.
#[derive(Clone, Debug, PartialEq)]
pub enum SubscriptionItem {
    /// The next matching event.
    Event(Arc<SharedEvent>),
    /// The subscription has delivered everything committed so far, up to this position (the
    /// position to resume after); from here on, events come live. Sent once.
    CaughtUp(Position),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading pages from the store.
    CatchUp,
    /// Following the hub.
    Live,
}

/// One subscriber's feed: every matching event after its start, exactly once, in position
/// order (see the module documentation).
pub struct Subscription {
    store: Arc<dyn EventStore>,
    hub: Arc<Hub>,
    receiver: broadcast::Receiver<Live>,
    tenant: TenantId,
    filter: SubscriptionFilter,
    /// The last position delivered or passed over (this tenant's events only).
    last: Position,
    /// `Start::Now` not resolved yet (the store's head is read at the first poll).
    start_now: bool,
    /// The current store page, not yet looked at.
    page: VecDeque<RecordedEvent>,
    phase: Phase,
    caught_up_sent: bool,
    /// Times the subscription went back to the store after lagging behind the live buffer.
    lag_recoveries: u64,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("tenant", &self.tenant)
            .field("filter", &self.filter)
            .field("last", &self.last)
            .field("phase", &self.phase)
            .finish()
    }
}

impl Subscription {
    /// A subscription; its hub receiver exists from here on, before any store read.
    pub(crate) fn new(
        store: Arc<dyn EventStore>,
        hub: Arc<Hub>,
        tenant: TenantId,
        filter: SubscriptionFilter,
        start: Start,
    ) -> Subscription {
        let receiver = hub.sender.subscribe();
        let (last, start_now) = match start {
            Start::Beginning => (Position(0), false),
            Start::After(p) => (p, false),
            // The head is read later, after the receiver exists: see the module documentation.
            Start::Now => (Position(0), true),
        };
        Subscription {
            store,
            hub,
            receiver,
            tenant,
            filter,
            last,
            start_now,
            page: VecDeque::new(),
            phase: Phase::CatchUp,
            caught_up_sent: false,
            lag_recoveries: 0,
        }
    }

    /// The last position delivered or passed over: where to resume after.
    pub fn position(&self) -> Position {
        self.last
    }

    /// Times the subscription lagged behind the live buffer and read the store again.
    pub fn lag_recoveries(&self) -> u64 {
        self.lag_recoveries
    }

    /// The next item. Errors are the store's; the subscription may be polled again after one
    /// (it resumes from its last position).
    pub async fn next(&mut self) -> Result<SubscriptionItem, StoreError> {
        if self.start_now {
            self.last = self.store.head().await?;
            self.start_now = false;
            if self.hub.is_fed() {
                // Everything after the head reaches the receiver: nothing to read.
                self.phase = Phase::Live;
            }
        }
        loop {
            if let Some(item) = self.next_in_page() {
                return item;
            }
            match self.phase {
                Phase::CatchUp => {
                    let page = self.store.read_all(&self.tenant, self.last, CATCH_UP_PAGE_EVENTS).await?;
                    if page.len() < CATCH_UP_PAGE_EVENTS {
                        self.phase = Phase::Live;
                    }
                    self.page.extend(page);
                }
                Phase::Live if !self.caught_up_sent => {
                    self.caught_up_sent = true;
                    return Ok(SubscriptionItem::CaughtUp(self.last));
                }
                Phase::Live => {
                    let received = self.receiver.recv().await;
                    if let Some(item) = self.take_live(received) {
                        return item;
                    }
                }
            }
        }
    }

    /// The next item if it is at hand without waiting and without reading the store (the
    /// current page, or the live buffer); `None` when [`Subscription::next`] has to wait.
    pub fn try_next(&mut self) -> Option<Result<SubscriptionItem, StoreError>> {
        if self.start_now {
            return None;
        }
        loop {
            if let Some(item) = self.next_in_page() {
                return Some(item);
            }
            match self.phase {
                Phase::CatchUp => return None,
                Phase::Live if !self.caught_up_sent => {
                    self.caught_up_sent = true;
                    return Some(Ok(SubscriptionItem::CaughtUp(self.last)));
                }
                Phase::Live => {
                    let received = match self.receiver.try_recv() {
                        Ok(live) => Ok(live),
                        Err(broadcast::error::TryRecvError::Empty) => return None,
                        Err(broadcast::error::TryRecvError::Lagged(n)) => Err(broadcast::error::RecvError::Lagged(n)),
                        Err(broadcast::error::TryRecvError::Closed) => Err(broadcast::error::RecvError::Closed),
                    };
                    if let Some(item) = self.take_live(received) {
                        return Some(item);
                    }
                }
            }
        }
    }

    /// The next matching event of the current store page, if any.
    fn next_in_page(&mut self) -> Option<Result<SubscriptionItem, StoreError>> {
        while let Some(e) = self.page.pop_front() {
            if e.position <= self.last {
                return Some(Err(StoreError::corrupt(format!(
                    "the feed went back from position {} to {}",
                    self.last, e.position
                ))));
            }
            self.last = e.position;
            if self.filter.matches(&e) {
                return Some(Ok(SubscriptionItem::Event(Arc::new(SharedEvent::new(e)))));
            }
        }
        None
    }

    /// What one receive from the live buffer means: an item to deliver, or `None` (an event
    /// passed over, or a switch back to reading the store).
    fn take_live(
        &mut self,
        received: Result<Live, broadcast::error::RecvError>,
    ) -> Option<Result<SubscriptionItem, StoreError>> {
        match received {
            Ok(Live::Event(e)) => {
                if e.tenant != self.tenant || e.position <= self.last {
                    return None;
                }
                self.last = e.position;
                self.filter.matches(&e).then_some(Ok(SubscriptionItem::Event(e)))
            }
            Ok(Live::Wake) => {
                self.phase = Phase::CatchUp;
                None
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // A fresh receiver first, then the store: see the module documentation.
                self.receiver = self.hub.sender.subscribe();
                self.phase = Phase::CatchUp;
                self.lag_recoveries += 1;
                tracing::debug!(missed, last = %self.last, "a subscription lagged; reading the store");
                None
            }
            Err(broadcast::error::RecvError::Closed) => Some(Err(StoreError::Closed)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_matches_type_and_id() {
        let f = SubscriptionFilter { target_name: Some(TypeName::parse("order").unwrap()), ..Default::default() };
        let e = |t: &str, id: &str| RecordedEvent {
            id: sourced_core::EventId(uuid::Uuid::nil()),
            position: Position(1),
            tenant: TenantId::default_tenant(),
            target_name: TypeName::parse(t).unwrap(),
            target_id: AggregateId::parse(id).unwrap(),
            version: sourced_core::Version(1),
            event_type: "created".into(),
            data: serde_json::Value::Null,
            metadata: serde_json::Value::Null,
            timestamp: chrono::Utc::now(),
        };
        assert!(f.matches(&e("order", "a")));
        assert!(!f.matches(&e("invoice", "a")));
        let f = SubscriptionFilter { target_id: Some(AggregateId::parse("a").unwrap()), ..f };
        assert!(f.matches(&e("order", "a")));
        assert!(!f.matches(&e("order", "b")));
    }

    use crate::{Engine, EngineConfig, SystemClock};
    use sourced_core::Command;
    use sourced_store::sqlite::{SqliteOptions, SqliteStore};

    fn engine(dir: &tempfile::TempDir, live_buffer_events: usize) -> Engine {
        let store = SqliteStore::open(&dir.path().join("s.db"), SqliteOptions::default()).unwrap();
        let config = EngineConfig { live_buffer_events, ..EngineConfig::default() };
        Engine::new(Arc::new(store), config, Arc::new(SystemClock))
    }

    async fn create(engine: &Engine, id: &str) {
        let env = serde_json::json!({"type": "create", "targetName": "order", "targetId": id, "body": {}});
        let defaults = crate::fresh::envelope_defaults(TenantId::default_tenant(), false);
        engine.execute(Command::from_envelope_value(env, defaults).unwrap(), None).await.unwrap();
    }

    async fn next_event(sub: &mut Subscription) -> u64 {
        let item = tokio::time::timeout(std::time::Duration::from_secs(20), sub.next()).await.unwrap().unwrap();
        match item {
            SubscriptionItem::Event(e) => e.position.0,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    /// Live subscribers share one serialization of each event.
    #[tokio::test]
    async fn live_subscribers_share_one_serialization_per_event() {
        let dir = tempfile::TempDir::new().unwrap();
        let engine = engine(&dir, 64);
        let mut subs: Vec<Subscription> = (0..3)
            .map(|_| engine.subscribe(TenantId::default_tenant(), SubscriptionFilter::default(), Start::Now))
            .collect();
        for sub in &mut subs {
            assert!(matches!(sub.next().await.unwrap(), SubscriptionItem::CaughtUp(_)));
        }
        create(&engine, "shared").await;
        let mut texts = Vec::new();
        for sub in &mut subs {
            let item = tokio::time::timeout(std::time::Duration::from_secs(20), sub.next()).await.unwrap().unwrap();
            let SubscriptionItem::Event(e) = item else { panic!("expected an event, got {item:?}") };
            assert_eq!(e.target_id.as_str(), "shared");
            texts.push(e.json().unwrap());
        }
        assert_eq!(serde_json::from_str::<serde_json::Value>(&texts[0]).unwrap()["targetId"], "shared");
        assert!(texts.windows(2).all(|w| Arc::ptr_eq(&w[0], &w[1])), "one JSON text for all subscribers");
    }

    /// `try_next` hands out what is at hand and never waits or reads the store.
    #[tokio::test]
    async fn try_next_takes_only_what_is_at_hand() {
        let dir = tempfile::TempDir::new().unwrap();
        let engine = engine(&dir, 4);
        create(&engine, "before").await;
        let mut sub = engine.subscribe(TenantId::default_tenant(), SubscriptionFilter::default(), Start::Beginning);
        assert!(sub.try_next().is_none(), "catching up needs the store");
        assert!(matches!(sub.next().await.unwrap(), SubscriptionItem::Event(e) if e.position == Position(1)));
        assert!(matches!(sub.try_next(), Some(Ok(SubscriptionItem::CaughtUp(Position(1))))));
        assert!(sub.try_next().is_none(), "nothing live yet");
        for i in 0..3 {
            create(&engine, &format!("live{i}")).await;
        }
        for p in 2..=4 {
            assert!(matches!(sub.try_next(), Some(Ok(SubscriptionItem::Event(e))) if e.position == Position(p)));
        }
        assert!(sub.try_next().is_none());
        // Past the live buffer (4 events): back to the store, which try_next leaves to next.
        for i in 0..6 {
            create(&engine, &format!("more{i}")).await;
        }
        assert!(sub.try_next().is_none());
        assert_eq!(sub.lag_recoveries(), 1);
        for p in 5..=10 {
            assert_eq!(next_event(&mut sub).await, p);
        }
    }

    /// A subscription from now on a store with history (reopened: no commit since) reads no
    /// event, and still gets the next one live.
    #[tokio::test]
    async fn a_subscription_from_now_reads_no_history() {
        let dir = tempfile::TempDir::new().unwrap();
        {
            let engine = engine(&dir, 64);
            for i in 0..300 {
                create(&engine, &format!("old{i}")).await;
            }
            engine.store().close().await;
        }
        let engine = engine(&dir, 64);
        assert_eq!(engine.store().head().await.unwrap(), Position(300));
        let mut sub = engine.subscribe(TenantId::default_tenant(), SubscriptionFilter::default(), Start::Now);
        assert_eq!(sub.next().await.unwrap(), SubscriptionItem::CaughtUp(Position(300)));
        assert_eq!(engine.store().stats().events_read, 0, "no event of the history was read");
        create(&engine, "new").await;
        assert_eq!(next_event(&mut sub).await, 301);
        assert_eq!(engine.store().stats().events_read, 0, "the live event came through the hub");
    }

    #[tokio::test]
    async fn a_lagging_subscriber_reads_the_store_and_skips_nothing() {
        let dir = tempfile::TempDir::new().unwrap();
        let engine = engine(&dir, 4);
        assert!(engine.hub().is_fed(), "the SQLite store feeds the hub");
        let mut sub = engine.subscribe(TenantId::default_tenant(), SubscriptionFilter::default(), Start::Beginning);
        assert_eq!(sub.next().await.unwrap(), SubscriptionItem::CaughtUp(Position(0)));
        // 100 events into a live buffer of 4 while the subscriber takes none.
        for i in 0..100 {
            create(&engine, &format!("o{i}")).await;
        }
        for p in 1..=100 {
            assert_eq!(next_event(&mut sub).await, p);
        }
        assert_eq!(sub.lag_recoveries(), 1);
        // Live again afterwards.
        create(&engine, "late").await;
        assert_eq!(next_event(&mut sub).await, 101);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn subscribers_starting_during_writes_get_every_event_once_in_order() {
        let dir = tempfile::TempDir::new().unwrap();
        let engine = engine(&dir, 8);
        const WRITERS: usize = 4;
        const PER_WRITER: usize = 100;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    for i in 0..PER_WRITER {
                        create(&engine, &format!("w{w}-{i}")).await;
                    }
                })
            })
            .collect();
        let mut readers = Vec::new();
        for k in 0..8u64 {
            tokio::task::yield_now().await;
            let start = if k % 2 == 0 { Start::Beginning } else { Start::After(Position(k * 10)) };
            let from = if let Start::After(p) = start { p.0 } else { 0 };
            let mut sub = engine.subscribe(TenantId::default_tenant(), SubscriptionFilter::default(), start);
            readers.push(tokio::spawn(async move {
                let mut got = Vec::new();
                while got.len() < WRITERS * PER_WRITER - from as usize {
                    let item = tokio::time::timeout(std::time::Duration::from_secs(30), sub.next()).await;
                    if let SubscriptionItem::Event(e) = item.unwrap().unwrap() {
                        got.push(e.position.0);
                    }
                }
                (from, got)
            }));
        }
        for w in writers {
            w.await.unwrap();
        }
        let total = (WRITERS * PER_WRITER) as u64;
        for r in readers {
            let (from, got) = r.await.unwrap();
            assert_eq!(got, ((from + 1)..=total).collect::<Vec<u64>>());
        }
    }
}
