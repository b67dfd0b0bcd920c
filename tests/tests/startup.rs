//! Start-up failures are clear and fail fast: an invalid manifest, a port already in use.

use serde_json::json;
use wasmesh_e2e::Proxy;

#[tokio::test]
async fn an_invalid_manifest_fails_the_start_with_its_errors() {
    let (status, stderr) = Proxy::start_failure(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "missing"}]}],
    }))
    .await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("listeners[0].routes[0].cluster: unknown cluster `missing`"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("listening on"),
        "nothing was served: {stderr}"
    );
}

#[tokio::test]
async fn a_port_in_use_fails_the_start_naming_the_listener() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let (status, stderr) = Proxy::start_failure(json!({
        "listeners": [{"name": "busy", "address": addr.to_string(),
                       "routes": [{"direct_response": {"status": 200}}]}],
    }))
    .await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("listener `busy` cannot bind {addr}")),
        "{stderr}"
    );
}

/// A manifest using most sections, on loopback only (the README's example, with its
/// addresses made local), with the sizes the proxy allocates from spelled out so that
/// mutations reach them.
fn rich_manifest() -> serde_json::Value {
    json!({
        "workers": 1,
        "node": {"workload": "checkout", "namespace": "shop",
                 "locality": {"region": "us-west", "zone": "us-west-1a"}},
        "admin": {"address": "127.0.0.1:0"},
        "access_log": {"enabled": true, "path": "stdout", "buffer_lines": 16384},
        "drain_timeout": "2s",
        "filter_engine": {"call_deadline": "100ms", "max_instance_memory_mib": 64},
        "listeners": [
            {"name": "inbound", "address": "127.0.0.1:0", "direction": "inbound",
             "xff_num_trusted_hops": 0,
             "limits": {"max_connections": 10000, "max_request_headers_kb": 60,
                        "max_headers_count": 100, "request_headers_timeout": "10s",
                        "idle_timeout": "300s", "http2_max_concurrent_streams": 100},
             "path_normalization": {"merge_slashes": true, "escaped_slashes": "keep"},
             "routes": [
                {"name": "health", "match": {"path": "/healthz"},
                 "direct_response": {"status": 200, "body": "ok\n"}},
                {"name": "legacy", "match": {"prefix": "/v1/"},
                 "redirect": {"path": "/v2/", "status": 301}},
                {"name": "api",
                 "match": {"authority": "*.shop.local", "prefix": "/api/", "methods": ["GET", "POST"],
                           "headers": [{"name": "x-canary", "present": false}],
                           "query": [{"name": "debug", "exact": "1"}]},
                 "cluster": "checkout", "prefix_rewrite": "/", "host_rewrite": "checkout.internal",
                 "request_headers": {"set": {"x-env": "prod"}, "remove": ["x-debug"]},
                 "response_headers": {"add": {"x-served-by": "wasmesh"}},
                 "timeout": "15s",
                 "retry_policy": {"retry_on": "5xx", "num_retries": 2, "per_try_timeout": "1s"},
                 "hash_policy": [{"header": {"header_name": "x-user"}}]},
                {"name": "canary", "match": {"prefix": "/"},
                 "weighted_clusters": [{"name": "checkout", "weight": 90},
                                       {"name": "checkout-v2", "weight": 10}]}
             ]},
            {"name": "postgres", "address": "127.0.0.1:0", "protocol": "tcp", "cluster": "db"}
        ],
        "clusters": [
            {"name": "checkout", "lb_policy": "ring_hash", "protocol": "http1",
             "connect_timeout": "1s",
             "circuit_breakers": {"max_connections": 1024, "max_requests": 100},
             "outlier_detection": {"consecutive_5xx": 5, "base_ejection_time": "30s"},
             "endpoints": [{"address": "127.0.0.1:9", "weight": 1,
                            "locality": {"region": "us-west", "zone": "us-west-1a"}}]},
            {"name": "checkout-v2", "protocol": "http2",
             "endpoints": [{"address": "127.0.0.1:10"}]},
            {"name": "db", "endpoints": [{"address": "127.0.0.1:11"}]}
        ]
    })
}

/// Mutated versions of a rich manifest (values of the wrong type, out of range, empty,
/// huge; fields removed), addresses left alone: each one either starts and becomes ready,
/// or is refused with exit status 1 and its errors. Never a panic, an abort or a hang:
/// `wasmesh check` passing a manifest that then crashes the proxy is what this catches.
#[tokio::test]
async fn mutated_manifests_start_or_are_refused() {
    use wasmesh_e2e::generate::{mutate_json, Replacements, Rng};
    let base = rich_manifest();
    // The base itself starts.
    drop(
        Proxy::try_start(base.clone(), &[])
            .await
            .unwrap_or_else(|f| panic!("{}", f.message)),
    );
    let with = Replacements::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut started, mut refused) = (0, 0);
    for case in 0..600 {
        let mut m = base.clone();
        // Addresses stay on loopback, as the tests must.
        mutate_json(&mut rng, &mut m, &with, &|k| k == "address");
        match Proxy::try_start(m.clone(), &[]).await {
            Ok(proxy) => {
                started += 1;
                assert!(
                    !proxy.stderr().contains("panicked"),
                    "case {case}: {}",
                    proxy.stderr()
                );
            }
            Err(f) => {
                refused += 1;
                assert_eq!(
                    f.status.and_then(|s| s.code()),
                    Some(1),
                    "case {case}: neither started nor refused cleanly\n{}",
                    f.message
                );
                assert!(!f.stderr.contains("panicked"), "case {case}: {}", f.message);
            }
        }
    }
    assert!(
        started > 10 && refused > 10,
        "started {started}, refused {refused}"
    );
}
