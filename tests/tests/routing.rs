//! Routing: which route a request takes (authority, path, method, headers, query; first match
//! wins) and what the route does to it (direct responses, redirects, rewrites, header edits,
//! timeouts).

use serde_json::json;
use std::time::Duration;
use wasmesh_e2e::client::Req;
use wasmesh_e2e::{cluster, Behavior, Proxy, Upstream};

fn direct(name: &str, m: serde_json::Value, body: &str) -> serde_json::Value {
    json!({"name": name, "match": m, "direct_response": {"status": 200, "body": body}})
}

#[tokio::test]
async fn matches_authority_path_method_headers_and_query_first_match_wins() {
    let api = Upstream::named("api").await;
    let wild = Upstream::named("wild").await;
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"name": "exact-host", "match": {"authority": "api.local"}, "cluster": "api"},
            {"name": "wild-host", "match": {"authority": "*.svc.local"}, "cluster": "wild"},
            {"name": "exact-path", "match": {"path": "/exact"}, "cluster": "a"},
            {"name": "regex", "match": {"regex": "/items/[0-9]+"}, "cluster": "b"},
            {"name": "methods", "match": {"prefix": "/m/", "methods": ["PUT", "DELETE"]}, "cluster": "b"},
            direct("hdr-exact", json!({"prefix": "/h", "headers": [{"name": "x-env", "exact": "canary"}]}), "hdr-exact"),
            direct("hdr-regex", json!({"prefix": "/h", "headers": [{"name": "x-env", "regex": "^stag.*"}]}), "hdr-regex"),
            direct("hdr-present", json!({"prefix": "/h", "headers": [{"name": "x-debug", "present": true}]}), "hdr-present"),
            direct("hdr-absent", json!({"prefix": "/h", "headers": [{"name": "x-user", "present": false}]}), "hdr-absent"),
            direct("query-exact", json!({"prefix": "/q", "query": [{"name": "v", "exact": "2"}]}), "query-v2"),
            direct("query-present", json!({"prefix": "/q", "query": [{"name": "flag", "present": true}]}), "query-flag"),
            direct("first", json!({"prefix": "/first"}), "first"),
            direct("second", json!({"prefix": "/first/second"}), "second"),
        ]}],
        "clusters": [cluster("api", api.addr()), cluster("wild", wild.addr()), cluster("a", a.addr()), cluster("b", b.addr())],
    }))
    .await;
    let l = proxy.listener("in");

    // Authority: exact (port ignored, case-insensitive) and `*.suffix` (not the bare suffix).
    let r = Req::get("/x").host("API.local:8080").send(l).await;
    assert_eq!((r.status, r.text().as_str()), (200, "upstream api"));
    let r = Req::get("/x").host("foo.svc.local").send(l).await;
    assert_eq!((r.status, r.text().as_str()), (200, "upstream wild"));
    let r = Req::get("/x").host("svc.local").send(l).await;
    assert_eq!(
        r.status, 404,
        "the bare suffix is not a `*.svc.local` match"
    );

    // Path: exact is exact; regex covers the whole path.
    assert_eq!(Req::get("/exact").send(l).await.text(), "upstream a");
    assert_eq!(Req::get("/exact/more").send(l).await.status, 404);
    assert_eq!(Req::get("/items/42").send(l).await.text(), "upstream b");
    assert_eq!(Req::get("/items/42x").send(l).await.status, 404);

    // Methods.
    assert_eq!(Req::new("PUT", "/m/1").send(l).await.text(), "upstream b");
    assert_eq!(
        Req::new("DELETE", "/m/1").send(l).await.text(),
        "upstream b"
    );
    assert_eq!(Req::get("/m/1").send(l).await.status, 404);
    assert_eq!(b.requests().iter().filter(|r| r.path == "/m/1").count(), 2);

    // Headers: exact, regex, present, absent; tried in order.
    let h = |k: &str, v: &str| Req::get("/h").header("x-user", "u").header(k, v);
    assert_eq!(h("x-env", "canary").send(l).await.text(), "hdr-exact");
    assert_eq!(h("x-env", "staging-2").send(l).await.text(), "hdr-regex");
    assert_eq!(h("x-debug", "").send(l).await.text(), "hdr-present");
    assert_eq!(Req::get("/h").send(l).await.text(), "hdr-absent");
    assert_eq!(h("x-env", "prod").send(l).await.status, 404);

    // Query parameters.
    assert_eq!(Req::get("/q?a=1&v=2").send(l).await.text(), "query-v2");
    assert_eq!(Req::get("/q?v=3&flag").send(l).await.text(), "query-flag");
    assert_eq!(Req::get("/q?v=3").send(l).await.status, 404);
    // Keys and values are compared percent-decoded (as Envoy does); the first one counts.
    assert_eq!(Req::get("/q?%76=%32").send(l).await.text(), "query-v2");
    assert_eq!(Req::get("/q?v=3&v=2").send(l).await.status, 404);

    // First match wins: `/first` shadows the more specific `/first/second`.
    assert_eq!(Req::get("/first/second").send(l).await.text(), "first");

    // No route: 404 with the NR flag, and nothing reached any upstream.
    let r = Req::get("/nowhere")
        .header("x-request-id", "no-route-1")
        .send(l)
        .await;
    assert_eq!(r.status, 404);
    assert_eq!(r.text(), "no route matched\n");
    let log = proxy.log_for_request_id("no-route-1").await;
    assert_eq!(log["response_flags"], "NR");
    assert!(a.requests().iter().all(|r| r.path != "/nowhere"));

    // The access log names the route taken.
    let r = Req::get("/items/7")
        .header("x-request-id", "route-name-1")
        .send(l)
        .await;
    assert_eq!(r.status, 200);
    let log = proxy.log_for_request_id("route-name-1").await;
    assert_eq!(log["route"], "regex");
    assert_eq!(log["cluster"], "b");
    assert_eq!(log["upstream"], b.addr().to_string());
}

#[tokio::test]
async fn direct_response_and_redirect() {
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"path": "/teapot"},
             "direct_response": {"status": 418, "body": "short and stout", "headers": {"x-direct": "yes"}},
             "response_headers": {"add": {"x-route": "teapot"}}},
            {"match": {"prefix": "/old"}, "redirect": {"path": "/new", "status": 302}},
            {"match": {"prefix": "/secure"}, "redirect": {"scheme": "https", "host": "example.test"}},
        ]}],
    }))
    .await;
    let l = proxy.listener("in");

    let r = Req::get("/teapot").send(l).await;
    assert_eq!(r.status, 418);
    assert_eq!(r.text(), "short and stout");
    assert_eq!(r.header("x-direct"), Some("yes"));
    assert_eq!(r.header("x-route"), Some("teapot"));

    let r = Req::get("/old/page?x=1").host("site.local").send(l).await;
    assert_eq!(r.status, 302);
    assert_eq!(r.header("location"), Some("http://site.local/new?x=1"));

    let r = Req::get("/secure/a").host("site.local").send(l).await;
    assert_eq!(r.status, 301, "301 is the default redirect status");
    assert_eq!(r.header("location"), Some("https://example.test/secure/a"));

    // No host to name (HTTP/1.0 without Host): a relative reference, not `http:///new`.
    let r = wasmesh_e2e::raw::RawConn::exchange(l, b"GET /old/page HTTP/1.0\r\n\r\n").await;
    assert_eq!(r.status(), Some(302), "{}", r.text());
    assert!(r.text().contains("location: /new\r\n"), "{}", r.text());
}

#[tokio::test]
async fn rewrites_and_header_mutations_reach_the_upstream() {
    let up = Upstream::start().await;
    up.set_default(Behavior::Respond {
        status: 200,
        headers: vec![
            ("x-upstream-secret".into(), "internal".into()),
            ("x-resp-set".into(), "old".into()),
        ],
        body: "rewritten".into(),
    });
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{
            "match": {"prefix": "/api/"},
            "prefix_rewrite": "/v2/",
            "host_rewrite": "backend.internal",
            "request_headers": {"add": {"x-added": "1"}, "set": {"x-set": "new"}, "remove": ["x-remove-me"]},
            "response_headers": {"add": {"x-resp-added": "yes"}, "set": {"x-resp-set": "new"}, "remove": ["x-upstream-secret"]},
            "cluster": "app"
        }]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;

    let r = Req::get("/api/users?id=7")
        .host("public.example")
        .header("x-set", "old")
        .header("x-added", "0")
        .header("x-remove-me", "please")
        .send(proxy.listener("in"))
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "rewritten");
    assert_eq!(r.header("x-resp-added"), Some("yes"));
    assert_eq!(r.header("x-resp-set"), Some("new"));
    assert_eq!(r.header("x-upstream-secret"), None);

    let seen = up.last();
    assert_eq!(seen.uri, "/v2/users?id=7");
    assert_eq!(seen.header("host"), Some("backend.internal"));
    assert_eq!(seen.header("x-set"), Some("new"));
    assert_eq!(seen.header_all("x-added"), vec!["0", "1"], "add appends");
    assert_eq!(seen.header("x-remove-me"), None);
}

#[tokio::test]
async fn route_timeout_is_504_with_ut() {
    let up = Upstream::start().await;
    up.set_default(Behavior::Hang);
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/"}, "timeout": "300ms", "cluster": "app"}
        ]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let start = std::time::Instant::now();
    let r = Req::get("/slow")
        .header("x-request-id", "timeout-1")
        .send(proxy.listener("in"))
        .await;
    let took = start.elapsed();
    assert_eq!(r.status, 504);
    assert_eq!(r.text(), "upstream request timeout\n");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    let log = proxy.log_for_request_id("timeout-1").await;
    assert_eq!(log["status"], 504);
    assert_eq!(log["response_flags"], "UT");
    assert_eq!(up.request_count(), 1, "the request did reach the upstream");
}

#[tokio::test]
async fn weighted_clusters_split_by_weight() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"weighted_clusters": [{"name": "a", "weight": 1}, {"name": "b", "weight": 3}]}
        ]}],
        "clusters": [cluster("a", a.addr()), cluster("b", b.addr())],
    }))
    .await;
    let mut c = wasmesh_e2e::client::Conn::h1(proxy.listener("in")).await;
    for _ in 0..200 {
        assert_eq!(c.send(Req::get("/w")).await.status, 200);
    }
    let (na, nb) = (a.request_count(), b.request_count());
    assert_eq!(na + nb, 200);
    // Expected 50/150; the bounds are loose enough never to flake (p < 1e-6).
    assert!((20..=85).contains(&na), "a got {na}, b got {nb}");
}
