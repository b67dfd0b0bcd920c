//! Shared state: a key/value map shared by every instance of this filter entry on every
//! worker thread (kept by the host, so it survives instance restarts and hot-swaps).
//! Every operation is atomic. A `ttl` of `None` means no expiry.
//!
//! ```ignore
//! use std::time::Duration;
//! let n = wasmesh_sdk::state::increment(&format!("rl:{ip}"), 1, Some(Duration::from_secs(1)))?;
//! if n > 100 { return Action::Respond(LocalResponse::new(429).flag("RL")); }
//! ```

use crate::bindings::wasmesh::filter::host;
use std::time::Duration;

pub use crate::bindings::wasmesh::filter::host::TokenDecision;

fn ttl_ms(ttl: Option<Duration>) -> u64 {
    ttl.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

/// Read a value (`None` when absent or expired).
///
/// ```ignore
/// let v = wasmesh_sdk::state::get("config-version");
/// ```
pub fn get(key: &str) -> Option<Vec<u8>> {
    host::state_get(key)
}

/// Write a value. Errors when the map is full.
///
/// ```ignore
/// wasmesh_sdk::state::set("k", b"v", None)?;
/// ```
pub fn set(key: &str, value: &[u8], ttl: Option<Duration>) -> Result<(), String> {
    host::state_set(key, value, ttl_ms(ttl))
}

/// Write `value` only if the current value is `expected` (`None`: absent). `Ok(true)` when written.
///
/// ```ignore
/// let won = wasmesh_sdk::state::compare_and_swap("leader", None, b"me", None)?;
/// ```
pub fn compare_and_swap(
    key: &str,
    expected: Option<&[u8]>,
    value: &[u8],
    ttl: Option<Duration>,
) -> Result<bool, String> {
    host::state_compare_and_swap(key, expected, value, ttl_ms(ttl))
}

/// Add `delta` to the decimal integer at `key` (absent: 0) and return the new value;
/// `ttl` applies when the key is created.
///
/// ```ignore
/// let n = wasmesh_sdk::state::increment("hits", 1, None)?;
/// ```
pub fn increment(key: &str, delta: i64, ttl: Option<Duration>) -> Result<i64, String> {
    host::state_increment(key, delta, ttl_ms(ttl))
}

/// Take one token from the token bucket at `key` (`burst` tokens, one back every
/// `interval`), in one atomic host call. The bucket lives at `key` (its theoretical
/// arrival time, in decimal nanoseconds of `monotonic_nanos`); a denial changes nothing.
///
/// ```ignore
/// let d = wasmesh_sdk::state::take_token(&format!("rl:{ip}"), 100, Duration::from_millis(10))?;
/// if !d.allowed { return LocalResponse::new(429).flag("RL").into(); }
/// ```
pub fn take_token(key: &str, burst: u64, interval: Duration) -> Result<TokenDecision, String> {
    // In u64 rather than through `as_nanos` (u128, whose multiplication is a call into
    // compiler-rt on wasm32); the same value, saturated the same way.
    let interval = interval
        .as_secs()
        .checked_mul(1_000_000_000)
        .and_then(|n| n.checked_add(u64::from(interval.subsec_nanos())))
        .unwrap_or(u64::MAX);
    host::state_take_token(key, burst, interval)
}

/// Delete a key; `true` when it existed.
///
/// ```ignore
/// wasmesh_sdk::state::delete("k");
/// ```
pub fn delete(key: &str) -> bool {
    host::state_delete(key)
}

/// Keys that start with `prefix`, at most `limit` (the host caps it at 10000).
///
/// ```ignore
/// let keys = wasmesh_sdk::state::list_keys("rl:", 100);
/// ```
pub fn list_keys(prefix: &str, limit: u32) -> Vec<String> {
    host::state_list_keys(prefix, limit)
}
