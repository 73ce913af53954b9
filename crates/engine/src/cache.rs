//! A bounded cache of folded aggregates, so a command on a recently used aggregate needs no
//! read before its append. It is only an optimisation: every append still carries the version
//! the decision was made on, so a stale entry costs a conflict and a reload, never a wrong
//! write. Bounded by entry count and by the approximate bytes of the cached documents.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use lru::LruCache;
use sourced_core::limits::serialized_len;
use sourced_core::{Aggregate, StreamKey};

struct Entry {
    aggregate: Arc<Aggregate>,
    bytes: usize,
}

struct Inner {
    lru: LruCache<StreamKey, Entry>,
    bytes: usize,
}

/// The cache; `None` inside when disabled.
pub(crate) struct AggregateCache {
    inner: Option<Mutex<Inner>>,
    bytes_max: usize,
}

impl AggregateCache {
    /// A cache of at most `entries_max` aggregates and about `bytes_max` bytes of documents;
    /// disabled when either is 0.
    pub(crate) fn new(entries_max: usize, bytes_max: usize) -> Self {
        let inner = NonZeroUsize::new(entries_max)
            .filter(|_| bytes_max > 0)
            .map(|n| Mutex::new(Inner { lru: LruCache::new(n), bytes: 0 }));
        Self { inner, bytes_max }
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, Inner>> {
        self.inner.as_ref().map(|m| m.lock().expect("the aggregate cache lock is never poisoned"))
    }

    pub(crate) fn get(&self, key: &StreamKey) -> Option<Arc<Aggregate>> {
        self.lock()?.lru.get(key).map(|e| e.aggregate.clone())
    }

    /// Keeps `aggregate` unless the cache already holds a newer version of it.
    pub(crate) fn put(&self, key: &StreamKey, aggregate: Arc<Aggregate>) {
        let Some(mut inner) = self.lock() else { return };
        if inner.lru.peek(key).is_some_and(|e| e.aggregate.version >= aggregate.version) {
            return;
        }
        // Key and bookkeeping overhead, plus the document's JSON size as an estimate of its
        // size in memory.
        let bytes = 128 + key.id.as_str().len() + aggregate.state.as_ref().map_or(0, serialized_len);
        if bytes > self.bytes_max {
            if let Some(old) = inner.lru.pop(key) {
                inner.bytes -= old.bytes;
            }
            return;
        }
        if let Some((_, old)) = inner.lru.push(key.clone(), Entry { aggregate, bytes }) {
            inner.bytes -= old.bytes;
        }
        inner.bytes += bytes;
        while inner.bytes > self.bytes_max {
            match inner.lru.pop_lru() {
                Some((_, old)) => inner.bytes -= old.bytes,
                None => break,
            }
        }
    }

    pub(crate) fn remove(&self, key: &StreamKey) {
        if let Some(mut inner) = self.lock()
            && let Some(old) = inner.lru.pop(key)
        {
            inner.bytes -= old.bytes;
        }
    }

    #[cfg(test)]
    fn stats(&self) -> (usize, usize) {
        self.lock().map_or((0, 0), |i| (i.lru.len(), i.bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use sourced_core::{AggregateId, TenantId, TypeName, Version};

    fn key(i: usize) -> StreamKey {
        StreamKey {
            tenant: TenantId::default_tenant(),
            type_name: TypeName::parse("t").unwrap(),
            id: AggregateId::parse(&format!("a{i}")).unwrap(),
        }
    }

    fn agg(v: u64, size: usize) -> Arc<Aggregate> {
        Arc::new(Aggregate { version: Version(v), state: Some(json!({"s": "x".repeat(size)})), ..Aggregate::default() })
    }

    #[test]
    fn bounded_by_entries_and_bytes() {
        let c = AggregateCache::new(3, 1_000_000);
        for i in 0..5 {
            c.put(&key(i), agg(1, 10));
        }
        assert_eq!(c.stats().0, 3);
        assert!(c.get(&key(0)).is_none() && c.get(&key(4)).is_some());

        let c = AggregateCache::new(100, 2_000);
        for i in 0..10 {
            c.put(&key(i), agg(1, 500));
        }
        let (n, bytes) = c.stats();
        assert!(bytes <= 2_000 && n < 10, "{n} entries, {bytes} bytes");
        c.put(&key(99), agg(1, 5_000));
        assert!(c.get(&key(99)).is_none(), "an entry over the whole budget is not kept");
    }

    #[test]
    fn never_goes_back_a_version() {
        let c = AggregateCache::new(10, 1_000_000);
        c.put(&key(1), agg(3, 1));
        c.put(&key(1), agg(2, 1));
        assert_eq!(c.get(&key(1)).unwrap().version, Version(3));
        c.remove(&key(1));
        assert!(c.get(&key(1)).is_none());
        assert_eq!(c.stats(), (0, 0));
    }

    #[test]
    fn disabled_keeps_nothing() {
        let c = AggregateCache::new(0, 1_000);
        c.put(&key(1), agg(1, 1));
        assert!(c.get(&key(1)).is_none());
    }
}
