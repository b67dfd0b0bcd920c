//! Distributed tracing: what the proxy exports over OTLP, as a real OTLP receiver (the
//! official protobuf definitions, gRPC and HTTP) decodes it. One trace across two chained
//! proxies, the HTTP semantic-convention attributes and statuses, filter spans, sampling,
//! the `OTEL_*` variables, and collectors that refuse or never answer.

use serde_json::{json, Value};
use std::time::{Duration, Instant};
use wasmesh_e2e::client::Req;
use wasmesh_e2e::otlp::{
    BlackHole, CollectorPki, OtlpReceiver, ReceivedSpan, KIND_CLIENT, KIND_INTERNAL, KIND_SERVER,
};
use wasmesh_e2e::upstream::refused_addr;
use wasmesh_e2e::{cluster, wasm_filters, Behavior, Proxy, Upstream};

const WAIT: Duration = Duration::from_secs(10);

/// Fast export for tests: small batches, short delay.
fn tracing(endpoint: &str, protocol: &str, extra: Value) -> Value {
    let mut t = json!({"endpoint": endpoint, "protocol": protocol, "batch_delay": "50ms"});
    if let (Some(o), Some(e)) = (t.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    t
}

fn find<'a>(spans: &'a [ReceivedSpan], service: &str, kind: i32) -> &'a ReceivedSpan {
    spans
        .iter()
        .find(|s| s.service_name == service && s.kind == kind)
        .unwrap_or_else(|| panic!("no span of kind {kind} from {service}: {spans:#?}"))
}

fn count(spans: &[ReceivedSpan], service: &str, kind: i32) -> usize {
    spans
        .iter()
        .filter(|s| s.service_name == service && s.kind == kind)
        .count()
}

/// A → B → app, A exporting over gRPC and B over HTTP/protobuf: one trace, each span the
/// child of the one before, starting from the caller's `traceparent`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_chained_proxies_make_one_trace() {
    let grpc = OtlpReceiver::grpc().await;
    let http = OtlpReceiver::http().await;
    let app = Upstream::start().await;
    let b = Proxy::start(json!({
        "node": {"workload": "proxy-b"},
        "tracing": tracing(&http.url(), "http/protobuf", json!({})),
        "listeners": [{"name": "in", "address": "127.0.0.1:0",
                       "routes": [{"name": "to-app", "match": {"prefix": "/api/"}, "cluster": "app"}]}],
        "clusters": [cluster("app", app.addr())],
    }))
    .await;
    let a = Proxy::start(json!({
        "tracing": tracing(&grpc.url(), "grpc", json!({"service_name": "proxy-a"})),
        "listeners": [{"name": "out", "address": "127.0.0.1:0", "direction": "outbound",
                       "routes": [{"name": "to-b", "match": {"path": "/api/items"}, "cluster": "b"}]}],
        "clusters": [cluster("b", b.listener("in"))],
    }))
    .await;

    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let r = Req::get("/api/items?page=2")
        .host("shop.local:8080")
        .header(
            "traceparent",
            &format!("00-{caller_trace}-{caller_span}-01"),
        )
        .header("tracestate", "vendor=opaque")
        .header("user-agent", "e2e/1.0")
        .send(a.listener("out"))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());

    let a_spans = grpc
        .wait_for(WAIT, "A's SERVER and CLIENT spans", |s| {
            count(s, "proxy-a", KIND_SERVER) == 1 && count(s, "proxy-a", KIND_CLIENT) == 1
        })
        .await;
    let b_spans = http
        .wait_for(WAIT, "B's SERVER and CLIENT spans", |s| {
            count(s, "proxy-b", KIND_SERVER) == 1 && count(s, "proxy-b", KIND_CLIENT) == 1
        })
        .await;
    let a_server = find(&a_spans, "proxy-a", KIND_SERVER);
    let a_client = find(&a_spans, "proxy-a", KIND_CLIENT);
    let b_server = find(&b_spans, "proxy-b", KIND_SERVER);
    let b_client = find(&b_spans, "proxy-b", KIND_CLIENT);
    for s in [a_server, a_client, b_server, b_client] {
        assert_eq!(s.trace_id, caller_trace, "{s:#?}");
        assert!(s.end_unix_nano >= s.start_unix_nano, "{s:#?}");
    }
    assert_eq!(a_server.parent_span_id, caller_span);
    assert_eq!(a_client.parent_span_id, a_server.span_id);
    assert_eq!(b_server.parent_span_id, a_client.span_id);
    assert_eq!(b_client.parent_span_id, b_server.span_id);

    // What the service behind B sees: B's CLIENT span as parent, the caller's tracestate.
    let seen = app.last();
    assert_eq!(
        seen.header("traceparent"),
        Some(format!("00-{caller_trace}-{}-01", b_client.span_id).as_str())
    );
    assert_eq!(seen.header("tracestate"), Some("vendor=opaque"));

    // SERVER attributes (stable HTTP semantic conventions) and wasmesh's own.
    assert_eq!(a_server.name, "GET /api/items");
    assert_eq!(a_server.attr("http.request.method"), Some("GET"));
    assert_eq!(a_server.attr("url.path"), Some("/api/items"));
    assert_eq!(a_server.attr("url.query"), Some("page=2"));
    assert_eq!(a_server.attr("url.scheme"), Some("http"));
    assert_eq!(a_server.attr("http.route"), Some("/api/items"));
    assert_eq!(a_server.attr("http.response.status_code"), Some("200"));
    assert_eq!(a_server.attr("server.address"), Some("shop.local"));
    assert_eq!(a_server.attr("server.port"), Some("8080"));
    assert_eq!(a_server.attr("network.peer.address"), Some("127.0.0.1"));
    assert_eq!(a_server.attr("network.protocol.version"), Some("1.1"));
    assert_eq!(a_server.attr("user_agent.original"), Some("e2e/1.0"));
    assert_eq!(a_server.attr("wasmesh.route"), Some("to-b"));
    assert_eq!(a_server.attr("wasmesh.cluster"), Some("b"));
    assert_eq!(a_server.attr("wasmesh.response_flags"), Some("-"));
    let b_addr = b.listener("in").to_string();
    assert_eq!(a_server.attr("wasmesh.upstream"), Some(b_addr.as_str()));
    assert_eq!(a_server.attr("error.type"), None);
    assert_eq!(a_server.status_code, 0, "2xx leaves the status unset");
    assert_eq!(b_server.name, "GET /api/*");
    assert_eq!(b_server.attr("http.route"), Some("/api/*"));

    // CLIENT attributes.
    assert_eq!(a_client.name, "GET");
    assert_eq!(a_client.attr("http.request.method"), Some("GET"));
    assert_eq!(
        a_client.attr("url.full"),
        Some("http://shop.local:8080/api/items?page=2")
    );
    assert_eq!(a_client.attr("server.address"), Some("127.0.0.1"));
    assert_eq!(
        a_client.attr("server.port"),
        Some(b.listener("in").port().to_string().as_str())
    );
    assert_eq!(a_client.attr("http.response.status_code"), Some("200"));
    assert_eq!(a_client.attr("wasmesh.cluster"), Some("b"));
    assert_eq!(a_client.attr("wasmesh.upstream"), Some(b_addr.as_str()));

    // The receiver holds the spans before the exporter has read its reply and counted
    // them, so wait for the counter rather than reading it once.
    a.wait_for(
        Duration::from_secs(5),
        "spans counted as exported",
        || async {
            (a.metric("wasmesh_tracing_spans_exported_total", &[]).await >= 2.0).then_some(())
        },
    )
    .await;
    assert_eq!(
        a.metric("wasmesh_tracing_spans_dropped_total", &[]).await,
        0.0
    );
}

/// SERVER spans: 4xx leaves the status unset, 5xx is an error; CLIENT spans: both are
/// errors; a failed attempt carries `error.type`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn span_status_follows_the_conventions() {
    let rx = OtlpReceiver::grpc().await;
    let app = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "tracing": tracing(&rx.url(), "grpc", json!({"service_name": "st"})),
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"name": "down", "match": {"prefix": "/down"}, "cluster": "gone"},
            {"name": "app", "match": {"prefix": "/"}, "cluster": "app"}]}],
        "clusters": [cluster("app", app.addr()), cluster("gone", refused_addr())],
    }))
    .await;
    let addr = proxy.listener("in");
    let mut ids = Vec::new();
    for (path, status) in [("/missing", 404), ("/broken", 503)] {
        app.push(Behavior::Status(status));
        let r = Req::get(path).send(addr).await;
        assert_eq!(r.status, status);
        ids.push(app.last().header("traceparent").map(str::to_string));
    }
    let r = Req::get("/down").send(addr).await;
    assert_eq!(r.status, 503);

    let spans = rx
        .wait_for(WAIT, "3 SERVER and 3 CLIENT spans", |s| {
            count(s, "st", KIND_SERVER) == 3 && count(s, "st", KIND_CLIENT) == 3
        })
        .await;
    let server = |path: &str| {
        spans
            .iter()
            .find(|s| s.kind == KIND_SERVER && s.attr("url.path") == Some(path))
            .unwrap_or_else(|| panic!("no SERVER span for {path}: {spans:#?}"))
    };
    let client_of = |server: &ReceivedSpan| {
        spans
            .iter()
            .find(|s| s.kind == KIND_CLIENT && s.parent_span_id == server.span_id)
            .unwrap_or_else(|| panic!("no CLIENT span under {server:#?}"))
            .clone()
    };

    let s404 = server("/missing");
    assert_eq!(s404.status_code, 0, "a 4xx is the client's: status unset");
    assert_eq!(s404.attr("error.type"), None);
    let c404 = client_of(s404);
    assert_eq!(c404.status_code, 2, "a 4xx is a CLIENT span error");
    assert_eq!(c404.attr("error.type"), Some("404"));
    // The upstream saw the CLIENT span as its parent.
    assert_eq!(
        ids[0].as_deref(),
        Some(format!("00-{}-{}-01", c404.trace_id, c404.span_id).as_str())
    );

    let s503 = server("/broken");
    assert_eq!(s503.status_code, 2);
    assert_eq!(s503.attr("error.type"), Some("503"));
    assert_eq!(
        client_of(s503).attr("http.response.status_code"),
        Some("503")
    );

    let down = server("/down");
    assert_eq!(down.status_code, 2);
    assert_eq!(down.attr("wasmesh.response_flags"), Some("UF"));
    let c = client_of(down);
    assert_eq!(c.status_code, 2);
    assert_eq!(c.attr("error.type"), Some("connect_failure"));
    assert_eq!(c.attr("http.response.status_code"), None);
}

/// A retried request: one CLIENT span per attempt under the one SERVER span, the failed
/// attempt an error, the retry marked with `http.request.resend_count`, and each attempt's
/// upstream request carrying its own span as parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_retry_is_its_own_client_span() {
    let rx = OtlpReceiver::grpc().await;
    let app = Upstream::start().await;
    app.fail_times(1, 503);
    let proxy = Proxy::start(json!({
        "tracing": tracing(&rx.url(), "grpc", json!({"service_name": "rt"})),
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"name": "app", "cluster": "app",
             "retry_policy": {"retry_on": "5xx", "num_retries": 1, "retry_back_off": {"base_interval": "1ms"}}}]}],
        "clusters": [cluster("app", app.addr())],
    }))
    .await;
    let r = Req::get("/retried").send(proxy.listener("in")).await;
    assert_eq!(r.status, 200);
    let spans = rx
        .wait_for(WAIT, "1 SERVER and 2 CLIENT spans", |s| {
            count(s, "rt", KIND_SERVER) == 1 && count(s, "rt", KIND_CLIENT) == 2
        })
        .await;
    let server = find(&spans, "rt", KIND_SERVER);
    assert_eq!(server.status_code, 0, "the client got a 200");
    let mut clients: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == KIND_CLIENT).collect();
    clients.sort_by_key(|s| s.start_unix_nano);
    for c in &clients {
        assert_eq!(c.parent_span_id, server.span_id);
    }
    assert_eq!(clients[0].attr("http.response.status_code"), Some("503"));
    assert_eq!(clients[0].status_code, 2);
    assert_eq!(clients[1].attr("http.response.status_code"), Some("200"));
    assert_eq!(clients[1].attr("http.request.resend_count"), Some("1"));
    let parents: Vec<String> = app
        .requests()
        .iter()
        .filter_map(|r| r.header("traceparent").map(str::to_string))
        .collect();
    assert_eq!(
        parents,
        clients
            .iter()
            .map(|c| format!("00-{}-{}-01", c.trace_id, c.span_id))
            .collect::<Vec<_>>()
    );
}

/// Each filter hook is a child span of the SERVER span, with the filter's name and
/// version; filters see the proxy's trace and span ids.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_invocations_are_child_spans() {
    let rx = OtlpReceiver::grpc().await;
    let app = Upstream::start().await;
    let dir = wasm_filters::filter_dir(&["testkit"]);
    let testkit = |name: &str| json!({"name": name, "file": "testkit.wasm", "config": {"name": name, "tag": "v1"}});
    let proxy = Proxy::start(json!({
        "tracing": tracing(&rx.url(), "grpc", json!({"service_name": "flt"})),
        "filter_dir": dir,
        "filters": [testkit("a"), testkit("b")],
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "filters": ["a", "b"],
                       "routes": [{"name": "main", "cluster": "app"}]}],
        "clusters": [cluster("app", app.addr())],
    }))
    .await;
    let r = Req::get("/x").send(proxy.listener("in")).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let spans = rx
        .wait_for(WAIT, "SERVER, CLIENT and filter spans", |s| {
            count(s, "flt", KIND_SERVER) == 1
                && count(s, "flt", KIND_CLIENT) == 1
                && count(s, "flt", KIND_INTERNAL) >= 4
        })
        .await;
    let server = find(&spans, "flt", KIND_SERVER);
    let filters: Vec<&ReceivedSpan> = spans.iter().filter(|s| s.kind == KIND_INTERNAL).collect();
    for f in &filters {
        assert_eq!(f.trace_id, server.trace_id);
        assert_eq!(f.parent_span_id, server.span_id, "{f:#?}");
        assert!(f.start_unix_nano >= server.start_unix_nano, "{f:#?}");
        assert!(f.end_unix_nano <= server.end_unix_nano, "{f:#?}");
        let name = f.attr("wasmesh.filter.name").unwrap_or_default();
        assert!(name == "a" || name == "b", "{f:#?}");
        assert!(
            f.attr("wasmesh.filter.version")
                .is_some_and(|v| v.starts_with(&format!("{name}@"))),
            "{f:#?}"
        );
    }
    let hooks: Vec<(String, String)> = filters
        .iter()
        .map(|f| {
            (
                f.attr("wasmesh.filter.name")
                    .unwrap_or_default()
                    .to_string(),
                f.attr("wasmesh.filter.hook")
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    for want in [
        ("a", "request_headers"),
        ("b", "request_headers"),
        ("b", "response_headers"),
        ("a", "response_headers"),
    ] {
        assert!(
            hooks.iter().any(|(n, h)| n == want.0 && h == want.1),
            "{want:?} missing in {hooks:?}"
        );
    }
    assert!(filters.iter().any(|f| f.name == "filter a request_headers"));
    // The filters saw the proxy's trace (testkit copies trace-id into a header).
    assert_eq!(
        app.last().header("x-testkit-trace-id"),
        Some(server.trace_id.as_str())
    );
}

/// Parent-based ratio sampling: ratio 0 records no new trace, but a caller's sampled
/// decision is kept, and so is an unsampled one (propagated with flags 00).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_is_parent_based() {
    let rx = OtlpReceiver::grpc().await;
    let app = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "tracing": tracing(&rx.url(), "grpc", json!({"service_name": "smp", "sampling": {"ratio": 0.0}})),
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", app.addr())],
    }))
    .await;
    let addr = proxy.listener("in");
    for _ in 0..5 {
        assert_eq!(Req::get("/new").send(addr).await.status, 200);
    }
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    assert_eq!(
        Req::get("/unsampled")
            .header("traceparent", unsampled)
            .send(addr)
            .await
            .status,
        200
    );
    let tp = app.last();
    let tp = tp.header("traceparent").unwrap_or_default();
    assert!(
        tp.starts_with("00-11111111111111111111111111111111-") && tp.ends_with("-00"),
        "the unsampled decision travels on: {tp}"
    );
    assert!(!tp.contains("2222222222222222"), "a new parent: {tp}");

    let sampled = "00-33333333333333333333333333333333-4444444444444444-01";
    assert_eq!(
        Req::get("/sampled")
            .header("traceparent", sampled)
            .send(addr)
            .await
            .status,
        200
    );
    let spans = rx
        .wait_for(WAIT, "the sampled request's spans", |s| {
            count(s, "smp", KIND_SERVER) >= 1 && count(s, "smp", KIND_CLIENT) >= 1
        })
        .await;
    // Spans leave in order: had the earlier requests been sampled, they would be here.
    assert_eq!(spans.len(), 2, "{spans:#?}");
    assert!(spans
        .iter()
        .all(|s| s.trace_id == "33333333333333333333333333333333"));
    assert_eq!(
        proxy
            .metric("wasmesh_tracing_spans_dropped_total", &[])
            .await,
        0.0
    );
}

/// `OTEL_EXPORTER_OTLP_ENDPOINT` turns export on for a manifest without `tracing`;
/// `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` name the service; B3 callers are
/// joined to their trace.
/// A proxy in front of `app` whose manifest says nothing of tracing: only `env` does.
async fn proxy_from_env(app: &Upstream, env: &[(&str, &str)]) -> Proxy {
    Proxy::start_with(
        json!({
            "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
            "clusters": [cluster("app", app.addr())],
        }),
        env,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environment_turns_tracing_on() {
    let rx = OtlpReceiver::http().await;
    let app = Upstream::start().await;
    let endpoint = rx.url();
    let proxy = proxy_from_env(
        &app,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_SERVICE_NAME", "from-env"),
            ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test"),
        ],
    )
    .await;
    let r = Req::get("/b3")
        .header("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7")
        .header("x-b3-spanid", "e457b5a2e4d86bd1")
        .header("x-b3-sampled", "1")
        .send(proxy.listener("in"))
        .await;
    assert_eq!(r.status, 200);
    let spans = rx
        .wait_for(WAIT, "spans from the environment's endpoint", |s| {
            count(s, "from-env", KIND_SERVER) == 1 && count(s, "from-env", KIND_CLIENT) == 1
        })
        .await;
    let server = find(&spans, "from-env", KIND_SERVER);
    assert_eq!(server.trace_id, "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(server.parent_span_id, "e457b5a2e4d86bd1");
    let client = find(&spans, "from-env", KIND_CLIENT);
    let seen = app.last();
    assert_eq!(seen.header("x-b3-traceid"), Some(server.trace_id.as_str()));
    assert_eq!(seen.header("x-b3-spanid"), Some(client.span_id.as_str()));
    assert_eq!(
        seen.header("x-b3-parentspanid"),
        Some(server.span_id.as_str())
    );
}

/// `compression: gzip`: exports go gzipped over both protocols (`grpc-encoding: gzip`,
/// `Content-Encoding: gzip`) and decode to the same spans; `OTEL_EXPORTER_OTLP_COMPRESSION`
/// sets it too, and an unknown value fails the start naming the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_compressed_exports() {
    let app = Upstream::start().await;
    for protocol in ["grpc", "http/protobuf"] {
        let rx = if protocol == "grpc" {
            OtlpReceiver::grpc().await
        } else {
            OtlpReceiver::http().await
        };
        let proxy = Proxy::start(json!({
            "tracing": tracing(&rx.url(), protocol, json!({"service_name": "zipped", "compression": "gzip"})),
            "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
            "clusters": [cluster("app", app.addr())],
        }))
        .await;
        for _ in 0..5 {
            let r = Req::get("/zipped").send(proxy.listener("in")).await;
            assert_eq!(r.status, 200);
        }
        let spans = rx
            .wait_for(WAIT, "five SERVER spans, gzipped", |s| {
                count(s, "zipped", KIND_SERVER) == 5
            })
            .await;
        assert_eq!(find(&spans, "zipped", KIND_SERVER).name, "GET /*");
        assert!(rx.export_requests() > 0);
        assert_eq!(
            rx.gzipped_requests(),
            rx.export_requests(),
            "{protocol}: every export gzipped"
        );
    }

    // The variable, over a manifest without compression.
    let rx = OtlpReceiver::http().await;
    let endpoint = rx.url();
    let proxy = proxy_from_env(
        &app,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_SERVICE_NAME", "zipped-env"),
        ],
    )
    .await;
    assert_eq!(Req::get("/z").send(proxy.listener("in")).await.status, 200);
    rx.wait_for(WAIT, "a SERVER span", |s| {
        count(s, "zipped-env", KIND_SERVER) == 1
    })
    .await;
    assert_eq!(rx.gzipped_requests(), rx.export_requests());

    let (status, stderr) = Proxy::start_failure_with(
        json!({
            "tracing": {"endpoint": "http://127.0.0.1:4317"},
            "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"direct_response": {"status": 200}}]}],
        }),
        &[("OTEL_EXPORTER_OTLP_COMPRESSION", "brotli")],
    )
    .await;
    assert!(!status.success());
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_COMPRESSION")
            && stderr.contains("`brotli` is not supported"),
        "{stderr}"
    );
}

/// Send `n` requests; each must succeed quickly whatever the collector does.
async fn requests_unaffected(proxy: &Proxy, n: usize) {
    for i in 0..n {
        let started = Instant::now();
        let r = Req::get(&format!("/r{i}")).send(proxy.listener("in")).await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "request {i} took {:?}",
            started.elapsed()
        );
    }
}

/// Wait until the dropped-span counter satisfies `ok`.
async fn wait_dropped(proxy: &Proxy, what: &str, ok: impl Fn(f64) -> bool) {
    proxy
        .wait_for(WAIT, what, || async {
            let d = proxy
                .metric("wasmesh_tracing_spans_dropped_total", &[])
                .await;
            ok(d).then_some(())
        })
        .await;
}

/// A collector that refuses connections costs only dropped-span counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_collector_costs_only_dropped_spans() {
    let app = Upstream::start().await;
    let endpoint = format!("http://{}", refused_addr());
    let proxy = Proxy::start(json!({
        "tracing": tracing(&endpoint, "grpc", json!({"export_timeout": "500ms"})),
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", app.addr())],
    }))
    .await;
    requests_unaffected(&proxy, 20).await;
    // Two spans per request (SERVER and CLIENT), every one counted as dropped.
    wait_dropped(&proxy, "40 dropped spans", |d| d == 40.0).await;
    assert_eq!(
        proxy
            .metric("wasmesh_tracing_spans_exported_total", &[])
            .await,
        0.0
    );
}

/// A collector that accepts connections and never answers: requests are not held up, the
/// bounded queue overflows, and every span is counted as dropped (queue full, or its batch
/// timed out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_holed_collector_costs_only_dropped_spans() {
    let hole = BlackHole::start().await;
    let app = Upstream::start().await;
    for protocol in ["grpc", "http/protobuf"] {
        let proxy = Proxy::start(json!({
            "tracing": tracing(&hole.url(), protocol, json!({
                "export_timeout": "300ms", "max_queue_size": 8, "batch_size": 4})),
            "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
            "clusters": [cluster("app", app.addr())],
        }))
        .await;
        requests_unaffected(&proxy, 30).await;
        wait_dropped(&proxy, "60 dropped spans", |d| d == 60.0).await;
        assert_eq!(
            proxy
                .metric("wasmesh_tracing_spans_exported_total", &[])
                .await,
            0.0
        );
    }
    assert!(hole.accepted() >= 1, "the exporter did connect");
}

/// The manifest's `tracing` section is checked like the rest.
#[tokio::test]
async fn bad_tracing_settings_fail_the_start() {
    let (status, stderr) = Proxy::start_failure(json!({
        "tracing": {"endpoint": "localhost:4317", "sampling": {"ratio": 2.0}, "batch_size": 0},
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"direct_response": {"status": 200}}]}],
    }))
    .await;
    assert!(!status.success());
    for want in [
        "tracing.endpoint: `localhost:4317` must start with http:// or https://",
        "tracing.sampling.ratio: must be between 0 and 1",
        "tracing.batch_size: must be at least 1",
    ] {
        assert!(stderr.contains(want), "missing {want:?} in {stderr}");
    }
}

/// An `https://` collector: gRPC trusting the collector's CA from the manifest, and
/// OTLP/HTTP with a client certificate from the standard variables (a collector that
/// requires mTLS). A collector the proxy does not trust gets nothing, and requests are
/// unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_collectors_get_spans_over_tls() {
    let pki = CollectorPki::new("collector-pki");
    let app = Upstream::start().await;
    let listeners =
        json!([{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}]);

    // gRPC: the CA from the manifest; this collector asks for no client certificate.
    let grpc = OtlpReceiver::grpc_tls(&pki, false).await;
    let proxy = Proxy::start(json!({
        "node": {"workload": "tls-grpc"},
        "tracing": tracing(&grpc.url(), "grpc", json!({"tls": {"ca_file": pki.ca}})),
        "listeners": listeners,
        "clusters": [cluster("app", app.addr())],
    }))
    .await;
    let r = Req::get("/over-tls").send(proxy.listener("in")).await;
    assert_eq!(r.status, 200);
    let spans = grpc
        .receiver
        .wait_for(WAIT, "spans over gRPC with TLS", |s| {
            count(s, "tls-grpc", KIND_SERVER) == 1 && count(s, "tls-grpc", KIND_CLIENT) == 1
        })
        .await;
    assert_eq!(
        find(&spans, "tls-grpc", KIND_SERVER).attr("url.path"),
        Some("/over-tls")
    );
    assert_eq!(
        grpc.handshakes(),
        (1, 0),
        "one TLS connection, no client certificate"
    );

    // OTLP/HTTP to a collector that requires a client certificate: everything from the
    // OTEL_* variables.
    let http = OtlpReceiver::http_tls(&pki, true).await;
    let (ca, cert, key) = (
        pki.ca.display().to_string(),
        pki.client.cert.display().to_string(),
        pki.client.key.display().to_string(),
    );
    let proxy = Proxy::start_with(
        json!({
            "node": {"workload": "tls-http"},
            "listeners": listeners,
            "clusters": [cluster("app", app.addr())],
        }),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", http.url().as_str()),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ("OTEL_EXPORTER_OTLP_CERTIFICATE", ca.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", cert.as_str()),
            ("OTEL_EXPORTER_OTLP_CLIENT_KEY", key.as_str()),
        ],
    )
    .await;
    let r = Req::get("/mtls").send(proxy.listener("in")).await;
    assert_eq!(r.status, 200);
    http.receiver
        .wait_for(WAIT, "spans over OTLP/HTTP with mTLS", |s| {
            count(s, "tls-http", KIND_SERVER) == 1 && count(s, "tls-http", KIND_CLIENT) == 1
        })
        .await;
    let (done, with_cert) = http.handshakes();
    assert!(
        done >= 1 && with_cert == done,
        "the exporter presented its certificate"
    );

    // A collector whose certificate another CA signed: no handshake completes, every span
    // is dropped and counted, and requests go on as usual.
    let other = CollectorPki::new("other-pki");
    let untrusted = OtlpReceiver::grpc_tls(&pki, false).await;
    let proxy = Proxy::start(json!({
        "tracing": tracing(&untrusted.url(), "grpc", json!({
            "export_timeout": "500ms", "tls": {"ca_file": other.ca}})),
        "listeners": listeners,
        "clusters": [cluster("app", app.addr())],
    }))
    .await;
    requests_unaffected(&proxy, 5).await;
    wait_dropped(&proxy, "10 dropped spans", |d| d == 10.0).await;
    assert_eq!(untrusted.handshakes().0, 0);
    assert!(untrusted.receiver.spans().is_empty());
}

/// TLS files that cannot be used fail the start, naming the field and the file.
#[tokio::test]
async fn unusable_collector_tls_files_fail_the_start() {
    let (status, stderr) = Proxy::start_failure(json!({
        "tracing": {"endpoint": "https://127.0.0.1:4317",
                    "tls": {"ca_file": "/nonexistent/ca.pem", "cert_file": "client.pem"}},
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"direct_response": {"status": 200}}]}],
    }))
    .await;
    assert!(!status.success());
    assert!(
        stderr.contains("tracing.tls.ca_file: cannot read /nonexistent/ca.pem"),
        "{stderr}"
    );
}

/// A rotated CA file is picked up without a restart: exports fail against a collector the
/// old file does not trust, then reach it once the file names the collector's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_collector_tls_files_are_picked_up() {
    let pki = CollectorPki::new("rotate-collector");
    let other = CollectorPki::new("rotate-other");
    let rx = OtlpReceiver::grpc_tls(&pki, false).await;
    let app = Upstream::start().await;
    let dir = wasmesh_e2e::proxy::temp_dir("rotate-ca");
    let ca = dir.join("ca.pem");
    std::fs::copy(&other.ca, &ca).expect("the wrong CA first");
    let proxy = Proxy::start(json!({
        "node": {"workload": "rotated"},
        "tracing": tracing(&rx.url(), "grpc", json!({
            "export_timeout": "500ms", "tls": {"ca_file": ca}})),
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", app.addr())],
    }))
    .await;
    requests_unaffected(&proxy, 1).await;
    wait_dropped(&proxy, "the first spans dropped", |d| d >= 2.0).await;
    assert!(rx.receiver.spans().is_empty());

    // Rotate: the collector's CA replaces the file, as a secret mount swaps it.
    let text = std::fs::read_to_string(&pki.ca).expect("CA");
    wasmesh_e2e::proxy::write_atomically(&ca, &text);
    // Requests keep coming (a batch is what makes the exporter look at the files).
    proxy
        .wait_for(WAIT, "spans over the rotated trust", || async {
            requests_unaffected(&proxy, 1).await;
            (count(&rx.receiver.spans(), "rotated", KIND_SERVER) > 0).then_some(())
        })
        .await;
}
