//! The reference filters (`filters/ratelimit`, `fault`, `canary`, `headers`, `telemetry`)
//! under real traffic: the real proxy, real upstreams, many concurrent HTTP/1.1 and HTTP/2
//! connections, and the numbers each filter promises (exact rate-limit counts, fault and
//! canary shares, stickiness), read back from responses, upstreams, `/metrics` and the
//! access log.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wasmesh_e2e::client::{Conn, Req};
use wasmesh_e2e::wasm_filters::filter_dir;
use wasmesh_e2e::{cluster, Behavior, Proxy, Resp, Upstream};

/// A manifest: one listener `in` whose catch-all route `app` goes to `app` through the
/// filter chain `chain`, with these filter entries (files in a fresh `filter_dir`).
fn manifest(up: &Upstream, entries: Vec<Value>, chain: &[&str]) -> Value {
    let pkgs: Vec<&str> = entries
        .iter()
        .filter_map(|e| e["file"].as_str())
        .map(|f| f.trim_end_matches(".wasm"))
        .collect();
    json!({
        "filter_dir": filter_dir(&pkgs),
        "filters": entries,
        "listeners": [{"name": "in", "address": "127.0.0.1:0",
                       "routes": [{"name": "app", "cluster": "app", "filters": chain}]}],
        "clusters": [cluster("app", up.addr())],
    })
}

/// A `filters[]` entry for filter crate `pkg`.
fn entry(name: &str, pkg: &str, config: Value) -> Value {
    json!({"name": name, "file": format!("{pkg}.wasm"), "config": config})
}

/// A response and when its request was sent and its response read.
type Timed = (Resp, Instant, Instant);

/// Keep sending requests over `conns` connections at once (even ones HTTP/1.1, odd ones
/// HTTP/2), each connection one request at a time, while `more(i)` says request number
/// `i` should be sent. The responses with their times, in request-number order.
async fn blast_timed(
    addr: SocketAddr,
    conns: usize,
    more: impl Fn(usize) -> bool + Send + Sync + 'static,
    req: impl Fn(usize) -> Req + Send + Sync + 'static,
) -> Vec<Timed> {
    let next = Arc::new(AtomicUsize::new(0));
    let more = Arc::new(more);
    let req = Arc::new(req);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let (next, more, req) = (next.clone(), more.clone(), req.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = if c % 2 == 0 {
                Conn::h1(addr).await
            } else {
                Conn::h2(addr).await
            };
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if !more(i) {
                    break;
                }
                let r = req(i);
                let sent = Instant::now();
                let resp = conn.send(r).await;
                out.push((i, (resp, sent, Instant::now())));
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("client task"));
    }
    all.sort_by_key(|(i, _)| *i);
    all.into_iter().map(|(_, r)| r).collect()
}

/// [`blast_timed`], the responses only.
async fn blast(
    addr: SocketAddr,
    conns: usize,
    more: impl Fn(usize) -> bool + Send + Sync + 'static,
    req: impl Fn(usize) -> Req + Send + Sync + 'static,
) -> Vec<Resp> {
    blast_timed(addr, conns, more, req)
        .await
        .into_iter()
        .map(|(r, _, _)| r)
        .collect()
}

/// [`blast`] exactly `total` requests.
async fn blast_n(
    addr: SocketAddr,
    conns: usize,
    total: usize,
    req: impl Fn(usize) -> Req + Send + Sync + 'static,
) -> Vec<Resp> {
    blast(addr, conns, move |i| i < total, req).await
}

fn count_status(resps: &[Resp], status: u16) -> usize {
    resps.iter().filter(|r| r.status == status).count()
}

/// Wait until the metric series reaches `want` (filter metrics of a request are recorded
/// when its response ends, a little after the client has it).
async fn wait_metric(proxy: &Proxy, name: &str, labels: &[(&str, &str)], want: f64) {
    let text = proxy
        .wait_for(
            Duration::from_secs(5),
            &format!("{name}{labels:?} == {want}"),
            || async {
                let text = proxy.metrics().await;
                let v = wasmesh_e2e::proxy::metric_value(&text, name, labels);
                (v == want).then_some(text)
            },
        )
        .await;
    assert!(text.contains(name));
}

// ---------------------------------------------------------------------------------------
// ratelimit

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_without_refill_passes_exactly_burst_across_workers_h1_and_h2() {
    let up = Upstream::start().await;
    let mut m = manifest(
        &up,
        vec![entry(
            "rl",
            "ratelimit",
            json!({"limits": [{"name": "all", "key": "global", "burst": 700}]}),
        )],
        &["rl"],
    );
    m["workers"] = json!(2);
    let proxy = Proxy::start(m).await;
    let started = Instant::now();
    let resps = blast_n(proxy.listener("in"), 32, 3000, |_| Req::get("/x")).await;
    let took = started.elapsed();
    let ok = count_status(&resps, 200);
    let limited = count_status(&resps, 429);
    println!("ratelimit no refill: {ok} passed, {limited} limited of 3000 in {took:?}");
    assert_eq!(ok, 700, "exactly `burst` requests pass");
    assert_eq!(limited, 2300);
    assert_eq!(
        up.request_count(),
        700,
        "the limited ones never reached the upstream"
    );

    let denied = resps.iter().find(|r| r.status == 429).expect("a 429");
    assert_eq!(denied.header("x-ratelimit-limit"), Some("700"));
    assert_eq!(denied.header("x-ratelimit-remaining"), Some("0"));
    assert!(denied.text().contains("all"), "{}", denied.text());
    let passed = resps.iter().find(|r| r.status == 200).expect("a 200");
    assert_eq!(passed.header("x-ratelimit-limit"), Some("700"));
    // Every remaining count from 699 down to 0 was handed out exactly once.
    let mut passes: Vec<u64> = resps
        .iter()
        .filter(|r| r.status == 200)
        .filter_map(|r| r.header("x-ratelimit-remaining")?.parse().ok())
        .collect();
    passes.sort_unstable();
    assert_eq!(passes, (0..700).collect::<Vec<u64>>());

    wait_metric(
        &proxy,
        "wasmesh_filter_ratelimit_requests_total",
        &[("filter", "rl"), ("limit", "all"), ("decision", "limited")],
        2300.0,
    )
    .await;
    wait_metric(
        &proxy,
        "wasmesh_filter_ratelimit_requests_total",
        &[("filter", "rl"), ("limit", "all"), ("decision", "allowed")],
        700.0,
    )
    .await;
    let line = proxy
        .log_entry("a rate-limited request's log line", |l| l["status"] == 429)
        .await;
    assert_eq!(line["response_flags"], "RL", "{line}");
    assert_eq!(line["attributes"]["ratelimit.limited_by"], "all", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratelimit_refill_passes_burst_plus_rate_times_elapsed_within_one_token() {
    const BURST: f64 = 20.0;
    const RATE: f64 = 50.0; // per second
    let up = Upstream::start().await;
    let mut m = manifest(
        &up,
        vec![entry(
            "rl",
            "ratelimit",
            json!({"limits": [{"name": "user", "key": "header:x-user", "burst": 20,
                               "refill": {"tokens": 5, "period": "100ms"}}]}),
        )],
        &["rl"],
    );
    m["workers"] = json!(2);
    let proxy = Proxy::start(m).await;
    let addr = proxy.listener("in");
    // Another user's bucket is untouched by the flood.
    let other = Req::get("/").header("x-user", "bob").send(addr).await;
    assert_eq!(other.status, 200);

    let started = Instant::now();
    let run_for = Duration::from_millis(2500);
    let timed = blast_timed(
        addr,
        16,
        move |_| started.elapsed() < run_for,
        |_| Req::get("/").header("x-user", "alice"),
    )
    .await;
    // Each decision is made between its request's send and its response's arrival, so
    // the span from the first decision to the last lies in [lo, hi].
    let first_sent = timed.iter().map(|t| t.1).min().expect("requests");
    let first_done = timed.iter().map(|t| t.2).min().expect("requests");
    let last_sent = timed.iter().map(|t| t.1).max().expect("requests");
    let last_done = timed.iter().map(|t| t.2).max().expect("requests");
    let lo = last_sent.duration_since(first_done).as_secs_f64();
    let hi = last_done.duration_since(first_sent).as_secs_f64();
    let resps: Vec<Resp> = timed.into_iter().map(|t| t.0).collect();
    let ok = count_status(&resps, 200) as f64;
    let (want_lo, want_hi) = (BURST + RATE * lo, BURST + RATE * hi);
    let mid = (want_lo + want_hi) / 2.0;
    println!(
        "ratelimit refill: {ok} passed of {} over a decision span of {lo:.4}..{hi:.4}s; \
         burst + rate × span = {want_lo:.2}..{want_hi:.2} (off by {:+.2} tokens from the middle)",
        resps.len(),
        ok - mid
    );
    assert!(
        resps.len() as f64 > 3.0 * mid,
        "the flood must outrun the refill"
    );
    // GCRA: burst + every token that came due during the span, plus at most the one due
    // exactly at the last decision.
    assert!(
        ok >= want_lo.floor() && ok <= want_hi.floor() + 1.0,
        "{ok} passes, expected {want_lo:.2}..={:.2}",
        want_hi + 1.0
    );
    let denied = resps.iter().find(|r| r.status == 429).expect("a 429");
    assert_eq!(
        denied.header("retry-after"),
        Some("1"),
        "a token comes back every 20 ms"
    );
    assert_eq!(denied.header("x-ratelimit-limit"), Some("20"));
}

#[tokio::test]
async fn ratelimit_several_limits_by_client_and_header_give_back_unused_tokens() {
    let up = Upstream::start().await;
    let mut m = manifest(
        &up,
        vec![entry(
            "rl",
            "ratelimit",
            json!({"limits": [
                {"name": "per-client", "key": "client_address", "burst": 3,
                 "refill": {"tokens": 1, "period": "1m"}},
                {"name": "per-tenant", "key": "header:x-tenant", "burst": 5, "window": "1h"},
            ]}),
        )],
        &["rl"],
    );
    // The client address comes from x-forwarded-for, so one test plays several clients.
    m["listeners"][0]["xff_num_trusted_hops"] = json!(1);
    let proxy = Proxy::start(m).await;
    let addr = proxy.listener("in");
    let send = |client: &'static str, tenant: &'static str| async move {
        Req::get("/")
            .header("x-forwarded-for", client)
            .header("x-tenant", tenant)
            .send(addr)
            .await
    };

    // Client A: three pass, the fourth is over its own limit.
    for left in ["2", "1", "0"] {
        let r = send("10.0.0.1", "t1").await;
        assert_eq!(r.status, 200);
        assert_eq!(
            r.header("x-ratelimit-remaining"),
            Some(left),
            "{:?}",
            r.headers
        );
    }
    let r = send("10.0.0.1", "t1").await;
    assert_eq!(r.status, 429);
    assert!(r.text().contains("per-client"), "{}", r.text());
    let retry: u64 = r
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("int");
    assert!(
        (58..=60).contains(&retry),
        "a token per minute: retry after {retry}s"
    );
    let reset: u64 = r
        .header("x-ratelimit-reset")
        .expect("reset")
        .parse()
        .expect("int");
    assert!(
        (178..=180).contains(&reset),
        "full again in 3 min: {reset}s"
    );

    // Client B, same tenant: the tenant has 2 left (A's denied request did not count).
    assert_eq!(send("10.0.0.2", "t1").await.status, 200);
    assert_eq!(send("10.0.0.2", "t1").await.status, 200);
    let r = send("10.0.0.2", "t1").await;
    assert_eq!(r.status, 429);
    assert!(r.text().contains("per-tenant"), "{}", r.text());
    let retry: u64 = r
        .header("retry-after")
        .expect("retry-after")
        .parse()
        .expect("int");
    assert!(
        (1..=3600).contains(&retry),
        "until the hour's window ends: {retry}"
    );
    // ... and B's per-client token for that request was given back: one more passes.
    assert_eq!(send("10.0.0.2", "t2").await.status, 200);
    assert_eq!(send("10.0.0.2", "t2").await.status, 429);
    // A request without the tenant header is limited per client only.
    let r = Req::get("/")
        .header("x-forwarded-for", "10.0.0.3")
        .send(addr)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(up.request_count(), 3 + 2 + 1 + 1);
}

#[tokio::test]
async fn ratelimit_shadow_mode_counts_and_logs_but_lets_everything_through() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(manifest(
        &up,
        vec![entry(
            "rl",
            "ratelimit",
            json!({"shadow": true, "limits": [{"name": "trial", "key": "route", "burst": 2}]}),
        )],
        &["rl"],
    ))
    .await;
    for _ in 0..5 {
        let r = Req::get("/").send(proxy.listener("in")).await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(up.request_count(), 5);
    wait_metric(
        &proxy,
        "wasmesh_filter_ratelimit_requests_total",
        &[("limit", "trial"), ("decision", "shadow_limited")],
        3.0,
    )
    .await;
    assert_eq!(
        proxy
            .metric(
                "wasmesh_filter_ratelimit_requests_total",
                &[("limit", "trial"), ("decision", "allowed")]
            )
            .await,
        2.0
    );
    proxy
        .wait_for(Duration::from_secs(5), "the shadow log line", || async {
            proxy
                .stderr()
                .contains("shadow: limit trial would reject")
                .then_some(())
        })
        .await;
    let line = proxy
        .log_entry("a shadow-limited line", |l| {
            l["attributes"]["ratelimit.limited_by"] == "trial"
        })
        .await;
    assert_eq!(line["status"], 200);
    assert_eq!(
        line["response_flags"], "-",
        "shadow mode sets no flag: {line}"
    );
}

#[tokio::test]
async fn filter_config_errors_name_the_field() {
    let up = Upstream::start().await;
    let (status, stderr) = Proxy::start_failure(manifest(
        &up,
        vec![entry(
            "rl",
            "ratelimit",
            json!({"limits": [{"key": "client_address", "burst": 10,
                               "refill": {"tokens": 1, "period": "1 minute"}}]}),
        )],
        &["rl"],
    ))
    .await;
    assert!(!status.success());
    assert!(
        stderr.contains("config.limits[0].refill.period"),
        "the error names the field:\n{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// fault

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_aborts_ten_percent_of_10000_requests() {
    let up = Upstream::start().await;
    let mut m = manifest(
        &up,
        vec![entry(
            "fault",
            "fault",
            json!({"abort": {"percent": 10, "status": 503}}),
        )],
        &["fault"],
    );
    m["workers"] = json!(2);
    let proxy = Proxy::start(m).await;
    let started = Instant::now();
    let resps = blast_n(proxy.listener("in"), 32, 10_000, |_| Req::get("/")).await;
    let took = started.elapsed();
    let aborted = count_status(&resps, 503);
    let share = aborted as f64 / 100.0;
    println!("fault: {aborted} of 10000 aborted ({share:.2}%) in {took:?}");
    assert_eq!(aborted + count_status(&resps, 200), 10_000);
    assert!((8.5..=11.5).contains(&share), "10% ± 1.5%: got {share}%");
    assert_eq!(up.request_count(), 10_000 - aborted);
    wait_metric(
        &proxy,
        "wasmesh_filter_fault_injected_total",
        &[("filter", "fault"), ("kind", "abort")],
        aborted as f64,
    )
    .await;
    let line = proxy
        .log_entry("an aborted request's line", |l| l["status"] == 503)
        .await;
    assert_eq!(line["response_flags"], "FI", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_delay_is_observed_and_does_not_block_the_worker() {
    let up = Upstream::start().await;
    // One worker: the delayed request and the others share its thread.
    let proxy = Proxy::start(manifest(
        &up,
        vec![entry(
            "fault",
            "fault",
            json!({"delay": {"percent": 100, "duration": "800ms"},
                   "match": {"headers": [{"name": "x-fault", "exact": "delay"}]}}),
        )],
        &["fault"],
    ))
    .await;
    let addr = proxy.listener("in");
    let slow = tokio::spawn(async move {
        let t = Instant::now();
        let r = Req::get("/slow")
            .header("x-fault", "delay")
            .header("x-request-id", "delayed-1")
            .send(addr)
            .await;
        (r.status, t.elapsed())
    });
    // Wait until the delayed request is inside the proxy (the filter has run), then time
    // other requests on the same worker while it waits.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let fast = blast_n(addr, 4, 40, |_| Req::get("/fast")).await;
    let fast_took = t.elapsed();
    assert_eq!(count_status(&fast, 200), 40);
    let (status, slow_took) = slow.await.expect("slow task");
    println!(
        "fault delay: delayed request took {slow_took:?}; 40 others took {fast_took:?} meanwhile"
    );
    assert_eq!(status, 200);
    assert!(slow_took >= Duration::from_millis(800), "{slow_took:?}");
    assert!(
        fast_took < Duration::from_millis(600),
        "other requests waited for the delay: {fast_took:?}"
    );
    let line = proxy.log_for_request_id("delayed-1").await;
    assert_eq!(line["response_flags"], "DI", "{line}");
    assert!(
        line["duration_ms"].as_f64().unwrap_or(0.0) >= 800.0,
        "{line}"
    );
    // The unmatched requests were not delayed or flagged.
    let fast_line = proxy
        .log_entry("a fast request's line", |l| l["path"] == "/fast")
        .await;
    assert_eq!(fast_line["response_flags"], "-", "{fast_line}");
}

#[tokio::test]
async fn fault_applies_only_to_matching_sources() {
    let up = Upstream::start().await;
    let mut m = manifest(
        &up,
        vec![entry(
            "fault",
            "fault",
            json!({"abort": {"percent": 100, "status": 418, "body": "teapot\n"},
                   "match": {"sources": ["10.0.0.0/8", "2001:db8::/32"]}}),
        )],
        &["fault"],
    );
    m["listeners"][0]["xff_num_trusted_hops"] = json!(1);
    let proxy = Proxy::start(m).await;
    let addr = proxy.listener("in");
    let from = |ip: &'static str| async move {
        Req::get("/").header("x-forwarded-for", ip).send(addr).await
    };
    let r = from("10.20.30.40").await;
    assert_eq!((r.status, r.text().as_str()), (418, "teapot\n"));
    assert_eq!(from("2001:db8::1").await.status, 418);
    assert_eq!(from("192.168.1.1").await.status, 200);
    assert_eq!(Req::get("/").send(addr).await.status, 200);
}

// ---------------------------------------------------------------------------------------
// canary

/// Two upstreams (`stable`, `canary`) and a proxy whose route goes to `stable`, with the
/// canary filter entries given (each on its own route prefix `/NAME/`, the first also `/`).
async fn canary_setup(entries: Vec<(&str, Value)>) -> (Upstream, Upstream, Proxy) {
    let stable = Upstream::named("stable").await;
    let canary = Upstream::named("canary").await;
    let names: Vec<String> = entries.iter().map(|(n, _)| n.to_string()).collect();
    let mut filters = Vec::new();
    let mut routes = Vec::new();
    for (name, config) in entries {
        let mut e = entry(name, "canary", config);
        e["clusters"] = json!(["canary"]);
        filters.push(e);
        routes.push(
            json!({"name": name, "match": {"prefix": format!("/{name}/")},
                           "cluster": "stable", "filters": [name]}),
        );
    }
    routes.push(json!({"name": "default", "cluster": "stable", "filters": [names[0]]}));
    let proxy = Proxy::start(json!({
        "workers": 2,
        "filter_dir": filter_dir(&["canary"]),
        "filters": filters,
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": routes}],
        "clusters": [cluster("stable", stable.addr()), cluster("canary", canary.addr())],
    }))
    .await;
    (stable, canary, proxy)
}

fn went_to_canary(r: &Resp) -> bool {
    assert_eq!(r.status, 200, "{}", r.text());
    r.text() == "upstream canary"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_splits_10000_requests_by_weight() {
    let (stable, canary, proxy) = canary_setup(vec![(
        "split",
        json!({"targets": [{"cluster": "canary", "percent": 10}], "mark_header": "x-canary-cluster"}),
    )])
    .await;
    let started = Instant::now();
    let resps = blast_n(proxy.listener("in"), 32, 10_000, |_| Req::get("/split/")).await;
    let took = started.elapsed();
    let to_canary = resps.iter().filter(|r| went_to_canary(r)).count();
    let share = to_canary as f64 / 100.0;
    println!("canary split: {to_canary} of 10000 to the canary ({share:.2}%) in {took:?}");
    assert!((8.0..=12.0).contains(&share), "10% ± 2%: got {share}%");
    assert_eq!(canary.request_count(), to_canary);
    assert_eq!(stable.request_count(), 10_000 - to_canary);
    assert_eq!(canary.last().header("x-canary-cluster"), Some("canary"));
    assert_eq!(stable.last().header("x-canary-cluster"), None);
    wait_metric(
        &proxy,
        "wasmesh_filter_canary_requests_total",
        &[("cluster", "canary"), ("reason", "random")],
        to_canary as f64,
    )
    .await;
    let line = proxy
        .log_entry("a canary request's line", |l| l["cluster"] == "canary")
        .await;
    assert_eq!(line["attributes"]["canary.cluster"], "canary", "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_is_sticky_per_user_and_header_matches_override() {
    let (_stable, _canary, proxy) = canary_setup(vec![
        (
            "byheader",
            json!({"targets": [{"cluster": "canary", "percent": 20}],
                   "sticky": {"header": "x-user"}, "salt": "exp-1",
                   "overrides": [
                       {"match": [{"name": "x-canary", "exact": "always"}], "cluster": "canary"},
                       {"match": [{"name": "x-canary", "exact": "never"}]}]}),
        ),
        (
            "bycookie",
            json!({"targets": [{"cluster": "canary", "percent": 50}],
                   "sticky": {"cookie": "uid"}, "when_missing": "route"}),
        ),
    ])
    .await;
    let addr = proxy.listener("in");
    // 5000 users, two requests each, interleaved over 32 connections and both workers.
    let resps = blast_n(addr, 32, 10_000, |i| {
        Req::get("/byheader/").header("x-user", &format!("user-{}", i % 5000))
    })
    .await;
    let mut side: HashMap<usize, bool> = HashMap::new();
    for (i, r) in resps.iter().enumerate() {
        let c = went_to_canary(r);
        if let Some(prev) = side.insert(i % 5000, c) {
            assert_eq!(prev, c, "user-{} switched sides", i % 5000);
        }
    }
    let users_on_canary = side.values().filter(|c| **c).count();
    let share = users_on_canary as f64 / 50.0;
    println!(
        "canary sticky: {users_on_canary} of 5000 users on the canary ({share:.2}%), none switched"
    );
    assert!(
        (18.0..=22.0).contains(&share),
        "20% ± 2% of users: {share}%"
    );

    // Header overrides, whatever the user.
    let stable_user = (0..5000).find(|u| !side[u]).expect("a stable user");
    let canary_user = (0..5000).find(|u| side[u]).expect("a canary user");
    let r = Req::get("/byheader/")
        .header("x-user", &format!("user-{stable_user}"))
        .header("x-canary", "always")
        .send(addr)
        .await;
    assert!(went_to_canary(&r));
    let r = Req::get("/byheader/")
        .header("x-user", &format!("user-{canary_user}"))
        .header("x-canary", "never")
        .send_h2(addr)
        .await;
    assert!(!went_to_canary(&r));
    let r = Req::get("/byheader/")
        .header("x-user", &format!("user-{canary_user}"))
        .send_h2(addr)
        .await;
    assert!(went_to_canary(&r));

    // Cookie stickiness; no cookie: the route's cluster.
    for u in 0..50 {
        let cookie = format!("theme=dark; uid={u}");
        let first = went_to_canary(
            &Req::get("/bycookie/")
                .header("cookie", &cookie)
                .send(addr)
                .await,
        );
        for _ in 0..3 {
            let again = Req::get("/bycookie/")
                .header("cookie", &cookie)
                .send_h2(addr)
                .await;
            assert_eq!(went_to_canary(&again), first, "uid {u} switched sides");
        }
    }
    for _ in 0..20 {
        assert!(!went_to_canary(&Req::get("/bycookie/").send(addr).await));
    }
}

// ---------------------------------------------------------------------------------------
// headers

#[tokio::test]
async fn headers_add_set_remove_rename_with_request_data() {
    let up = Upstream::start().await;
    up.set_default(Behavior::Respond {
        status: 200,
        headers: vec![
            ("x-upstream-secret".into(), "s3cr3t".into()),
            ("x-internal".into(), "v1".into()),
        ],
        body: "ok".into(),
    });
    let proxy = Proxy::start(manifest(
        &up,
        vec![entry(
            "hdr",
            "headers",
            json!({
                "request": {
                    "rename": {"x-old": "x-new"},
                    "remove": ["x-debug"],
                    "set": {"x-path": "%PATH%", "x-rid": "%REQUEST_ID%", "x-method": "%METHOD%",
                            "x-auth": "%AUTHORITY%", "x-client": "%SOURCE_ADDRESS%",
                            "x-route": "%ROUTE%", "x-peer": "%PEER_IDENTITY%",
                            "x-user-copy": "user=%REQ(x-user)% (100%%)"},
                    "add": {"x-via": ["edge", "%METHOD%"]}
                },
                "response": {
                    "rename": {"x-internal": "x-public"},
                    "remove": ["x-upstream-secret"],
                    "set": {"x-request-id": "%REQUEST_ID%"},
                    "add": {"x-served-for": "%REQ(x-user)%"}
                }
            }),
        )],
        &["hdr"],
    ))
    .await;
    let addr = proxy.listener("in");
    for h2 in [false, true] {
        let id = format!("hdr-{h2}");
        let req = Req::post("/a/b?q=1")
            .host("shop.local")
            .header("x-request-id", &id)
            .header("x-user", "alice")
            .header("x-debug", "1")
            .header("x-old", "o1")
            .header("x-old", "o2")
            .header("x-via", "client");
        let r = if h2 {
            req.send_h2(addr).await
        } else {
            req.send(addr).await
        };
        assert_eq!(r.status, 200);
        let seen = up.last();
        assert_eq!(seen.header("x-path"), Some("/a/b"));
        assert_eq!(seen.header("x-rid"), Some(id.as_str()));
        assert_eq!(seen.header("x-method"), Some("POST"));
        assert_eq!(seen.header("x-auth"), Some("shop.local"));
        let client = seen.header("x-client").expect("x-client");
        assert!(client.starts_with("127.0.0.1:"), "{client}");
        assert_eq!(seen.header("x-route"), Some("app"));
        assert_eq!(seen.header("x-peer"), None, "empty values are not written");
        assert_eq!(seen.header("x-user-copy"), Some("user=alice (100%)"));
        assert_eq!(seen.header("x-debug"), None);
        assert_eq!(seen.header("x-old"), None);
        assert_eq!(seen.header_all("x-new"), vec!["o1", "o2"]);
        assert_eq!(seen.header_all("x-via"), vec!["client", "edge", "POST"]);

        assert_eq!(r.header("x-upstream-secret"), None);
        assert_eq!(r.header("x-internal"), None);
        assert_eq!(r.header("x-public"), Some("v1"));
        assert_eq!(r.header("x-request-id"), Some(id.as_str()));
        assert_eq!(r.header("x-served-for"), Some("alice"));
    }
}

// ---------------------------------------------------------------------------------------
// telemetry

#[tokio::test]
async fn telemetry_counts_by_tenant_with_bounded_labels_and_logs_attributes() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(manifest(
        &up,
        vec![entry(
            "tm",
            "telemetry",
            json!({
                "attributes": {"tenant": "%REQ(x-tenant)%", "client": "%SOURCE_IP%",
                               "route": "%ROUTE%"},
                "label": {"name": "tenant", "header": "x-tenant",
                          "values": ["acme", "globex"]},
                "buckets": [0.001, 0.01, 0.1, 1.0]
            }),
        )],
        &["tm"],
    ))
    .await;
    let addr = proxy.listener("in");
    let tenants = ["acme", "acme", "acme", "globex", "globex", "evil-corp"];
    for (i, t) in tenants.iter().enumerate() {
        let r = Req::get("/")
            .header("x-tenant", t)
            .header("x-request-id", &format!("tm-{i}"))
            .send(addr)
            .await;
        assert_eq!(r.status, 200);
    }
    assert_eq!(Req::get("/").send_h2(addr).await.status, 200);

    let name = "wasmesh_filter_telemetry_requests_total";
    wait_metric(
        &proxy,
        name,
        &[
            ("filter", "tm"),
            ("tenant", "acme"),
            ("response_code_class", "2xx"),
        ],
        3.0,
    )
    .await;
    let text = proxy.metrics().await;
    let v = |labels: &[(&str, &str)]| wasmesh_e2e::proxy::metric_value(&text, name, labels);
    assert_eq!(v(&[("tenant", "globex")]), 2.0);
    assert_eq!(
        v(&[("tenant", "other")]),
        1.0,
        "values outside the list count as other"
    );
    assert_eq!(v(&[("tenant", "unknown")]), 1.0, "no header: the default");
    assert_eq!(v(&[("tenant", "evil-corp")]), 0.0);
    let hist = "wasmesh_filter_telemetry_request_duration_seconds_count";
    assert_eq!(
        wasmesh_e2e::proxy::metric_value(&text, hist, &[("tenant", "acme")]),
        3.0,
        "{text}"
    );
    assert!(
        text.contains("wasmesh_filter_telemetry_request_duration_seconds_bucket{"),
        "{text}"
    );

    let line = proxy.log_for_request_id("tm-3").await;
    assert_eq!(line["attributes"]["tenant"], "globex", "{line}");
    assert_eq!(line["attributes"]["client"], "127.0.0.1", "{line}");
    assert_eq!(line["attributes"]["route"], "app", "{line}");
}

// ---------------------------------------------------------------------------------------
// all together

#[tokio::test]
async fn a_chain_of_reference_filters_works_together() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(manifest(
        &up,
        vec![
            entry(
                "tm",
                "telemetry",
                json!({"attributes": {"user": "%REQ(x-user)%"},
                       "label": {"name": "user", "header": "x-user"}}),
            ),
            entry(
                "hdr",
                "headers",
                json!({"request": {"set": {"x-user": "%REQ(x-api-key)%"}}}),
            ),
            entry(
                "rl",
                "ratelimit",
                json!({"limits": [{"key": "header:x-user", "burst": 2}]}),
            ),
        ],
        &["tm", "hdr", "rl"],
    ))
    .await;
    let addr = proxy.listener("in");
    // The rate limit sees the header the headers filter derived from the API key.
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(
                Req::get("/")
                    .header("x-api-key", "k1")
                    .send(addr)
                    .await
                    .status,
            );
        }
        v
    };
    assert_eq!(statuses, vec![200, 200, 429]);
    assert_eq!(
        Req::get("/")
            .header("x-api-key", "k2")
            .send(addr)
            .await
            .status,
        200
    );
    assert_eq!(up.last().header("x-user"), Some("k2"));
    wait_metric(
        &proxy,
        "wasmesh_filter_telemetry_requests_total",
        &[("response_code_class", "4xx")],
        1.0,
    )
    .await;
}
