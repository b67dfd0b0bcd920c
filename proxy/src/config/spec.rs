//! The manifest as written by the user: serde types that mirror the JSON one to one.
//!
//! Every struct rejects unknown fields so a typo is an error, not a silently ignored
//! setting. Defaults live here, next to the field they apply to, and are the ones the
//! README documents. Nothing in this module is used on the request path: `resolve`
//! turns a [`Manifest`] into the runtime [`super::Config`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Worker threads for the data plane. Default: the number of cores.
    #[serde(default)]
    pub workers: Option<usize>,
    /// Who this proxy is: workload name and locality, used in metrics and routing.
    #[serde(default)]
    pub node: NodeSpec,
    #[serde(default)]
    pub admin: AdminSpec,
    #[serde(default)]
    pub access_log: AccessLogSpec,
    /// OTLP trace export. Off unless this section or `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    #[serde(default)]
    pub tracing: Option<TracingSpec>,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(default = "default_drain_timeout", with = "humantime_serde")]
    pub drain_timeout: Duration,
    pub listeners: Vec<ListenerSpec>,
    #[serde(default)]
    pub clusters: Vec<ClusterSpec>,
    /// Directory that holds the filters' `.wasm` files; watched for hot-swaps.
    #[serde(default)]
    pub filter_dir: Option<PathBuf>,
    #[serde(default)]
    pub filters: Vec<FilterSpec>,
    /// Settings of the WebAssembly engine shared by every filter.
    #[serde(default)]
    pub filter_engine: FilterEngineSpec,
}

fn default_drain_timeout() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Workload name (Istio's `*_workload` metric labels).
    #[serde(default)]
    pub workload: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub locality: LocalitySpec,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(deny_unknown_fields)]
pub struct LocalitySpec {
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminSpec {
    /// Address of the admin endpoint. Default `127.0.0.1:9901`.
    #[serde(default = "default_admin_address")]
    pub address: String,
}

impl Default for AdminSpec {
    fn default() -> Self {
        Self {
            address: default_admin_address(),
        }
    }
}

fn default_admin_address() -> String {
    "127.0.0.1:9901".to_string()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogSpec {
    /// Write one JSON line per request. Default: true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// `stdout` (default) or a file path (appended to).
    #[serde(default = "default_log_path")]
    pub path: String,
    /// Lines buffered between the request path and the writer; past it lines are dropped and counted.
    #[serde(default = "default_log_buffer")]
    pub buffer_lines: usize,
}

impl Default for AccessLogSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_log_path(),
            buffer_lines: default_log_buffer(),
        }
    }
}

fn yes() -> bool {
    true
}
fn default_log_path() -> String {
    "stdout".to_string()
}
fn default_log_buffer() -> usize {
    16 * 1024
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    /// HTTP/1.1 and HTTP/2 (prior knowledge, h2c) on the same port.
    #[default]
    Http,
    /// Raw TCP forwarded to `cluster`.
    Tcp,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// In front of the local service: metrics carry `reporter="destination"`.
    #[default]
    Inbound,
    /// Called by the local service: metrics carry `reporter="source"`.
    Outbound,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerSpec {
    pub name: String,
    /// `IP:PORT`; port 0 picks a free port (shown on the admin endpoint's `/listeners`).
    pub address: String,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    #[serde(default)]
    pub direction: Direction,
    /// HTTP routes, first match wins.
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// TCP listeners: the cluster connections are forwarded to.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Default filter chain for routes that do not name their own.
    #[serde(default)]
    pub filters: Vec<String>,
    /// How many `x-forwarded-for` hops to trust when deciding the client address (Envoy's
    /// `xff_num_trusted_hops`). 0: the connection's peer address.
    #[serde(default)]
    pub xff_num_trusted_hops: u32,
    #[serde(default)]
    pub limits: ListenerLimits,
    #[serde(default)]
    pub path_normalization: PathNormalizationSpec,
    /// Terminate (m)TLS on this listener (HTTP listeners only). Default: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTlsSpec>,
}

/// Whether a TLS listener also takes plaintext.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// mTLS only: plaintext connections and clients without a valid certificate are refused.
    #[default]
    Strict,
    /// mTLS and plaintext on one port (told apart by the first byte), for migrations.
    /// A TLS client must still present a valid certificate.
    Permissive,
}

/// Lowest TLS version accepted or offered. TLS 1.3 is always preferred.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    Tls12,
    #[default]
    #[serde(rename = "1.3")]
    Tls13,
}

/// `listeners[].tls`: mesh mTLS on an inbound listener. Paths are relative to the
/// manifest's directory (or absolute); the files are watched and rotated without a restart.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsSpec {
    #[serde(default)]
    pub mode: TlsMode,
    /// This workload's certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// The certificate's private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// CA certificates (PEM) that client certificates must chain to.
    pub trust_bundle: PathBuf,
    /// `1.3` (default) or `1.2`.
    #[serde(default)]
    pub min_version: TlsVersion,
    /// SPIFFE IDs allowed to connect. Default: any identity the trust bundle vouches for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_identities: Option<Vec<String>>,
}

/// `clusters[].tls`: originate mTLS to the cluster's endpoints.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterTlsSpec {
    /// The certificate this proxy presents (PEM, leaf first).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// CA certificates (PEM) the upstream's certificate must chain to.
    pub trust_bundle: PathBuf,
    /// Server name sent in the ClientHello. Default: none (the endpoint's IP is used and no
    /// SNI is sent). The peer is authenticated by its SPIFFE ID, never by this name.
    #[serde(default)]
    pub sni: Option<String>,
    /// SPIFFE IDs the upstream may present; anything else is refused. At least one.
    pub allowed_identities: Vec<String>,
    /// `1.3` (default) or `1.2`.
    #[serde(default)]
    pub min_version: TlsVersion,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerLimits {
    /// Connections accepted at once; past it new connections wait in the kernel backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Total size of request headers (Envoy's `max_request_headers_kb`, default 60). Past it: 431.
    #[serde(default = "default_max_headers_kb")]
    pub max_request_headers_kb: usize,
    /// Number of request headers. Past it: 431.
    #[serde(default = "default_max_headers_count")]
    pub max_headers_count: usize,
    /// Time allowed to receive a request's headers (slowloris).
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub request_headers_timeout: Duration,
    /// A downstream connection with no request for this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// HTTP/2 concurrent streams per connection.
    #[serde(default = "default_h2_streams")]
    pub http2_max_concurrent_streams: u32,
    /// Body bytes buffered when a filter asks for a whole request or response body.
    #[serde(default = "default_body_buffer")]
    pub max_body_buffer_bytes: usize,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_connections: default_max_connections(),
            max_request_headers_kb: default_max_headers_kb(),
            max_headers_count: default_max_headers_count(),
            request_headers_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            http2_max_concurrent_streams: default_h2_streams(),
            max_body_buffer_bytes: default_body_buffer(),
        }
    }
}

fn default_max_connections() -> usize {
    10_000
}
fn default_max_headers_kb() -> usize {
    60
}
fn default_max_headers_count() -> usize {
    100
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_h2_streams() -> u32 {
    100
}
fn default_body_buffer() -> usize {
    1024 * 1024
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PathNormalizationSpec {
    /// Merge `//` into `/` before routing. Default: true.
    #[serde(default = "yes")]
    pub merge_slashes: bool,
    /// What to do with `%2F` / `%5C` in a path: keep (default), reject (400) or unescape.
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
}

impl Default for PathNormalizationSpec {
    fn default() -> Self {
        Self {
            merge_slashes: true,
            escaped_slashes: EscapedSlashes::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EscapedSlashes {
    #[default]
    Keep,
    Reject,
    Unescape,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Name used in metrics, logs and spans. Default: `LISTENER/INDEX`.
    #[serde(default)]
    pub name: Option<String>,
    #[serde(rename = "match", default)]
    pub matcher: MatchSpec,
    /// Forward to this cluster.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Forward to one of these clusters, chosen by weight.
    #[serde(default)]
    pub weighted_clusters: Option<Vec<WeightedClusterSpec>>,
    #[serde(default)]
    pub redirect: Option<RedirectSpec>,
    #[serde(default)]
    pub direct_response: Option<DirectResponseSpec>,
    /// Replace the matched prefix (route `prefix` match only) with this.
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Replace the Host/:authority sent upstream.
    #[serde(default)]
    pub host_rewrite: Option<String>,
    #[serde(default)]
    pub request_headers: HeaderMutationSpec,
    #[serde(default)]
    pub response_headers: HeaderMutationSpec,
    /// Whole-request timeout, until the response headers arrive. Default 15s; `0s` disables.
    #[serde(default = "default_route_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Filter chain for this route; overrides the listener's default chain.
    #[serde(default)]
    pub filters: Option<Vec<String>>,
}

fn default_route_timeout() -> Duration {
    Duration::from_secs(15)
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MatchSpec {
    /// Host/:authority, port ignored: exact (`api.local`) or suffix wildcard (`*.local`).
    #[serde(default)]
    pub authority: Option<String>,
    /// Exact path.
    #[serde(default)]
    pub path: Option<String>,
    /// Path prefix.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Regex over the whole path.
    #[serde(default)]
    pub regex: Option<String>,
    /// Any of these methods.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatchSpec>,
    #[serde(default)]
    pub query: Vec<QueryMatchSpec>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatchSpec {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    /// true: the header must be present; false: it must be absent.
    #[serde(default)]
    pub present: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueryMatchSpec {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    #[serde(default)]
    pub present: Option<bool>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedClusterSpec {
    pub name: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectSpec {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path: Option<String>,
    /// 301 (default), 302, 303, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
}

fn default_redirect_status() -> u16 {
    301
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DirectResponseSpec {
    pub status: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMutationSpec {
    /// Appended, keeping existing values.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Replacing existing values.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (h2c), e.g. for gRPC.
    Http2,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Weighted round robin.
    #[default]
    RoundRobin,
    /// Power of two choices over active requests, weighted.
    LeastRequest,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterSpec {
    pub name: String,
    pub endpoints: Vec<EndpointSpec>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default)]
    pub lb_policy: LbPolicy,
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How often DNS names among the endpoints are resolved again.
    #[serde(default = "default_dns_refresh", with = "humantime_serde")]
    pub dns_refresh_rate: Duration,
    /// Idle pooled connections are closed after this long.
    #[serde(default = "default_pool_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_endpoint: usize,
    /// Upstream connections open at once across the cluster (circuit breaker). Past it: 503 `UO`.
    #[serde(default = "default_max_upstream_connections")]
    pub max_connections: usize,
    /// Originate mTLS to the endpoints. Default: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClusterTlsSpec>,
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_dns_refresh() -> Duration {
    Duration::from_secs(5)
}
fn default_pool_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_max_idle() -> usize {
    128
}
fn default_max_upstream_connections() -> usize {
    1024
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// `IP:PORT` or `HOSTNAME:PORT` (re-resolved every `dns_refresh_rate`).
    pub address: String,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub locality: LocalitySpec,
}

fn default_weight() -> u32 {
    1
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// A failing filter fails the request (500/503 with a response flag).
    #[default]
    FailClosed,
    /// A failing filter is skipped for that request.
    FailOpen,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    /// Name routes and listeners use in their `filters` chains.
    pub name: String,
    /// The `.wasm` file, relative to `filter_dir` (or absolute).
    pub file: PathBuf,
    /// Passed to the filter's configure hook as JSON.
    #[serde(default)]
    pub config: serde_json::Value,
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Pin the file's content: a file whose sha256 (hex) differs is refused.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Clusters this filter may send requests to or call out to.
    #[serde(default)]
    pub clusters: Vec<String>,
    /// Progressive rollout: a candidate version of this filter gets a share of requests
    /// beside `file`, and is rolled back automatically when its error rate crosses
    /// `max_error_rate`. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutSpec>,
}

/// A candidate version of a filter serving a share of requests (`filters[].rollout`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The candidate `.wasm`, relative to `filter_dir` (or absolute); watched for hot-swaps
    /// like `file` (a new candidate file restarts the rollout's counts).
    pub file: PathBuf,
    /// Pin the candidate's content (64 hex digits).
    #[serde(default)]
    pub sha256: Option<String>,
    /// Share of requests the candidate serves, in percent (0 < percent ≤ 100).
    pub percent: f64,
    /// Roll back when `failed requests / requests` of the candidate exceeds this
    /// (0..=1). Default 0.05.
    #[serde(default = "default_rollout_max_error_rate")]
    pub max_error_rate: f64,
    /// Requests the candidate must have served before its error rate is judged. Default 100.
    #[serde(default = "default_rollout_min_requests")]
    pub min_requests: u64,
}

fn default_rollout_max_error_rate() -> f64 {
    0.05
}

fn default_rollout_min_requests() -> u64 {
    100
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FilterEngineSpec {
    /// Deadline for one call into a filter.
    #[serde(default = "default_call_deadline", with = "humantime_serde")]
    pub call_deadline: Duration,
    /// Linear memory one filter instance may grow to, in MiB.
    #[serde(default = "default_instance_memory_mib")]
    pub max_instance_memory_mib: usize,
    /// Instances kept per filter per worker thread.
    #[serde(default = "default_instances_per_worker")]
    pub instances_per_worker: usize,
    /// Directory for compiled filters (keyed by content hash and engine version).
    /// Default: `$XDG_CACHE_HOME/wasmesh` or `~/.cache/wasmesh`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
}

impl Default for FilterEngineSpec {
    fn default() -> Self {
        Self {
            call_deadline: default_call_deadline(),
            max_instance_memory_mib: default_instance_memory_mib(),
            instances_per_worker: default_instances_per_worker(),
            cache_dir: None,
        }
    }
}

fn default_call_deadline() -> Duration {
    Duration::from_millis(100)
}
fn default_instance_memory_mib() -> usize {
    64
}
fn default_instances_per_worker() -> usize {
    4
}

/// How spans reach a collector (the `tracing` section). `OTEL_*` environment variables
/// override these fields (see `crate::telemetry::otel`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TracingSpec {
    /// Export spans at all. Default: true when the section is present.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The collector: `http://HOST:4317` for gRPC; for HTTP a base URL (`/v1/traces` is
    /// appended when it has no path) or the full traces URL.
    /// Default: `http://127.0.0.1:4317` (gRPC) or `http://127.0.0.1:4318` (HTTP).
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default)]
    pub protocol: OtlpProtocol,
    /// Sent with every export (e.g. an API key).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// `service.name` of the spans. Default: `node.workload`, else `wasmesh`.
    #[serde(default)]
    pub service_name: Option<String>,
    #[serde(default)]
    pub sampling: SamplingSpec,
    /// Finished spans waiting for export; past it spans are dropped and counted.
    #[serde(default = "default_trace_queue")]
    pub max_queue_size: usize,
    /// Spans sent per export request.
    #[serde(default = "default_trace_batch")]
    pub batch_size: usize,
    /// Longest wait before a partial batch is sent.
    #[serde(default = "default_trace_delay", with = "humantime_serde")]
    pub batch_delay: Duration,
    /// An export that takes longer is abandoned (its spans counted as dropped).
    #[serde(default = "default_export_timeout", with = "humantime_serde")]
    pub export_timeout: Duration,
}

impl Default for TracingSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            endpoint: None,
            protocol: OtlpProtocol::default(),
            headers: BTreeMap::new(),
            service_name: None,
            sampling: SamplingSpec::default(),
            max_queue_size: default_trace_queue(),
            batch_size: default_trace_batch(),
            batch_delay: default_trace_delay(),
            export_timeout: default_export_timeout(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    /// OTLP/gRPC (port 4317).
    #[default]
    Grpc,
    /// OTLP/HTTP with protobuf bodies (port 4318).
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SamplingSpec {
    /// Share of new traces recorded, 0 to 1. A request that carries a sampling decision
    /// (`traceparent` flags, `x-b3-sampled`) keeps it: parent-based sampling.
    #[serde(default = "one")]
    pub ratio: f64,
}

impl Default for SamplingSpec {
    fn default() -> Self {
        Self { ratio: 1.0 }
    }
}

fn one() -> f64 {
    1.0
}
fn default_trace_queue() -> usize {
    2048
}
fn default_trace_batch() -> usize {
    512
}
fn default_trace_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_export_timeout() -> Duration {
    Duration::from_secs(5)
}
