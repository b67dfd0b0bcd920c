//! Endpoint health: outlier detection ejects failing endpoints and brings them back, active
//! health checks take endpoints out of rotation and back in, panic mode spreads load when
//! too few are healthy. Each also shown not to fire when it should not.

use serde_json::json;
use std::time::Duration;
use wasmesh_e2e::balance::{checks, endpoint_status, spread, traffic, wait_health, HEALTH_PATH};
use wasmesh_e2e::client::Req;
use wasmesh_e2e::{Behavior, Proxy, Upstream};

fn endpoints(ups: &[&Upstream]) -> serde_json::Value {
    json!(ups
        .iter()
        .map(|u| json!({"address": u.addr().to_string()}))
        .collect::<Vec<_>>())
}

#[tokio::test]
async fn consecutive_5xx_ejects_then_the_endpoint_returns() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let bad = Upstream::named("bad").await;
    bad.set_default(Behavior::Status(500));
    let solo = Upstream::named("solo").await;
    solo.set_default(Behavior::Status(500));
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/solo"}, "cluster": "solo"},
            {"cluster": "app"},
        ]}],
        "clusters": [
            {"name": "app", "endpoints": endpoints(&[&a, &b, &bad]),
             "outlier_detection": {"consecutive_5xx": 3, "interval": "100ms",
                                   "base_ejection_time": "1s", "max_ejection_percent": 50}},
            {"name": "solo", "endpoints": endpoints(&[&solo]), "healthy_panic_threshold": 0,
             "outlier_detection": {"consecutive_5xx": 3, "interval": "100ms",
                                   "base_ejection_time": "30s", "max_ejection_percent": 100}},
        ],
    }))
    .await;
    let l = proxy.listener("in");

    // Round robin reaches `bad` every third request: after its third 500 it is out.
    proxy
        .wait_for(Duration::from_secs(10), "bad ejected", || async {
            let _ = Req::get("/x").send(l).await;
            let n = proxy
                .metric(
                    "wasmesh_outlier_detection_ejections_total",
                    &[("cluster", "app"), ("reason", "consecutive_5xx")],
                )
                .await;
            (n >= 1.0).then_some(())
        })
        .await;
    assert_eq!(traffic(&bad), 3, "ejected after exactly 3 consecutive 500s");
    let st = endpoint_status(&proxy, "app", bad.addr()).await;
    assert_eq!(st["health"], "ejected", "{st}");
    assert_eq!(st["times_ejected"], 1, "{st}");
    assert!(st["ejected_until"].is_string(), "{st}");
    assert_eq!(
        proxy
            .metric(
                "wasmesh_outlier_detection_ejections_active",
                &[("cluster", "app")]
            )
            .await,
        1.0
    );
    assert_eq!(
        proxy
            .metric(
                "wasmesh_endpoint_healthy",
                &[("cluster", "app"), ("endpoint", &bad.addr().to_string())]
            )
            .await,
        0.0
    );

    // While ejected: no traffic, every answer a 200 from the others.
    let seen = spread(l, 20, |_| Req::get("/x")).await;
    assert_eq!(seen.get("bad"), None, "{seen:?}");
    assert_eq!(seen.values().sum::<usize>(), 20, "{seen:?}");
    assert_eq!(traffic(&bad), 3);

    // The endpoint recovers; after its ejection time it takes traffic again.
    bad.set_default(Behavior::Status(200));
    wait_health(&proxy, "app", bad.addr(), "healthy", 5).await;
    proxy
        .wait_for(Duration::from_secs(5), "traffic back at bad", || async {
            let _ = Req::get("/x").send(l).await;
            (traffic(&bad) > 3).then_some(())
        })
        .await;

    // A cluster whose only endpoint is ejected (panic mode off) answers 503 `UH` itself.
    for _ in 0..3 {
        assert_eq!(Req::get("/solo").send(l).await.status, 500);
    }
    let r = Req::get("/solo")
        .header("x-request-id", "solo-uh")
        .send(l)
        .await;
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.text(), "no healthy upstream\n");
    let log = proxy.log_for_request_id("solo-uh").await;
    assert_eq!(log["response_flags"], "UH", "{log}");
    assert_eq!(traffic(&solo), 3);
}

#[tokio::test]
async fn a_single_5xx_or_alternating_failures_do_not_eject() {
    let a = Upstream::named("a").await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [{"name": "app", "endpoints": endpoints(&[&a]),
                      "outlier_detection": {"consecutive_5xx": 3, "consecutive_gateway_failure": 3,
                                            "interval": "100ms", "base_ejection_time": "30s",
                                            "max_ejection_percent": 100}}],
    }))
    .await;
    let l = proxy.listener("in");
    // 500, 200, 503, 200, 502, 502, 200 ...: never three in a row.
    for b in [500, 200, 503, 200, 502, 502, 200, 500, 500, 200] {
        a.push(Behavior::Status(b));
    }
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(Req::get("/x").send(l).await.status);
    }
    assert_eq!(
        statuses,
        vec![500, 200, 503, 200, 502, 502, 200, 500, 500, 200]
    );
    assert_eq!(
        proxy
            .metric("wasmesh_outlier_detection_ejections_total", &[])
            .await,
        0.0
    );
    assert_eq!(
        endpoint_status(&proxy, "app", a.addr()).await["health"],
        "healthy"
    );
    assert_eq!(Req::get("/x").send(l).await.status, 200);
}

#[tokio::test]
async fn max_ejection_percent_holds() {
    let ups: Vec<Upstream> = futures_util::future::join_all(
        (0..4).map(|i| async move { Upstream::named(&format!("u{i}")).await }),
    )
    .await;
    for u in &ups {
        u.set_default(Behavior::Status(503));
    }
    let refs: Vec<&Upstream> = ups.iter().collect();
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [{"name": "app", "endpoints": endpoints(&refs), "healthy_panic_threshold": 0,
                      "outlier_detection": {"consecutive_gateway_failure": 2, "interval": "100ms",
                                            "base_ejection_time": "30s",
                                            "max_ejection_percent": 50}}],
    }))
    .await;
    let l = proxy.listener("in");
    let seen = spread(l, 40, |_| Req::get("/x")).await;
    assert_eq!(seen.get("status 503"), Some(&40), "{seen:?}");
    assert_eq!(
        proxy
            .metric(
                "wasmesh_outlier_detection_ejections_total",
                &[
                    ("cluster", "app"),
                    ("reason", "consecutive_gateway_failure")
                ]
            )
            .await,
        2.0,
        "half of 4 at most"
    );
    assert_eq!(
        proxy
            .metric(
                "wasmesh_outlier_detection_ejections_active",
                &[("cluster", "app")]
            )
            .await,
        2.0
    );
    let mut states = Vec::new();
    for u in &ups {
        states.push(
            endpoint_status(&proxy, "app", u.addr()).await["health"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    states.sort();
    assert_eq!(states, vec!["ejected", "ejected", "healthy", "healthy"]);
}

fn hc_cluster(name: &str, ups: &[&Upstream], extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({
        "name": name, "endpoints": endpoints(ups),
        "health_check": {"path": HEALTH_PATH, "interval": "100ms", "timeout": "500ms",
                         "healthy_threshold": 2, "unhealthy_threshold": 2},
    });
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

#[tokio::test]
async fn failing_health_checks_take_an_endpoint_out_and_passing_ones_bring_it_back() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let down = Upstream::named("down").await;
    // Failing before the proxy starts: never healthy, never sent a request, even the first.
    down.set_default(Behavior::Status(503));
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [hc_cluster("app", &[&a, &b, &down], json!({"healthy_panic_threshold": 0}))],
    }))
    .await;
    let l = proxy.listener("in");
    assert_eq!(
        endpoint_status(&proxy, "app", down.addr()).await["health"],
        "unhealthy"
    );
    let seen = spread(l, 20, |_| Req::get("/x")).await;
    assert_eq!(seen.get("a"), Some(&10), "{seen:?}");
    assert_eq!(seen.get("b"), Some(&10), "{seen:?}");
    assert_eq!(traffic(&down), 0);
    assert!(checks(&down) >= 1);
    assert_eq!(
        a.requests()
            .iter()
            .find(|r| r.path == HEALTH_PATH)
            .and_then(|r| r.header("host").map(str::to_string))
            .as_deref(),
        Some("app"),
        "checks carry the cluster's name as Host by default"
    );

    // b starts failing its checks: out after unhealthy_threshold (2) failures.
    b.set_default(Behavior::Status(500));
    wait_health(&proxy, "app", b.addr(), "unhealthy", 5).await;
    let before = traffic(&b);
    let seen = spread(l, 10, |_| Req::get("/x")).await;
    assert_eq!(seen.get("a"), Some(&10), "{seen:?}");
    assert_eq!(traffic(&b), before);
    assert_eq!(
        proxy
            .metric(
                "wasmesh_endpoint_healthy",
                &[("cluster", "app"), ("endpoint", &b.addr().to_string())]
            )
            .await,
        0.0
    );
    assert!(
        proxy
            .metric("wasmesh_health_check_failures_total", &[("cluster", "app")])
            .await
            >= 2.0
    );
    assert!(
        proxy
            .metric("wasmesh_health_check_attempts_total", &[("cluster", "app")])
            .await
            >= 6.0
    );

    // b and down recover: back in after healthy_threshold (2) passes.
    b.set_default(Behavior::Status(200));
    down.set_default(Behavior::Status(200));
    wait_health(&proxy, "app", b.addr(), "healthy", 5).await;
    wait_health(&proxy, "app", down.addr(), "healthy", 5).await;
    let seen = spread(l, 30, |_| Req::get("/x")).await;
    for name in ["a", "b", "down"] {
        assert_eq!(seen.get(name), Some(&10), "{seen:?}");
    }
}

#[tokio::test]
async fn health_checks_stop_when_a_reload_drops_the_cluster() {
    let a = Upstream::named("a").await;
    let other = Upstream::named("other").await;
    let manifest = |with_checks: bool| {
        let mut clusters = vec![json!({"name": "plain", "endpoints": endpoints(&[&other])})];
        if with_checks {
            clusters.push(hc_cluster("app", &[&a], json!({})));
        }
        json!({
            "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "plain"}]}],
            "clusters": clusters,
        })
    };
    let proxy = Proxy::start(manifest(true)).await;
    a.wait_requests(3).await;
    proxy.write_manifest(manifest(false));
    proxy
        .wait_for(
            Duration::from_secs(10),
            "the reload dropping `app`",
            || async {
                let c = proxy.admin_get("/clusters").await.json();
                (c.as_array().map(|a| a.len()) == Some(1)).then_some(())
            },
        )
        .await;
    // Give an in-flight round time to land, then no more checks arrive.
    let settled = a.request_count();
    proxy
        .wait_for(Duration::from_secs(5), "checks to stop", || async {
            let now = a.request_count();
            // Several check intervals without a new check.
            tokio::time::sleep(Duration::from_millis(400)).await;
            (a.request_count() == now).then_some(())
        })
        .await;
    assert!(a.request_count() <= settled + 1);
}

#[tokio::test]
async fn panic_mode_spreads_load_over_all_endpoints() {
    let ups: Vec<Upstream> = futures_util::future::join_all(
        (0..4).map(|i| async move { Upstream::named(&format!("u{i}")).await }),
    )
    .await;
    let refs: Vec<&Upstream> = ups.iter().collect();
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [hc_cluster("app", &refs, json!({}))],
    }))
    .await;
    let l = proxy.listener("in");

    // One of four failing (75% healthy, over the 50% threshold): no panic, u0 gets nothing.
    ups[0].set_default(Behavior::Status(503));
    wait_health(&proxy, "app", ups[0].addr(), "unhealthy", 5).await;
    let seen = spread(l, 30, |_| Req::get("/x")).await;
    assert_eq!(seen.get("u0"), None, "{seen:?}");
    assert_eq!(seen.get("status 503"), None, "{seen:?}");
    assert_eq!(
        proxy
            .metric("wasmesh_lb_healthy_panic_total", &[("cluster", "app")])
            .await,
        0.0
    );

    // Three of four failing (25% < 50%): panic, every endpoint takes its share.
    ups[1].set_default(Behavior::Status(503));
    ups[2].set_default(Behavior::Status(503));
    wait_health(&proxy, "app", ups[1].addr(), "unhealthy", 5).await;
    wait_health(&proxy, "app", ups[2].addr(), "unhealthy", 5).await;
    let before: Vec<usize> = ups.iter().map(traffic).collect();
    let seen = spread(l, 40, |_| Req::get("/x")).await;
    for (i, u) in ups.iter().enumerate() {
        assert!(
            traffic(u) >= before[i] + 5,
            "u{i} got {} of 40 in panic: {seen:?}",
            traffic(u) - before[i]
        );
    }
    assert!(
        proxy
            .metric("wasmesh_lb_healthy_panic_total", &[("cluster", "app")])
            .await
            >= 40.0
    );
    assert_eq!(proxy.admin_get("/clusters").await.json()[0]["panic"], true);
}

/// Health checks of an mTLS cluster go over mTLS (the cluster's own connector and
/// certificate), in the cluster's protocol: through a second proxy that only takes mTLS.
#[tokio::test]
async fn health_checks_of_an_mtls_cluster_use_mtls() {
    use wasmesh_e2e::mtls::{cluster_tls, listener_tls, MeshCa};
    const FRONTEND: &str = "spiffe://mesh.local/ns/shop/sa/frontend";
    const BACKEND: &str = "spiffe://mesh.local/ns/shop/sa/backend";
    let ca = MeshCa::init("health-mtls");
    let frontend = ca.issue("frontend", FRONTEND);
    let backend = ca.issue("backend", BACKEND);
    for protocol in ["http1", "http2"] {
        let up = Upstream::named("up").await;
        let b = Proxy::start(json!({
            "listeners": [{"name": "in", "address": "127.0.0.1:0",
                           "tls": listener_tls("strict", &backend, &ca.bundle()),
                           "routes": [{"cluster": "app"}]}],
            "clusters": [{"name": "app", "endpoints": endpoints(&[&up])}],
        }))
        .await;
        let b_addr = b.listener("in");
        let a = Proxy::start(json!({
            "listeners": [{"name": "out", "address": "127.0.0.1:0", "direction": "outbound",
                           "routes": [{"cluster": "b"}]}],
            "clusters": [{"name": "b", "protocol": protocol, "healthy_panic_threshold": 0,
                          "tls": cluster_tls(&frontend, &ca.bundle(), &[BACKEND]),
                          "endpoints": [{"address": b_addr.to_string()}],
                          "health_check": {"path": HEALTH_PATH, "interval": "100ms",
                                           "timeout": "1s", "unhealthy_threshold": 1}}],
        }))
        .await;
        assert_eq!(
            endpoint_status(&a, "b", b_addr).await["health"],
            "healthy",
            "{protocol}"
        );
        let check = up
            .requests()
            .into_iter()
            .find(|r| r.path == HEALTH_PATH)
            .expect("a check reached the upstream through B");
        assert_eq!(check.header("user-agent"), Some("wasmesh-health-check"));
        let line = b
            .log_entry("a health check in B's log", |l| l["path"] == HEALTH_PATH)
            .await;
        assert_eq!(line["peer_identity"], FRONTEND, "{protocol}: {line}");
        assert_eq!(
            Req::get("/x").send(a.listener("out")).await.status,
            200,
            "{protocol}"
        );

        up.set_default(Behavior::Status(503));
        wait_health(&a, "b", b_addr, "unhealthy", 5).await;
        let r = Req::get("/x").send(a.listener("out")).await;
        assert_eq!(r.status, 503, "{protocol}");
        assert_eq!(r.text(), "no healthy upstream\n", "{protocol}");
    }
}

/// Success-rate ejection: among five endpoints with enough requests, the one failing far
/// more often than the others is ejected; the others, one of them a little noisy, are not.
#[tokio::test]
async fn success_rate_ejects_the_outlier_only() {
    let ups: Vec<Upstream> = futures_util::future::join_all(
        (0..5).map(|i| async move { Upstream::named(&format!("u{i}")).await }),
    )
    .await;
    // u4 always fails; u0 fails one request in ten; the rest never.
    ups[4].set_default(Behavior::Status(500));
    for _ in 0..100 {
        ups[0].fail_times(1, 500);
        for _ in 0..9 {
            ups[0].push(Behavior::Status(200));
        }
    }
    let refs: Vec<&Upstream> = ups.iter().collect();
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [{"name": "app", "endpoints": endpoints(&refs),
                      "outlier_detection": {"consecutive_5xx": 0, "consecutive_gateway_failure": 0,
                                            "interval": "1s", "base_ejection_time": "30s",
                                            "max_ejection_percent": 50,
                                            "success_rate_minimum_hosts": 5,
                                            "success_rate_request_volume": 20}}],
    }))
    .await;
    let l = proxy.listener("in");
    // Traffic until an interval has seen enough of it (round robin: 10 each per round).
    proxy
        .wait_for(
            Duration::from_secs(20),
            "a success-rate ejection",
            || async {
                let _ = spread(l, 50, |_| Req::get("/x")).await;
                let n = proxy
                    .metric(
                        "wasmesh_outlier_detection_ejections_total",
                        &[("cluster", "app"), ("reason", "success_rate")],
                    )
                    .await;
                (n >= 1.0).then_some(())
            },
        )
        .await;
    assert_eq!(
        endpoint_status(&proxy, "app", ups[4].addr()).await["health"],
        "ejected"
    );
    for u in &ups[..4] {
        assert_eq!(
            endpoint_status(&proxy, "app", u.addr()).await["health"],
            "healthy"
        );
    }
    assert_eq!(
        proxy
            .metric("wasmesh_outlier_detection_ejections_total", &[])
            .await,
        1.0
    );
}
