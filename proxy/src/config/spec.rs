//! The manifest as written by the user: serde types that mirror the JSON one to one.
//!
//! Every struct rejects unknown fields so a typo is an error, not a silently ignored
//! setting. Defaults live here, next to the field they apply to, and are the ones the
//! README documents. Nothing in this module is used on the request path:
//! [`crate::server::build`] turns a [`Manifest`] into the runtime configuration.

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
    /// Prometheus metrics on the admin endpoint.
    #[serde(default)]
    pub metrics: MetricsSpec,
    /// OTLP trace export. Off unless this section or `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    #[serde(default)]
    pub tracing: Option<TracingSpec>,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(default = "default_drain_timeout", with = "super::duration")]
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
    /// The fields of each line, in this order. Default: every field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fields: Option<Vec<crate::telemetry::access_log::Field>>,
}

impl Default for AccessLogSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_log_path(),
            buffer_lines: default_log_buffer(),
            fields: None,
        }
    }
}

/// `metrics`: how the admin endpoint's `/metrics` names things.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsSpec {
    /// Prefix of Istio's four request metrics (`*_requests_total`,
    /// `*_request_duration_milliseconds`, `*_request_bytes`, `*_response_bytes`):
    /// `wasmesh` (default) or `istio`, for dashboards written against Istio's names.
    #[serde(default)]
    pub request_metrics_prefix: RequestMetricsPrefix,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RequestMetricsPrefix {
    #[default]
    Wasmesh,
    Istio,
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
    /// Raw TCP forwarded to `cluster` (optionally after terminating `tls` or `public_tls`).
    Tcp,
    /// TLS connections routed by the ClientHello's SNI to `sni_routes` (or `cluster`)
    /// without being decrypted.
    TlsPassthrough,
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
    /// Terminate mesh mTLS on this listener (http and tcp listeners). Default: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTlsSpec>,
    /// Terminate public TLS (no client certificate), the certificate chosen by SNI
    /// (http and tcp listeners). Exclusive with `tls`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_tls: Option<PublicTlsSpec>,
    /// `tls_passthrough` listeners: clusters by the ClientHello's server name, first match
    /// wins; `cluster` takes connections no route matches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sni_routes: Vec<SniRouteSpec>,
}

/// `listeners[].public_tls`: server certificates for clients outside the mesh.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PublicTlsSpec {
    /// Certificates, each used for the DNS names in its subjectAltName (`*.example.com`
    /// wildcards included); the first is the default for clients sending no or an unknown
    /// server name. Watched and rotated like mesh certificates.
    pub certificates: Vec<CertKeySpec>,
    /// `1.3` or `1.2` (default: public clients are older).
    #[serde(default = "default_public_min_version")]
    pub min_version: TlsVersion,
}

fn default_public_min_version() -> TlsVersion {
    TlsVersion::Tls12
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertKeySpec {
    /// Certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
}

/// A `tls_passthrough` route.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SniRouteSpec {
    /// Exact names or `*.suffix` wildcards (one label), matched case-insensitively.
    pub server_names: Vec<String>,
    pub cluster: String,
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
    /// Time allowed to receive a request's headers (slowloris): an HTTP/1.1 head, or an
    /// HTTP/2 header block from its first byte to its last.
    #[serde(default = "default_header_timeout", with = "super::duration")]
    pub request_headers_timeout: Duration,
    /// A downstream connection with no request in progress for this long is closed
    /// (HTTP/2: whatever control frames move meanwhile).
    #[serde(default = "default_idle_timeout", with = "super::duration")]
    pub idle_timeout: Duration,
    /// A request or response body that waits this long for its next bytes fails (Envoy's
    /// `stream_idle_timeout`): 408 `SI` before the response starts, a reset stream after.
    /// `0s` disables it.
    #[serde(default = "default_stream_idle_timeout", with = "super::duration")]
    pub stream_idle_timeout: Duration,
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
            stream_idle_timeout: default_stream_idle_timeout(),
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
fn default_stream_idle_timeout() -> Duration {
    // Envoy's default.
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
    #[serde(default = "default_route_timeout", with = "super::duration")]
    pub timeout: Duration,
    /// Filter chain for this route; overrides the listener's default chain.
    #[serde(default)]
    pub filters: Option<Vec<String>>,
    /// Retry failed upstream attempts (Envoy's `retry_policy`). Default: no retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_policy: Option<RetryPolicySpec>,
    /// Shadow a share of this route's requests to other clusters; their answers are discarded.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub request_mirror_policies: Vec<MirrorPolicySpec>,
    /// What a hashing load balancer (`ring_hash`) hashes (Envoy's `hash_policy`): the first
    /// entry that yields a value wins; none: weighted round robin.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hash_policy: Vec<HashPolicySpec>,
    /// Choose the region this request is served from (a header, a geo header set at the
    /// edge, or the client's address). Default: none (the proxy's own locality).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality_routing: Option<LocalityRoutingSpec>,
}

/// One entry of a route's `hash_policy`: exactly one of the three.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HashPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<HashHeaderSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<HashCookieSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_properties: Option<HashConnectionSpec>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HashHeaderSpec {
    pub header_name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HashCookieSpec {
    pub name: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HashConnectionSpec {
    /// Hash the client address (`x-forwarded-for` aware, see `xff_num_trusted_hops`).
    pub source_ip: bool,
}

/// `routes[].locality_routing`: which region serves a request. Tried in order: the
/// override `header`, the `geo_header`, the `client_cidrs` table; none matching: the
/// proxy's own locality.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LocalityRoutingSpec {
    /// A header whose value names the region to send this request to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    /// A header set at the edge (e.g. a CDN's country/state code) and the region each of
    /// its values maps to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub geo_header: Option<GeoHeaderSpec>,
    /// Client address ranges and their region; the most specific (longest prefix) wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub client_cidrs: Vec<CidrRegionSpec>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GeoHeaderSpec {
    pub name: String,
    /// Header value (exact, case-insensitive) → region.
    pub regions: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CidrRegionSpec {
    /// `10.1.0.0/16`, `2001:db8::/32`.
    pub cidr: String,
    pub region: String,
}

fn default_route_timeout() -> Duration {
    Duration::from_secs(15)
}

/// When and how to retry (Envoy's route `retry_policy`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicySpec {
    /// Comma-separated conditions, as in Envoy: `5xx`, `gateway-error`, `reset`,
    /// `connect-failure`, `refused-stream`, `retriable-status-codes`, `retriable-4xx`.
    pub retry_on: String,
    /// Retries after the first attempt. Default 1.
    #[serde(default = "default_num_retries")]
    pub num_retries: u32,
    /// Timeout of each attempt, until its response headers. Default: none (the route's
    /// `timeout` bounds all attempts together).
    #[serde(
        default,
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub per_try_timeout: Option<Duration>,
    /// Statuses retried under `retriable-status-codes`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retriable_status_codes: Vec<u16>,
    #[serde(default)]
    pub retry_back_off: RetryBackOffSpec,
    /// Request bodies up to this size are kept to be sent again; a request with a larger
    /// body is not retried. Default 64 KiB.
    #[serde(default = "default_retry_buffer")]
    pub per_request_buffer_limit_bytes: usize,
}

fn default_num_retries() -> u32 {
    1
}
fn default_retry_buffer() -> usize {
    64 * 1024
}

/// Exponential back-off with full jitter between attempts (Envoy's `retry_back_off`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryBackOffSpec {
    /// Default 25ms.
    #[serde(default = "default_backoff_base", with = "super::duration")]
    pub base_interval: Duration,
    /// Default 10 × `base_interval`.
    #[serde(
        default,
        with = "super::duration::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_interval: Option<Duration>,
}

impl Default for RetryBackOffSpec {
    fn default() -> Self {
        Self {
            base_interval: default_backoff_base(),
            max_interval: None,
        }
    }
}

fn default_backoff_base() -> Duration {
    Duration::from_millis(25)
}

/// Shadow traffic (Envoy's `request_mirror_policies`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MirrorPolicySpec {
    pub cluster: String,
    /// Share of the route's requests mirrored, 0 to 100. Default 100.
    #[serde(default = "default_mirror_percent")]
    pub percent: f64,
    /// Bodies larger than this are not mirrored (the copy is dropped and counted). Default 64 KiB.
    #[serde(default = "default_retry_buffer")]
    pub max_body_bytes: usize,
    /// A mirrored request still unanswered after this long is abandoned. Default 5s.
    #[serde(default = "default_mirror_timeout", with = "super::duration")]
    pub timeout: Duration,
}

fn default_mirror_percent() -> f64 {
    100.0
}
fn default_mirror_timeout() -> Duration {
    Duration::from_secs(5)
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
    /// Consistent hashing on a Ketama-style ring over the route's `hash_policy`.
    RingHash,
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
    #[serde(default = "default_connect_timeout", with = "super::duration")]
    pub connect_timeout: Duration,
    /// How often DNS names among the endpoints are resolved again.
    #[serde(default = "default_dns_refresh", with = "super::duration")]
    pub dns_refresh_rate: Duration,
    /// Idle pooled connections are closed after this long (HTTP/2: idle means no request
    /// in progress on the connection).
    #[serde(default = "default_pool_idle", with = "super::duration")]
    pub idle_timeout: Duration,
    /// Idle connections kept per endpoint, per worker. Default: no cap of its own, only
    /// `circuit_breakers.max_connections`: a burst's connections wait for the next one
    /// until `idle_timeout`, as Envoy keeps them. A lower cap closes the connections a
    /// burst opened past it and opens them again on the next burst.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_idle_per_endpoint: Option<usize>,
    /// Limits that fail requests fast instead of queueing them (Envoy's thresholds).
    #[serde(default)]
    pub circuit_breakers: CircuitBreakersSpec,
    /// Originate mTLS to the endpoints. Default: plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClusterTlsSpec>,
    /// Passive health: eject endpoints that fail. Default: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Active health: probe every endpoint over HTTP. Default: off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheckSpec>,
    /// Percent of healthy endpoints under which load spreads over all endpoints, healthy or
    /// not (Envoy's panic mode). Default 50; 0 disables panic mode.
    #[serde(default = "default_panic_threshold")]
    pub healthy_panic_threshold: f64,
    /// Prefer endpoints in the proxy's zone, then its region, then elsewhere, failing over
    /// as endpoints become unhealthy. Default: false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub locality_lb: bool,
    /// Settings of the `ring_hash` load balancer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_hash: Option<RingHashSpec>,
}

fn default_panic_threshold() -> f64 {
    50.0
}

/// `clusters[].outlier_detection` (Envoy's names and defaults).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    /// Consecutive 5xx (or connect failures, resets, timeouts) that eject an endpoint; 0 disables.
    #[serde(default = "default_consecutive")]
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 (or connect failures, resets, timeouts) that eject; 0 disables.
    #[serde(default = "default_consecutive")]
    pub consecutive_gateway_failure: u32,
    /// How often success rates are evaluated (and ejection state is swept).
    #[serde(default = "default_outlier_interval", with = "super::duration")]
    pub interval: Duration,
    /// Ejection time of a first ejection; the n-th ejection of an endpoint lasts n times this.
    #[serde(default = "default_base_ejection", with = "super::duration")]
    pub base_ejection_time: Duration,
    /// Upper bound of an ejection's duration.
    #[serde(default = "default_max_ejection", with = "super::duration")]
    pub max_ejection_time: Duration,
    /// At most this percent of the cluster's endpoints are ejected at once.
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: f64,
    /// Success-rate ejection needs at least this many endpoints with enough requests.
    #[serde(default = "default_sr_minimum_hosts")]
    pub success_rate_minimum_hosts: u32,
    /// Requests an endpoint needs in an interval for its success rate to count.
    #[serde(default = "default_sr_request_volume")]
    pub success_rate_request_volume: u64,
    /// Eject below `mean - stdev × factor / 1000`; 0 disables success-rate ejection.
    #[serde(default = "default_sr_stdev_factor")]
    pub success_rate_stdev_factor: u32,
}

fn default_consecutive() -> u32 {
    5
}
fn default_outlier_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(300)
}
fn default_max_ejection_percent() -> f64 {
    10.0
}
fn default_sr_minimum_hosts() -> u32 {
    5
}
fn default_sr_request_volume() -> u64 {
    100
}
fn default_sr_stdev_factor() -> u32 {
    1900
}

/// `clusters[].health_check`: an HTTP probe of every endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckSpec {
    /// Path requested (GET).
    pub path: String,
    /// Time between two checks of an endpoint. Default 5s.
    #[serde(default = "default_hc_interval", with = "super::duration")]
    pub interval: Duration,
    /// Up to this much is added at random to each interval, so checks do not synchronise.
    #[serde(default, with = "super::duration")]
    pub interval_jitter: Duration,
    /// A check without an answer within this fails. Default 1s.
    #[serde(default = "default_hc_timeout", with = "super::duration")]
    pub timeout: Duration,
    /// Consecutive passes that make an unhealthy endpoint healthy. Default 1.
    #[serde(default = "default_one")]
    pub healthy_threshold: u32,
    /// Consecutive failures that make a healthy endpoint unhealthy. Default 2.
    #[serde(default = "default_two")]
    pub unhealthy_threshold: u32,
    /// Host header of the check. Default: the cluster's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Status ranges that pass, `start` inclusive, `end` exclusive. Default 200-399.
    #[serde(default = "default_expected_statuses")]
    pub expected_statuses: Vec<StatusRangeSpec>,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StatusRangeSpec {
    pub start: u16,
    pub end: u16,
}

fn default_hc_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_hc_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_one() -> u32 {
    1
}
fn default_two() -> u32 {
    2
}
fn default_expected_statuses() -> Vec<StatusRangeSpec> {
    vec![StatusRangeSpec {
        start: 200,
        end: 400,
    }]
}

/// `clusters[].ring_hash`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RingHashSpec {
    /// Points each endpoint of weight 1 gets on the ring (weight w: w times as many), so
    /// the ring has at least this many. Default 1024.
    #[serde(default = "default_ring_size")]
    pub minimum_ring_size: u32,
}

impl Default for RingHashSpec {
    fn default() -> Self {
        Self {
            minimum_ring_size: default_ring_size(),
        }
    }
}

fn default_ring_size() -> u32 {
    1024
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
fn default_max_upstream_connections() -> usize {
    1024
}

/// A cluster's circuit breakers (Envoy's `circuit_breakers.thresholds`), all workers together.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreakersSpec {
    /// Upstream connections open at once. Past it: 503 `UO`. Default 1024.
    #[serde(default = "default_max_upstream_connections")]
    pub max_connections: usize,
    /// Requests waiting for an upstream connection to open. Past it: 503 `UO`. Default 1024.
    #[serde(default = "default_max_upstream_connections")]
    pub max_pending_requests: usize,
    /// Requests in flight to the cluster. Past it: 503 `UO`. Default 1024.
    #[serde(default = "default_max_upstream_connections")]
    pub max_requests: usize,
    /// Retries in flight. Past it a retry is skipped and the last answer returned. Default 3.
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// When set, replaces `max_retries`: retries in flight may be at most this share of the
    /// requests in flight (at least `min_retry_concurrency`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudgetSpec>,
}

impl Default for CircuitBreakersSpec {
    fn default() -> Self {
        Self {
            max_connections: default_max_upstream_connections(),
            max_pending_requests: default_max_upstream_connections(),
            max_requests: default_max_upstream_connections(),
            max_retries: default_max_retries(),
            retry_budget: None,
        }
    }
}

fn default_max_retries() -> usize {
    3
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryBudgetSpec {
    /// Percent of active requests. Default 20.
    #[serde(default = "default_budget_percent")]
    pub budget_percent: f64,
    /// Retries always allowed in flight, whatever the share. Default 3.
    #[serde(default = "default_max_retries")]
    pub min_retry_concurrency: usize,
}

fn default_budget_percent() -> f64 {
    20.0
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
    #[serde(default = "default_call_deadline", with = "super::duration")]
    pub call_deadline: Duration,
    /// Linear memory one filter instance may grow to, in MiB.
    #[serde(default = "default_instance_memory_mib")]
    pub max_instance_memory_mib: usize,
    /// Accepted for manifests written for earlier versions, and ignored: one instance per
    /// filter version and worker thread serves every request of that thread (calls are
    /// synchronous). Setting it makes the load log a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instances_per_worker: Option<usize>,
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
            instances_per_worker: None,
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
    /// Compression of export requests: `none` (the default, as in the OpenTelemetry
    /// specification) or `gzip`.
    #[serde(default)]
    pub compression: OtlpCompression,
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
    #[serde(default = "default_trace_delay", with = "super::duration")]
    pub batch_delay: Duration,
    /// An export that takes longer is abandoned (its spans counted as dropped).
    #[serde(default = "default_export_timeout", with = "super::duration")]
    pub export_timeout: Duration,
    /// TLS to an `https://` collector. Default: the system's trusted CAs, no client
    /// certificate.
    #[serde(default)]
    pub tls: Option<CollectorTlsSpec>,
}

/// TLS to the collector (`tracing.tls`). Relative paths are relative to the manifest's
/// directory. The standard `OTEL_EXPORTER_OTLP_CERTIFICATE`,
/// `OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE` and `OTEL_EXPORTER_OTLP_CLIENT_KEY` override them.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CollectorTlsSpec {
    /// PEM file of the CA certificates to trust instead of the system's.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain to present when the collector asks for a client certificate;
    /// with `key_file`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The name the collector's certificate must carry (and the SNI sent), when it is not
    /// the endpoint's host.
    #[serde(default)]
    pub server_name: Option<String>,
}

impl CollectorTlsSpec {
    /// Make relative paths relative to `base` (the manifest's directory).
    pub fn resolve_paths(&mut self, base: Option<&std::path::Path>) {
        let Some(base) = base else { return };
        for p in [&mut self.ca_file, &mut self.cert_file, &mut self.key_file]
            .into_iter()
            .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }
}

impl Default for TracingSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            endpoint: None,
            protocol: OtlpProtocol::default(),
            compression: OtlpCompression::default(),
            headers: BTreeMap::new(),
            service_name: None,
            sampling: SamplingSpec::default(),
            max_queue_size: default_trace_queue(),
            batch_size: default_trace_batch(),
            batch_delay: default_trace_delay(),
            export_timeout: default_export_timeout(),
            tls: None,
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

/// How export requests are compressed (`tracing.compression`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OtlpCompression {
    #[default]
    None,
    /// gzip: OTLP/gRPC's `grpc-encoding: gzip`, OTLP/HTTP's `Content-Encoding: gzip`.
    Gzip,
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
