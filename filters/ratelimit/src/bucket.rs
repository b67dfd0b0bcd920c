//! The limiting algorithms, on an abstract atomic store so they are unit tested (threads
//! included) off the proxy.
//!
//! - **Token bucket**: GCRA, taken by the host in one call (`state::take_token`, atomic
//!   on the shared map, so every worker thread sees one exact bucket). The state is one
//!   number per key, the *theoretical arrival time* (TAT, nanoseconds on the host's
//!   monotonic clock); [`return_token`] moves it back when a later limit denies the
//!   request, with a compare-and-swap loop.
//! - **Quota** ([`take_quota`]): no refill. One atomic increment per request on a counter;
//!   `n <= burst` passes. With a `window`, the counter is per window of wall-clock time
//!   (`burst` requests per minute, aligned on the minute); without, `burst` requests in all.

/// The host's atomic key/value operations (the SDK's `state` module in the filter).
pub trait Store {
    /// Read a value.
    fn get(&self, key: &str) -> Option<Vec<u8>>;
    /// Write `value` if the current value is `expected`; `Ok(true)` when written.
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_ms: u64,
    ) -> Result<bool, String>;
    /// Add `delta` to the counter at `key`; the new value.
    fn increment(&self, key: &str, delta: i64, ttl_ms: u64) -> Result<i64, String>;
}

/// Compare-and-swap attempts before giving up on a (pathologically contended) key.
const MAX_CAS_TRIES: usize = 256;

/// What one limit said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Tokens (requests) left right after this request.
    pub remaining: u64,
    /// Nanoseconds until the bucket is full again (the window ends); `None`: never.
    pub reset_ns: Option<u64>,
    /// For a denial: nanoseconds until a request would pass; `None`: never.
    pub retry_after_ns: Option<u64>,
}

fn ttl_ms(ns: u64) -> u64 {
    // Round up and keep a millisecond of slack: expiring late is harmless (the stored TAT
    // is then in the past, which reads as a full bucket), expiring early is not.
    ns.div_ceil(1_000_000) + 1
}

fn parse_u64(v: &[u8]) -> Option<u64> {
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Give back the token the host's `state-take-token` took (a later limit denied the
/// request): the bucket's stored arrival time moves back one interval.
pub fn return_token(store: &impl Store, key: &str, now: u64, interval_ns: u64) {
    for _ in 0..MAX_CAS_TRIES {
        let Some(current) = store.get(key) else {
            return;
        };
        let Some(tat) = parse_u64(&current) else {
            return;
        };
        let back = tat.saturating_sub(interval_ns);
        if back <= now {
            // Full bucket either way; leave the key to expire.
            return;
        }
        let mut buf = [0; 20];
        let value = filter_common::fmt_u64(back, &mut buf).as_bytes();
        match store.compare_and_swap(key, Some(&current), value, ttl_ms(back - now)) {
            Ok(false) => continue,
            _ => return,
        }
    }
}

/// The key of the quota counter for `key` at wall-clock time `now_unix` (nanoseconds),
/// and the nanoseconds left in its window.
pub fn quota_key(key: &str, now_unix: u64, window_ns: Option<u64>) -> (String, Option<u64>) {
    match window_ns {
        Some(w) if w > 0 => {
            let idx = now_unix / w;
            let left = w - now_unix % w;
            (format!("{key}@{idx}"), Some(left))
        }
        _ => (key.to_string(), None),
    }
}

/// Quota: count one request against `burst` at the counter `key` (from [`quota_key`]).
pub fn take_quota(
    store: &impl Store,
    key: &str,
    window_left_ns: Option<u64>,
    burst: u64,
) -> Result<Decision, String> {
    let ttl = window_left_ns.map_or(0, |left| ttl_ms(left) + 1_000);
    let n = store.increment(key, 1, ttl)?;
    let n = u64::try_from(n).unwrap_or(0);
    Ok(Decision {
        allowed: n <= burst,
        remaining: burst.saturating_sub(n),
        reset_ns: window_left_ns,
        retry_after_ns: if n <= burst { None } else { window_left_ns },
    })
}

/// Give back a quota request (a later limit denied it).
pub fn return_quota(store: &impl Store, key: &str) {
    let _ = store.increment(key, -1, 0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// An in-memory store with the host's semantics (TTL ignored: the tests' clock is fake).
    #[derive(Default)]
    struct Mem(Mutex<HashMap<String, Vec<u8>>>);

    impl Store for Mem {
        fn get(&self, key: &str) -> Option<Vec<u8>> {
            self.0.lock().unwrap().get(key).cloned()
        }
        fn compare_and_swap(
            &self,
            key: &str,
            expected: Option<&[u8]>,
            value: &[u8],
            _ttl: u64,
        ) -> Result<bool, String> {
            let mut m = self.0.lock().unwrap();
            if m.get(key).map(Vec::as_slice) != expected {
                return Ok(false);
            }
            m.insert(key.to_string(), value.to_vec());
            Ok(true)
        }
        fn increment(&self, key: &str, delta: i64, _ttl: u64) -> Result<i64, String> {
            let mut m = self.0.lock().unwrap();
            let cur: i64 = m
                .get(key)
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                .unwrap_or(0);
            m.insert(key.to_string(), (cur + delta).to_string().into_bytes());
            Ok(cur + delta)
        }
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn return_gives_the_token_back() {
        let s = Mem::default();
        let now = 50 * SEC;
        // An empty bucket of 3 (one token a second), as the host leaves it.
        let tat = (now + 3 * SEC).to_string();
        s.0.lock().unwrap().insert("k".into(), tat.into_bytes());
        return_token(&s, "k", now, SEC);
        assert_eq!(s.get("k"), Some((now + 2 * SEC).to_string().into_bytes()));
        // A full bucket (TAT in the past) stays as it is.
        return_token(&s, "k", now + 10 * SEC, SEC);
        assert_eq!(s.get("k"), Some((now + 2 * SEC).to_string().into_bytes()));
    }

    #[test]
    fn quotas() {
        let s = Mem::default();
        let (k, left) = quota_key("q", 125 * SEC, Some(60 * SEC));
        assert_eq!(k, "q@2");
        assert_eq!(left, Some(55 * SEC));
        for i in 0..3 {
            let d = take_quota(&s, &k, left, 3).unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, 2 - i);
        }
        let d = take_quota(&s, &k, left, 3).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ns, Some(55 * SEC));
        return_quota(&s, &k);
        return_quota(&s, &k);
        assert!(take_quota(&s, &k, left, 3).unwrap().allowed);
        let (k2, _) = quota_key("q", 185 * SEC, Some(60 * SEC));
        assert!(take_quota(&s, &k2, left, 3).unwrap().allowed);
        let (forever, none) = quota_key("q", 1, None);
        assert_eq!((forever.as_str(), none), ("q", None));
    }
}
