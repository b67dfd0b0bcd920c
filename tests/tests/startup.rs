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
