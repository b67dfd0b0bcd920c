//! Shared state of a filter entry: one concurrent map per filter name, shared by every
//! instance on every worker thread and kept across hot-swaps and manifest reloads.
//!
//! Each operation is atomic (DashMap's shard lock, held for the one operation, never
//! across a call into wasm). Expired entries are removed lazily when touched and in a
//! sweep when the map is full. Sizes are bounded so a filter cannot eat the host's memory.

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Keys one filter entry may hold.
pub(crate) const MAX_KEYS: usize = 100_000;
/// Longest key, in bytes.
pub(crate) const MAX_KEY_LEN: usize = 1024;
/// Largest value, in bytes.
pub(crate) const MAX_VALUE_LEN: usize = 64 * 1024;
/// Most keys `list_keys` returns.
pub(crate) const MAX_LIST: usize = 10_000;

struct Item {
    value: Vec<u8>,
    expires: Option<Instant>,
}

impl Item {
    fn live(&self, now: Instant) -> bool {
        self.expires.is_none_or(|t| t > now)
    }
}

/// The map behind the `state-*` host functions of one filter entry.
#[derive(Default)]
pub struct SharedState {
    map: DashMap<String, Item>,
    /// Keys in the map, kept beside it: `DashMap::len` locks every shard, too much for
    /// each write. Approximate under races, like the bound it serves.
    count: AtomicUsize,
}

fn expiry(ttl_ms: u64) -> Option<Instant> {
    if ttl_ms == 0 {
        None
    } else {
        Instant::now().checked_add(Duration::from_millis(ttl_ms))
    }
}

fn check(key: &str, value: Option<&[u8]>) -> Result<(), String> {
    if key.len() > MAX_KEY_LEN {
        return Err(format!("key longer than {MAX_KEY_LEN} bytes"));
    }
    if value.is_some_and(|v| v.len() > MAX_VALUE_LEN) {
        return Err(format!("value larger than {MAX_VALUE_LEN} bytes"));
    }
    Ok(())
}

/// Compare-and-swap on a present item (live or expired).
fn cas_item(
    item: &mut Item,
    now: Instant,
    expected: Option<&[u8]>,
    value: Vec<u8>,
    ttl_ms: u64,
) -> bool {
    let current = item.live(now).then_some(item.value.as_slice());
    if current != expected {
        return false;
    }
    *item = Item {
        value,
        expires: expiry(ttl_ms),
    };
    true
}

/// Increment on a present item (live or expired).
fn increment_item(
    item: &mut Item,
    now: Instant,
    key: &str,
    delta: i64,
    ttl_ms: u64,
) -> Result<i64, String> {
    if !item.live(now) {
        item.value.clear();
        item.expires = expiry(ttl_ms);
    }
    let current: i64 = if item.value.is_empty() {
        0
    } else {
        std::str::from_utf8(&item.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("value at {key:?} is not a decimal integer"))?
    };
    let next = current.saturating_add(delta);
    item.value.clear();
    write_decimal(&mut item.value, next);
    Ok(next)
}

/// What [`SharedState::take_token_at`] decided (the WIT's `token-decision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenDecision {
    pub allowed: bool,
    pub remaining: u64,
    pub reset_ns: u64,
    pub retry_after_ns: u64,
}

/// GCRA on a present item (live or expired) that holds a bucket's theoretical arrival
/// time (TAT): with `T = interval_ns`, a request at `now` passes when
/// `max(TAT, now) + T - now <= burst × T`, and then TAT becomes `max(TAT, now) + T`.
/// A denial leaves the item as it was.
fn take_token_item(
    item: &mut Item,
    instant: Instant,
    key: &str,
    now: u64,
    burst: u64,
    interval_ns: u64,
) -> Result<TokenDecision, String> {
    let stored = if item.live(instant) && !item.value.is_empty() {
        let tat = parse_u64(&item.value)
            .ok_or_else(|| format!("value at {key:?} is not a token bucket"))?;
        Some(tat)
    } else {
        None
    };
    let capacity = burst.saturating_mul(interval_ns);
    let tat = stored.map_or(now, |t| t.max(now));
    let new_tat = tat.saturating_add(interval_ns);
    let ahead = new_tat - now;
    if ahead > capacity {
        return Ok(TokenDecision {
            allowed: false,
            remaining: 0,
            reset_ns: tat - now,
            retry_after_ns: ahead - capacity,
        });
    }
    item.value.clear();
    write_decimal(&mut item.value, i64::try_from(new_tat).unwrap_or(i64::MAX));
    // Expiring late is harmless (a past TAT reads as a full bucket), early is not: round
    // up, plus a millisecond.
    item.expires = instant.checked_add(Duration::from_millis(ahead.div_ceil(1_000_000) + 1));
    Ok(TokenDecision {
        allowed: true,
        remaining: (capacity - ahead) / interval_ns,
        reset_ns: ahead,
        retry_after_ns: 0,
    })
}

/// `n` in decimal, appended to `out`, digit by digit: through `write!` it cost more than
/// the rest of a token-bucket update.
fn write_decimal(out: &mut Vec<u8>, n: i64) {
    if n < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(crate::text::u64_decimal(n.unsigned_abs(), &mut [0; 20]));
}

/// A decimal number of ASCII digits only (what [`write_decimal`] writes for a
/// non-negative number); None for anything else, or past `u64::MAX`.
fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() {
        return None;
    }
    b.iter().try_fold(0u64, |n, &c| {
        let d = c.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(d))
    })
}

impl SharedState {
    /// Number of keys, expired ones included until swept.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Make room for one more key, or say why not.
    fn room_for(&self, key: &str) -> Result<(), String> {
        if self.count.load(Ordering::Relaxed) < MAX_KEYS {
            return Ok(());
        }
        if self.map.len() < MAX_KEYS || self.map.contains_key(key) {
            self.count.store(self.map.len(), Ordering::Relaxed);
            return Ok(());
        }
        let now = Instant::now();
        self.map.retain(|_, item| item.live(now));
        let len = self.map.len();
        self.count.store(len, Ordering::Relaxed);
        if len < MAX_KEYS {
            Ok(())
        } else {
            Err(format!("shared state is full ({MAX_KEYS} keys)"))
        }
    }

    fn added(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn removed(&self) {
        // Saturating: a sweep may have reset the count meanwhile.
        let _ = self
            .count
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |c| c.checked_sub(1));
    }

    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let now = Instant::now();
        {
            let item = self.map.get(key)?;
            if item.live(now) {
                return Some(item.value.clone());
            }
        }
        if self.map.remove_if(key, |_, item| !item.live(now)).is_some() {
            self.removed();
        }
        None
    }

    pub fn set(&self, key: &str, value: Vec<u8>, ttl_ms: u64) -> Result<(), String> {
        check(key, Some(&value))?;
        let item = Item {
            value,
            expires: expiry(ttl_ms),
        };
        // A present key is replaced in place, without allocating the key again.
        if let Some(mut e) = self.map.get_mut(key) {
            *e = item;
            return Ok(());
        }
        self.room_for(key)?;
        if self.map.insert(key.to_string(), item).is_none() {
            self.added();
        }
        Ok(())
    }

    pub fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: Vec<u8>,
        ttl_ms: u64,
    ) -> Result<bool, String> {
        check(key, Some(&value))?;
        let now = Instant::now();
        // The common case, a key that exists: one shard lock, no allocation.
        if let Some(mut e) = self.map.get_mut(key) {
            return Ok(cas_item(&mut e, now, expected, value, ttl_ms));
        }
        self.room_for(key)?;
        match self.map.entry(key.to_string()) {
            Entry::Occupied(mut e) => Ok(cas_item(e.get_mut(), now, expected, value, ttl_ms)),
            Entry::Vacant(e) => {
                e.insert(Item {
                    value,
                    expires: expiry(ttl_ms),
                });
                self.added();
                Ok(true)
            }
        }
    }

    pub fn increment(&self, key: &str, delta: i64, ttl_ms: u64) -> Result<i64, String> {
        check(key, None)?;
        let now = Instant::now();
        self.upsert(key, |item, fresh| {
            if fresh {
                item.expires = expiry(ttl_ms);
            }
            increment_item(item, now, key, delta, ttl_ms).map(|v| (v, true))
        })
    }

    /// [`Self::take_token_at`] with the clock read here: for tests, which drive `now`.
    #[cfg(test)]
    pub fn take_token(
        &self,
        key: &str,
        now: u64,
        burst: u64,
        interval_ns: u64,
    ) -> Result<TokenDecision, String> {
        self.take_token_at(key, Instant::now(), now, burst, interval_ns)
    }

    /// Take a token from the bucket at `key` at time `now` (monotonic nanoseconds): see
    /// the WIT's `state-take-token`. `instant` is the moment `now` stands for (the key's
    /// expiry is kept as an `Instant`): the host reads the clock once per call.
    pub fn take_token_at(
        &self,
        key: &str,
        instant: Instant,
        now: u64,
        burst: u64,
        interval_ns: u64,
    ) -> Result<TokenDecision, String> {
        check(key, None)?;
        if burst == 0 || interval_ns == 0 {
            return Err("burst and interval must be at least 1".to_string());
        }
        // A missing key is a full bucket: with `burst` >= 1 the token is there. A denial
        // stores nothing.
        self.upsert(key, |item, _fresh| {
            take_token_item(item, instant, key, now, burst, interval_ns).map(|d| (d, d.allowed))
        })
    }

    /// Update the item at `key` with `f`, atomically (under the key's shard lock). A
    /// missing key is handed to `f` as a new empty item without expiry (`fresh`), and
    /// stored only if `f` answers `true` with its result. The common case, a key that is
    /// there, is one lookup that allocates nothing.
    fn upsert<T>(
        &self,
        key: &str,
        f: impl FnOnce(&mut Item, bool) -> Result<(T, bool), String>,
    ) -> Result<T, String> {
        if let Some(mut e) = self.map.get_mut(key) {
            return f(&mut e, false).map(|(t, _)| t);
        }
        self.room_for(key)?;
        match self.map.entry(key.to_string()) {
            Entry::Occupied(mut e) => f(e.get_mut(), false).map(|(t, _)| t),
            Entry::Vacant(e) => {
                let mut item = Item {
                    value: Vec::new(),
                    expires: None,
                };
                let (t, store) = f(&mut item, true)?;
                if store {
                    e.insert(item);
                    self.added();
                }
                Ok(t)
            }
        }
    }

    pub fn delete(&self, key: &str) -> bool {
        let now = Instant::now();
        match self.map.remove(key) {
            Some((_, item)) => {
                self.removed();
                item.live(now)
            }
            None => false,
        }
    }

    pub fn list_keys(&self, prefix: &str, limit: u32) -> Vec<String> {
        let limit = usize::try_from(limit).unwrap_or(MAX_LIST).min(MAX_LIST);
        let now = Instant::now();
        self.map
            .iter()
            .filter(|e| e.key().starts_with(prefix) && e.value().live(now))
            .take(limit)
            .map(|e| e.key().clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn decimals_are_written_and_read_as_std_does() {
        for n in [0, 1, 9, 10, 99, 12345, -1, -10, i64::MAX, i64::MIN] {
            let mut out = b"x".to_vec();
            super::write_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").into_bytes());
            if n >= 0 {
                assert_eq!(
                    super::parse_u64(out.get(1..).unwrap_or_default()),
                    Some(n as u64)
                );
            }
        }
        assert_eq!(super::parse_u64(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"18446744073709551616",
            b"-1",
            b"+1",
            b"1 ",
            b"1a",
        ] {
            assert_eq!(super::parse_u64(bad), None, "{bad:?}");
        }
    }

    use super::*;

    #[test]
    fn increment_cas_ttl() {
        let s = SharedState::default();
        assert_eq!(s.increment("a", 2, 0), Ok(2));
        assert_eq!(s.increment("a", -5, 0), Ok(-3));
        assert_eq!(s.get("a").as_deref(), Some(&b"-3"[..]));
        assert_eq!(s.compare_and_swap("b", None, b"x".to_vec(), 0), Ok(true));
        assert_eq!(s.compare_and_swap("b", None, b"y".to_vec(), 0), Ok(false));
        assert_eq!(
            s.compare_and_swap("b", Some(b"x"), b"y".to_vec(), 0),
            Ok(true)
        );
        s.set("t", b"v".to_vec(), 1).ok();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.get("t"), None);
        assert_eq!(s.increment("t", 1, 0), Ok(1));
        assert!(s.increment("b", 1, 0).is_err());
        let mut keys = s.list_keys("", 10);
        keys.sort();
        assert_eq!(keys, vec!["a", "b", "t"]);
        assert!(s.delete("a"));
        assert!(!s.delete("a"));
    }

    #[test]
    fn full_map() {
        let s = SharedState::default();
        for i in 0..MAX_KEYS - 1 {
            s.set(&format!("k{i}"), b"1".to_vec(), 0).ok();
        }
        s.set("short", b"v".to_vec(), 1).ok();
        assert_eq!(s.len(), MAX_KEYS);
        // Full: existing keys still change, a new one waits for the expired key to go.
        assert_eq!(s.increment("k1", 1, 0), Ok(2));
        assert_eq!(
            s.compare_and_swap("k2", Some(b"1"), b"w".to_vec(), 0),
            Ok(true)
        );
        assert!(s.set("k3", b"x".to_vec(), 0).is_ok());
        assert!(s.set("new", b"x".to_vec(), 0).is_err());
        std::thread::sleep(Duration::from_millis(5));
        assert!(s.set("new", b"x".to_vec(), 0).is_ok());
        assert!(s.increment("new2", 1, 0).is_err());
        assert!(s.delete("new"));
        assert_eq!(s.increment("new2", 1, 0), Ok(1));
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn token_bucket_burst_then_refill() {
        let s = SharedState::default();
        let t = SEC / 2; // 2 tokens per second
        let now = 1_000 * SEC;
        for i in 0..5 {
            let d = s.take_token("k", now, 5, t).expect("take");
            assert!(d.allowed);
            assert_eq!(d.remaining, 4 - i);
        }
        let d = s.take_token("k", now, 5, t).expect("take");
        assert!(!d.allowed);
        assert_eq!((d.retry_after_ns, d.reset_ns), (t, 5 * t));
        // The stored value is the theoretical arrival time in decimal (what filters that
        // run the algorithm on `state-get` / `compare-and-swap` read and write).
        let tat = (now + 5 * t).to_string().into_bytes();
        assert_eq!(s.get("k"), Some(tat));
        // Half a token later: still no; a full token later: exactly one.
        assert!(!s.take_token("k", now + t / 2, 5, t).expect("take").allowed);
        assert!(s.take_token("k", now + t, 5, t).expect("take").allowed);
        assert!(!s.take_token("k", now + t, 5, t).expect("take").allowed);
        // Long idle: full again, and not more than full.
        let later = now + 100 * SEC;
        let passed = (0..10)
            .filter(|_| s.take_token("k", later, 5, t).is_ok_and(|d| d.allowed))
            .count();
        assert_eq!(passed, 5);
        assert!(s.take_token("other", now, 5, t).expect("take").allowed);
        // Steady 10/s with burst 5, one request a millisecond for 3 s: 5 + 30 pass.
        let start = 10_000 * SEC;
        let passed = (0..3000u64)
            .filter(|ms| {
                s.take_token("steady", start + ms * 1_000_000, 5, SEC / 10)
                    .is_ok_and(|d| d.allowed)
            })
            .count();
        assert!((34..=35).contains(&passed), "{passed}");
        // Misuse is an error, not a panic.
        assert!(s.take_token("k", now, 0, t).is_err());
        assert!(s.take_token("k", now, 5, 0).is_err());
        s.set("text", b"abc".to_vec(), 0).expect("set");
        assert!(s.take_token("text", now, 5, t).is_err());
    }

    #[test]
    fn token_bucket_exact_across_threads() {
        // 8 threads hammer one bucket at one instant: exactly `burst` pass.
        let s = std::sync::Arc::new(SharedState::default());
        let now = 7 * SEC;
        let passed: usize = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..8)
                .map(|_| {
                    let s = s.clone();
                    sc.spawn(move || {
                        (0..500)
                            .filter(|_| s.take_token("k", now, 1234, SEC).is_ok_and(|d| d.allowed))
                            .count()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(passed, 1234);
    }
}
