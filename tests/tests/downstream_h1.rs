//! The proxy's own HTTP/1.1 server, on the wire: `Expect: 100-continue`, pipelining, an
//! unread request body dropped to keep the connection, and
//! how a response of unknown length is framed for HTTP/1.1 and HTTP/1.0 clients.

use serde_json::json;
use std::time::Duration;
use wasmesh_e2e::raw::RawConn;
use wasmesh_e2e::{cluster, Behavior, Proxy, Upstream};

async fn setup(behavior: Behavior) -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    let grpc = matches!(behavior, Behavior::GrpcEcho);
    up.set_default(behavior);
    let mut app = cluster("app", up.addr());
    if grpc {
        // Trailers come back from an HTTP/2 upstream.
        app["protocol"] = json!("http2");
    }
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [app],
    }))
    .await;
    (up, proxy)
}

#[tokio::test]
async fn expect_100_continue_is_answered_by_the_proxy() {
    let (up, proxy) = setup(Behavior::Echo).await;
    let mut c = RawConn::connect(proxy.listener("in")).await;
    c.write(
        b"PUT /upload HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n",
    )
    .await;
    // The interim answer comes before the client sends a byte of its body.
    let interim = c.read_for(Duration::from_millis(500)).await;
    assert_eq!(interim.text(), "HTTP/1.1 100 Continue\r\n\r\n");
    c.write(b"hello").await;
    let r = c.read_for(Duration::from_millis(500)).await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert!(r.text().ends_with("\r\n\r\nhello"), "{}", r.text());
    let seen = up.requests();
    assert_eq!(seen.len(), 1);
    assert_eq!(&seen[0].body[..], b"hello");
    assert_eq!(
        seen[0].header("expect"),
        None,
        "answered here, not forwarded"
    );
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let (up, proxy) = setup(Behavior::Echo).await;
    let r = RawConn::exchange(
        proxy.listener("in"),
        b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none\
          POST /2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n\
          GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(r.closed);
    assert_eq!(r.statuses(), vec![200, 200, 200], "{}", r.text());
    let text = r.text();
    let (one, two) = (
        text.find("\r\n\r\none").expect("first body"),
        text.find("\r\n\r\ntwo").expect("second body"),
    );
    assert!(one < two, "{text}");
    let paths: Vec<String> = up.requests().iter().map(|q| q.path.clone()).collect();
    assert_eq!(paths, ["/1", "/2", "/3"]);
}

#[tokio::test]
async fn unknown_lengths_are_chunked_for_http11_and_closed_for_http10() {
    // gRPC-style: a body of unknown length, then trailers.
    let (_up, proxy) = setup(Behavior::GrpcEcho).await;
    let l = proxy.listener("in");
    let r = RawConn::exchange(
        l,
        b"POST /g HTTP/1.1\r\nHost: x\r\nTE: trailers\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .await;
    let text = r.text();
    assert_eq!(r.status(), Some(200), "{text}");
    assert!(text.contains("transfer-encoding: chunked\r\n"), "{text}");
    assert!(
        text.ends_with("\r\n\r\n2\r\nhi\r\n0\r\ngrpc-status: 0\r\ngrpc-message: ok\r\n\r\n"),
        "{text}"
    );

    let r = RawConn::exchange(l, b"POST /g HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi").await;
    let text = r.text();
    assert_eq!(r.status(), Some(200), "{text}");
    assert!(r.closed, "delimited by the close");
    assert!(!text.contains("transfer-encoding"), "{text}");
    assert!(text.contains("connection: close\r\n"), "{text}");
    assert!(text.ends_with("\r\n\r\nhi"), "{text}");
}

#[tokio::test]
async fn a_request_answered_before_its_body_keeps_the_connection() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"name": "deny", "match": {"prefix": "/deny"}, "direct_response": {"status": 403, "body": "no"}},
            {"cluster": "app"},
        ]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let mut c = RawConn::connect(proxy.listener("in")).await;
    // The head alone: the proxy answers 403 without the body.
    c.write(b"POST /deny HTTP/1.1\r\nHost: x\r\nContent-Length: 10000\r\n\r\n")
        .await;
    let r = c.read_for(Duration::from_millis(500)).await;
    assert_eq!(r.status(), Some(403), "{}", r.text());
    assert!(!r.closed);
    // The body comes after the answer; it is dropped, and the connection serves on.
    c.write(&[b'x'; 10000]).await;
    c.write(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let r = c.read_for(Duration::from_millis(500)).await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    let paths: Vec<String> = up.requests().iter().map(|q| q.path.clone()).collect();
    assert_eq!(paths, ["/next"]);
}
