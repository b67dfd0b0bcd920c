//! The limiting algorithms, on an abstract atomic store so they are unit tested (threads
//! included) off the proxy.
//!
//! - **Token bucket** ([`take_token`]): GCRA. The state is one number per key, the
//!   *theoretical arrival time* (TAT, nanoseconds on the host's process-wide monotonic
//!   clock): with `T` the time one token takes to come back, a request at `now` is allowed
//!   when `max(TAT, now) + T - now <= burst × T`, and then TAT becomes `max(TAT, now) + T`.
//!   The update is a compare-and-swap loop on the stored TAT, so every worker thread sees
//!   one exact bucket: over any run, successes are `burst + elapsed / T`, to the token.
//!   A denial writes nothing. The key's TTL is the time until the bucket is full again
//!   (a missing key *is* a full bucket), so idle keys free themselves.
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

/// GCRA: take one token from the bucket at `key` (`burst` tokens, one back every
/// `interval_ns`), at time `now` (host monotonic nanoseconds).
pub fn take_token(
    store: &impl Store,
    key: &str,
    now: u64,
    burst: u64,
    interval_ns: u64,
) -> Result<Decision, String> {
    let capacity = burst.saturating_mul(interval_ns);
    for _ in 0..MAX_CAS_TRIES {
        let current = store.get(key);
        let tat = current
            .as_deref()
            .and_then(parse_u64)
            .map_or(now, |t| t.max(now));
        let new_tat = tat.saturating_add(interval_ns);
        let ahead = new_tat - now;
        if ahead > capacity {
            return Ok(Decision {
                allowed: false,
                remaining: 0,
                reset_ns: Some(tat - now),
                retry_after_ns: Some(ahead - capacity),
            });
        }
        let mut buf = [0; 20];
        let value = filter_common::fmt_u64(new_tat, &mut buf).as_bytes();
        if store.compare_and_swap(key, current.as_deref(), value, ttl_ms(ahead))? {
            return Ok(Decision {
                allowed: true,
                remaining: (capacity - ahead) / interval_ns.max(1),
                reset_ns: Some(ahead),
                retry_after_ns: None,
            });
        }
    }
    Err(format!(
        "{key:?}: gave up after {MAX_CAS_TRIES} contended compare-and-swap attempts"
    ))
}

/// Give back the token [`take_token`] took (a later limit denied the request).
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
    fn burst_then_refill() {
        let s = Mem::default();
        let t = SEC / 2; // 2 tokens per second
        let now = 1_000 * SEC;
        for i in 0..5 {
            let d = take_token(&s, "k", now, 5, t).unwrap();
            assert!(d.allowed);
            assert_eq!(d.remaining, 4 - i);
        }
        let d = take_token(&s, "k", now, 5, t).unwrap();
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ns, Some(t));
        assert_eq!(d.reset_ns, Some(5 * t));
        // Half a token later: still no; a full token later: exactly one.
        assert!(!take_token(&s, "k", now + t / 2, 5, t).unwrap().allowed);
        assert!(take_token(&s, "k", now + t, 5, t).unwrap().allowed);
        assert!(!take_token(&s, "k", now + t, 5, t).unwrap().allowed);
        // Long idle: the bucket is full again, and not more than full.
        let later = now + 100 * SEC;
        let passed = (0..10)
            .filter(|_| take_token(&s, "k", later, 5, t).unwrap().allowed)
            .count();
        assert_eq!(passed, 5);
        // Other keys are other buckets.
        assert!(take_token(&s, "other", now, 5, t).unwrap().allowed);
    }

    #[test]
    fn return_gives_the_token_back() {
        let s = Mem::default();
        let now = 50 * SEC;
        for _ in 0..3 {
            assert!(take_token(&s, "k", now, 3, SEC).unwrap().allowed);
        }
        assert!(!take_token(&s, "k", now, 3, SEC).unwrap().allowed);
        return_token(&s, "k", now, SEC);
        assert!(take_token(&s, "k", now, 3, SEC).unwrap().allowed);
        assert!(!take_token(&s, "k", now, 3, SEC).unwrap().allowed);
    }

    #[test]
    fn exact_across_threads() {
        // 8 threads hammer one bucket at one instant: exactly `burst` pass.
        let s = std::sync::Arc::new(Mem::default());
        let now = 7 * SEC;
        let passed: usize = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let s = s.clone();
                    sc.spawn(move || {
                        (0..500)
                            .filter(|_| take_token(&*s, "k", now, 1234, SEC).unwrap().allowed)
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(passed, 1234);
    }

    #[test]
    fn steady_rate() {
        // 10/s, burst 5, one request every millisecond for 3 s: 5 + 30 pass.
        let s = Mem::default();
        let start = 10 * SEC;
        let passed = (0..3000u64)
            .filter(|ms| {
                take_token(&s, "k", start + ms * 1_000_000, 5, SEC / 10)
                    .unwrap()
                    .allowed
            })
            .count();
        assert!((34..=35).contains(&passed), "{passed}");
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
