//! Reload: a new manifest renamed into place takes effect with no failed request; an invalid
//! one is refused (the old configuration keeps serving, the failure is counted and shown);
//! SIGHUP and `POST /reload` reload too.

use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use wasmesh_e2e::client::{Conn, Req};
use wasmesh_e2e::{cluster, Proxy, Upstream};

fn manifest(version: &str, upstream: std::net::SocketAddr) -> serde_json::Value {
    json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"path": "/version"}, "direct_response": {"status": 200, "body": version}},
            {"cluster": "app"},
        ]}],
        "clusters": [cluster("app", upstream)],
    })
}

/// Requests in a loop on another task, on kept-alive and fresh connections, recording every
/// body and every failure.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    bodies: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(addr: std::net::SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (s, o, f, b) = (stop.clone(), ok.clone(), failures.clone(), bodies.clone());
        let task = tokio::spawn(async move {
            let mut kept = Conn::h1(addr).await;
            let mut i = 0u64;
            while !s.load(Ordering::SeqCst) {
                i += 1;
                let path = if i.is_multiple_of(2) {
                    "/version"
                } else {
                    "/app"
                };
                let r = if i.is_multiple_of(3) {
                    Req::get(path).try_send(addr).await
                } else {
                    kept.try_send(Req::get(path)).await
                };
                match r {
                    Ok(r) if r.status == 200 && r.body_error.is_none() => {
                        o.fetch_add(1, Ordering::SeqCst);
                        if path == "/version" {
                            b.lock().expect("lock").push(r.text());
                        }
                    }
                    Ok(r) => {
                        f.lock()
                            .expect("lock")
                            .push(format!("{path}: {} {}", r.status, r.text()))
                    }
                    Err(e) => f.lock().expect("lock").push(format!("{path}: {e}")),
                }
            }
        });
        Load {
            stop,
            ok,
            failures,
            bodies,
            task,
        }
    }

    fn last_body(&self) -> Option<String> {
        self.bodies.lock().expect("lock").last().cloned()
    }

    async fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        (
            self.ok.load(Ordering::SeqCst),
            self.failures.lock().expect("lock").clone(),
        )
    }
}

#[tokio::test]
async fn reload_under_load_changes_behaviour_without_failures() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(manifest("v1", up.addr())).await;
    let load = Load::start(proxy.listener("in"));
    proxy
        .wait_for(Duration::from_secs(5), "v1 served", || async {
            (load.last_body().as_deref() == Some("v1")).then_some(())
        })
        .await;

    // A valid new manifest, renamed into place.
    proxy.write_manifest(manifest("v2", up.addr()));
    proxy
        .wait_for(
            Duration::from_secs(10),
            "v2 served after the file changed",
            || async { (load.last_body().as_deref() == Some("v2")).then_some(()) },
        )
        .await;
    assert!(
        proxy
            .metric("wasmesh_config_reloads_total", &[("result", "success")])
            .await
            >= 1.0
    );

    // An invalid manifest: refused, counted, shown; v2 keeps serving.
    let failures_before = proxy
        .metric("wasmesh_config_reloads_total", &[("result", "failure")])
        .await;
    proxy.write_manifest_text("{ \"listeners\": [ this is not json");
    proxy
        .wait_for(
            Duration::from_secs(10),
            "the failed reload to be counted",
            || async {
                (proxy
                    .metric("wasmesh_config_reloads_total", &[("result", "failure")])
                    .await
                    > failures_before)
                    .then_some(())
            },
        )
        .await;
    let config = proxy.admin_get("/config").await.json();
    let err = config["last_reload_error"]
        .as_str()
        .expect("last_reload_error is set");
    assert!(err.contains("invalid JSON"), "{err}");
    let served = load.bodies.lock().expect("lock").len();
    proxy
        .wait_for(
            Duration::from_secs(5),
            "more requests after the bad reload",
            || async { (load.bodies.lock().expect("lock").len() > served + 5).then_some(()) },
        )
        .await;
    assert_eq!(
        load.last_body().as_deref(),
        Some("v2"),
        "the previous configuration keeps serving"
    );

    // A semantically invalid manifest (unknown cluster) is refused the same way.
    let mut bad = manifest("v3", up.addr());
    bad["listeners"][0]["routes"][1]["cluster"] = json!("missing");
    let failures_before = proxy
        .metric("wasmesh_config_reloads_total", &[("result", "failure")])
        .await;
    proxy.write_manifest(bad);
    proxy
        .wait_for(
            Duration::from_secs(10),
            "the second failed reload to be counted",
            || async {
                (proxy
                    .metric("wasmesh_config_reloads_total", &[("result", "failure")])
                    .await
                    > failures_before)
                    .then_some(())
            },
        )
        .await;
    let config = proxy.admin_get("/config").await.json();
    assert!(
        config["last_reload_error"]
            .as_str()
            .is_some_and(|e| e.contains("missing")),
        "{config}"
    );
    assert_eq!(
        Req::get("/version").send(proxy.listener("in")).await.text(),
        "v2"
    );

    // Fixing the file clears the error.
    proxy.write_manifest(manifest("v4", up.addr()));
    proxy
        .wait_for(Duration::from_secs(10), "v4 served", || async {
            (load.last_body().as_deref() == Some("v4")).then_some(())
        })
        .await;
    assert!(proxy.admin_get("/config").await.json()["last_reload_error"].is_null());

    let (ok, failures) = load.stop().await;
    assert!(
        failures.is_empty(),
        "{} requests failed during reloads: {failures:?}",
        failures.len()
    );
    assert!(ok > 50, "the load loop ran ({ok} requests)");
}

#[tokio::test]
async fn sighup_and_admin_post_reload() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(manifest("v1", up.addr())).await;
    let successes = || async {
        proxy
            .metric("wasmesh_config_reloads_total", &[("result", "success")])
            .await
    };

    let before = successes().await;
    proxy.sighup();
    proxy
        .wait_for(Duration::from_secs(10), "SIGHUP to reload", || async {
            (successes().await > before).then_some(())
        })
        .await;

    let before = successes().await;
    let r = proxy.admin_post("/reload").await;
    assert_eq!((r.status, r.text().as_str()), (200, "reloaded\n"));
    assert_eq!(successes().await, before + 1.0);

    // POST /reload answers the reason when the manifest is refused.
    let mut bad = manifest("v2", up.addr());
    bad["listeners"][0]["address"] = json!("127.0.0.1:1");
    proxy.write_manifest(bad);
    // The watcher may get there first; either way the refusal is reported.
    let r = proxy.admin_post("/reload").await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("needs a restart"), "{}", r.text());
    assert_eq!(
        Req::get("/version").send(proxy.listener("in")).await.text(),
        "v1"
    );
}

#[tokio::test]
async fn other_files_next_to_the_manifest_do_not_trigger_reloads() {
    // The harness writes the access log (stdout) next to the manifest, as
    // `wasmesh run manifest.json > access.log` would: traffic must not cause reloads.
    let up = Upstream::start().await;
    let proxy = Proxy::start(manifest("v1", up.addr())).await;
    let mut c = Conn::h1(proxy.listener("in")).await;
    for _ in 0..20 {
        assert_eq!(c.send(Req::get("/version")).await.text(), "v1");
    }
    std::fs::write(proxy.dir().join("unrelated.txt"), "x").expect("write");
    proxy
        .wait_for(Duration::from_secs(5), "20 access log lines", || async {
            (proxy.access_log_lines().len() >= 20).then_some(())
        })
        .await;
    // Past the watcher's debounce: a reload would have happened by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let reloads = proxy.metric("wasmesh_config_reloads_total", &[]).await;
    assert_eq!(
        reloads,
        0.0,
        "reloads without a manifest change\n{}",
        proxy.stderr()
    );
}
