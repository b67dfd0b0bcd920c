//! Metrics a filter defines, exported on the proxy's `/metrics` as
//! `wasmesh_filter_NAME{filter="ENTRY",...}`. Define them in [`crate::Filter::configure`]
//! (definition is idempotent, so every instance may define them) and keep the handle.
//! Each metric keeps at most 1000 label sets; more go to one "overflow" set.
//!
//! ```ignore
//! let denied = Counter::new("denied", "Requests denied", &["reason"])?;
//! denied.add(&["no_token"], 1);
//! ```

use crate::bindings::wasmesh::filter::host;
use crate::bindings::wasmesh::filter::types::MetricKind;
use crate::effects::{push_metric, MetricOp};

fn define(
    kind: MetricKind,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<u32, String> {
    let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
    host::define_metric(kind, name, help, &labels, buckets)
}

fn values(labels: &[&str]) -> Vec<String> {
    labels.iter().map(|s| s.to_string()).collect()
}

/// Inside a hook the update goes back with the hook's effects (no call of its own);
/// elsewhere (e.g. in `configure`) it is sent now.
fn update(metric: u32, labels: &[&str], op: MetricOp) {
    if push_metric(metric, labels, &op) {
        return;
    }
    let labels = values(labels);
    match op {
        MetricOp::CounterAdd(v) => host::counter_add(metric, &labels, v),
        MetricOp::GaugeSet(v) => host::gauge_set(metric, &labels, v),
        MetricOp::GaugeAdd(v) => host::gauge_add(metric, &labels, v),
        MetricOp::Observe(v) => host::histogram_observe(metric, &labels, v),
    }
}

/// A monotonic counter.
///
/// ```ignore
/// let c = Counter::new("hits", "Cache hits", &[])?;
/// c.add(&[], 1);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Counter(u32);

impl Counter {
    /// Define (or look up) the counter `name` with these label names.
    pub fn new(name: &str, help: &str, labels: &[&str]) -> Result<Counter, String> {
        define(MetricKind::Counter, name, help, labels, &[]).map(Counter)
    }
    /// Add `value`; `labels` are the values, in definition order.
    pub fn add(&self, labels: &[&str], value: u64) {
        update(self.0, labels, MetricOp::CounterAdd(value))
    }
}

/// A value that goes up and down.
///
/// ```ignore
/// let g = Gauge::new("in_flight", "Requests in flight", &[])?;
/// g.add(&[], 1);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Gauge(u32);

impl Gauge {
    /// Define (or look up) the gauge `name` with these label names.
    pub fn new(name: &str, help: &str, labels: &[&str]) -> Result<Gauge, String> {
        define(MetricKind::Gauge, name, help, labels, &[]).map(Gauge)
    }
    /// Set the value.
    pub fn set(&self, labels: &[&str], value: i64) {
        update(self.0, labels, MetricOp::GaugeSet(value))
    }
    /// Add `delta` (negative to subtract).
    pub fn add(&self, labels: &[&str], delta: i64) {
        update(self.0, labels, MetricOp::GaugeAdd(delta))
    }
}

/// A distribution of observations.
///
/// ```ignore
/// let h = Histogram::new("token_age_seconds", "Age of tokens", &[], &[1.0, 60.0, 3600.0])?;
/// h.observe(&[], 12.0);
/// ```
#[derive(Debug, Clone, Copy)]
pub struct Histogram(u32);

impl Histogram {
    /// Define (or look up) the histogram `name`; `buckets` empty means a default set.
    pub fn new(
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<Histogram, String> {
        define(MetricKind::Histogram, name, help, labels, buckets).map(Histogram)
    }
    /// Record one observation.
    pub fn observe(&self, labels: &[&str], value: f64) {
        update(self.0, labels, MetricOp::Observe(value))
    }
}
