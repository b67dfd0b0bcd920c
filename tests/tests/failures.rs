//! Failure mapping: every way an upstream can fail becomes a status, an Envoy response flag
//! in the access log, and a short reason as the body.

use serde_json::json;
use std::time::Duration;
use wasmesh_e2e::client::{Conn, Req};
use wasmesh_e2e::upstream::refused_addr;
use wasmesh_e2e::{cluster, h1_and_h2_manifest, h2_cluster, Behavior, Proxy, Upstream};

/// Send `GET path` with a request id and return (response, its access log line).
async fn call(proxy: &Proxy, path: &str, id: &str) -> (wasmesh_e2e::Resp, serde_json::Value) {
    let r = Req::get(path)
        .header("x-request-id", id)
        .send(proxy.listener("in"))
        .await;
    let log = proxy.log_for_request_id(id).await;
    (r, log)
}

#[tokio::test]
async fn upstream_failures_map_to_status_flag_and_reason() {
    let reset = Upstream::named("reset").await;
    reset.set_default(Behavior::ResetBeforeResponse);
    let hang = Upstream::named("hang").await;
    hang.set_default(Behavior::Hang);
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/refused"}, "cluster": "refused"},
            {"match": {"prefix": "/reset"}, "cluster": "reset"},
            {"match": {"prefix": "/hang"}, "cluster": "hang", "timeout": "250ms"},
            {"match": {"prefix": "/nohealthy"}, "cluster": "nohealthy"},
            {"match": {"prefix": "/h2reset"}, "cluster": "h2reset"},
        ]}],
        "clusters": [
            cluster("refused", refused_addr()),
            cluster("reset", reset.addr()),
            cluster("hang", hang.addr()),
            h2_cluster("h2reset", reset.addr()),
            // No healthy endpoint: its only one fails its health check (a new endpoint
            // is unhealthy until a check passes), and no panic mode. (An unresolvable DNS
            // name would do too, but the tests must not query a resolver off loopback.)
            {"name": "nohealthy", "healthy_panic_threshold": 0,
             "health_check": {"path": "/h", "interval": "1s", "timeout": "200ms"},
             "endpoints": [{"address": refused_addr().to_string()}]},
        ],
    }))
    .await;

    for (path, status, flag, reason) in [
        ("/refused", 503, "UF", "upstream connect failure\n"),
        ("/reset", 503, "UR", "upstream reset before response\n"),
        ("/h2reset", 503, "UR", "upstream reset before response\n"),
        ("/hang", 504, "UT", "upstream request timeout\n"),
        ("/nohealthy", 503, "UH", "no healthy upstream\n"),
        ("/no-such-route", 404, "NR", "no route matched\n"),
    ] {
        let id = format!("fail{}", path.replace('/', "-"));
        let (r, log) = call(&proxy, path, &id).await;
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert_eq!(r.text(), reason, "{path}");
        assert_eq!(log["status"], status, "{path}");
        assert_eq!(log["response_flags"], flag, "{path}: {log}");
        assert_eq!(log["reason"].as_str(), Some(reason.trim_end()), "{path}");
    }
    assert!(
        proxy
            .metric(
                "wasmesh_upstream_cx_connect_fail_total",
                &[("cluster", "refused")]
            )
            .await
            >= 1.0
    );
    assert_eq!(
        proxy
            .metric("wasmesh_upstream_rq_timeout_total", &[("cluster", "hang")])
            .await,
        1.0
    );
    let clusters = proxy.admin_get("/clusters").await.json();
    let nohealthy = clusters
        .as_array()
        .and_then(|a| a.iter().find(|c| c["name"] == "nohealthy"))
        .expect("nohealthy");
    assert_eq!(
        nohealthy["endpoints"][0]["health"], "unhealthy",
        "{nohealthy}"
    );
}

#[tokio::test]
async fn an_upstream_response_head_over_64_kib_is_refused_on_both_protocols() {
    let up = Upstream::named("big").await;
    let proxy = Proxy::start(h1_and_h2_manifest("/", up.addr(), up.addr())).await;
    for path in ["/h1", "/h2"] {
        up.push(Behavior::Respond {
            status: 200,
            headers: vec![("x-big".into(), "a".repeat(100 * 1024))],
            body: bytes::Bytes::from_static(b"never"),
        });
        let (r, log) = call(&proxy, path, &format!("big{}", path.replace('/', "-"))).await;
        assert!(
            r.status == 502 || r.status == 503,
            "{path}: {} {}",
            r.status,
            r.text()
        );
        assert!(r.header("x-big").is_none(), "{path}");
        assert_ne!(r.text(), "never", "{path}");
        assert_eq!(log["status"], r.status, "{path}: {log}");
    }
    // Just under the limit passes.
    up.push(Behavior::Respond {
        status: 200,
        headers: vec![("x-big".into(), "a".repeat(60 * 1024))],
        body: bytes::Bytes::from_static(b"fits"),
    });
    let r = Req::get("/h2").send(proxy.listener("in")).await;
    assert_eq!((r.status, r.text().as_str()), (200, "fits"));
}

#[tokio::test]
async fn reset_mid_response_truncates_and_is_flagged() {
    let h1 = Upstream::named("h1").await;
    let h2 = Upstream::named("h2").await;
    for u in [&h1, &h2] {
        u.set_default(Behavior::ResetMidResponse { sent: 10_000 });
    }
    let proxy = Proxy::start(h1_and_h2_manifest("/", h1.addr(), h2.addr())).await;
    let l = proxy.listener("in");

    // HTTP/1.1 client: the headers said 20 000 bytes; 10 000 came, then the connection closed.
    let mut c = Conn::h1(l).await;
    let r = c
        .send(Req::get("/h1/x").header("x-request-id", "mid-h1"))
        .await;
    assert_eq!(r.status, 200);
    assert!(
        r.body_error.is_some(),
        "the client must see the body break off"
    );
    assert!(r.body.len() < 20_000, "{} bytes", r.body.len());
    wait_closed(&c).await;
    let log = proxy.log_for_request_id("mid-h1").await;
    assert!(
        log["response_flags"]
            .as_str()
            .is_some_and(|f| f.contains("UR")),
        "{log}"
    );

    // HTTP/2 client: the stream is reset; the connection (and other streams) live on.
    let mut c2 = Conn::h2(l).await;
    let r = c2
        .send(Req::get("/h2/x").header("x-request-id", "mid-h2"))
        .await;
    assert_eq!(r.status, 200);
    assert!(
        r.body_error.is_some(),
        "the client must see the stream reset"
    );
    let log = proxy.log_for_request_id("mid-h2").await;
    assert!(
        log["response_flags"]
            .as_str()
            .is_some_and(|f| f.contains("UR")),
        "{log}"
    );
    h2.push(Behavior::Status(200));
    let r = c2.send(Req::get("/h2/after")).await;
    assert_eq!(
        (r.status, r.body_error),
        (200, None),
        "the HTTP/2 connection survives a reset stream"
    );
}

async fn wait_closed(c: &Conn) {
    wasmesh_e2e::eventually(
        Duration::from_secs(5),
        "the h1 connection to close",
        || async { c.is_closed().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn upstream_connection_limit_overflows_with_uo() {
    let up = Upstream::start().await;
    up.push(Behavior::Hang);
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "small", "timeout": "0s"}]}],
        "clusters": [{"name": "small", "circuit_breakers": {"max_connections": 1}, "endpoints": [{"address": up.addr().to_string()}]}],
    }))
    .await;
    let l = proxy.listener("in");
    // The first request holds the only upstream connection.
    let hung = tokio::spawn(async move { Req::get("/hold").try_send(l).await });
    up.wait_requests(1).await;
    let (r, log) = call(&proxy, "/overflow", "overflow-1").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.text(), "upstream overflow: circuit breaker open\n");
    assert_eq!(log["response_flags"], "UO");
    assert_eq!(
        proxy
            .metric(
                "wasmesh_upstream_cx_overflow_total",
                &[("cluster", "small")]
            )
            .await,
        1.0
    );
    assert_eq!(
        up.request_count(),
        1,
        "the overflowing request never reached the upstream"
    );

    // The client of the hung request gives up: its upstream connection is closed and the slot
    // comes back.
    hung.abort();
    let _ = hung.await;
    proxy
        .wait_for(
            Duration::from_secs(5),
            "the connection slot to be released",
            || async {
                let r = Req::get("/again").try_send(l).await.ok()?;
                (r.status == 200).then_some(())
            },
        )
        .await;
}

#[tokio::test]
async fn a_client_gone_mid_response_is_logged_dc() {
    let up = Upstream::start().await;
    up.set_default(Behavior::Stream {
        len: 256 * 1024 * 1024,
    });
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let mut c = Conn::h1(proxy.listener("in")).await;
    let mut resp = c
        .send_head(Req::get("/big").header("x-request-id", "gone-1"))
        .await
        .expect("head");
    let first = http_body_util::BodyExt::frame(resp.body_mut()).await;
    assert!(first.is_some(), "some of the body arrived");
    drop(resp);
    drop(c);
    let log = proxy.log_for_request_id("gone-1").await;
    assert_eq!(log["status"], 200);
    assert_eq!(log["response_flags"], "DC", "{log}");
    let sent = log["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(sent > 0 && sent < 256 * 1024 * 1024, "{log}");
}

/// A body that sends `chunks` pieces of 1 KiB, `gap` apart.
fn slow_body(chunks: usize, gap: Duration) -> wasmesh_e2e::client::ReqBody {
    let frames = futures_util::stream::unfold(0, move |i| async move {
        if i == chunks {
            return None;
        }
        tokio::time::sleep(gap).await;
        let frame = http_body::Frame::data(bytes::Bytes::from(vec![b'x'; 1024]));
        Some((Ok::<_, wasmesh_e2e::client::BoxError>(frame), i + 1))
    });
    http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(frames))
}

/// The route's timeout starts once the whole request has been received (Envoy's rule): an
/// upload that takes longer than the timeout is not cut off by it, and the upstream then
/// gets the full timeout for its answer. Over both client protocols, to both upstream
/// protocols, all at once.
#[tokio::test]
async fn the_route_timeout_starts_when_the_request_body_has_arrived() {
    let count = [Upstream::start().await, Upstream::start().await];
    let slow = [Upstream::start().await, Upstream::start().await];
    for up in &count {
        up.set_default(Behavior::CountBody);
    }
    for up in &slow {
        up.set_default(Behavior::Delay(Duration::from_secs(5)));
    }
    let route = |prefix: &str, cluster: &str| json!({"match": {"prefix": prefix}, "cluster": cluster, "timeout": "500ms"});
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            route("/h1/count", "h1-count"), route("/h2/count", "h2-count"),
            route("/h1/slow", "h1-slow"), route("/h2/slow", "h2-slow"),
        ]}],
        "clusters": [
            cluster("h1-count", count[0].addr()), h2_cluster("h2-count", count[1].addr()),
            cluster("h1-slow", slow[0].addr()), h2_cluster("h2-slow", slow[1].addr()),
        ],
    }))
    .await;
    let l = proxy.listener("in");
    // 4 chunks 250 ms apart: the upload takes about 1 s, twice the route's timeout.
    let (chunks, gap) = (4, Duration::from_millis(250));
    let mut cases = Vec::new();
    for upstream in ["h1", "h2"] {
        for what in ["count", "slow"] {
            for over_h2 in [false, true] {
                let path = format!("/{upstream}/{what}");
                cases.push(async move {
                    let req = Req::post(&path).stream_body(slow_body(chunks, gap));
                    let start = std::time::Instant::now();
                    let r = if over_h2 {
                        req.send_h2(l).await
                    } else {
                        req.send(l).await
                    };
                    (path, over_h2, r, start.elapsed())
                });
            }
        }
    }
    for (path, over_h2, r, took) in futures_util::future::join_all(cases).await {
        if path.ends_with("count") {
            assert_eq!(r.status, 200, "{path} h2={over_h2}: {}", r.text());
            assert!(r.text().contains("\"bytes\":4096"), "{path}: {}", r.text());
        } else {
            // Slow after the body: the timeout still applies, counted from the body's end.
            assert_eq!(r.status, 504, "{path} h2={over_h2}: {}", r.text());
            assert!(
                took >= gap * chunks as u32 + Duration::from_millis(400),
                "{path} h2={over_h2}: 504 after {took:?}, before the body's end + 500 ms"
            );
        }
    }
}
