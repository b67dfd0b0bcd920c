//! End-to-end test harness for wasmesh: the real `wasmesh` binary, in-process upstreams on
//! loopback, and clients that record what they saw.
//!
//! A test reads like its scenario:
//!
//! ```no_run
//! # async fn t() {
//! use wasmesh_e2e::{Proxy, Upstream, client};
//! use serde_json::json;
//! let up = Upstream::start().await;
//! let proxy = Proxy::start(json!({
//!     "listeners": [{"name": "in", "address": "127.0.0.1:0",
//!                    "routes": [{"cluster": "app"}]}],
//!     "clusters": [{"name": "app", "endpoints": [{"address": up.addr().to_string()}]}],
//! })).await;
//! let resp = client::get(proxy.listener("in"), "/hello").await;
//! assert_eq!(resp.status, 200);
//! assert_eq!(up.requests()[0].path, "/hello");
//! # }
//! ```
//!
//! Everything binds `127.0.0.1:0`; the harness waits on readiness (the proxy's stderr lines,
//! then `/ready`), never on a sleep. The binary is `target/debug/wasmesh`: `scripts/test.sh`
//! builds it before `cargo test`; if it is missing the harness builds it once (see
//! [`binary::wasmesh_bin`]).

pub mod balance;
pub mod binary;
pub mod client;
pub mod filter_builds;
pub mod generate;
pub mod mtls;
pub mod otlp;
pub mod proxy;
pub mod raw;
pub mod raw_h2;
pub mod upstream;
pub mod wasm_filters;

pub use client::Resp;
pub use proxy::Proxy;
pub use raw::RawConn;
pub use upstream::{Behavior, Recorded, Upstream};

use std::future::Future;
use std::time::Duration;

/// Heavy tests (gigabyte transfers, memory measurements) hold this lock so they never run
/// alongside each other inside one test binary (test binaries themselves run one after
/// another). An async lock: it is held across the whole scenario, awaits included, and works
/// across the per-test runtimes.
pub async fn heavy_lock() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// Poll `check` every 20 ms until it returns `Some`, or panic with `what` after `timeout`.
/// For state that changes asynchronously (a reload, a drain): a readiness wait, not a sleep.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_or(timeout, what, check, String::new).await
}

/// [`eventually`], adding `context()` (e.g. the proxy's stderr) to the panic message.
pub async fn eventually_or<T, F, Fut>(
    timeout: Duration,
    what: &str,
    mut check: F,
    context: impl Fn() -> String,
) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "timed out after {timeout:?} waiting for: {what}\n{}",
                context()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Period of the test byte pattern: a prime, so it never lines up with chunk or buffer sizes
/// and a lost, duplicated or reordered chunk shows.
const PATTERN_PERIOD: usize = 65_521;
/// Largest chunk [`pattern_chunk`] hands out.
pub const PATTERN_MAX_CHUNK: usize = 256 * 1024;

fn pattern_block() -> &'static bytes::Bytes {
    static BLOCK: std::sync::OnceLock<bytes::Bytes> = std::sync::OnceLock::new();
    BLOCK.get_or_init(|| {
        let mut x: u32 = 0x9E37_79B9;
        let period: Vec<u8> = (0..PATTERN_PERIOD)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        let mut block = Vec::with_capacity(PATTERN_PERIOD + PATTERN_MAX_CHUNK);
        while block.len() < PATTERN_PERIOD + PATTERN_MAX_CHUNK {
            let n = period
                .len()
                .min(PATTERN_PERIOD + PATTERN_MAX_CHUNK - block.len());
            block.extend_from_slice(&period[..n]);
        }
        bytes::Bytes::from(block)
    })
}

/// `len` bytes of the test pattern as they appear at stream offset `offset` (no copy;
/// `len` at most [`PATTERN_MAX_CHUNK`]). Streams of any size are checked without keeping them.
pub fn pattern_chunk(offset: u64, len: usize) -> bytes::Bytes {
    assert!(
        len <= PATTERN_MAX_CHUNK,
        "pattern chunks are at most {PATTERN_MAX_CHUNK} bytes"
    );
    let start = (offset % PATTERN_PERIOD as u64) as usize;
    pattern_block().slice(start..start + len)
}

/// Whether `data` is the test pattern at stream offset `offset`.
pub fn pattern_matches(data: &[u8], offset: u64) -> bool {
    let mut off = offset;
    let mut rest = data;
    while !rest.is_empty() {
        let n = rest.len().min(PATTERN_MAX_CHUNK);
        if pattern_chunk(off, n) != rest[..n] {
            return false;
        }
        off += n as u64;
        rest = &rest[n..];
    }
    true
}

/// A cluster of one endpoint, as the manifest spells it.
pub fn cluster(name: &str, addr: std::net::SocketAddr) -> serde_json::Value {
    serde_json::json!({"name": name, "endpoints": [{"address": addr.to_string()}]})
}

/// A cluster of one endpoint speaking HTTP/2 (h2c prior knowledge).
pub fn h2_cluster(name: &str, addr: std::net::SocketAddr) -> serde_json::Value {
    serde_json::json!({"name": name, "protocol": "http2", "endpoints": [{"address": addr.to_string()}]})
}

/// A manifest with one listener `in` whose paths under `{prefix}h1` go to cluster `h1`
/// (HTTP/1.1, at `h1`) and under `{prefix}h2` to cluster `h2` (HTTP/2, at `h2`): for
/// tests that run the same case over both upstream protocols.
pub fn h1_and_h2_manifest(
    prefix: &str,
    h1: std::net::SocketAddr,
    h2: std::net::SocketAddr,
) -> serde_json::Value {
    serde_json::json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": format!("{prefix}h1")}, "cluster": "h1"},
            {"match": {"prefix": format!("{prefix}h2")}, "cluster": "h2"},
        ]}],
        "clusters": [cluster("h1", h1), h2_cluster("h2", h2)],
    })
}
