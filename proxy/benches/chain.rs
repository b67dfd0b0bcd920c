//! What a route's WebAssembly filters cost per request, in process: real chains of the
//! reference filters (built from `filters/`) run request after request as a worker thread
//! runs them (current-thread runtime, `LocalSet`), without sockets or HTTP parsing.
//!
//! ```sh
//! cargo bench -p wasmesh --bench chain                 # 200000 requests per chain
//! cargo bench -p wasmesh --bench chain -- 50000        # fewer
//! WASMESH_BENCH_NO_BUILD=1 cargo bench -p wasmesh --bench chain   # filters already built
//! ```
//!
//! For each chain it prints wall-clock and thread CPU time per request, minus the same
//! loop with no filter (making the request and response heads), so the figure is what the
//! filters add. Chains: `passthrough` (one filter that does nothing: the host's floor per
//! filter), each of `headers`, `ratelimit` and `authz` alone, and `filter3` (headers →
//! ratelimit → authz, configured as `bench/templates/wasmesh-filter3.json`).
//! `WASMESH_BENCH_CHAIN=filter3` runs one chain only. `WASMESH_BENCH_EVICT_KB=2048` writes
//! 2 MiB between requests, so the filters start each request with cold caches, as in a
//! proxy (see BENCHMARKS.md: the same instructions take about 2.5 times as long there). For instruction counts, run the
//! binary under `valgrind --tool=callgrind` with a small count
//! (`WASMESH_BENCH_NO_BUILD=1 valgrind --tool=callgrind target/release/deps/chain-HASH 2000`).

use bytes::Bytes;
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmesh::config::{FailureMode, FilterEngineSpec, FilterSpec};
use wasmesh::filters::{Callout, Chain, FilterHost, Outcome, RequestInfo, Verdict};

/// The bench makes no callouts; a chain that asks for one gets an error answer.
struct NoCallout;

impl Callout for NoCallout {
    fn call(
        &self,
        _cluster: &str,
        _req: http::Request<Bytes>,
        _timeout: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<http::Response<Bytes>, String>>>>
    {
        Box::pin(async { Err("no callouts in the bench".to_string()) })
    }
}

fn filter_dir() -> PathBuf {
    if std::env::var_os("WASMESH_BENCH_NO_BUILD").is_some() {
        return wasmesh_e2e::wasm_filters::built_dir();
    }
    wasmesh_e2e::wasm_filters::build_all().unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    })
}

fn spec(name: &str, file: &str, config: serde_json::Value) -> FilterSpec {
    FilterSpec {
        name: name.to_string(),
        file: PathBuf::from(file),
        config,
        failure_mode: FailureMode::FailClosed,
        sha256: None,
        clusters: Vec::new(),
        rollout: None,
    }
}

/// The filters of `bench/templates/wasmesh-filter1.json` and `wasmesh-filter3.json`.
fn specs() -> Vec<FilterSpec> {
    use serde_json::json;
    vec![
        spec("pt", "passthrough.wasm", serde_json::Value::Null),
        spec(
            "headers",
            "headers.wasm",
            json!({"request": {"set": {"x-client-ip": "%SOURCE_IP%"}},
                   "response": {"set": {"x-request-id": "%REQUEST_ID%"}}}),
        ),
        spec(
            "ratelimit",
            "ratelimit.wasm",
            json!({"limits": [{"name": "per-client", "key": "client_address", "burst": 1000000000u64,
                               "refill": {"tokens": 1000000000u64, "period": "1s"}}]}),
        ),
        spec(
            "authz",
            "authz.wasm",
            json!({"rules": [{"name": "everyone", "paths": [{"prefix": "/"}]}]}),
        ),
    ]
}

fn request() -> http::request::Parts {
    let mut parts = http::Request::new(()).into_parts().0;
    parts.uri = http::Uri::from_static("/api/x");
    let h = &mut parts.headers;
    h.insert("host", http::HeaderValue::from_static("127.0.0.1:8080"));
    h.insert("user-agent", http::HeaderValue::from_static("bench"));
    h.insert("accept", http::HeaderValue::from_static("*/*"));
    h.insert("x-user", http::HeaderValue::from_static("alice"));
    parts
}

fn response() -> http::response::Parts {
    let mut parts = http::Response::new(()).into_parts().0;
    let h = &mut parts.headers;
    h.insert("content-type", http::HeaderValue::from_static("text/plain"));
    h.insert("content-length", http::HeaderValue::from_static("128"));
    parts
}

fn info(n: u64) -> RequestInfo {
    RequestInfo {
        request_id: format!("bench-{n:016x}").into(),
        source_addr: std::net::SocketAddr::from(([127, 0, 0, 1], 40000)),
        peer_identity: None,
        route: Arc::from("ingress"),
        scheme: "http",
        trace_ids: None,
    }
}

/// One request through `chain` (`None`: the same work without filters).
async fn one(chain: Option<&Chain>, n: u64) {
    let mut req = request();
    let mut resp = response();
    let info = info(n);
    let Some(chain) = chain else {
        std::hint::black_box((&mut req, &mut resp, info));
        return;
    };
    let mut run = chain.start(info);
    if let Verdict::Respond(r) = run.request_headers(&mut req).await {
        eprintln!(
            "the chain answered {}: the bench expects it to pass",
            r.status
        );
        std::process::exit(1);
    }
    if let Verdict::Respond(r) = run.response_headers(&mut resp).await {
        eprintln!("the chain answered {} on the response side", r.status);
        std::process::exit(1);
    }
    if run.wants_done() {
        run.done(&Outcome {
            status: 200,
            response_flags: String::new(),
            duration: Duration::from_micros(50),
            cluster: Some("upstream".to_string()),
            upstream: Some("127.0.0.1:3000".to_string()),
        });
    }
    std::hint::black_box((&req, &resp));
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Run `n` requests; (wall, CPU) per request. With `evict` non-empty, every request is
/// preceded by a write to each cache line of `evict`, as the rest of a proxy's work (the
/// kernel's network stack, HTTP parsing) would push the filters' code and data out of the
/// caches between requests; the loop without filters does the same, so the difference is
/// what the filters cost when they start cold.
async fn measure(chain: Option<&Chain>, n: u64, evict: &mut [u8]) -> (Duration, Duration) {
    let (t0, c0) = (Instant::now(), thread_cpu());
    for i in 0..n {
        for line in evict.chunks_mut(64) {
            if let Some(b) = line.first_mut() {
                *b = b.wrapping_add(1);
            }
        }
        std::hint::black_box(&mut *evict);
        one(chain, i).await;
    }
    let per = |d: Duration| d / u32::try_from(n.max(1)).unwrap_or(u32::MAX);
    (per(t0.elapsed()), per(thread_cpu().saturating_sub(c0)))
}

fn main() {
    // `cargo bench` passes `--bench`; a bare number is the request count.
    let n: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(200_000);
    let dir = filter_dir();
    let mut registry = prometheus_client::registry::Registry::default();
    let engine = FilterEngineSpec {
        cache_dir: Some(std::env::temp_dir().join("wasmesh-bench-cache")),
        ..FilterEngineSpec::default()
    };
    let host = match FilterHost::new(&engine, 1, &mut registry, Arc::new(NoCallout)) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e}");
            std::process::exit(1);
        }
    };
    tokio::task::LocalSet::new().block_on(&rt, async {
        let set = match host.prepare(Some(&dir), &specs(), &HashSet::new()).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("cannot load the filters: {e:?}");
                std::process::exit(1);
            }
        };
        let chain = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            set.chain(&names).unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(1);
            })
        };
        let chains = [
            ("passthrough", chain(&["pt"])),
            ("headers", chain(&["headers"])),
            ("ratelimit", chain(&["ratelimit"])),
            ("authz", chain(&["authz"])),
            ("filter3", chain(&["headers", "ratelimit", "authz"])),
        ];
        // `WASMESH_BENCH_CHAIN=NAME`: only that chain (e.g. under callgrind).
        let only = std::env::var("WASMESH_BENCH_CHAIN").ok();
        let chains: Vec<_> = chains
            .into_iter()
            .filter(|(name, _)| only.as_deref().is_none_or(|o| o == *name))
            .collect();
        // Warm up: instances created, caches filled, CPU clocks up.
        let warm = (n / 10).clamp(1, 20_000);
        // `WASMESH_BENCH_EVICT_KB=N`: write N KiB between requests (see `measure`).
        let evict_kb: usize = std::env::var("WASMESH_BENCH_EVICT_KB")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut evict = vec![0u8; evict_kb * 1024];
        measure(None, warm, &mut evict).await;
        for (_, c) in &chains {
            measure(Some(c), warm, &mut evict).await;
        }
        let (base_wall, base_cpu) = measure(None, n, &mut evict).await;
        let cold = if evict_kb > 0 {
            format!(", {evict_kb} KiB written between requests")
        } else {
            String::new()
        };
        println!("{n} requests per chain{cold}; per request, minus the loop without filters:");
        for (name, c) in &chains {
            let (wall, cpu) = measure(Some(c), n, &mut evict).await;
            println!(
                "{name:12} wall {:>8.3} µs   cpu {:>8.3} µs",
                wall.saturating_sub(base_wall).as_secs_f64() * 1e6,
                cpu.saturating_sub(base_cpu).as_secs_f64() * 1e6,
            );
        }
    });
}
