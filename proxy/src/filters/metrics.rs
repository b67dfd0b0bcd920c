//! Every metric of the filter host, declared in one place.
//!
//! Host metrics (per filter entry and version, where `version` is the short content hash):
//! - `wasmesh_filter_invocations_total{filter,version}`: hook calls;
//! - `wasmesh_filter_errors_total{filter,version,kind}`: failed hook calls, `kind` one of
//!   `trap`, `deadline`, `memory`, `instantiate`, `invalid_action`, `state_lost`, `callout`;
//! - `wasmesh_filter_call_duration_seconds{filter,version}`: time in a hook call;
//! - `wasmesh_filter_requests_total{filter,version}`: requests each version served (a
//!   rollout's two versions side by side);
//! - `wasmesh_filter_rollout_percent{filter,version}`: the share a rollout candidate gets
//!   (0 once rolled back), and `wasmesh_filter_rollbacks_total{filter}`;
//! - `wasmesh_filter_hot_swaps_total{filter}` and `wasmesh_filter_load_failures_total{filter}`;
//! - `wasmesh_filter_metric_overflow_total{filter,metric}`: values of filter-defined metrics
//!   that went to the "overflow" label set.
//!
//! Filter-defined metrics (`define-metric`) are exported by [`DynMetrics`], a collector
//! that renders them at scrape time as `wasmesh_filter_NAME{filter="ENTRY",...}`.

use super::effects::{decode_labels, MetricOp};
use poison_free::RwLock;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use rustc_hash::FxHashMap;
use std::collections::HashMap;
use std::sync::Arc;

/// `std`'s RwLock, poison-tolerant: metrics must keep working after a panic elsewhere.
mod poison_free {
    #[derive(Default)]
    pub struct RwLock<T>(std::sync::RwLock<T>);
    impl<T> RwLock<T> {
        pub fn new(v: T) -> Self {
            Self(std::sync::RwLock::new(v))
        }
        pub fn read(&self) -> std::sync::RwLockReadGuard<'_, T> {
            self.0.read().unwrap_or_else(|e| e.into_inner())
        }
        pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, T> {
            self.0.write().unwrap_or_else(|e| e.into_inner())
        }
    }
}

/// Label sets a filter-defined metric may hold; past it values go to the "overflow" set.
pub const MAX_LABEL_SETS: usize = 1000;
/// Metrics one process may define through `define-metric`.
pub const MAX_DYN_METRICS: usize = 1000;
const MAX_NAME_LEN: usize = 100;

/// The host's own `wasmesh_filter_*` families (registered in [`HostMetrics::new`]): a
/// filter cannot define a metric whose names would clash with theirs.
const HOST_FAMILIES: [(&str, MetricType); 9] = [
    ("wasmesh_filter_requests", MetricType::Counter),
    ("wasmesh_filter_rollout_percent", MetricType::Gauge),
    ("wasmesh_filter_rollbacks", MetricType::Counter),
    ("wasmesh_filter_invocations", MetricType::Counter),
    ("wasmesh_filter_errors", MetricType::Counter),
    (
        "wasmesh_filter_call_duration_seconds",
        MetricType::Histogram,
    ),
    ("wasmesh_filter_hot_swaps", MetricType::Counter),
    ("wasmesh_filter_load_failures", MetricType::Counter),
    ("wasmesh_filter_metric_overflow", MetricType::Counter),
];

/// Every name a family puts in the exposition: its own and its samples' (`_total` of a
/// counter; `_bucket`, `_count`, `_sum` of a histogram). Two families that share one make
/// the whole `/metrics` page invalid for a strict parser.
fn exposed_names(family: &str, kind: MetricType) -> Vec<String> {
    let suffixes: &[&str] = match kind {
        MetricType::Counter => &["", "_total"],
        MetricType::Histogram => &["", "_bucket", "_count", "_sum"],
        _ => &[""],
    };
    suffixes.iter().map(|s| format!("{family}{s}")).collect()
}

/// HELP text both exposition formats accept as is: one line, no backslash or double quote.
fn clean_help(help: &str) -> String {
    help.chars()
        .take(500)
        .map(|c| match c {
            '"' => '\'',
            '\\' => '/',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabels {
    pub filter: String,
    pub version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub filter: String,
    pub version: String,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FilterLabels {
    pub filter: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub filter: String,
    pub metric: String,
}

fn duration_histogram() -> Histogram {
    // 1 µs .. ~1 s.
    Histogram::new(exponential_buckets(1e-6, 4.0, 11))
}

/// The host's own metric families.
pub struct HostMetrics {
    pub requests: Family<VersionLabels, Counter>,
    pub rollout_percent: Family<VersionLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub rollbacks: Family<FilterLabels, Counter>,
    pub invocations: Family<VersionLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub duration: Family<VersionLabels, Histogram>,
    pub hot_swaps: Family<FilterLabels, Counter>,
    pub load_failures: Family<FilterLabels, Counter>,
    pub metric_overflow: Family<OverflowLabels, Counter>,
}

impl HostMetrics {
    pub fn new(registry: &mut Registry) -> (Arc<Self>, Arc<DynMetrics>) {
        let m = Arc::new(HostMetrics {
            requests: Family::default(),
            rollout_percent: Family::default(),
            rollbacks: Family::default(),
            invocations: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            hot_swaps: Family::default(),
            load_failures: Family::default(),
            metric_overflow: Family::default(),
        });
        registry.register(
            "wasmesh_filter_requests",
            "Requests served by each filter version",
            m.requests.clone(),
        );
        registry.register(
            "wasmesh_filter_rollout_percent",
            "Share of requests a rollout candidate version serves (0 once rolled back)",
            m.rollout_percent.clone(),
        );
        registry.register(
            "wasmesh_filter_rollbacks",
            "Rollout candidates rolled back for their error rate",
            m.rollbacks.clone(),
        );
        registry.register(
            "wasmesh_filter_invocations",
            "Calls into filter hooks",
            m.invocations.clone(),
        );
        registry.register(
            "wasmesh_filter_errors",
            "Failed filter hook calls, by kind (trap, deadline, memory, instantiate, invalid_action, state_lost, callout)",
            m.errors.clone(),
        );
        registry.register(
            "wasmesh_filter_call_duration_seconds",
            "Time spent in one filter hook call",
            m.duration.clone(),
        );
        registry.register(
            "wasmesh_filter_hot_swaps",
            "New filter versions put in service",
            m.hot_swaps.clone(),
        );
        registry.register(
            "wasmesh_filter_load_failures",
            "Filter versions that failed to load",
            m.load_failures.clone(),
        );
        registry.register(
            "wasmesh_filter_metric_overflow",
            "Values of filter-defined metrics recorded in the overflow label set",
            m.metric_overflow.clone(),
        );
        let dynamic = Arc::new(DynMetrics::default());
        registry.register_collector(Box::new(dynamic.clone()));
        (m, dynamic)
    }

    /// Handles for the hot path of one filter version (no map lookup per call).
    pub fn for_version(&self, filter: &str, version: &str) -> VersionMetrics {
        let labels = VersionLabels {
            filter: filter.to_string(),
            version: version.to_string(),
        };
        VersionMetrics {
            requests: self.requests.get_or_create(&labels).clone(),
            invocations: self.invocations.get_or_create(&labels).clone(),
            duration: self.duration.get_or_create(&labels).clone(),
            labels,
        }
    }

    pub fn error(&self, v: &VersionMetrics, kind: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                filter: v.labels.filter.clone(),
                version: v.labels.version.clone(),
                kind,
            })
            .inc();
    }
}

/// Per-version metric handles.
pub struct VersionMetrics {
    pub requests: Counter,
    pub invocations: Counter,
    pub duration: Histogram,
    pub labels: VersionLabels,
}

#[derive(Clone)]
enum Series {
    Counter(Counter),
    Gauge(Gauge),
    Histogram(Histogram),
}

/// One filter-defined metric family.
pub struct DynMetric {
    name: String,
    help: String,
    kind: MetricType,
    label_names: Vec<String>,
    buckets: Vec<f64>,
    /// Key: the filter entry name followed by the label values.
    series: RwLock<HashMap<Vec<String>, Series>>,
}

impl DynMetric {
    /// Full exported name (`wasmesh_filter_...`).
    pub fn name(&self) -> &str {
        &self.name
    }

    fn new_series(&self) -> Series {
        match self.kind {
            MetricType::Counter => Series::Counter(Counter::default()),
            MetricType::Gauge => Series::Gauge(Gauge::default()),
            _ => Series::Histogram(Histogram::new(self.buckets.iter().copied())),
        }
    }

    /// The series of `filter` with `labels` (created if needed, or the overflow set past
    /// [`MAX_LABEL_SETS`]), and whether it is the overflow set. `None`: wrong label count.
    fn series(&self, filter: &str, labels: &[String]) -> Option<(Series, bool)> {
        if labels.len() != self.label_names.len() {
            return None;
        }
        let mut key = Vec::with_capacity(labels.len() + 1);
        key.push(filter.to_string());
        key.extend(labels.iter().cloned());
        if let Some(s) = self.series.read().get(&key) {
            return Some((s.clone(), false));
        }
        let mut map = self.series.write();
        let overflow = map.len() >= MAX_LABEL_SETS && !map.contains_key(&key);
        if overflow {
            key.truncate(1);
            key.extend(std::iter::repeat_n("overflow".to_string(), labels.len()));
        }
        let s = map.entry(key).or_insert_with(|| self.new_series()).clone();
        Some((s, overflow))
    }
}

impl Series {
    fn apply(&self, op: MetricOp) {
        match (self, op) {
            (Series::Counter(c), MetricOp::CounterAdd(v)) => {
                c.inc_by(v);
            }
            (Series::Gauge(g), MetricOp::GaugeSet(v)) => {
                g.set(v);
            }
            (Series::Gauge(g), MetricOp::GaugeAdd(v)) => {
                g.inc_by(v);
            }
            (Series::Histogram(h), MetricOp::Observe(v)) => h.observe(v),
            _ => {}
        }
    }
}

/// One filter instance's handles to the series it recorded to, by metric id (the
/// instance's index) and label values. A filter records on every request, usually to a
/// handful of label sets: after the first value, recording is one lookup in the
/// instance's own map, keyed by the label values as the effect carried them (no string
/// made), without the metric's lock or building the shared map's key.
/// Series are never removed from a metric, so a handle stays valid; overflow values are
/// not cached, so each one is still counted as an overflow.
#[derive(Default)]
pub struct SeriesCache {
    by_metric: Vec<FxHashMap<Box<[u8]>, Series>>,
}

impl SeriesCache {
    /// Apply `op` to the series of `filter` with `labels` (encoded as in a metric
    /// effect); `idx` is the metric's id in this instance. Returns true when the value went
    /// to the overflow set. Wrong label count, bad labels or wrong kind: ignored (false).
    pub fn record(
        &mut self,
        idx: usize,
        m: &DynMetric,
        filter: &str,
        labels: &[u8],
        op: MetricOp,
    ) -> bool {
        if let Some(s) = self.by_metric.get(idx).and_then(|c| c.get(labels)) {
            s.apply(op);
            return false;
        }
        let Ok(values) = decode_labels(labels) else {
            return false;
        };
        let Some((series, overflow)) = m.series(filter, &values) else {
            return false;
        };
        series.apply(op);
        if !overflow {
            if self.by_metric.len() <= idx {
                self.by_metric.resize_with(idx + 1, FxHashMap::default);
            }
            if let Some(c) = self.by_metric.get_mut(idx) {
                if c.len() < MAX_LABEL_SETS {
                    c.insert(labels.into(), series);
                }
            }
        }
        overflow
    }
}

/// All filter-defined metrics; a prometheus-client [`Collector`].
#[derive(Default)]
pub struct DynMetrics {
    metrics: RwLock<Vec<Arc<DynMetric>>>,
}

impl std::fmt::Debug for DynMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DynMetrics")
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.bytes()
            .enumerate()
            .all(|(i, b)| b == b'_' || b.is_ascii_alphabetic() || (i > 0 && b.is_ascii_digit()))
}

impl DynMetrics {
    /// Define (or find) a metric. Same name with the same kind and labels: the same metric.
    pub fn define(
        &self,
        kind: MetricType,
        name: &str,
        help: &str,
        labels: &[String],
        buckets: &[f64],
    ) -> Result<Arc<DynMetric>, String> {
        if !valid_name(name) {
            return Err(format!(
                "invalid metric name {name:?} (letters, digits, '_', at most {MAX_NAME_LEN})"
            ));
        }
        if let Some(bad) = labels
            .iter()
            .find(|l| !valid_name(l) || *l == "filter" || l.starts_with("__"))
        {
            return Err(format!("invalid label name {bad:?}"));
        }
        if buckets.iter().any(|b| !b.is_finite()) {
            return Err("histogram buckets must be finite".to_string());
        }
        let full = format!("wasmesh_filter_{name}");
        let mut all = self.metrics.write();
        if let Some(m) = all.iter().find(|m| m.name == full) {
            if m.kind == kind && m.label_names == labels {
                return Ok(m.clone());
            }
            return Err(format!(
                "metric {full} is already defined with another kind or labels"
            ));
        }
        let mine = exposed_names(&full, kind);
        let others = HOST_FAMILIES
            .iter()
            .map(|(n, k)| (n.to_string(), *k))
            .chain(all.iter().map(|m| (m.name.clone(), m.kind)));
        for (other, other_kind) in others {
            if exposed_names(&other, other_kind)
                .iter()
                .any(|n| mine.contains(n))
            {
                return Err(format!("metric {full} would clash with {other}"));
            }
        }
        if all.len() >= MAX_DYN_METRICS {
            return Err(format!(
                "too many filter metrics (at most {MAX_DYN_METRICS})"
            ));
        }
        let mut buckets: Vec<f64> = buckets.to_vec();
        if buckets.is_empty() {
            buckets = vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0];
        }
        buckets.sort_by(f64::total_cmp);
        buckets.dedup();
        let m = Arc::new(DynMetric {
            name: full,
            help: clean_help(help),
            kind,
            label_names: labels.to_vec(),
            buckets,
            series: RwLock::new(HashMap::new()),
        });
        all.push(m.clone());
        Ok(m)
    }
}

impl Collector for DynMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let all: Vec<Arc<DynMetric>> = self.metrics.read().clone();
        for m in all {
            let series: Vec<(Vec<String>, Series)> = m
                .series
                .read()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            if series.is_empty() {
                continue;
            }
            let mut me = encoder.encode_descriptor(&m.name, &m.help, None, m.kind)?;
            for (key, s) in series {
                let mut labels: Vec<(String, String)> = Vec::with_capacity(key.len());
                let mut values = key.into_iter();
                labels.push(("filter".to_string(), values.next().unwrap_or_default()));
                labels.extend(m.label_names.iter().cloned().zip(values));
                let fe = me.encode_family(&labels)?;
                match s {
                    Series::Counter(c) => c.encode(fe)?,
                    Series::Gauge(g) => g.encode(fe)?,
                    Series::Histogram(h) => h.encode(fe)?,
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::DynMetrics;
    use prometheus_client::metrics::MetricType;

    #[test]
    fn names_that_would_clash_in_the_exposition_are_refused() {
        let d = DynMetrics::default();
        let err = |kind, name: &str| d.define(kind, name, "", &[], &[]).err();
        assert!(
            err(MetricType::Counter, "requests").is_some(),
            "a host family"
        );
        assert!(err(MetricType::Gauge, "call_duration_seconds_count").is_some());
        assert!(err(MetricType::Histogram, "latency").is_none());
        assert!(err(MetricType::Gauge, "latency_bucket").is_some());
        assert!(err(MetricType::Counter, "hits").is_none());
        assert!(err(MetricType::Gauge, "hits_total").is_some());
        assert!(
            err(MetricType::Counter, "hits").is_none(),
            "the same definition again"
        );
    }

    #[test]
    fn help_text_stays_on_one_line_without_escapes() {
        let d = DynMetrics::default();
        let m = d
            .define(MetricType::Counter, "x", "a \"b\"\nc\\d", &[], &[])
            .expect("defined");
        assert_eq!(m.help, "a 'b' c/d");
    }
}
