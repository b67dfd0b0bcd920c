//! Filter host tests against the real test filters (`filters/passthrough`,
//! `filters/testkit`), built once per run by `scripts/build-filters.sh`.
//!
//! Each test drives a `ChainRun` on a current-thread runtime inside a `LocalSet`, as a
//! worker thread does, with real `http` parts.

use bytes::Bytes;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use wasmesh::config::{FailureMode, FilterEngineSpec, FilterSpec};
use wasmesh::filters::{Callout, Chain, FilterHost, FilterSet, Outcome, RequestInfo, Verdict};

/// Build the test filters once per test process; returns the directory with the .wasm files.
fn wasm_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| wasmesh_e2e::wasm_filters::build_all().unwrap_or_else(|e| panic!("{e}")))
}

fn wasm(name: &str) -> PathBuf {
    wasm_dir().join(format!("{name}.wasm"))
}

fn temp_dir(tag: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("wasmesh-test-{}-{tag}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

struct MockCallout;

impl Callout for MockCallout {
    fn call(
        &self,
        cluster: &str,
        req: http::Request<Bytes>,
        _timeout: Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<http::Response<Bytes>, String>>>>
    {
        let body = format!("pong {cluster} {}", req.uri().path());
        Box::pin(async move { Ok(http::Response::new(Bytes::from(body))) })
    }
}

struct Harness {
    host: Arc<FilterHost>,
    registry: prometheus_client::registry::Registry,
}

fn harness_with(deadline: Duration, mem_mib: usize) -> Harness {
    let spec = FilterEngineSpec {
        call_deadline: deadline,
        max_instance_memory_mib: mem_mib,
        instances_per_worker: None,
        cache_dir: Some(temp_dir("cache")),
    };
    let mut registry = prometheus_client::registry::Registry::default();
    let host =
        FilterHost::new(&spec, 2, &mut registry, Arc::new(MockCallout)).expect("filter host");
    Harness { host, registry }
}

fn harness() -> Harness {
    harness_with(Duration::from_millis(100), 32)
}

impl Harness {
    fn metrics(&self) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, &self.registry).expect("encode");
        s
    }
}

fn spec(name: &str, file: &Path, config: serde_json::Value, mode: FailureMode) -> FilterSpec {
    FilterSpec {
        name: name.to_string(),
        file: file.to_path_buf(),
        config,
        failure_mode: mode,
        sha256: None,
        clusters: vec!["auth".to_string()],
        rollout: None,
    }
}

fn clusters() -> HashSet<String> {
    ["auth", "other"].iter().map(|s| s.to_string()).collect()
}

fn tk(name: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::json!({ "name": name, "tag": "v1" });
    if let (Some(o), Some(e)) = (v.as_object_mut(), extra.as_object()) {
        for (k, x) in e {
            o.insert(k.clone(), x.clone());
        }
    }
    v
}

/// Run a future as a worker thread would: current-thread runtime inside a LocalSet.
fn worker<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    tokio::task::LocalSet::new().block_on(&rt, f)
}

fn load(h: &Harness, dir: Option<&Path>, specs: &[FilterSpec]) -> FilterSet {
    let set = worker(h.host.prepare(dir, specs, &clusters()))
        .unwrap_or_else(|e| panic!("prepare failed: {e:?}"));
    h.host.activate(&set);
    set
}

fn info(id: &str) -> RequestInfo {
    RequestInfo {
        request_id: id.into(),
        source_addr: "127.0.0.1:4000".parse().expect("addr"),
        peer_identity: None,
        route: Arc::from("r1"),
        scheme: "http",
        trace_ids: None,
    }
}

fn request(headers: &[(&str, &str)]) -> http::request::Parts {
    let mut b = http::Request::builder()
        .method("GET")
        .uri("/hello?x=1")
        .header("host", "svc.local");
    for (n, v) in headers {
        b = b.header(*n, *v);
    }
    b.body(()).expect("request").into_parts().0
}

fn response() -> http::response::Parts {
    http::Response::builder()
        .status(200)
        .body(())
        .expect("response")
        .into_parts()
        .0
}

fn values(h: &http::HeaderMap, name: &str) -> Vec<String> {
    h.get_all(name)
        .iter()
        .map(|v| v.to_str().unwrap_or("?").to_string())
        .collect()
}

fn outcome(status: u16) -> Outcome {
    Outcome {
        status,
        response_flags: String::new(),
        duration: Duration::from_millis(1),
        cluster: None,
        upstream: None,
    }
}

/// Full request through `chain`: request headers, response headers, done.
async fn roundtrip(
    chain: &Chain,
    id: &str,
    headers: &[(&str, &str)],
) -> (
    Verdict,
    http::request::Parts,
    http::response::Parts,
    Vec<String>,
    Vec<String>,
) {
    let mut run = chain.start(info(id));
    let mut req = request(headers);
    let v = run.request_headers(&mut req).await;
    let mut resp = response();
    if matches!(v, Verdict::Continue) {
        let _ = run.response_headers(&mut resp).await;
    }
    let ran = run.filters_ran().to_vec();
    let flags = run.response_flags().to_vec();
    run.done(&outcome(200));
    (v, req, resp, ran, flags)
}

fn local(v: Verdict) -> wasmesh::filters::LocalResponse {
    match v {
        Verdict::Respond(r) => r,
        Verdict::Continue => panic!("expected a local response"),
    }
}

#[test]
fn passthrough_loads_and_runs() {
    let h = harness();
    let set = load(
        &h,
        None,
        &[spec(
            "pt",
            &wasm("passthrough"),
            serde_json::Value::Null,
            FailureMode::FailClosed,
        )],
    );
    let chain = set.chain(&["pt".to_string()]).expect("chain");
    assert!(set.chain(&["nope".to_string()]).is_err());
    let (v, _, _, ran, _) = worker(roundtrip(&chain, "1", &[]));
    assert!(matches!(v, Verdict::Continue));
    assert_eq!(ran.len(), 1);
    assert!(ran[0].starts_with("pt@"), "{ran:?}");
    let st = h.host.status_json();
    assert_eq!(st[0]["name"], "pt");
    assert_eq!(st[0]["hooks"], serde_json::json!(["request_headers"]));
    assert!(h.host.ready());
}

#[test]
fn chain_order_both_sides_bag_and_attributes() {
    let h = harness();
    let set = load(
        &h,
        None,
        &[
            spec(
                "a",
                &wasm("testkit"),
                tk("a", serde_json::json!({})),
                FailureMode::FailClosed,
            ),
            spec(
                "b",
                &wasm("testkit"),
                tk("b", serde_json::json!({"tag": "v2"})),
                FailureMode::FailClosed,
            ),
        ],
    );
    let chain = set
        .chain(&["a".to_string(), "b".to_string()])
        .expect("chain");
    worker(async {
        let mut run = chain.start(info("r1"));
        let mut req = request(&[]);
        assert!(matches!(
            run.request_headers(&mut req).await,
            Verdict::Continue
        ));
        assert_eq!(values(&req.headers, "x-testkit-trace"), ["a:v1", "b:v2"]);
        assert_eq!(
            values(&req.headers, "x-testkit-bag"),
            ["v1"],
            "b reads what a put in the bag"
        );
        assert_eq!(run.property("seen-by-b"), Some("v2"));
        assert!(run
            .attributes()
            .iter()
            .any(|(k, v)| k == "testkit.tag" && v == "v2"));
        let mut resp = response();
        assert!(matches!(
            run.response_headers(&mut resp).await,
            Verdict::Continue
        ));
        assert_eq!(
            values(&resp.headers, "x-testkit-trace"),
            ["b:v2", "a:v1"],
            "response side runs in reverse"
        );
        assert_eq!(
            values(&resp.headers, "x-testkit-seen"),
            ["yes"],
            "per-request state kept between hooks"
        );
        assert_eq!(run.filters_ran().len(), 2);
        run.done(&outcome(200));
        // done ran: the shared counter went up (b runs last, so its answer wins).
        let (_, req, _, _, _) = roundtrip(&chain, "r2", &[("x-testkit-do", "get:done:b")]).await;
        assert_eq!(values(&req.headers, "x-testkit-get"), ["1"]);
    });
    let m = h.metrics();
    assert!(
        m.contains("wasmesh_filter_testkit_requests_total{filter=\"a\",tag=\"v1\"} 2"),
        "{m}"
    );
    assert!(
        m.contains("wasmesh_filter_invocations_total{filter=\"a\""),
        "{m}"
    );
}

#[test]
fn local_answer_stops_the_chain() {
    let h = harness();
    let set = load(
        &h,
        None,
        &[
            spec(
                "a",
                &wasm("testkit"),
                tk("a", serde_json::json!({})),
                FailureMode::FailClosed,
            ),
            spec(
                "b",
                &wasm("testkit"),
                tk("b", serde_json::json!({})),
                FailureMode::FailClosed,
            ),
        ],
    );
    let chain = set
        .chain(&["a".to_string(), "b".to_string()])
        .expect("chain");
    let (v, _, _, ran, flags) = worker(roundtrip(&chain, "1", &[("x-testkit-do", "respond:429")]));
    let r = local(v);
    assert_eq!(r.status, 429);
    assert_eq!(r.flag.as_deref(), Some("RL"));
    assert_eq!(r.body, Bytes::from("answered by a"));
    assert_eq!(ran.len(), 1, "b never ran: {ran:?}");
    assert_eq!(flags, ["RL"]);
}

#[test]
fn delay_then_continue() {
    let h = harness();
    let set = load(
        &h,
        None,
        &[spec(
            "a",
            &wasm("testkit"),
            tk("a", serde_json::json!({})),
            FailureMode::FailClosed,
        )],
    );
    let chain = set.chain(&["a".to_string()]).expect("chain");
    let t0 = Instant::now();
    let (v, _, _, _, flags) = worker(roundtrip(&chain, "1", &[("x-testkit-do", "delay:60")]));
    assert!(matches!(v, Verdict::Continue));
    assert!(t0.elapsed() >= Duration::from_millis(60));
    assert_eq!(flags, ["DI"]);
}

#[test]
fn cluster_choice_and_callout() {
    let h = harness();
    let set = load(
        &h,
        None,
        &[spec(
            "a",
            &wasm("testkit"),
            tk("a", serde_json::json!({})),
            FailureMode::FailClosed,
        )],
    );
    let chain = set.chain(&["a".to_string()]).expect("chain");
    worker(async {
        let mut run = chain.start(info("1"));
        let mut req = request(&[("x-testkit-do", "cluster:auth")]);
        run.request_headers(&mut req).await;
        assert_eq!(values(&req.headers, "x-testkit-cluster"), ["ok"]);
        assert_eq!(run.cluster_override(), Some("auth"));

        let mut run = chain.start(info("2"));
        let mut req = request(&[("x-testkit-do", "cluster:other")]);
        run.request_headers(&mut req).await;
        assert!(
            values(&req.headers, "x-testkit-cluster")[0].starts_with("error:"),
            "other is not in the filter's list"
        );
        assert_eq!(run.cluster_override(), None);

        let mut run = chain.start(info("3"));
        let mut req = request(&[("x-testkit-do", "callout:auth:/check")]);
        assert!(matches!(
            run.request_headers(&mut req).await,
            Verdict::Continue
        ));
        assert_eq!(
            values(&req.headers, "x-testkit-callout"),
            ["200 pong auth /check"]
        );

        let mut run = chain.start(info("4"));
        let mut req = request(&[("x-testkit-do", "callout:other:/x")]);
        run.request_headers(&mut req).await;
        assert!(values(&req.headers, "x-testkit-callout")[0].contains("not in filter a's clusters"));
    });
    // A filter may only list clusters the manifest has.
    let mut bad = spec(
        "a",
        &wasm("testkit"),
        serde_json::Value::Null,
        FailureMode::FailClosed,
    );
    bad.clusters = vec!["ghost".to_string()];
    let err = worker(h.host.prepare(None, &[bad], &clusters()))
        .err()
        .expect("unknown cluster refused");
    assert!(
        err[0].contains("ghost") && err[0].contains("filter a"),
        "{err:?}"
    );
}

#[test]
fn body_hooks_rewrite_bodies() {
    let h = harness();
    let cfg = tk(
        "a",
        serde_json::json!({"hooks": ["request_body", "response_body"], "body_suffix": "+a"}),
    );
    let set = load(
        &h,
        None,
        &[spec("a", &wasm("testkit"), cfg, FailureMode::FailClosed)],
    );
    let chain = set.chain(&["a".to_string()]).expect("chain");
    worker(async {
        let mut run = chain.start(info("1"));
        assert!(run.wants_request_body() && run.wants_response_body());
        let mut req = request(&[("content-length", "5")]);
        assert!(matches!(
            run.request_headers(&mut req).await,
            Verdict::Continue
        ));
        let body = run
            .request_body(&mut req, Bytes::from("hello"))
            .await
            .expect("body");
        assert_eq!(body, Bytes::from("hello+a"));
        assert_eq!(values(&req.headers, "content-length"), ["7"]);
        let mut resp = response();
        let body = run
            .response_body(&mut resp, Bytes::from("world"))
            .await
            .expect("body");
        assert_eq!(body, Bytes::from("world+a"));
        run.done(&outcome(200));
    });
}

fn failure_case(h: &Harness, command: &str, mode: FailureMode) -> (Verdict, Vec<String>, Duration) {
    let set = load(
        h,
        None,
        &[spec(
            "a",
            &wasm("testkit"),
            tk("a", serde_json::json!({})),
            mode,
        )],
    );
    let chain = set.chain(&["a".to_string()]).expect("chain");
    let t0 = Instant::now();
    let (v, _, resp, _, flags) = worker(roundtrip(&chain, "1", &[("x-testkit-do", command)]));
    let elapsed = t0.elapsed();
    // The instance was replaced: the next request works.
    let (v2, req2, _, _, _) = worker(roundtrip(&chain, "2", &[]));
    assert!(matches!(v2, Verdict::Continue));
    assert_eq!(values(&req2.headers, "x-testkit-trace"), ["a:v1"]);
    if mode == FailureMode::FailOpen {
        assert!(
            values(&resp.headers, "x-testkit-trace").is_empty(),
            "a failed-open filter is skipped for the rest of the request"
        );
    }
    (v, flags, elapsed)
}

#[test]
fn trap_fail_closed_answers_500() {
    let h = harness();
    let (v, flags, _) = failure_case(&h, "trap", FailureMode::FailClosed);
    let r = local(v);
    assert_eq!(r.status, 500);
    assert_eq!(r.flag.as_deref(), Some("FE"));
    assert!(String::from_utf8_lossy(&r.body).contains("filter a failed"));
    assert_eq!(flags, ["FE"]);
    assert!(h.metrics().contains("kind=\"trap\"} 1"), "{}", h.metrics());
}

#[test]
fn trap_fail_open_skips_the_filter() {
    let h = harness();
    let (v, flags, _) = failure_case(&h, "trap", FailureMode::FailOpen);
    assert!(matches!(v, Verdict::Continue));
    assert!(flags.is_empty());
}

#[test]
fn deadline_stops_an_infinite_loop() {
    let h = harness_with(Duration::from_millis(50), 32);
    let (v, _, elapsed) = failure_case(&h, "loop", FailureMode::FailClosed);
    assert_eq!(local(v).status, 500);
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    assert!(
        h.metrics().contains("kind=\"deadline\"} 1"),
        "{}",
        h.metrics()
    );
}

#[test]
fn memory_bomb_is_contained() {
    let h = harness_with(Duration::from_secs(2), 16);
    let (v, _, _) = failure_case(&h, "oom", FailureMode::FailClosed);
    assert_eq!(local(v).status, 500);
    assert!(
        h.metrics().contains("kind=\"memory\"} 1"),
        "{}",
        h.metrics()
    );
}

#[test]
fn response_side_state_lost_follows_failure_mode() {
    let h = harness();
    let set = load(
        &h,
        None,
        &[spec(
            "a",
            &wasm("testkit"),
            tk("a", serde_json::json!({})),
            FailureMode::FailClosed,
        )],
    );
    let chain = set.chain(&["a".to_string()]).expect("chain");
    worker(async {
        let mut first = chain.start(info("1"));
        let mut req = request(&[]);
        assert!(matches!(
            first.request_headers(&mut req).await,
            Verdict::Continue
        ));
        // Another request traps the (shared) instance in between.
        let (v, ..) = roundtrip(&chain, "2", &[("x-testkit-do", "trap")]).await;
        assert_eq!(local(v).status, 500);
        let mut resp = response();
        let v = first.response_headers(&mut resp).await;
        assert_eq!(
            local(v).flag.as_deref(),
            Some("FE"),
            "the state of request 1 died with the instance"
        );
    });
    assert!(h.metrics().contains("kind=\"state_lost\"} 1"));
}

#[test]
fn load_errors_name_filter_and_file() {
    let h = harness();
    let dir = temp_dir("bad");
    std::fs::write(dir.join("junk.wasm"), b"not wasm at all").expect("write");
    std::fs::copy(wasm("testkit"), dir.join("tk.wasm")).expect("copy");
    let mut pinned = spec(
        "pinned",
        Path::new("tk.wasm"),
        serde_json::Value::Null,
        FailureMode::FailClosed,
    );
    pinned.sha256 = Some("00".repeat(32));
    let specs = [
        spec(
            "junk",
            Path::new("junk.wasm"),
            serde_json::Value::Null,
            FailureMode::FailClosed,
        ),
        spec(
            "missing",
            Path::new("missing.wasm"),
            serde_json::Value::Null,
            FailureMode::FailClosed,
        ),
        spec(
            "cfgerr",
            Path::new("tk.wasm"),
            serde_json::json!({"on_configure": "error"}),
            FailureMode::FailClosed,
        ),
        spec(
            "cfgtrap",
            Path::new("tk.wasm"),
            serde_json::json!({"on_configure": "trap"}),
            FailureMode::FailClosed,
        ),
        pinned,
        spec(
            "good",
            Path::new("tk.wasm"),
            serde_json::Value::Null,
            FailureMode::FailClosed,
        ),
    ];
    let errors = worker(h.host.prepare(Some(&dir), &specs, &clusters()))
        .err()
        .expect("refused");
    assert_eq!(errors.len(), 5, "{errors:#?}");
    for (e, (name, what)) in errors.iter().zip([
        ("junk", "not a WebAssembly file"),
        ("missing", "cannot read"),
        ("cfgerr", "configure refused"),
        ("cfgtrap", "trapped"),
        ("pinned", "does not match the pinned sha256"),
    ]) {
        assert!(
            e.contains(&format!("filter {name} (file ")) && e.contains(what),
            "{e}"
        );
    }
    // The right pin loads.
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
        std::fs::read(wasm("testkit")).expect("read"),
    ));
    let mut ok = spec(
        "pinned",
        Path::new("tk.wasm"),
        serde_json::Value::Null,
        FailureMode::FailClosed,
    );
    ok.sha256 = Some(sha);
    assert!(worker(h.host.prepare(Some(&dir), &[ok], &clusters())).is_ok());
}

#[test]
fn shared_state_is_atomic_across_threads() {
    let h = harness();
    let set = load(
        &h,
        None,
        &[spec(
            "a",
            &wasm("testkit"),
            tk("a", serde_json::json!({})),
            FailureMode::FailClosed,
        )],
    );
    let chain = set.chain(&["a".to_string()]).expect("chain");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let chain = chain.clone();
            std::thread::spawn(move || {
                worker(async move {
                    for i in 0..200 {
                        let (v, req, ..) =
                            roundtrip(&chain, &format!("{t}-{i}"), &[("x-testkit-do", "incr:ctr")])
                                .await;
                        assert!(matches!(v, Verdict::Continue));
                        assert!(!values(&req.headers, "x-testkit-count").is_empty());
                    }
                })
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    let (_, req, ..) = worker(roundtrip(&chain, "last", &[("x-testkit-do", "get:ctr")]));
    assert_eq!(values(&req.headers, "x-testkit-get"), ["800"]);
}

/// `bytes` with a custom section appended: a valid component with another hash.
fn variant(bytes: &[u8], n: u32) -> Vec<u8> {
    let name = b"wasmesh-test";
    let payload = n.to_le_bytes();
    let mut out = bytes.to_vec();
    out.push(0);
    out.push(u8::try_from(1 + name.len() + payload.len()).expect("small"));
    out.push(u8::try_from(name.len()).expect("small"));
    out.extend_from_slice(name);
    out.extend_from_slice(&payload);
    out
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn replace_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[test]
fn hot_swap_replaces_the_version_and_refuses_broken_files() {
    let h = harness();
    let dir = temp_dir("swap");
    let file = dir.join("f.wasm");
    std::fs::copy(wasm("testkit"), &file).expect("copy");
    let set = load(
        &h,
        Some(&dir),
        &[spec(
            "f",
            Path::new("f.wasm"),
            tk("f", serde_json::json!({})),
            FailureMode::FailClosed,
        )],
    );
    let chain = set.chain(&["f".to_string()]).expect("chain");
    let sha = |h: &Harness| {
        h.host.status_json()[0]["sha256"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    let old_sha = sha(&h);
    worker(async {
        // A request in flight keeps the version it started with.
        let mut inflight = chain.start(info("old"));
        let mut req = request(&[]);
        inflight.request_headers(&mut req).await;
        assert_eq!(values(&req.headers, "x-testkit-trace"), ["f:v1"]);

        // Swap testkit for passthrough (rename into place).
        replace_file(&file, &std::fs::read(wasm("passthrough")).expect("read"));
        wait_for("the new version", || sha(&h) != old_sha);
        let st = h.host.status_json();
        assert_eq!(st[0]["version"], 2);
        assert!(st[0]["last_error"].is_null());
        let (_, req, _, ran, _) = roundtrip(&chain, "new", &[]).await;
        assert!(
            values(&req.headers, "x-testkit-trace").is_empty(),
            "passthrough serves now"
        );
        assert_eq!(ran[0], format!("f@{}", &sha(&h)[..12]));

        let mut resp = response();
        inflight.response_headers(&mut resp).await;
        assert_eq!(
            values(&resp.headers, "x-testkit-trace"),
            ["f:v1"],
            "in-flight request finished on the old version"
        );
        assert!(inflight.filters_ran()[0].contains(&old_sha[..12]));
        inflight.done(&outcome(200));

        // A broken file is refused; the passthrough version keeps serving.
        let serving = sha(&h);
        replace_file(&file, b"\0asm garbage");
        wait_for("the load error", || {
            !h.host.status_json()[0]["last_error"].is_null()
        });
        assert_eq!(sha(&h), serving);
        let err = h.host.status_json()[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(err.contains("filter f (file "), "{err}");
        let (v, _, _, ran, _) = roundtrip(&chain, "after-broken", &[]).await;
        assert!(matches!(v, Verdict::Continue));
        assert_eq!(ran[0], format!("f@{}", &serving[..12]));

        // A symlink swap is seen too.
        let target = dir.join("tk-v3.wasm");
        std::fs::write(
            &target,
            variant(&std::fs::read(wasm("testkit")).expect("read"), 3),
        )
        .expect("write");
        let link = dir.join("f.wasm.new");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        std::fs::rename(&link, &file).expect("rename");
        wait_for("the symlinked version", || {
            h.host.status_json()[0]["version"] == 3
        });
        let (_, req, ..) = roundtrip(&chain, "v3", &[]).await;
        assert_eq!(values(&req.headers, "x-testkit-trace"), ["f:v1"]);
    });
    assert!(
        h.metrics()
            .contains("wasmesh_filter_hot_swaps_total{filter=\"f\"} 2"),
        "{}",
        h.metrics()
    );
    assert!(
        h.metrics()
            .contains("wasmesh_filter_load_failures_total{filter=\"f\"} 1"),
        "{}",
        h.metrics()
    );
}

#[test]
fn many_swaps_free_old_instances() {
    let h = harness();
    let dir = temp_dir("leak");
    let file = dir.join("f.wasm");
    let base = std::fs::read(wasm("testkit")).expect("read");
    std::fs::write(&file, &base).expect("write");
    let set = load(
        &h,
        Some(&dir),
        &[spec(
            "f",
            Path::new("f.wasm"),
            tk("f", serde_json::json!({})),
            FailureMode::FailClosed,
        )],
    );
    let chain = set.chain(&["f".to_string()]).expect("chain");
    worker(async {
        for n in 0..25 {
            replace_file(&file, &variant(&base, n));
            set.reload_now("f").expect("reload");
            let (v, ..) = roundtrip(&chain, &n.to_string(), &[]).await;
            assert!(matches!(v, Verdict::Continue));
            assert!(
                wasmesh::filters::instance::thread_instances() <= 2,
                "old instances are freed"
            );
        }
    });
    assert_eq!(h.host.status_json()[0]["version"], 26);
}

#[test]
fn unchanged_entries_keep_their_slot_on_reload() {
    let h = harness();
    let specs = [spec(
        "a",
        &wasm("testkit"),
        tk("a", serde_json::json!({})),
        FailureMode::FailClosed,
    )];
    load(&h, None, &specs);
    let before = h.host.status_json()[0]["loaded_at_unix_ms"].clone();
    std::thread::sleep(Duration::from_millis(5));
    load(&h, None, &specs);
    assert_eq!(h.host.status_json()[0]["loaded_at_unix_ms"], before);
    let mut changed = specs.to_vec();
    changed[0].config = tk("a", serde_json::json!({"tag": "v9"}));
    load(&h, None, &changed);
    assert_ne!(h.host.status_json()[0]["loaded_at_unix_ms"], before);
}

/// Per-call overhead of a one-filter pass-through chain. Run with
/// `cargo test --release -p wasmesh --test filter_host bench -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_passthrough_chain() {
    let h = harness();
    let set = load(
        &h,
        None,
        &[spec(
            "pt",
            &wasm("passthrough"),
            serde_json::Value::Null,
            FailureMode::FailClosed,
        )],
    );
    let chain = set.chain(&["pt".to_string()]).expect("chain");
    let empty = Chain::default();
    worker(async {
        for (label, chain) in [("empty chain", &empty), ("passthrough", &chain)] {
            let n = 200_000;
            let mut req = request(&[("user-agent", "bench"), ("accept", "*/*")]);
            let t0 = Instant::now();
            for _ in 0..n {
                let mut run = chain.start(info("b"));
                let _ = run.request_headers(&mut req).await;
                run.done(&outcome(200));
            }
            let per = t0.elapsed() / n;
            println!("{label}: {per:?} per request (start + request_headers + done)");
        }
    });
}

/// Log lines written while `f` runs on this thread.
fn capture_logs<T>(f: impl FnOnce() -> T) -> (T, String) {
    #[derive(Clone, Default)]
    struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("log buffer").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(move || writer.clone())
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let text = String::from_utf8_lossy(&buf.0.lock().expect("log buffer")).into_owned();
    (out, text)
}

#[test]
fn stderr_and_stdout_reach_the_log() {
    let h = harness();
    let set = load(
        &h,
        None,
        &[spec(
            "a",
            &wasm("testkit"),
            tk("a", serde_json::json!({})),
            FailureMode::FailClosed,
        )],
    );
    let chain = set.chain(&["a".to_string()]).expect("chain");
    let ((v, req, resp, _, _), logs) = capture_logs(|| {
        worker(roundtrip(
            &chain,
            "1",
            &[(
                "x-testkit-do",
                "eprint:hello from stderr,print:hello from stdout",
            )],
        ))
    });
    // The hook ran to its end (it used to trap on the first stderr write).
    assert!(matches!(v, Verdict::Continue));
    assert_eq!(values(&req.headers, "x-testkit-trace"), ["a:v1"]);
    assert_eq!(values(&resp.headers, "x-testkit-trace"), ["a:v1"]);
    assert!(logs.contains("testkit a: hello from stderr"), "{logs}");
    assert!(logs.contains("stream=\"stderr\""), "{logs}");
    assert!(logs.contains("testkit a: hello from stdout"), "{logs}");
    assert!(!h.metrics().contains("kind=\"trap\""), "{}", h.metrics());

    // A panic's message reaches the log too, and the request fails as a trap.
    let ((v, _, _, _, _), logs) =
        capture_logs(|| worker(roundtrip(&chain, "2", &[("x-testkit-do", "trap")])));
    assert_eq!(local(v).status, 500);
    assert!(logs.contains("trap on command"), "{logs}");
}
