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

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// A listener `in` whose route `app` runs the `testkit` filter `tk` in front of `up`.
fn with_testkit(up: &Upstream, access_log: serde_json::Value) -> serde_json::Value {
    json!({
        "access_log": access_log,
        "filter_dir": wasmesh_e2e::wasm_filters::filter_dir(&["testkit"]),
        "filters": [{"name": "tk", "file": "testkit.wasm", "config": {}}],
        "listeners": [{"name": "in", "address": "127.0.0.1:0",
                       "routes": [{"name": "app", "cluster": "app", "filters": ["tk"]}]}],
        "clusters": [cluster("app", up.addr())],
    })
}

#[tokio::test]
async fn the_line_carries_the_trace_and_the_filters_local_answer() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(with_testkit(&up, json!({}))).await;
    let l = proxy.listener("in");
    let r = Req::get("/traced")
        .header("x-request-id", "trace-1")
        .header("traceparent", TRACEPARENT)
        .send(l)
        .await;
    assert_eq!(r.status, 200);
    let r = Req::get("/answered")
        .header("x-request-id", "local-1")
        .header("x-testkit-do", "respond:429")
        .send(l)
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(
        up.request_count(),
        1,
        "the local answer never reached the upstream"
    );

    let traced = proxy.log_for_request_id("trace-1").await;
    assert_eq!(
        traced["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736",
        "{traced}"
    );
    assert_eq!(traced["span_id"], "00f067aa0ba902b7", "{traced}");
    assert!(traced.get("local_response").is_none(), "{traced}");
    let ran = traced["filters"][0]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        ran.starts_with("tk@"),
        "name@version of the filter that ran: {traced}"
    );

    let answered = proxy.log_for_request_id("local-1").await;
    assert_eq!(answered["status"], 429, "{answered}");
    assert_eq!(
        answered["local_response"]["filter"],
        ran.as_str(),
        "{answered}"
    );
    assert_eq!(answered["local_response"]["status"], 429, "{answered}");
    assert_eq!(answered["response_flags"], "RL", "{answered}");
    assert!(
        answered.get("trace_id").is_none(),
        "no traceparent, no trace_id: {answered}"
    );
}

#[tokio::test]
async fn access_log_fields_choose_what_a_line_carries() {
    let up = Upstream::start().await;
    let fields = ["request_id", "status", "trace_id", "local_response", "path"];
    let proxy = Proxy::start(with_testkit(&up, json!({ "fields": fields }))).await;
    let l = proxy.listener("in");
    Req::get("/chosen")
        .header("x-request-id", "fields-1")
        .header("traceparent", TRACEPARENT)
        .header("user-agent", "e2e/1.0")
        .send(l)
        .await;
    Req::get("/chosen")
        .header("x-request-id", "fields-2")
        .header("x-testkit-do", "respond:403")
        .send(l)
        .await;
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().expect("object").keys().cloned().collect();
        k.sort();
        k
    };
    let line = proxy.log_for_request_id("fields-1").await;
    assert_eq!(
        keys(&line),
        ["path", "request_id", "status", "trace_id"],
        "{line}"
    );
    assert_eq!(line["path"], "/chosen");
    let line = proxy.log_for_request_id("fields-2").await;
    assert_eq!(
        keys(&line),
        ["local_response", "path", "request_id", "status"],
        "{line}"
    );
    assert_eq!(line["local_response"]["status"], 403);
}

#[tokio::test]
async fn an_unknown_access_log_field_fails_the_start_naming_it() {
    let (status, stderr) = Proxy::start_failure(json!({
        "access_log": {"fields": ["status", "trace", "status"]},
        "listeners": [{"name": "in", "address": "127.0.0.1:0",
                       "routes": [{"direct_response": {"status": 204}}]}],
    }))
    .await;
    assert!(!status.success());
    assert!(
        stderr.contains("access_log.fields[1]") && stderr.contains("`trace`"),
        "{stderr}"
    );
}

/// A writer that cannot keep up (a pipe nobody reads) costs log lines, counted, never
/// requests: the buffer is bounded and the request path does not wait for it.
#[tokio::test]
async fn a_stuck_log_writer_drops_lines_and_counts_them_but_requests_flow() {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = wasmesh_e2e::proxy::temp_dir("access-log-fifo");
    let fifo = dir.join("access.pipe");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo");
    // A reader that never reads: the proxy's open for writing succeeds, its writes stall
    // once the pipe's buffer is full.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the pipe for reading");
    let proxy = Proxy::start(json!({
        "access_log": {"path": fifo.display().to_string(), "buffer_lines": 4},
        "listeners": [{"name": "in", "address": "127.0.0.1:0",
                       "routes": [{"direct_response": {"status": 204}}]}],
    }))
    .await;
    // Lines of ~8 KiB: the writer's buffer and the pipe's fill after a few dozen.
    let agent = "a".repeat(8 * 1024);
    let sent = 200;
    for i in 0..sent {
        let r = Req::get(&format!("/stuck/{i}"))
            .header("user-agent", &agent)
            .send(proxy.listener("in"))
            .await;
        assert_eq!(r.status, 204);
    }
    let dropped = proxy.metric("wasmesh_access_log_dropped_total", &[]).await;
    assert!(
        dropped >= 100.0 && dropped < f64::from(sent),
        "dropped {dropped} of {sent} lines"
    );
    drop(proxy);
    let _ = std::fs::remove_dir_all(dir);
}
