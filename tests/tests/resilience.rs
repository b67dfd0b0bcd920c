//! Retries, timeouts, circuit breakers, mirroring and weighted splits: each shown working
//! against upstreams that fail on command, and shown not over-firing.

use bytes::Bytes;
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use wasmesh_e2e::client::{Conn, Req};
use wasmesh_e2e::upstream::refused_addr;
use wasmesh_e2e::{cluster, eventually, Behavior, Proxy, Upstream};

/// One listener `in` routing everything to cluster `up` with this route body merged in.
fn manifest(route: Value, clusters: Vec<Value>) -> Value {
    let mut r = json!({"match": {"prefix": "/"}, "cluster": "up"});
    if let (Some(r), Some(extra)) = (r.as_object_mut(), route.as_object()) {
        for (k, v) in extra {
            r.insert(k.clone(), v.clone());
        }
    }
    json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [r]}],
        "clusters": clusters,
    })
}

fn fast_retries(on: &str, n: u32) -> Value {
    json!({"retry_on": on, "num_retries": n, "retry_back_off": {"base_interval": "1ms"}})
}

async fn counter(proxy: &Proxy, name: &str, cluster: &str) -> f64 {
    proxy.metric(name, &[("cluster", cluster)]).await
}

#[tokio::test]
async fn retries_5xx_until_success_and_counts_them() {
    let up = Upstream::named("up").await;
    up.fail_times(2, 503);
    let proxy = Proxy::start(manifest(
        json!({"retry_policy": fast_retries("5xx", 2)}),
        vec![cluster("up", up.addr())],
    ))
    .await;
    let r = Req::get("/x")
        .header("x-request-id", "retry-ok")
        .send(proxy.listener("in"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "upstream up");
    assert_eq!(up.request_count(), 3, "first attempt and two retries");
    let log = proxy.log_for_request_id("retry-ok").await;
    assert_eq!(log["response_flags"], "-", "{log}");
    assert_eq!(
        counter(&proxy, "wasmesh_upstream_rq_retry_total", "up").await,
        2.0
    );
    assert_eq!(
        counter(&proxy, "wasmesh_upstream_rq_retry_success_total", "up").await,
        1.0
    );
}

#[tokio::test]
async fn exhausted_retries_return_the_upstream_answer_with_urx() {
    let up = Upstream::named("up").await;
    up.set_default(Behavior::Status(503));
    let other = Upstream::named("other").await;
    other.set_default(Behavior::Status(404));
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/gw"}, "cluster": "up", "retry_policy": fast_retries("5xx", 2)},
            // A condition that does not match the failure: no retry.
            {"match": {"prefix": "/cf"}, "cluster": "up", "retry_policy": fast_retries("connect-failure", 3)},
            // 404 is not retried under 5xx.
            {"match": {"prefix": "/nf"}, "cluster": "other", "retry_policy": fast_retries("5xx", 3)},
        ]}],
        "clusters": [cluster("up", up.addr()), cluster("other", other.addr())],
    }))
    .await;
    let r = Req::get("/gw")
        .header("x-request-id", "urx")
        .send(proxy.listener("in"))
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "upstream up", "the upstream's own answer");
    assert_eq!(up.request_count(), 3);
    let log = proxy.log_for_request_id("urx").await;
    assert_eq!(log["response_flags"], "URX", "{log}");
    assert_eq!(
        counter(
            &proxy,
            "wasmesh_upstream_rq_retry_limit_exceeded_total",
            "up"
        )
        .await,
        1.0
    );

    let r = Req::get("/cf").send(proxy.listener("in")).await;
    assert_eq!(r.status, 503);
    assert_eq!(
        up.request_count(),
        4,
        "connect-failure does not retry a 503"
    );
    let r = Req::get("/nf").send(proxy.listener("in")).await;
    assert_eq!(r.status, 404);
    assert_eq!(other.request_count(), 1, "a 404 is not retried");
}

#[tokio::test]
async fn a_retry_goes_to_another_endpoint() {
    let bad = Upstream::named("bad").await;
    bad.set_default(Behavior::Status(502));
    let good = Upstream::named("good").await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/"}, "cluster": "up", "retry_policy": fast_retries("gateway-error", 1)},
        ]}],
        "clusters": [{"name": "up", "lb_policy": "least_request", "endpoints": [
            {"address": bad.addr().to_string()}, {"address": good.addr().to_string()},
        ]}],
    }))
    .await;
    let mut conn = Conn::h1(proxy.listener("in")).await;
    for i in 0..40 {
        let r = conn.send(Req::get("/")).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        assert_eq!(r.text(), "upstream good");
    }
    // Every request that met the bad endpoint first was retried once, on the good one.
    assert_eq!(good.request_count(), 40);
    assert!(bad.request_count() > 0 && bad.request_count() < 40);
}

#[tokio::test]
async fn connect_failures_and_resets_are_retried() {
    let reset = Upstream::named("reset").await;
    reset.set_default(Behavior::ResetBeforeResponse);
    let good = Upstream::named("good").await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/cf"}, "cluster": "cf", "retry_policy": fast_retries("connect-failure", 1)},
            {"match": {"prefix": "/reset"}, "cluster": "rs", "retry_policy": fast_retries("reset", 1)},
            {"match": {"prefix": "/noretry"}, "cluster": "rs"},
        ]}],
        "clusters": [
            {"name": "cf", "endpoints": [{"address": refused_addr().to_string()}, {"address": good.addr().to_string()}]},
            {"name": "rs", "endpoints": [{"address": reset.addr().to_string()}, {"address": good.addr().to_string()}]},
        ],
    }))
    .await;
    for path in ["/cf", "/reset"] {
        for _ in 0..10 {
            let r = Req::get(path).send(proxy.listener("in")).await;
            assert_eq!(r.status, 200, "{path}: {}", r.text());
        }
    }
    // Without a policy a reset reaches the client (some of the time: round robin).
    let mut failures = 0;
    for _ in 0..10 {
        if Req::get("/noretry").send(proxy.listener("in")).await.status == 503 {
            failures += 1;
        }
    }
    assert!(failures > 0);
}

#[tokio::test]
async fn per_try_timeout_retries_a_slow_attempt_and_route_timeout_bounds_all() {
    let up = Upstream::named("up").await;
    up.push(Behavior::Delay(Duration::from_secs(5)));
    let hang = Upstream::named("hang").await;
    hang.set_default(Behavior::Hang);
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/slow-once"}, "cluster": "up", "timeout": "10s",
             "retry_policy": {"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "200ms",
                              "retry_back_off": {"base_interval": "1ms"}}},
            {"match": {"prefix": "/hang"}, "cluster": "hang", "timeout": "700ms",
             "retry_policy": {"retry_on": "5xx", "num_retries": 10, "per_try_timeout": "200ms",
                              "retry_back_off": {"base_interval": "1ms"}}},
        ]}],
        "clusters": [cluster("up", up.addr()), cluster("hang", hang.addr())],
    }))
    .await;
    let r = Req::get("/slow-once").send(proxy.listener("in")).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "upstream up");
    assert_eq!(up.request_count(), 2);
    assert_eq!(
        counter(&proxy, "wasmesh_upstream_rq_per_try_timeout_total", "up").await,
        1.0
    );

    let r = Req::get("/hang")
        .header("x-request-id", "route-timeout")
        .send(proxy.listener("in"))
        .await;
    assert_eq!(r.status, 504);
    let log = proxy.log_for_request_id("route-timeout").await;
    assert_eq!(log["response_flags"], "UT", "{log}");
    // 700ms route timeout, 200ms tries: at most 4 attempts, never the 11 the count allows.
    let n = hang.request_count();
    assert!((3..=4).contains(&n), "{n} attempts");
}

#[tokio::test]
async fn grpc_timeout_header_shortens_the_route_timeout() {
    let hang = Upstream::named("hang").await;
    hang.set_default(Behavior::Hang);
    let proxy = Proxy::start(manifest(
        json!({"timeout": "30s"}),
        vec![cluster("up", hang.addr())],
    ))
    .await;
    let r = Req::post("/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("grpc-timeout", "300m")
        .header("x-request-id", "grpc-deadline")
        .body(Bytes::from_static(b"\0\0\0\0\0"))
        .send(proxy.listener("in"))
        .await;
    assert_eq!(r.status, 504);
    let log = proxy.log_for_request_id("grpc-deadline").await;
    assert_eq!(log["response_flags"], "UT");
    assert!(
        log["duration_ms"].as_f64().unwrap_or(1e9) < 10_000.0,
        "{log}"
    );
}

#[tokio::test]
async fn request_bodies_replay_up_to_the_buffer_limit() {
    let up = Upstream::named("up").await;
    up.set_default(Behavior::Echo);
    let proxy = Proxy::start(manifest(
        json!({"retry_policy": {"retry_on": "5xx", "num_retries": 1, "per_request_buffer_limit_bytes": 2048,
                                "retry_back_off": {"base_interval": "1ms"}}}),
        vec![cluster("up", up.addr())],
    ))
    .await;
    up.fail_times(1, 503);
    let small = Bytes::from(vec![b's'; 1500]);
    let r = Req::post("/small")
        .body(small.clone())
        .send(proxy.listener("in"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, small, "the retry carried the same body");
    let reqs = up.requests();
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[0].body, small);
    assert_eq!(reqs[1].body, small);

    // Over the limit: the body streams through once and a failure is not retried.
    up.fail_times(1, 503);
    let large = Bytes::from(vec![b'L'; 8000]);
    let r = Req::post("/large")
        .body(large.clone())
        .send(proxy.listener("in"))
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(up.request_count(), 3, "not retried");
    assert_eq!(
        up.last().body,
        large,
        "the upstream still got the whole body"
    );
    assert_eq!(
        counter(
            &proxy,
            "wasmesh_upstream_rq_retry_not_replayable_total",
            "up"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn retry_after_is_honoured_within_the_route_timeout() {
    let up = Upstream::named("up").await;
    let retry_after = |secs: &str| Behavior::Respond {
        status: 503,
        headers: vec![("retry-after".into(), secs.into())],
        body: Bytes::from_static(b"busy"),
    };
    let proxy = Proxy::start(manifest(
        json!({"timeout": "3s", "retry_policy": fast_retries("5xx", 1)}),
        vec![cluster("up", up.addr())],
    ))
    .await;
    up.push(retry_after("1"));
    let t = Instant::now();
    let r = Req::get("/").send(proxy.listener("in")).await;
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(950),
        "waited {:?}",
        t.elapsed()
    );
    assert_eq!(up.request_count(), 2);

    // Asked to wait past the route's timeout: the client gets the 503 now.
    up.push(retry_after("60"));
    let r = Req::get("/").send(proxy.listener("in")).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "busy");
    assert_eq!(up.request_count(), 3);

    // Past what the clock can hold, in either form: the 503 now, not a dropped request.
    // A wait that long is not waited for.
    up.push(retry_after("18446744073709551615"));
    let r = Req::get("/").send(proxy.listener("in")).await;
    assert_eq!(r.status, 503);
    // A date that is not one is no retry-after: the back-off, then the retry.
    up.push(retry_after("Sun, 06 Nov 300000000000 08:49:37 GMT"));
    let r = Req::get("/").send(proxy.listener("in")).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.request_count(), 6);
    assert!(!proxy.stderr().contains("panicked"), "{}", proxy.stderr());
}

#[tokio::test]
async fn an_upstream_cannot_park_a_request_with_retry_after() {
    // No route timeout: a retry-after over 5 minutes is not waited for.
    let up = Upstream::named("up").await;
    let proxy = Proxy::start(manifest(
        json!({"timeout": "0s", "retry_policy": fast_retries("5xx", 1)}),
        vec![cluster("up", up.addr())],
    ))
    .await;
    up.push(Behavior::Respond {
        status: 503,
        headers: vec![("retry-after".into(), "86400".into())],
        body: Bytes::from_static(b"busy"),
    });
    let r = Req::get("/").send(proxy.listener("in")).await;
    assert_eq!((r.status, r.text().as_str()), (503, "busy"));
    assert_eq!(r.header("retry-after"), Some("86400"), "the client sees it");
    assert_eq!(up.request_count(), 1);
}

#[tokio::test]
async fn retry_overflow_returns_the_answer_and_budget_caps_an_outage() {
    let up = Upstream::named("up").await;
    up.set_default(Behavior::Status(503));
    let slow = Upstream::named("slow").await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/none"}, "cluster": "noretries", "retry_policy": fast_retries("5xx", 3)},
            {"match": {"prefix": "/budget"}, "cluster": "budget", "retry_policy": fast_retries("5xx", 3)},
        ]}],
        "clusters": [
            {"name": "noretries", "circuit_breakers": {"max_retries": 0},
             "endpoints": [{"address": up.addr().to_string()}]},
            {"name": "budget", "circuit_breakers": {"retry_budget": {"budget_percent": 20.0, "min_retry_concurrency": 2}},
             "endpoints": [{"address": slow.addr().to_string()}]},
        ],
    }))
    .await;
    let r = Req::get("/none").send(proxy.listener("in")).await;
    assert_eq!(r.status, 503);
    assert_eq!(up.request_count(), 1, "no retry slot: not retried");
    assert_eq!(
        counter(
            &proxy,
            "wasmesh_upstream_rq_retry_overflow_total",
            "noretries"
        )
        .await,
        1.0
    );

    // A full outage under 40 concurrent requests: each attempt takes 300ms and fails. The
    // budget allows 20% of the requests in flight (8) as retries at once, so most requests
    // get no retry instead of the 3 each that `num_retries` would allow (120).
    slow.set_default(Behavior::SlowStatus(Duration::from_millis(300), 503));
    let addr = proxy.listener("in");
    let calls = (0..40).map(|_| Req::get("/budget").send(addr));
    let results = futures_util::future::join_all(calls).await;
    assert!(results.iter().all(|r| r.status == 503));
    let retries = counter(&proxy, "wasmesh_upstream_rq_retry_total", "budget").await;
    let overflow = counter(&proxy, "wasmesh_upstream_rq_retry_overflow_total", "budget").await;
    assert!(retries <= 30.0, "{retries} retries during the outage");
    assert!(overflow >= 20.0, "only {overflow} retries refused");
    assert_eq!(slow.request_count() as f64, 40.0 + retries);
}

#[tokio::test]
async fn breakers_answer_overflow_at_once() {
    let hang = Upstream::named("hang").await;
    hang.set_default(Behavior::Hang);
    // A peer that accepts TCP and never answers: a TLS handshake to it stays pending.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let _hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let ca = wasmesh_e2e::mtls::MeshCa::init("breakers");
    let client = ca.issue("client", "spiffe://mesh.local/ns/a/sa/client");
    let mut tls_cluster = json!({"name": "pending", "connect_timeout": "10s",
        "circuit_breakers": {"max_pending_requests": 1},
        "endpoints": [{"address": silent_addr.to_string()}]});
    tls_cluster["tls"] = wasmesh_e2e::mtls::cluster_tls(
        &client,
        &ca.bundle(),
        &["spiffe://mesh.local/ns/b/sa/server"],
    );
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/req"}, "cluster": "requests", "timeout": "0s"},
            {"match": {"prefix": "/pending"}, "cluster": "pending", "timeout": "0s"},
        ]}],
        "clusters": [
            {"name": "requests", "circuit_breakers": {"max_requests": 2},
             "endpoints": [{"address": hang.addr().to_string()}]},
            tls_cluster,
        ],
    }))
    .await;
    let addr = proxy.listener("in");
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(Req::get("/req").send(addr)))
        .collect();
    hang.wait_requests(2).await;
    let r = Req::get("/req")
        .header("x-request-id", "rq-overflow")
        .send(addr)
        .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "upstream overflow: circuit breaker open\n");
    assert_eq!(
        proxy.log_for_request_id("rq-overflow").await["response_flags"],
        "UO"
    );
    assert_eq!(
        counter(&proxy, "wasmesh_upstream_rq_overflow_total", "requests").await,
        1.0
    );
    assert_eq!(
        hang.request_count(),
        2,
        "the third never reached the upstream"
    );

    let pending = tokio::spawn(Req::get("/pending").send(addr));
    eventually(Duration::from_secs(10), "one pending request", || async {
        (proxy
            .metric(
                "wasmesh_upstream_rq_pending_active",
                &[("cluster", "pending")],
            )
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    let r = Req::get("/pending").send(addr).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "upstream overflow: circuit breaker open\n");
    assert_eq!(
        counter(
            &proxy,
            "wasmesh_upstream_rq_pending_overflow_total",
            "pending"
        )
        .await,
        1.0
    );
    pending.abort();
    for h in held {
        h.abort();
    }
}

#[tokio::test]
async fn mirrors_get_a_copy_without_slowing_the_request() {
    let up = Upstream::named("up").await;
    let shadow = Upstream::named("shadow").await;
    shadow.set_default(Behavior::Echo);
    let stuck = Upstream::named("stuck").await;
    stuck.set_default(Behavior::Hang);
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/all"}, "cluster": "up",
             "request_mirror_policies": [{"cluster": "shadow", "max_body_bytes": 1024}]},
            {"match": {"prefix": "/half"}, "cluster": "up",
             "request_mirror_policies": [{"cluster": "shadow", "percent": 50.0}]},
            {"match": {"prefix": "/stuck"}, "cluster": "up",
             "request_mirror_policies": [{"cluster": "stuck", "timeout": "300ms"}]},
        ]}],
        "clusters": [cluster("up", up.addr()), cluster("shadow", shadow.addr()), cluster("stuck", stuck.addr())],
    }))
    .await;
    let addr = proxy.listener("in");
    let r = Req::post("/all")
        .host("orders.local:8080")
        .body("hello mirror")
        .send(addr)
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "upstream up", "the client gets the real answer");
    shadow.wait_requests(1).await;
    let copy = shadow.last();
    assert_eq!(copy.header("host"), Some("orders.local-shadow:8080"));
    assert_eq!(&copy.body[..], b"hello mirror");
    assert_eq!(up.last().header("host"), Some("orders.local:8080"));

    // Bodies over the cap are not mirrored; the real request is unaffected.
    let big = Bytes::from(vec![b'b'; 4096]);
    let r = Req::post("/all").body(big.clone()).send(addr).await;
    assert_eq!(r.status, 200);
    assert_eq!(up.last().body, big);
    eventually(Duration::from_secs(5), "a dropped mirror", || async {
        (proxy
            .metric(
                "wasmesh_mirror_dropped_total",
                &[("cluster", "shadow"), ("reason", "body_too_large")],
            )
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(shadow.request_count(), 1);

    // A mirror that never answers does not hold the request; the copy times out, counted.
    let t = Instant::now();
    let r = Req::get("/stuck").send(addr).await;
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(5));
    eventually(Duration::from_secs(5), "a timed-out mirror", || async {
        (proxy
            .metric(
                "wasmesh_mirror_dropped_total",
                &[("cluster", "stuck"), ("reason", "timeout")],
            )
            .await
            == 1.0)
            .then_some(())
    })
    .await;

    // A 50% share over 1000 requests (counted when sent, before the answer).
    let mirrored = || async {
        proxy
            .metric("wasmesh_mirror_requests_total", &[("cluster", "shadow")])
            .await
    };
    let before = mirrored().await;
    let mut conn = Conn::h1(addr).await;
    for _ in 0..1000 {
        assert_eq!(conn.send(Req::get("/half")).await.status, 200);
    }
    let sent = mirrored().await - before;
    assert!((430.0..=570.0).contains(&sent), "{sent} of 1000 mirrored");
    shadow.wait_requests(1 + sent as usize).await;
}

#[tokio::test]
async fn weighted_split_holds_its_ratio_and_shifts_by_reload_without_failures() {
    let stable = Upstream::named("stable").await;
    let canary = Upstream::named("canary").await;
    let split = |a: u32, b: u32| {
        json!({
            "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
                {"match": {"prefix": "/"}, "weighted_clusters": [
                    {"name": "stable", "weight": a}, {"name": "canary", "weight": b}]},
            ]}],
            "clusters": [cluster("stable", stable.addr()), cluster("canary", canary.addr())],
        })
    };
    let mut proxy = Proxy::start(split(90, 10)).await;
    let addr = proxy.listener("in");
    let mut conn = Conn::h1(addr).await;
    for _ in 0..10_000 {
        assert_eq!(conn.send(Req::get("/")).await.status, 200);
    }
    let share = canary.request_count() as f64 / 10_000.0;
    assert!((0.08..=0.12).contains(&share), "canary share {share}");

    // Shift 90/10 → 50/50 → 0/100 under steady traffic: no request fails.
    let load = tokio::spawn(async move {
        let mut conn = Conn::h1(addr).await;
        let mut statuses = Vec::new();
        let stop = Instant::now() + Duration::from_secs(4);
        while Instant::now() < stop {
            statuses.push(conn.send(Req::get("/")).await.status);
        }
        statuses
    });
    for (a, b) in [(50, 50), (0, 100)] {
        let reloads = proxy
            .metric("wasmesh_config_reloads_total", &[("result", "success")])
            .await;
        proxy.write_manifest(split(a, b));
        eventually(Duration::from_secs(10), "the reload", || async {
            (proxy
                .metric("wasmesh_config_reloads_total", &[("result", "success")])
                .await
                > reloads)
                .then_some(())
        })
        .await;
    }
    let statuses = load.await.expect("load");
    assert!(
        statuses.iter().all(|s| *s == 200),
        "a request failed during the shift"
    );
    let before = stable.request_count();
    for _ in 0..200 {
        Req::get("/").send(addr).await;
    }
    assert_eq!(
        stable.request_count(),
        before,
        "all traffic on the canary after 0/100"
    );
    proxy.sigterm();
    proxy.wait_exit(Duration::from_secs(10)).await;
}
