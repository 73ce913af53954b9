//! Rate limits (SPEC §8.3): one token bucket per principal, or per client address for requests
//! without one (`AUTH=none`, anonymous), refilled at `RATE_LIMIT_PER_SEC` up to
//! `RATE_LIMIT_BURST`. Every HTTP request that reads or writes a tenant's data takes a token, as
//! does every command on a WebSocket or Socket.IO connection. A caller out of tokens gets 429
//! with `Retry-After`. The buckets are kept in an LRU of [`BUCKETS_MAX`] callers, so the memory
//! is bounded whatever the number of clients (a forgotten caller starts with a full bucket).

use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lru::LruCache;

use crate::limits::RATE_LIMIT_BUCKETS_MAX as BUCKETS_MAX;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The buckets of every caller.
#[derive(Debug)]
pub struct RateLimiter {
    per_sec: f64,
    burst: f64,
    buckets: Mutex<LruCache<String, Bucket>>,
}

impl RateLimiter {
    /// A limiter of `per_sec` tokens a second, at most `burst` saved; `None` when `per_sec` is
    /// 0 (no limit).
    pub fn new(per_sec: u64, burst: u64) -> Option<RateLimiter> {
        let cap = NonZeroUsize::new(BUCKETS_MAX).expect("a positive bound");
        (per_sec > 0).then(|| RateLimiter {
            per_sec: per_sec as f64,
            burst: burst.max(1) as f64,
            buckets: Mutex::new(LruCache::new(cap)),
        })
    }

    /// Takes one token of `caller`'s bucket at `now`, or says how long until there is one.
    pub fn take(&self, caller: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = buckets.get_or_insert_mut(caller.to_owned(), || Bucket { tokens: self.burst, at: now });
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_sec).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64((1.0 - bucket.tokens) / self.per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_spends_its_burst_then_refills_at_its_rate() {
        let l = RateLimiter::new(10, 3).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            l.take("a", t0).unwrap();
        }
        let wait = l.take("a", t0).unwrap_err();
        assert!(wait > Duration::from_millis(90) && wait <= Duration::from_millis(100), "{wait:?}");
        // Another caller has its own bucket.
        l.take("b", t0).unwrap();
        // 100 ms later one token is back, and only one.
        let t1 = t0 + Duration::from_millis(100);
        l.take("a", t1).unwrap();
        assert!(l.take("a", t1).is_err());
        // A long pause refills up to the burst, not beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            l.take("a", t2).unwrap();
        }
        assert!(l.take("a", t2).is_err());
        assert!(RateLimiter::new(0, 10).is_none());
    }

    #[test]
    fn the_buckets_are_bounded() {
        let l = RateLimiter::new(1, 1).unwrap();
        let t = Instant::now();
        for i in 0..(BUCKETS_MAX + 10) {
            l.take(&format!("c{i}"), t).unwrap();
        }
        assert_eq!(l.buckets.lock().unwrap().len(), BUCKETS_MAX);
    }
}
