//! `/metrics` as a scraper reads it: valid in the format its Content-Type declares
//! (OpenMetrics 1.0 when asked for, Prometheus text 0.0.4 otherwise), checked with a real
//! parser of each format; Istio's request metrics with their labels and values, under the
//! `istio_` prefix when configured; and the cap on label values a filter can create.

use openmetrics_parser::{
    openmetrics::parse_openmetrics, prometheus::parse_prometheus, OpenMetricsType,
    OpenMetricsValue, PrometheusType, PrometheusValue,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use wasmesh_e2e::client::{Conn, Req};
use wasmesh_e2e::upstream::refused_addr;
use wasmesh_e2e::{cluster, Proxy, Upstream};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const TEXT_004: &str = "text/plain; version=0.0.4; charset=utf-8";
/// What Prometheus sends when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

/// One parsed series: its labels and its value (a histogram's value is its count).
type Series = (HashMap<String, String>, f64);

/// A family as both parsers see it: type, help, series.
struct Family {
    kind: String,
    help: String,
    series: Vec<Series>,
}

fn labels_of<V>(s: &openmetrics_parser::Sample<V>) -> HashMap<String, String>
where
    V: openmetrics_parser::RenderableMetricValue + Clone,
{
    s.get_labelset()
        .map(|l| l.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default()
}

/// GET /metrics with `accept`; check the Content-Type is `want_type`; parse the body with
/// the parser of that format (panicking with the body if it is not valid).
async fn scrape(proxy: &Proxy, accept: Option<&str>, want_type: &str) -> HashMap<String, Family> {
    let mut req = Req::get("/metrics");
    if let Some(a) = accept {
        req = req.header("accept", a);
    }
    let r = req.send(proxy.admin()).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some(want_type));
    let text = r.text();
    let mut out = HashMap::new();
    if want_type == OPENMETRICS {
        let exp = parse_openmetrics(&text)
            .unwrap_or_else(|e| panic!("invalid OpenMetrics: {e:?}\n{text}"));
        for (name, f) in exp.families {
            let series = f
                .iter_samples()
                .map(|s| {
                    let v = match &s.value {
                        OpenMetricsValue::Counter(c) => c.value.as_f64(),
                        OpenMetricsValue::Gauge(g) | OpenMetricsValue::Unknown(g) => g.as_f64(),
                        OpenMetricsValue::Histogram(h) => h.count.unwrap_or_default() as f64,
                        _ => f64::NAN,
                    };
                    (labels_of(s), v)
                })
                .collect();
            let kind = match f.family_type {
                OpenMetricsType::Counter => "counter",
                OpenMetricsType::Gauge => "gauge",
                OpenMetricsType::Histogram => "histogram",
                _ => "other",
            };
            out.insert(
                name,
                Family {
                    kind: kind.into(),
                    help: f.help.clone(),
                    series,
                },
            );
        }
    } else {
        let exp = parse_prometheus(&text)
            .unwrap_or_else(|e| panic!("invalid Prometheus text: {e:?}\n{text}"));
        for (name, f) in exp.families {
            let series = f
                .iter_samples()
                .map(|s| {
                    let v = match &s.value {
                        PrometheusValue::Counter(c) => c.value.as_f64(),
                        PrometheusValue::Gauge(g) | PrometheusValue::Unknown(g) => g.as_f64(),
                        PrometheusValue::Histogram(h) => h.count.unwrap_or_default() as f64,
                        PrometheusValue::Summary(_) => f64::NAN,
                    };
                    (labels_of(s), v)
                })
                .collect();
            let kind = match f.family_type {
                PrometheusType::Counter => "counter",
                PrometheusType::Gauge => "gauge",
                PrometheusType::Histogram => "histogram",
                _ => "other",
            };
            out.insert(
                name,
                Family {
                    kind: kind.into(),
                    help: f.help.clone(),
                    series,
                },
            );
        }
    }
    out
}

/// The sum of the series of `family` whose labels include `want`.
fn value(fams: &HashMap<String, Family>, family: &str, want: &[(&str, &str)]) -> f64 {
    fams.get(family)
        .map(|f| {
            f.series
                .iter()
                .filter(|(l, _)| {
                    want.iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|(_, v)| v)
                .sum()
        })
        .unwrap_or(0.0)
}

/// The request labels Istio's dashboards group by, plus wasmesh's `route` and `cluster`.
const ISTIO_LABELS: [&str; 11] = [
    "reporter",
    "source_workload",
    "source_principal",
    "destination_workload",
    "destination_principal",
    "destination_service",
    "request_protocol",
    "response_code",
    "response_flags",
    "route",
    "cluster",
];

fn manifest(up: &Upstream, extra: Value) -> Value {
    let mut m = json!({
        "node": {"workload": "orders"},
        "filter_dir": wasmesh_e2e::wasm_filters::filter_dir(&["telemetry"]),
        "filters": [{"name": "tm", "file": "telemetry.wasm", "config": {
            "label": {"name": "tenant", "header": "x-tenant"}}}],
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"name": "ok", "match": {"prefix": "/ok"}, "cluster": "app", "filters": ["tm"]},
            {"name": "down", "match": {"prefix": "/down"}, "cluster": "refused"},
        ]}],
        "clusters": [cluster("app", up.addr()), cluster("refused", refused_addr())],
    });
    if let (Some(m), Some(extra)) = (m.as_object_mut(), extra.as_object()) {
        m.extend(extra.clone());
    }
    m
}

#[tokio::test]
async fn metrics_parse_in_the_format_the_content_type_declares() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(manifest(&up, json!({}))).await;
    let l = proxy.listener("in");
    for _ in 0..3 {
        let r = Req::get("/ok").header("x-tenant", "acme").send(l).await;
        assert_eq!(r.status, 200);
    }
    // Label values a parser must see escaped: quotes, a backslash.
    let r = Req::get("/ok").header("x-tenant", r#"a"b\c"#).send(l).await;
    assert_eq!(r.status, 200);
    assert_eq!(Req::get("/down").send(l).await.status, 503);
    assert_eq!(Req::get("/ok").send_h2(l).await.status, 200);
    proxy
        .wait_for(
            std::time::Duration::from_secs(5),
            "6 requests counted",
            || async { (proxy.metric("wasmesh_requests_total", &[]).await == 6.0).then_some(()) },
        )
        .await;

    let om = scrape(&proxy, Some(PROMETHEUS_ACCEPT), OPENMETRICS).await;
    let text = scrape(&proxy, None, TEXT_004).await;
    let any = scrape(&proxy, Some("*/*"), TEXT_004).await;
    assert_eq!(text.len(), any.len());

    // The same families in both formats; OpenMetrics names a counter without `_total`.
    let mut om_names: Vec<String> = om.keys().cloned().collect();
    let mut text_names: Vec<String> = text
        .iter()
        .map(|(n, f)| match f.kind.as_str() {
            "counter" => n.strip_suffix("_total").unwrap_or(n).to_string(),
            _ => n.clone(),
        })
        .collect();
    om_names.sort();
    text_names.sort();
    assert_eq!(om_names, text_names);
    for (name, f) in &om {
        assert!(!f.help.is_empty(), "{name} has a HELP line");
    }

    for fams in [&om, &text] {
        let (requests, duration, req_bytes, resp_bytes) = if fams.contains_key("wasmesh_requests") {
            (
                "wasmesh_requests",
                "wasmesh_request_duration_milliseconds",
                "wasmesh_request_bytes",
                "wasmesh_response_bytes",
            )
        } else {
            (
                "wasmesh_requests_total",
                "wasmesh_request_duration_milliseconds",
                "wasmesh_request_bytes",
                "wasmesh_response_bytes",
            )
        };
        assert_eq!(fams[requests].kind, "counter");
        for h in [duration, req_bytes, resp_bytes] {
            assert_eq!(fams[h].kind, "histogram", "{h}");
        }
        // Every request series carries exactly Istio's labels (plus route and cluster).
        for (labels, _) in &fams[requests].series {
            let mut names: Vec<&str> = labels.keys().map(String::as_str).collect();
            names.sort_unstable();
            let mut want = ISTIO_LABELS.to_vec();
            want.sort_unstable();
            assert_eq!(names, want);
        }
        let ok = [
            ("reporter", "destination"),
            ("source_workload", "unknown"),
            ("source_principal", "unknown"),
            ("destination_workload", "orders"),
            ("destination_principal", "unknown"),
            ("destination_service", "orders"),
            ("response_code", "200"),
            ("response_flags", "-"),
            ("route", "ok"),
            ("cluster", "app"),
        ];
        assert_eq!(value(fams, requests, &ok), 5.0);
        assert_eq!(
            value(
                fams,
                requests,
                &[("request_protocol", "http2"), ("route", "ok")]
            ),
            1.0
        );
        assert_eq!(
            value(
                fams,
                requests,
                &[
                    ("response_code", "503"),
                    ("response_flags", "UF"),
                    ("cluster", "refused")
                ]
            ),
            1.0
        );
        assert_eq!(value(fams, duration, &[("route", "ok")]), 5.0);
        assert_eq!(value(fams, resp_bytes, &[("route", "down")]), 1.0);
        // The filter's own metric, with the escaped label value intact.
        let filter_requests = if fams.contains_key("wasmesh_filter_telemetry_requests") {
            "wasmesh_filter_telemetry_requests"
        } else {
            "wasmesh_filter_telemetry_requests_total"
        };
        assert_eq!(
            value(
                fams,
                filter_requests,
                &[("filter", "tm"), ("tenant", "acme")]
            ),
            3.0
        );
        assert_eq!(value(fams, filter_requests, &[("tenant", r#"a"b\c"#)]), 1.0);
        // Per filter and version: invocations and the time they took.
        let inv = if fams.contains_key("wasmesh_filter_invocations") {
            "wasmesh_filter_invocations"
        } else {
            "wasmesh_filter_invocations_total"
        };
        assert!(value(fams, inv, &[("filter", "tm")]) >= 5.0);
        let series = &fams[inv].series;
        assert!(
            series
                .iter()
                .all(|(l, _)| l.get("version").is_some_and(|v| v.len() == 12)),
            "version is the short content hash"
        );
        assert!(
            value(
                fams,
                "wasmesh_filter_call_duration_seconds",
                &[("filter", "tm")]
            ) >= 5.0
        );
    }
}

#[tokio::test]
async fn request_metrics_can_use_istios_prefix() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(manifest(
        &up,
        json!({"metrics": {"request_metrics_prefix": "istio"}}),
    ))
    .await;
    assert_eq!(Req::get("/ok").send(proxy.listener("in")).await.status, 200);
    let fams = proxy
        .wait_for(
            std::time::Duration::from_secs(5),
            "the request counted",
            || async {
                let f = scrape(&proxy, Some(PROMETHEUS_ACCEPT), OPENMETRICS).await;
                (value(&f, "istio_requests", &[("route", "ok")]) == 1.0).then_some(f)
            },
        )
        .await;
    for name in [
        "istio_request_duration_milliseconds",
        "istio_request_bytes",
        "istio_response_bytes",
    ] {
        assert_eq!(
            value(&fams, name, &[("response_code", "200")]),
            1.0,
            "{name}"
        );
    }
    assert!(
        !fams.keys().any(|n| n.starts_with("wasmesh_request")),
        "only the request metrics move; the rest stay wasmesh_*"
    );
    assert!(fams.contains_key("wasmesh_downstream_cx"));
}

/// A filter that labels by a header could create a series per client: past 1000 label
/// sets per metric the values go to one `overflow` set, counted per filter and metric.
#[tokio::test]
async fn a_filter_cannot_create_unbounded_label_values() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(manifest(&up, json!({}))).await;
    let extra = 25;
    let tenants = 1000 + extra;
    let mut conn = Conn::h1(proxy.listener("in")).await;
    for i in 0..tenants {
        let r = conn
            .send(Req::get("/ok").header("x-tenant", &format!("tenant-{i}")))
            .await;
        assert_eq!(r.status, 200);
    }
    let name = "wasmesh_filter_telemetry_requests";
    let fams = proxy
        .wait_for(
            std::time::Duration::from_secs(10),
            "every request counted by the filter",
            || async {
                let f = scrape(&proxy, Some(PROMETHEUS_ACCEPT), OPENMETRICS).await;
                (value(&f, name, &[("filter", "tm")]) == tenants as f64).then_some(f)
            },
        )
        .await;
    let series = &fams[name].series;
    assert_eq!(series.len(), 1001, "1000 label sets and the overflow set");
    assert_eq!(
        value(
            &fams,
            name,
            &[("tenant", "overflow"), ("response_code_class", "overflow")]
        ),
        extra as f64
    );
    assert_eq!(
        value(
            &fams,
            "wasmesh_filter_metric_overflow",
            &[("filter", "tm"), ("metric", name)]
        ),
        extra as f64
    );
    // The histogram has its own cap and its own count.
    let hist = "wasmesh_filter_telemetry_request_duration_seconds";
    assert_eq!(fams[hist].series.len(), 1001);
    assert_eq!(
        value(
            &fams,
            "wasmesh_filter_metric_overflow",
            &[("filter", "tm"), ("metric", hist)]
        ),
        extra as f64
    );
}
