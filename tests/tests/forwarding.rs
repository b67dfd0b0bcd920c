//! Forwarding headers: hop-by-hop headers removed (including those a `Connection` header
//! names), `x-forwarded-for` appended, `x-forwarded-proto` set, `x-request-id` generated or
//! kept, internal `x-wasmesh-*` headers stripped, and `xff_num_trusted_hops`.

use serde_json::json;
use wasmesh_e2e::client::Req;
use wasmesh_e2e::raw::RawConn;
use wasmesh_e2e::raw_h2::RawH2;
use wasmesh_e2e::{cluster, h1_and_h2_manifest, Proxy, Upstream};

async fn setup() -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [
            {"name": "edge", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]},
            {"name": "behind-lb", "address": "127.0.0.1:0", "xff_num_trusted_hops": 1, "routes": [{"cluster": "app"}]},
        ],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    (up, proxy)
}

#[tokio::test]
async fn hop_by_hop_and_internal_headers_are_removed() {
    let (up, proxy) = setup().await;
    let r = Req::get("/h")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "per-connection secret")
        .header("keep-alive", "timeout=5")
        .header("proxy-connection", "keep-alive")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .header("te", "trailers, deflate")
        .header("x-wasmesh-route", "forged")
        .header("x-wasmesh-peer-identity", "spiffe://forged")
        .header("x-end-to-end", "kept")
        .send(proxy.listener("edge"))
        .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    for h in [
        "x-hop",
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "x-wasmesh-route",
        "x-wasmesh-peer-identity",
    ] {
        assert_eq!(
            seen.header(h),
            None,
            "{h} must not reach the upstream: {:?}",
            seen.headers
        );
    }
    assert!(
        seen.header("connection")
            .is_none_or(|c| !c.contains("x-hop")),
        "{:?}",
        seen.headers
    );
    assert_eq!(
        seen.header("te"),
        Some("trailers"),
        "only `TE: trailers` passes"
    );
    assert_eq!(seen.header("x-end-to-end"), Some("kept"));
}

#[tokio::test]
async fn forwarded_for_proto_and_request_id() {
    let (up, proxy) = setup().await;
    let edge = proxy.listener("edge");

    // No forwarding headers: the proxy adds them and generates a request id.
    Req::get("/a").send(edge).await;
    let seen = up.last();
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    let id = seen
        .header("x-request-id")
        .expect("a generated x-request-id")
        .to_string();
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let log = proxy.log_for_request_id(&id).await;
    assert_eq!(log["path"], "/a");
    assert_eq!(log["client_address"], "127.0.0.1");

    // A client's x-forwarded-for is appended to; its request id is kept end to end.
    Req::get("/b")
        .header("x-forwarded-for", "203.0.113.7")
        .header("x-request-id", "client-id-42")
        .send(edge)
        .await;
    let seen = up.last();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    assert_eq!(seen.header("x-request-id"), Some("client-id-42"));
    // Several x-forwarded-for lines are one list (RFC 9110 §5.3): none is lost.
    Req::get("/b2")
        .header("x-forwarded-for", "198.51.100.1")
        .header("x-forwarded-for", "203.0.113.7, 203.0.113.8")
        .send(edge)
        .await;
    assert_eq!(
        up.last().header("x-forwarded-for"),
        Some("198.51.100.1, 203.0.113.7, 203.0.113.8, 127.0.0.1")
    );
    // An absurdly long id is replaced, not forwarded or logged.
    Req::get("/c")
        .header("x-request-id", &"x".repeat(200))
        .send(edge)
        .await;
    assert_eq!(up.last().header("x-request-id").map(str::len), Some(36));
    let log = proxy.log_for_request_id("client-id-42").await;
    assert_eq!(
        log["client_address"], "127.0.0.1",
        "an untrusted x-forwarded-for is not the client"
    );
}

#[tokio::test]
async fn edge_listener_overwrites_a_client_forwarded_proto() {
    let (up, proxy) = setup().await;
    // With no trusted hops the client is the internet: it must not claim it came over TLS.
    Req::get("/p")
        .header("x-forwarded-proto", "https")
        .send(proxy.listener("edge"))
        .await;
    assert_eq!(up.last().header("x-forwarded-proto"), Some("http"));
    // Behind a trusted load balancer, the balancer's x-forwarded-proto stands.
    Req::get("/p")
        .header("x-forwarded-proto", "https")
        .send(proxy.listener("behind-lb"))
        .await;
    assert_eq!(up.last().header("x-forwarded-proto"), Some("https"));
}

#[tokio::test]
async fn xff_num_trusted_hops_picks_the_client_and_appends_the_peer() {
    let (up, proxy) = setup().await;
    Req::get("/t")
        .header("x-forwarded-for", "198.51.100.9, 203.0.113.7")
        .header("x-request-id", "trusted-hops-1")
        .send(proxy.listener("behind-lb"))
        .await;
    // One trusted hop: the rightmost entry was written by our load balancer, so the client
    // is the address it saw.
    let log = proxy.log_for_request_id("trusted-hops-1").await;
    assert_eq!(log["client_address"], "203.0.113.7");
    // The chain grows by the hop that actually connected to us (the load balancer), as Envoy
    // does; it must not repeat the client address.
    assert_eq!(
        up.last().header("x-forwarded-for"),
        Some("198.51.100.9, 203.0.113.7, 127.0.0.1")
    );
}

/// Routing and the upstream must agree on the host, or a route on `:authority`/`Host` can be
/// bypassed by a request that says two different things.
#[tokio::test]
async fn the_upstream_sees_the_host_the_proxy_routed_on() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"authority": "admin.local"}, "direct_response": {"status": 403, "body": "internal"}},
            {"cluster": "app"},
        ]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let l = proxy.listener("in");

    // Absolute-form: the URI's authority wins over Host (RFC 9112 §3.2.2), for routing and
    // for what is forwarded.
    let r = RawConn::exchange(
        l,
        b"GET http://public.local/x HTTP/1.1\r\nHost: admin.local\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert_eq!(
        up.last().header_all("host"),
        vec!["public.local"],
        "routed as public.local, forwarded as public.local"
    );

    // Two Host headers: 400 (RFC 9112 §3.2), nothing forwarded.
    let before = up.request_count();
    let r = RawConn::exchange(
        l,
        b"GET /x HTTP/1.1\r\nHost: public.local\r\nHost: admin.local\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), Some(400), "{}", r.text());
    // HTTP/1.1 without Host: 400 as well.
    let r = RawConn::exchange(l, b"GET /x HTTP/1.1\r\nConnection: close\r\n\r\n").await;
    assert_eq!(r.status(), Some(400), "{}", r.text());
    assert_eq!(up.request_count(), before, "{:?}", up.requests());

    // A host an upstream might still read as admin.local is not a way past its route:
    // invalid ones are 400 (RFC 9112 §3.2), a trailing dot is the same name.
    for host in [
        "x@admin.local",
        "admin.local@x",
        "admin.local/x",
        "admin.local\\x",
        "admin.local:x",
    ] {
        let req = format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let r = RawConn::exchange(l, req.as_bytes()).await;
        assert_eq!(r.status(), Some(400), "{host}: {}", r.text());
    }
    for host in ["admin.local.", "ADMIN.LOCAL.:80"] {
        let r = Req::get("/x").host(host).send(l).await;
        assert_eq!(
            (r.status, r.text()),
            (403, "internal".to_string()),
            "{host}"
        );
    }
    let mut c = RawH2::connect(l).await;
    c.headers(
        1,
        &[
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", b"x@admin.local"),
            (b":path", b"/x"),
        ],
        true,
    )
    .await;
    let outcome = c.outcome(1, std::time::Duration::from_secs(5)).await;
    assert!(outcome.refused(), "{outcome:?}");
    assert_eq!(up.request_count(), before, "{:?}", up.requests());

    // HTTP/1.0 needs no Host.
    let r = RawConn::exchange(l, b"GET /old HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
}

/// Browsers send each cookie as its own field over HTTP/2; an HTTP/1.1 upstream gets them
/// as one `cookie` line joined by "; " (RFC 9113 §8.2.3). An HTTP/2 upstream gets the fields.
#[tokio::test]
async fn http2_cookie_crumbs_are_joined_for_an_http1_upstream() {
    let (h1, h2) = (Upstream::start().await, Upstream::start().await);
    let proxy = Proxy::start(h1_and_h2_manifest("/", h1.addr(), h2.addr())).await;
    let l = proxy.listener("in");
    let crumbs = |r: Req| {
        r.header("cookie", "a=1")
            .header("cookie", "b=2")
            .header("cookie", "c=3")
    };

    let r = crumbs(Req::get("/h1/x")).send_h2(l).await;
    assert_eq!(r.status, 200);
    assert_eq!(h1.last().header_all("cookie"), ["a=1; b=2; c=3"]);

    let r = crumbs(Req::get("/h2/x")).send_h2(l).await;
    assert_eq!(r.status, 200);
    assert_eq!(h2.last().header_all("cookie").len(), 3, "{:?}", h2.last());

    // HTTP/1.1 clients send one line (RFC 6265 §5.4); it passes as it came.
    let r = Req::get("/h1/y").header("cookie", "a=1; b=2").send(l).await;
    assert_eq!(r.status, 200);
    assert_eq!(h1.last().header_all("cookie"), ["a=1; b=2"]);
}
