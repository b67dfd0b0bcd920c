//! The access log: one JSON line per request with stable field names (golden), the values
//! a request produced, and `access_log.path` writing to a file instead of stdout.

use serde_json::json;
use std::path::PathBuf;
use wasmesh_e2e::client::Req;
use wasmesh_e2e::{cluster, Behavior, Proxy, Upstream};

#[tokio::test]
async fn a_line_per_request_with_stable_fields() {
    let up = Upstream::start().await;
    up.set_default(Behavior::Echo);
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0",
                       "routes": [{"name": "echo", "cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let r = Req::post("/submit?x=1")
        .host("shop.local")
        .header("x-request-id", "log-fields-1")
        .header("user-agent", "e2e/1.0")
        .body("0123456789")
        .send(proxy.listener("in"))
        .await;
    assert_eq!(r.status, 200);
    let line = proxy.log_for_request_id("log-fields-1").await;
    assert_eq!(line["listener"], "in");
    assert_eq!(line["method"], "POST");
    assert_eq!(line["authority"], "shop.local");
    assert_eq!(line["path"], "/submit?x=1");
    assert_eq!(line["protocol"], "HTTP/1.1");
    assert_eq!(line["status"], 200);
    assert_eq!(line["response_flags"], "-");
    assert_eq!(line["bytes_received"], 10);
    assert_eq!(line["bytes_sent"], 10);
    assert_eq!(line["upstream"], up.addr().to_string());
    assert_eq!(line["route"], "echo");
    assert_eq!(line["cluster"], "app");
    assert_eq!(line["client_address"], "127.0.0.1");
    assert_eq!(line["user_agent"], "e2e/1.0");
    assert!(
        line["duration_ms"].as_f64().is_some_and(|d| d > 0.0),
        "{line}"
    );
    assert!(
        line["time"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{line}"
    );

    // Field names are an interface: dashboards and log pipelines read them.
    let mut keys: Vec<&str> = line
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    let got = keys.join("\n") + "\n";
    let golden = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("golden/access_log_fields.txt");
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &got).expect("write golden");
    } else {
        let want = std::fs::read_to_string(&golden).expect("golden/access_log_fields.txt");
        assert!(got == want, "access log fields changed (UPDATE_GOLDEN=1 to accept):\n--- want\n{want}--- got\n{got}");
    }
}

#[tokio::test]
async fn access_log_path_writes_to_a_file() {
    let dir = wasmesh_e2e::proxy::temp_dir("access-log");
    let file = dir.join("access.log");
    let proxy = Proxy::start(json!({
        "access_log": {"path": file.display().to_string()},
        "listeners": [{"name": "in", "address": "127.0.0.1:0",
                       "routes": [{"direct_response": {"status": 204}}]}],
    }))
    .await;
    for i in 0..3 {
        Req::get(&format!("/file/{i}"))
            .send(proxy.listener("in"))
            .await;
    }
    let lines = proxy
        .wait_for(
            std::time::Duration::from_secs(5),
            "3 lines in the access log file",
            || async {
                let text = std::fs::read_to_string(&file).unwrap_or_default();
                let lines: Vec<serde_json::Value> = text
                    .lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect();
                (lines.len() >= 3).then_some(lines)
            },
        )
        .await;
    assert_eq!(lines[2]["path"], "/file/2");
    assert_eq!(lines[2]["status"], 204);
    assert!(proxy.access_log_lines().is_empty(), "nothing on stdout");
    drop(proxy);
    let _ = std::fs::remove_dir_all(dir);
}
