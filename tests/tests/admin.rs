//! The admin endpoint: request metrics by route, cluster and status after real traffic;
//! `/clusters`, `/listeners`, `/config` (secrets redacted), probes; and a golden list of the
//! metric names dashboards depend on.

use serde_json::json;
use std::path::PathBuf;
use wasmesh_e2e::client::Req;
use wasmesh_e2e::raw::RawConn;
use wasmesh_e2e::upstream::refused_addr;
use wasmesh_e2e::{cluster, Proxy, Upstream};

async fn setup() -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "node": {"workload": "orders"},
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"name": "ok", "match": {"prefix": "/ok"}, "cluster": "app",
             "request_headers": {"set": {"authorization": "Bearer s3cr3t-token"}}},
            {"name": "down", "match": {"prefix": "/down"}, "cluster": "refused"},
        ]}, {"name": "tcp", "address": "127.0.0.1:0", "protocol": "tcp", "cluster": "app"}],
        "clusters": [cluster("app", up.addr()), cluster("refused", refused_addr())],
    }))
    .await;
    (up, proxy)
}

#[tokio::test]
async fn metrics_count_requests_by_route_cluster_status_and_flag() {
    let (up, proxy) = setup().await;
    let l = proxy.listener("in");
    up.fail_times(2, 500);
    for _ in 0..2 {
        assert_eq!(Req::get("/ok").send(l).await.status, 500);
    }
    for _ in 0..3 {
        assert_eq!(Req::get("/ok").send(l).await.status, 200);
    }
    for _ in 0..2 {
        assert_eq!(Req::get("/down").send(l).await.status, 503);
    }
    assert_eq!(Req::get("/nowhere").send(l).await.status, 404);
    assert_eq!(up.request_count(), 5);

    let m = proxy.metrics().await;
    let value =
        |name: &str, labels: &[(&str, &str)]| wasmesh_e2e::proxy::metric_value(&m, name, labels);
    let requests = |route: &str, cluster: &str, code: &str, flags: &str| {
        let labels = [
            ("route", route),
            ("cluster", cluster),
            ("response_code", code),
            ("response_flags", flags),
        ];
        value("wasmesh_requests_total", &labels)
    };
    assert_eq!(requests("ok", "app", "200", "-"), 3.0, "{m}");
    assert_eq!(
        requests("ok", "app", "500", "-"),
        2.0,
        "an upstream's 500 is its answer, not a flag: {m}"
    );
    assert_eq!(requests("down", "refused", "503", "UF"), 2.0, "{m}");
    assert_eq!(
        value(
            "wasmesh_requests_total",
            &[("response_code", "404"), ("response_flags", "NR")]
        ),
        1.0,
        "{m}"
    );
    let by_workload = [
        ("destination_workload", "orders"),
        ("reporter", "destination"),
    ];
    assert_eq!(value("wasmesh_requests_total", &by_workload), 8.0, "{m}");
    assert_eq!(
        value(
            "wasmesh_request_duration_milliseconds_count",
            &[("route", "ok")]
        ),
        5.0
    );
    assert_eq!(
        value(
            "wasmesh_upstream_cx_connect_fail_total",
            &[("cluster", "refused")]
        ),
        2.0
    );
    assert_eq!(
        value("wasmesh_downstream_cx_total", &[("listener", "in")]),
        8.0
    );
}

#[tokio::test]
async fn clusters_listeners_and_probes() {
    let (up, proxy) = setup().await;
    Req::get("/ok").send(proxy.listener("in")).await;

    let clusters = proxy.admin_get("/clusters").await.json();
    let app = clusters
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "app"))
        .expect("app in /clusters");
    let ep = &app["endpoints"][0];
    assert_eq!(ep["address"], up.addr().to_string());
    assert_eq!(ep["total_requests"], 1);
    assert_eq!(ep["active_requests"], 0);
    assert_eq!(app["protocol"], "http1");
    assert!(clusters
        .as_array()
        .is_some_and(|a| a.iter().any(|c| c["name"] == "refused")));

    let listeners = proxy.admin_get("/listeners").await.json();
    assert_eq!(listeners[0]["name"], "in");
    assert_eq!(
        listeners[0]["address"],
        proxy.listener("in").to_string(),
        "the bound port, not 0"
    );

    assert_eq!(proxy.admin_get("/live").await.status, 200);
    assert_eq!(proxy.admin_get("/ready").await.text(), "ready\n");
    assert_eq!(proxy.admin_get("/no-such-page").await.status, 404);
    assert_eq!(proxy.admin_get("/filters").await.status, 200);
}

#[tokio::test]
async fn config_shows_the_manifest_with_secrets_redacted() {
    let (up, proxy) = setup().await;
    // The secret is still sent upstream...
    Req::get("/ok").send(proxy.listener("in")).await;
    assert_eq!(
        up.last().header("authorization"),
        Some("Bearer s3cr3t-token")
    );
    // ...but never shown.
    let r = proxy.admin_get("/config").await;
    assert!(!r.text().contains("s3cr3t"), "{}", r.text());
    let config = r.json();
    assert_eq!(
        config["manifest"]["listeners"][0]["routes"][0]["name"],
        "ok"
    );
    assert_eq!(
        config["manifest"]["clusters"][0]["endpoints"][0]["address"],
        up.addr().to_string()
    );
    assert!(config["last_reload_error"].is_null());
    assert!(config["manifest_path"]
        .as_str()
        .is_some_and(|p| p.ends_with("manifest.json")));
}

/// The metric families of the proxy core (filter metrics belong to the filter host's own
/// tests). `UPDATE_GOLDEN=1` rewrites `golden/metric_names.txt`.
#[tokio::test]
async fn metric_names_golden() {
    let (up, proxy) = setup().await;
    // Families without a series are not rendered: touch every one this setup can.
    Req::get("/ok").send(proxy.listener("in")).await;
    Req::get("/down").send(proxy.listener("in")).await;
    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    assert_eq!(
        RawConn::exchange(proxy.listener("in"), big.as_bytes())
            .await
            .status(),
        Some(431)
    );
    drop(tokio::net::TcpStream::connect(proxy.listener("tcp")).await);
    assert_eq!(proxy.admin_post("/reload").await.status, 200);
    up.wait_requests(1).await;
    proxy
        .wait_for(
            std::time::Duration::from_secs(5),
            "the tcp connection to be counted",
            || async { (proxy.metric("wasmesh_tcp_cx_total", &[]).await >= 1.0).then_some(()) },
        )
        .await;
    let m = proxy.metrics().await;
    let mut names: Vec<String> = m
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter(|l| !l.starts_with("wasmesh_filter"))
        .map(str::to_string)
        .collect();
    names.sort();
    let got = names.join("\n") + "\n";
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/metric_names.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &got).expect("write golden");
        return;
    }
    let want = std::fs::read_to_string(&golden)
        .expect("golden/metric_names.txt (UPDATE_GOLDEN=1 creates it)");
    assert!(
        got == want,
        "metric names changed (UPDATE_GOLDEN=1 to accept):\n--- want\n{want}--- got\n{got}"
    );
}
