//! Graceful drain on SIGTERM: requests in flight finish, `/ready` turns 503, new connections
//! are refused, and the process exits 0.

use serde_json::json;
use std::time::Duration;
use wasmesh_e2e::client::{self, Req};
use wasmesh_e2e::{cluster, Behavior, Proxy, Upstream};

#[tokio::test]
async fn sigterm_drains_in_flight_requests_then_exits_zero() {
    let up = Upstream::start().await;
    up.set_default(Behavior::Delay(Duration::from_millis(1500)));
    let mut proxy = Proxy::start(json!({
        "drain_timeout": "10s",
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let l = proxy.listener("in");

    let slow = tokio::spawn(async move { Req::get("/slow").try_send(l).await });
    up.wait_requests(1).await;
    proxy.sigterm();

    // Readiness drops at once so load balancers stop sending.
    proxy
        .wait_for(Duration::from_secs(5), "/ready to answer 503", || async {
            let r = client::try_get(proxy.admin(), "/ready").await.ok()?;
            (r.status == 503).then_some(())
        })
        .await;
    // The listening sockets are closed: new connections are refused.
    proxy
        .wait_for(
            Duration::from_secs(5),
            "new connections to be refused",
            || async {
                tokio::net::TcpStream::connect(l)
                    .await
                    .err()
                    .map(|e| assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused))
            },
        )
        .await;
    assert!(!slow.is_finished(), "the slow request is still in flight");

    let r = slow
        .await
        .expect("task")
        .expect("the in-flight request completes");
    assert_eq!(
        (r.status, r.text().as_str(), r.body_error),
        (200, "slow", None)
    );
    let status = proxy.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "{}", proxy.stderr());
}

#[tokio::test]
async fn drain_timeout_bounds_the_drain() {
    let up = Upstream::start().await;
    up.set_default(Behavior::Hang);
    let mut proxy = Proxy::start(json!({
        "drain_timeout": "500ms",
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app", "timeout": "0s"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let l = proxy.listener("in");
    let hung = tokio::spawn(async move { Req::get("/forever").try_send(l).await });
    up.wait_requests(1).await;
    let start = std::time::Instant::now();
    proxy.sigterm();
    let status = proxy.wait_exit(Duration::from_secs(10)).await;
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "exited after {:?}",
        start.elapsed()
    );
    assert_eq!(status.code(), Some(0), "{}", proxy.stderr());
    let r = hung.await.expect("task");
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|r| r.body_error.is_some()),
        "{r:?}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_do_not_hold_up_the_exit() {
    let up = Upstream::start().await;
    let mut proxy = Proxy::start(json!({
        "drain_timeout": "10s",
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let mut h1 = wasmesh_e2e::client::Conn::h1(proxy.listener("in")).await;
    assert_eq!(h1.send(Req::get("/a")).await.status, 200);
    let mut h2 = wasmesh_e2e::client::Conn::h2(proxy.listener("in")).await;
    assert_eq!(h2.send(Req::get("/b")).await.status, 200);

    let start = std::time::Instant::now();
    proxy.sigterm();
    let status = proxy.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0));
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "idle connections held the drain for {:?}",
        start.elapsed()
    );
    // The proxy has exited; the clients' connection tasks may not have read the close yet.
    wasmesh_e2e::eventually(
        Duration::from_secs(5),
        "idle connections to be closed (HTTP/2: GOAWAY)",
        || async { (h1.is_closed() && h2.is_closed()).then_some(()) },
    )
    .await;
}
