//! Telemetry: Prometheus metrics, the JSON access log and OTLP traces.

pub mod access_log;
pub mod collector_tls;
pub mod metrics;
pub mod otel;
pub(crate) mod otlp;
