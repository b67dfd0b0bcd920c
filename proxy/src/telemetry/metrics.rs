//! Every metric the host exports, declared in one place.
//!
//! Request metrics mirror Istio's standard metrics (`*_requests_total`,
//! `*_request_duration_milliseconds`, `*_request_bytes`, `*_response_bytes`) with Istio's label
//! names, so existing dashboards work; the rest follows Envoy's vocabulary (upstream
//! connections, overflow, reloads). Rendered on the admin endpoint as OpenMetrics 1.0 text
//! for scrapers that ask for it (`Accept: application/openmetrics-text`, as Prometheus
//! does), and as Prometheus text 0.0.4 otherwise ([`Format`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex};

/// Labels of the request metrics (Istio's names, plus `route` and `cluster`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: Arc<str>,
    pub source_principal: Arc<str>,
    pub destination_workload: Arc<str>,
    pub destination_principal: Arc<str>,
    pub destination_service: Arc<str>,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_flags: Arc<str>,
    pub route: Arc<str>,
    pub cluster: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    pub cluster: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub listener: Arc<str>,
    pub reason: &'static str,
}

/// A refused upstream TLS handshake.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterReasonLabel {
    pub cluster: Arc<str>,
    pub reason: &'static str,
}

/// One endpoint of a cluster (`endpoint` is its `IP:PORT`). Only clusters with health
/// checks or outlier detection have such series, and an endpoint's series goes when the
/// endpoint leaves: at most one per endpoint.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    pub cluster: Arc<str>,
    pub endpoint: Arc<str>,
}

/// A TLS owner's certificate (`owner` is `listener/NAME` or `cluster/NAME`; `kind` is
/// `certificate` or `trust_bundle`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsCertLabel {
    pub owner: Arc<str>,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TlsReloadLabel {
    pub owner: Arc<str>,
    pub result: &'static str,
}

fn duration_buckets() -> Histogram {
    // Istio's default duration buckets, in milliseconds.
    Histogram::new([
        0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0,
        30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
    ])
}

fn size_buckets() -> Histogram {
    // Istio's default size buckets: 1 byte to 1 GB by powers of ten.
    Histogram::new((0..10).map(|e| 10f64.powi(e)))
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// The host's metrics. Cheap to clone handles out of; shared by every worker.
pub struct Metrics {
    pub registry: Mutex<Registry>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: HistogramFamily<RequestLabels>,
    pub request_bytes: HistogramFamily<RequestLabels>,
    pub response_bytes: HistogramFamily<RequestLabels>,
    pub downstream_cx_active: Family<ListenerLabel, Gauge>,
    pub downstream_cx_total: Family<ListenerLabel, Counter>,
    pub downstream_rq_rejected: Family<ReasonLabel, Counter>,
    pub downstream_rq_idle_timeout: Family<ListenerLabel, Counter>,
    pub upstream_cx_active: Family<ClusterLabel, Gauge>,
    pub upstream_cx_total: Family<ClusterLabel, Counter>,
    pub upstream_cx_connect_fail: Family<ClusterLabel, Counter>,
    pub upstream_cx_overflow: Family<ClusterLabel, Counter>,
    pub upstream_rq_active: Family<ClusterLabel, Gauge>,
    pub upstream_rq_timeout: Family<ClusterLabel, Counter>,
    pub upstream_rq_retry: Family<ClusterLabel, Counter>,
    pub upstream_rq_retry_success: Family<ClusterLabel, Counter>,
    pub upstream_rq_retry_overflow: Family<ClusterLabel, Counter>,
    pub upstream_rq_retry_limit_exceeded: Family<ClusterLabel, Counter>,
    pub upstream_rq_retry_not_replayable: Family<ClusterLabel, Counter>,
    pub upstream_rq_per_try_timeout: Family<ClusterLabel, Counter>,
    pub upstream_rq_pending_active: Family<ClusterLabel, Gauge>,
    pub upstream_rq_pending_overflow: Family<ClusterLabel, Counter>,
    pub upstream_rq_overflow: Family<ClusterLabel, Counter>,
    pub mirror_requests: Family<ClusterLabel, Counter>,
    pub mirror_dropped: Family<ClusterReasonLabel, Counter>,
    pub upstream_rq_pending_total: Family<ClusterLabel, Counter>,
    pub tcp_cx_total: Family<ListenerLabel, Counter>,
    pub reloads: Family<ResultLabel, Counter>,
    pub access_log_dropped: Counter,
    /// Finished spans not delivered: the export queue was full, or the collector refused
    /// or did not answer their batch in time.
    pub tracing_spans_dropped: Counter,
    /// Spans the collector accepted.
    pub tracing_spans_exported: Counter,
    pub tls_handshakes: Family<ListenerLabel, Counter>,
    pub tls_handshake_failures: Family<ReasonLabel, Counter>,
    pub upstream_tls_handshake_failures: Family<ClusterReasonLabel, Counter>,
    pub tls_cert_expiry: Family<TlsCertLabel, Gauge>,
    pub tls_cert_reloads: Family<TlsReloadLabel, Counter>,
    pub outlier_ejections: Family<ClusterReasonLabel, Counter>,
    pub outlier_ejections_active: Family<ClusterLabel, Gauge>,
    pub health_check_attempts: Family<ClusterLabel, Counter>,
    pub health_check_failures: Family<ClusterLabel, Counter>,
    pub endpoint_healthy: Family<EndpointLabel, Gauge>,
    pub lb_healthy_panic: Family<ClusterLabel, Counter>,
}

impl Metrics {
    /// `istio_prefix`: export the request metrics as `istio_*` instead of `wasmesh_*`.
    pub fn new(istio_prefix: bool) -> Arc<Self> {
        let mut root = Registry::default();
        let requests = Family::default();
        let request_duration: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(duration_buckets);
        let request_bytes: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(size_buckets);
        let response_bytes: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(size_buckets);
        {
            let reg = root.sub_registry_with_prefix(if istio_prefix { "istio" } else { "wasmesh" });
            reg.register(
                "requests",
                "Requests completed, by Istio's standard labels",
                requests.clone(),
            );
            reg.register(
                "request_duration_milliseconds",
                "Time from the first request byte to the last response byte",
                request_duration.clone(),
            );
            reg.register("request_bytes", "Request body size", request_bytes.clone());
            reg.register(
                "response_bytes",
                "Response body size",
                response_bytes.clone(),
            );
        }
        let m = Metrics {
            requests,
            request_duration,
            request_bytes,
            response_bytes,
            downstream_cx_active: Family::default(),
            downstream_cx_total: Family::default(),
            downstream_rq_idle_timeout: Family::default(),
            downstream_rq_rejected: Family::default(),
            upstream_cx_active: Family::default(),
            upstream_cx_total: Family::default(),
            upstream_cx_connect_fail: Family::default(),
            upstream_cx_overflow: Family::default(),
            upstream_rq_active: Family::default(),
            upstream_rq_timeout: Family::default(),
            upstream_rq_retry: Family::default(),
            upstream_rq_retry_success: Family::default(),
            upstream_rq_retry_overflow: Family::default(),
            upstream_rq_retry_limit_exceeded: Family::default(),
            upstream_rq_retry_not_replayable: Family::default(),
            upstream_rq_per_try_timeout: Family::default(),
            upstream_rq_pending_active: Family::default(),
            upstream_rq_pending_overflow: Family::default(),
            upstream_rq_overflow: Family::default(),
            mirror_requests: Family::default(),
            mirror_dropped: Family::default(),
            upstream_rq_pending_total: Family::default(),
            tcp_cx_total: Family::default(),
            reloads: Family::default(),
            access_log_dropped: Counter::default(),
            tracing_spans_dropped: Counter::default(),
            tracing_spans_exported: Counter::default(),
            tls_handshakes: Family::default(),
            tls_handshake_failures: Family::default(),
            upstream_tls_handshake_failures: Family::default(),
            tls_cert_expiry: Family::default(),
            tls_cert_reloads: Family::default(),
            outlier_ejections: Family::default(),
            outlier_ejections_active: Family::default(),
            health_check_attempts: Family::default(),
            health_check_failures: Family::default(),
            endpoint_healthy: Family::default(),
            lb_healthy_panic: Family::default(),
            registry: Mutex::new(Registry::default()),
        };
        {
            let reg = root.sub_registry_with_prefix("wasmesh");
            reg.register(
                "downstream_cx_active",
                "Downstream connections open",
                m.downstream_cx_active.clone(),
            );
            reg.register(
                "downstream_cx",
                "Downstream connections accepted",
                m.downstream_cx_total.clone(),
            );
            reg.register(
                "downstream_rq_rejected",
                "Requests refused before routing, by reason",
                m.downstream_rq_rejected.clone(),
            );
            reg.register(
                "downstream_rq_idle_timeout",
                "Requests ended by the stream idle timeout (flag SI)",
                m.downstream_rq_idle_timeout.clone(),
            );
            reg.register(
                "upstream_cx_active",
                "Upstream connections open",
                m.upstream_cx_active.clone(),
            );
            reg.register(
                "upstream_cx",
                "Upstream connections opened",
                m.upstream_cx_total.clone(),
            );
            reg.register(
                "upstream_cx_connect_fail",
                "Upstream connection attempts that failed or timed out",
                m.upstream_cx_connect_fail.clone(),
            );
            reg.register(
                "upstream_cx_overflow",
                "Upstream connections refused by the cluster's max_connections",
                m.upstream_cx_overflow.clone(),
            );
            reg.register(
                "upstream_rq_active",
                "Upstream requests in flight",
                m.upstream_rq_active.clone(),
            );
            reg.register(
                "upstream_rq_timeout",
                "Upstream requests that timed out",
                m.upstream_rq_timeout.clone(),
            );
            reg.register(
                "upstream_rq_retry",
                "Retries sent to the cluster",
                m.upstream_rq_retry.clone(),
            );
            reg.register(
                "upstream_rq_retry_success",
                "Retries that got an answer the retry policy accepts",
                m.upstream_rq_retry_success.clone(),
            );
            reg.register(
                "upstream_rq_retry_overflow",
                "Retries skipped because the cluster's max_retries or retry budget was reached",
                m.upstream_rq_retry_overflow.clone(),
            );
            reg.register(
                "upstream_rq_retry_limit_exceeded",
                "Requests whose retries ran out (num_retries) while still failing",
                m.upstream_rq_retry_limit_exceeded.clone(),
            );
            reg.register(
                "upstream_rq_retry_not_replayable",
                "Retries skipped because the request body was larger than per_request_buffer_limit_bytes",
                m.upstream_rq_retry_not_replayable.clone(),
            );
            reg.register(
                "upstream_rq_per_try_timeout",
                "Upstream attempts that hit the per-try timeout",
                m.upstream_rq_per_try_timeout.clone(),
            );
            reg.register(
                "upstream_rq_pending_active",
                "Requests waiting for an upstream connection to open",
                m.upstream_rq_pending_active.clone(),
            );
            reg.register(
                "upstream_rq_pending_overflow",
                "Requests refused (503 UO) by the cluster's max_pending_requests",
                m.upstream_rq_pending_overflow.clone(),
            );
            reg.register(
                "upstream_rq_overflow",
                "Requests refused (503 UO) by the cluster's max_requests",
                m.upstream_rq_overflow.clone(),
            );
            reg.register(
                "mirror_requests",
                "Mirrored (shadow) requests sent, by mirror cluster",
                m.mirror_requests.clone(),
            );
            reg.register(
                "mirror_dropped",
                "Mirrored requests dropped, by mirror cluster and reason (body_too_large, slow, overflow, timeout, failed)",
                m.mirror_dropped.clone(),
            );
            reg.register(
                "upstream_rq_pending",
                "Requests that had to wait for a new upstream connection",
                m.upstream_rq_pending_total.clone(),
            );
            reg.register(
                "tcp_cx",
                "Connections proxied by TCP listeners",
                m.tcp_cx_total.clone(),
            );
            reg.register(
                "config_reloads",
                "Manifest reloads, by result",
                m.reloads.clone(),
            );
            reg.register(
                "access_log_dropped",
                "Access-log lines dropped because the writer fell behind",
                m.access_log_dropped.clone(),
            );
            reg.register(
                "tracing_spans_dropped",
                "Spans not exported: queue full, or the collector refused or did not answer in time",
                m.tracing_spans_dropped.clone(),
            );
            reg.register(
                "tracing_spans_exported",
                "Spans the OTLP collector accepted",
                m.tracing_spans_exported.clone(),
            );
            reg.register(
                "tls_handshakes",
                "Downstream TLS handshakes completed",
                m.tls_handshakes.clone(),
            );
            reg.register(
                "tls_handshake_failures",
                "Downstream connections refused at the TLS layer, by reason (plaintext, unknown_ca, expired, no_spiffe_id, identity_not_allowed, ...)",
                m.tls_handshake_failures.clone(),
            );
            reg.register(
                "upstream_tls_handshake_failures",
                "Upstream TLS handshakes that failed, by reason",
                m.upstream_tls_handshake_failures.clone(),
            );
            reg.register(
                "tls_certificate_expiry_timestamp_seconds",
                "When the certificate in use (or the earliest CA of the trust bundle) expires, unix seconds",
                m.tls_cert_expiry.clone(),
            );
            reg.register(
                "tls_certificate_reloads",
                "Certificate (re)loads by result; a failure keeps the previous certificate",
                m.tls_cert_reloads.clone(),
            );
            reg.register(
                "outlier_detection_ejections",
                "Endpoints ejected by outlier detection, by reason (consecutive_5xx, consecutive_gateway_failure, success_rate)",
                m.outlier_ejections.clone(),
            );
            reg.register(
                "outlier_detection_ejections_active",
                "Endpoints currently ejected by outlier detection",
                m.outlier_ejections_active.clone(),
            );
            reg.register(
                "health_check_attempts",
                "Active health checks made",
                m.health_check_attempts.clone(),
            );
            reg.register(
                "health_check_failures",
                "Active health checks that failed (no answer in time, or an unexpected status)",
                m.health_check_failures.clone(),
            );
            reg.register(
                "endpoint_healthy",
                "1 while an endpoint may take traffic (passing its checks, not ejected), else 0",
                m.endpoint_healthy.clone(),
            );
            reg.register(
                "lb_healthy_panic",
                "Requests balanced in panic mode: too few healthy endpoints, so all of them were used",
                m.lb_healthy_panic.clone(),
            );
        }
        let m = Metrics {
            registry: Mutex::new(root),
            ..m
        };
        Arc::new(m)
    }

    /// Render every registered metric in `format`.
    pub fn encode_as(&self, format: Format) -> String {
        let om = self.encode();
        match format {
            Format::OpenMetrics => om,
            Format::Text004 => openmetrics_to_text004(&om),
        }
    }

    /// Render every registered metric as OpenMetrics 1.0 text.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        let reg = match self.registry.lock() {
            Ok(r) => r,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
            tracing::error!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// Count one finished request. The four families are looked up once per distinct label
    /// set and thread (a per-worker cache), not on every request: hashing eleven label strings
    /// four times per request was the largest single cost on the request path.
    pub fn record_request(
        &self,
        labels: RequestLabels,
        duration_ms: f64,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        thread_local! {
            static CACHE: std::cell::RefCell<rustc_hash::FxHashMap<LabelKey, RequestHandles>> =
                std::cell::RefCell::new(Default::default());
        }
        let key = LabelKey(labels);
        CACHE.with(|c| {
            let mut cache = c.borrow_mut();
            if !cache.contains_key(&key) {
                // Bounded: label sets that come and go (reloads, rare flags) cannot pile up.
                if cache.len() >= 4096 {
                    cache.clear();
                }
                let h = RequestHandles {
                    requests: self.requests.get_or_create(&key.0).clone(),
                    duration: self.request_duration.get_or_create(&key.0).clone(),
                    request_bytes: self.request_bytes.get_or_create(&key.0).clone(),
                    response_bytes: self.response_bytes.get_or_create(&key.0).clone(),
                };
                cache.insert(LabelKey(key.0.clone()), h);
            }
            if let Some(h) = cache.get(&key) {
                h.requests.inc();
                h.duration.observe(duration_ms);
                h.request_bytes.observe(bytes_in as f64);
                h.response_bytes.observe(bytes_out as f64);
            }
        });
    }

    pub fn cluster_label(name: &Arc<str>) -> ClusterLabel {
        ClusterLabel {
            cluster: name.clone(),
        }
    }
}

/// An exposition format of `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text: counters' TYPE names without `_total`, ends with `# EOF`.
    OpenMetrics,
    /// Prometheus text 0.0.4, what most tools and people expect from a plain GET.
    Text004,
}

impl Format {
    /// OpenMetrics when the client accepts it (Prometheus asks for it first), else 0.0.4.
    pub fn from_accept(accept: Option<&str>) -> Self {
        let wants_om = accept.is_some_and(|a| {
            a.split(',').any(|part| {
                let mut params = part.split(';');
                let media = params.next().unwrap_or_default().trim();
                // `q=0` means "not acceptable".
                let refused = params.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
            })
        });
        if wants_om {
            Format::OpenMetrics
        } else {
            Format::Text004
        }
    }

    /// The `Content-Type` that declares this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text004 => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Rewrite prometheus-client's OpenMetrics output as Prometheus text 0.0.4: a counter's
/// HELP and TYPE lines name its samples (`x_total`, not `x`), `# UNIT` and `# EOF` go, and
/// types 0.0.4 lacks become `untyped`. Samples are the same in both formats (we emit no
/// exemplars and no `_created` series).
fn openmetrics_to_text004(om: &str) -> String {
    let mut out = String::with_capacity(om.len() + om.len() / 16);
    // A HELP line waits for its TYPE line, which says whether the name needs `_total`.
    let mut help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (orig, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name, kind) = match kind {
                "counter" if !orig.ends_with("_total") => (format!("{orig}_total"), kind),
                "counter" | "gauge" | "histogram" | "summary" => (orig.to_string(), kind),
                _ => (orig.to_string(), "untyped"),
            };
            if let Some((_, text)) = help.take().filter(|(h, _)| *h == orig) {
                out.push_str("# HELP ");
                out.push_str(&name);
                out.push(' ');
                out.push_str(text);
                out.push('\n');
            }
            out.push_str("# TYPE ");
            out.push_str(&name);
            out.push(' ');
            out.push_str(kind);
            out.push('\n');
        } else if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

struct RequestHandles {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// A label set compared by the identity of its shared strings (which the cache entry keeps
/// alive, so an address cannot be reused while it is a key) and by the value of the rest.
struct LabelKey(RequestLabels);

fn ptr(s: &Arc<str>) -> usize {
    Arc::as_ptr(s) as *const u8 as usize
}

impl std::hash::Hash for LabelKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        let l = &self.0;
        for p in [
            ptr(&l.source_workload),
            ptr(&l.source_principal),
            ptr(&l.destination_workload),
            ptr(&l.destination_principal),
            ptr(&l.destination_service),
            ptr(&l.route),
            ptr(&l.cluster),
            l.reporter.as_ptr() as usize,
            l.request_protocol.as_ptr() as usize,
        ] {
            h.write_usize(p);
        }
        h.write_u16(l.response_code);
        l.response_flags.hash(h);
    }
}

impl PartialEq for LabelKey {
    fn eq(&self, o: &Self) -> bool {
        let (a, b) = (&self.0, &o.0);
        ptr(&a.source_workload) == ptr(&b.source_workload)
            && ptr(&a.source_principal) == ptr(&b.source_principal)
            && ptr(&a.destination_workload) == ptr(&b.destination_workload)
            && ptr(&a.destination_principal) == ptr(&b.destination_principal)
            && ptr(&a.destination_service) == ptr(&b.destination_service)
            && ptr(&a.route) == ptr(&b.route)
            && ptr(&a.cluster) == ptr(&b.cluster)
            && std::ptr::eq(a.reporter, b.reporter)
            && std::ptr::eq(a.request_protocol, b.request_protocol)
            && a.response_code == b.response_code
            && a.response_flags == b.response_flags
    }
}

impl Eq for LabelKey {}

#[cfg(test)]
mod tests {
    use super::{openmetrics_to_text004, Format};

    #[test]
    fn accept_picks_the_format() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::from_accept(Some(prometheus)), Format::OpenMetrics);
        assert_eq!(Format::from_accept(Some("*/*")), Format::Text004);
        assert_eq!(Format::from_accept(None), Format::Text004);
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;q=0, text/plain")),
            Format::Text004
        );
    }

    #[test]
    fn openmetrics_becomes_text_004() {
        let om =
            "# HELP a_requests Requests.\n# TYPE a_requests counter\na_requests_total{x=\"1\"} 2\n\
                  # HELP a_up Up.\n# TYPE a_up gauge\n# UNIT a_up seconds\na_up 1\n\
                  # HELP a_info Info.\n# TYPE a_info info\na_info{v=\"1\"} 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text004(om),
            "# HELP a_requests_total Requests.\n# TYPE a_requests_total counter\na_requests_total{x=\"1\"} 2\n\
             # HELP a_up Up.\n# TYPE a_up gauge\na_up 1\n\
             # HELP a_info Info.\n# TYPE a_info untyped\na_info{v=\"1\"} 1\n"
        );
    }
}
