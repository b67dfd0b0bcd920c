//! Path normalization: routing sees the normalized path, so dot-segments, doubled slashes and
//! percent-encoded dots cannot sneak past a route; encoded slashes follow the listener's
//! policy; the access log keeps what the client sent.

use serde_json::json;
use std::net::SocketAddr;
use wasmesh_e2e::raw::{RawConn, RawReply};
use wasmesh_e2e::{cluster, Proxy, Upstream};

fn listener(name: &str, escaped_slashes: &str) -> serde_json::Value {
    json!({"name": name, "address": "127.0.0.1:0",
    "path_normalization": {"escaped_slashes": escaped_slashes},
    "routes": [
        {"name": "public", "match": {"prefix": "/public/"}, "cluster": "app"},
        {"name": "admin", "match": {"prefix": "/admin"},
         "direct_response": {"status": 403, "body": "admin is internal"}},
    ]})
}

/// Send a request line exactly as written (real clients would clean the path up).
async fn get_raw(addr: SocketAddr, target: &str, id: &str) -> RawReply {
    let req = format!("GET {target} HTTP/1.1\r\nHost: paths.local\r\nx-request-id: {id}\r\nConnection: close\r\n\r\n");
    RawConn::exchange(addr, req.as_bytes()).await
}

#[tokio::test]
async fn a_public_route_cannot_reach_admin() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [listener("keep", "keep")],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let l = proxy.listener("keep");

    for (i, target) in [
        "/public/../admin",
        "/public/../admin/users",
        "//admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2e/%2e/admin",
        "/public/./../../admin",
        "/public\\..\\admin",
    ]
    .iter()
    .enumerate()
    {
        let id = format!("traversal-{i}");
        let r = get_raw(l, target, &id).await;
        assert_eq!(
            r.status(),
            Some(403),
            "{target} must be routed as /admin: {}",
            r.text()
        );
        let log = proxy.log_for_request_id(&id).await;
        assert_eq!(
            log["path"], *target,
            "the access log keeps the original path"
        );
        assert_eq!(log["route"], "admin");
    }
    assert_eq!(up.request_count(), 0, "no traversal reached the upstream");

    // A normal dot-segment inside /public is resolved before forwarding.
    let r = get_raw(l, "/public/a/../b", "dots-ok").await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert_eq!(up.last().uri, "/public/b");
    assert_eq!(
        proxy.log_for_request_id("dots-ok").await["path"],
        "/public/a/../b"
    );

    // Unreserved characters are decoded: `%61dmin` is `admin`.
    let r = get_raw(l, "/%61dmin", "pct-unreserved").await;
    assert_eq!(r.status(), Some(403), "{}", r.text());
}

#[tokio::test]
async fn encoded_slash_policies() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [listener("keep", "keep"), listener("reject", "reject"), listener("unescape", "unescape")],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;

    // keep: forwarded as is (not a separator for routing).
    let r = get_raw(proxy.listener("keep"), "/public/a%2Fb", "keep-1").await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert_eq!(up.last().uri, "/public/a%2Fb");
    // ...so `..%2F` is one odd segment under /public, not a way out.
    let r = get_raw(proxy.listener("keep"), "/public/..%2Fadmin", "keep-2").await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert!(up.last().uri.starts_with("/public/"), "{}", up.last().uri);

    // reject: 400 before routing; nothing forwarded.
    let before = up.request_count();
    let r = get_raw(proxy.listener("reject"), "/public/a%2Fb", "reject-1").await;
    assert_eq!(r.status(), Some(400), "{}", r.text());
    assert!(r.text().contains("encoded slash"), "{}", r.text());
    assert_eq!(up.request_count(), before);
    let log = proxy.log_for_request_id("reject-1").await;
    assert_eq!(log["status"], 400);
    assert_eq!(log["path"], "/public/a%2Fb");

    // unescape: a real slash, then dot-segments: `..%2F` climbs out of /public into /admin.
    let r = get_raw(proxy.listener("unescape"), "/public/a%2Fb", "unescape-1").await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert_eq!(up.last().uri, "/public/a/b");
    let r = get_raw(
        proxy.listener("unescape"),
        "/public/..%2Fadmin",
        "unescape-2",
    )
    .await;
    assert_eq!(r.status(), Some(403), "{}", r.text());
    assert_eq!(up.request_count(), before + 1);
}

#[tokio::test]
async fn malformed_percent_encoding_is_400() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [listener("keep", "keep")],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let r = get_raw(proxy.listener("keep"), "/public/%zz", "bad-pct").await;
    assert_eq!(r.status(), Some(400), "{}", r.text());
    assert_eq!(up.request_count(), 0);
}
