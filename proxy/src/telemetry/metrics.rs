//! Every metric the host exports, declared in one place.
//!
//! Request metrics mirror Istio's standard metrics (`*_requests_total`,
//! `*_request_duration_milliseconds`, `*_request_bytes`, `*_response_bytes`) with Istio's label
//! names, so existing dashboards work; the rest follows Envoy's vocabulary (upstream
//! connections, overflow, reloads). Rendered as Prometheus text on the admin endpoint.

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
    pub upstream_cx_active: Family<ClusterLabel, Gauge>,
    pub upstream_cx_total: Family<ClusterLabel, Counter>,
    pub upstream_cx_connect_fail: Family<ClusterLabel, Counter>,
    pub upstream_cx_overflow: Family<ClusterLabel, Counter>,
    pub upstream_rq_active: Family<ClusterLabel, Gauge>,
    pub upstream_rq_timeout: Family<ClusterLabel, Counter>,
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
            downstream_rq_rejected: Family::default(),
            upstream_cx_active: Family::default(),
            upstream_cx_total: Family::default(),
            upstream_cx_connect_fail: Family::default(),
            upstream_cx_overflow: Family::default(),
            upstream_rq_active: Family::default(),
            upstream_rq_timeout: Family::default(),
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
        }
        let m = Metrics {
            registry: Mutex::new(root),
            ..m
        };
        Arc::new(m)
    }

    /// Render every registered metric as Prometheus/OpenMetrics text.
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
