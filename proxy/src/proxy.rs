//! The HTTP request path, top to bottom in [`handle`]:
//! checks → route → request-side filters → cluster and endpoint → upstream call →
//! response-side filters → log. Each step is a call into its own module; this file only
//! strings them together and turns every failure into an answer (see `crate::error`).

use crate::cluster::{Body, BoxError, Cluster, Endpoint, PickContext};
use crate::config::Direction;
use crate::error::ProxyError;
use crate::filters::{ChainRun, LocalResponse, Outcome, RequestInfo, Verdict};
use crate::idle::IdleBody;
use crate::routing::{normalize_path, RequestView, Route, RouteAction};
use crate::server::{ListenerConfig, ListenerRuntime, Shared};
use crate::telemetry::access_log::{now_rfc3339, Entry, LocalResponseLog};
use crate::telemetry::metrics::RequestLabels;
use crate::telemetry::otel::{RequestTrace, ServerEnd, TraceIds};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// What the connection knows about the client.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The port the client connected to (only the port: this struct is copied into every
    /// request's future).
    pub local_port: u16,
    /// SPIFFE ID of an mTLS peer.
    pub peer_identity: Option<Arc<str>>,
    /// SPIFFE ID this proxy presented on the connection (mTLS listeners).
    pub local_identity: Option<Arc<str>>,
    /// The peer's IP as a header value, rendered once per connection: every request on
    /// it appends this hop to `x-forwarded-for`.
    pub peer_ip: HeaderValue,
    /// The connection is TLS (public TLS or mesh mTLS): its requests are `https`.
    pub tls: bool,
}

impl ConnInfo {
    pub fn new(peer: SocketAddr, local: SocketAddr) -> Self {
        // An IP address always renders to a valid header value.
        let peer_ip = HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Self {
            peer,
            local_port: local.port(),
            peer_identity: None,
            local_identity: None,
            peer_ip,
            tls: false,
        }
    }

    /// The scheme the client used: what filters, redirects and `x-forwarded-proto` say.
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }
}

/// Request-scoped facts collected along the path, for the log and metrics.
pub(crate) struct Exchange {
    pub(crate) start: Instant,
    pub(crate) method: http::Method,
    pub(crate) authority: String,
    /// The request target as the client sent it (before normalization), for the log.
    pub(crate) original_uri: Uri,
    pub(crate) protocol: &'static str,
    /// Set once the request is checked; `None` if it was rejected before that.
    pub(crate) request_id: Option<Arc<str>>,
    pub(crate) client: SocketAddr,
    pub(crate) user_agent: Option<HeaderValue>,
    pub(crate) route: Option<Arc<str>>,
    pub(crate) cluster: Option<Arc<Cluster>>,
    pub(crate) endpoint: Option<Arc<Endpoint>>,
    pub(crate) flags: Vec<String>,
    pub(crate) reason: Option<String>,
    pub(crate) bytes_in: Arc<AtomicU64>,
    /// The mTLS peer's SPIFFE ID (interned: the metrics cache keys on the pointer).
    pub(crate) peer_identity: Option<Arc<str>>,
    /// The cluster's `max_requests` slot, held until the response is done.
    pub(crate) inflight: Option<crate::breaker::GateGuard>,
    /// Who answered, as Istio's `destination_principal`: this proxy's own SPIFFE ID on an
    /// inbound mTLS connection, the upstream's on an mTLS cluster (set in `finish`).
    pub(crate) destination_principal: Option<Arc<str>>,
    /// The SERVER span (tracing on), ended with the request.
    pub(crate) trace: RequestTrace,
    /// Ids for logs and filters: the proxy's SERVER span, or with tracing off the caller's
    /// span from `traceparent`/B3.
    pub(crate) trace_ids: Option<TraceIds>,
}

/// Headers only the proxy may set; stripped from client requests so no one can forge them.
const INTERNAL_PREFIX: &str = "x-wasmesh-";

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        _ => "HTTP/?",
    }
}

/// Serve one request (its body: `crate::h1_server::RequestBody` over HTTP/1.1, hyper's
/// `Incoming` over HTTP/2). Never fails: every error becomes a response.
pub async fn handle<B>(
    shared: Arc<Shared>,
    listener: Arc<ListenerRuntime>,
    conn: ConnInfo,
    req: Request<B>,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (parts, body) = req.into_parts();
    let bytes_in = Arc::new(AtomicU64::new(0));
    let authority = request_authority(&parts).unwrap_or_default();
    let user_agent = parts.headers.get(header::USER_AGENT);
    let trace = shared.tracing.start_server(
        &parts,
        authority,
        user_agent,
        conn.peer,
        conn.local_port,
        conn.tls,
    );
    let trace_ids = trace.ids(&parts.headers);
    let mut x = Exchange {
        start: Instant::now(),
        method: parts.method.clone(),
        authority: authority.to_string(),
        // Clones of the parsed head share its buffer: no copy per request.
        original_uri: parts.uri.clone(),
        protocol: protocol_name(parts.version),
        request_id: None,
        client: conn.peer,
        user_agent: user_agent.cloned(),
        route: None,
        cluster: None,
        endpoint: None,
        flags: Vec::new(),
        reason: None,
        bytes_in: bytes_in.clone(),
        peer_identity: conn.peer_identity.clone(),
        inflight: None,
        destination_principal: conn.local_identity.clone(),
        trace,
        trace_ids,
    };
    // One consistent view of the listener's config for the whole request, even across a reload.
    let lc = listener.current.load_full();
    // The client's body under the stream idle timeout (the upstream's gets its own in `serve`).
    // A request without a body (most) needs neither: an empty body costs no allocation.
    let body = if body.is_end_stream() {
        empty()
    } else {
        let body = IdleBody::new(body.map_err(Into::into), lc.spec.limits.stream_idle_timeout);
        CountingBody::new(body.boxed_unsync(), bytes_in, None).boxed_unsync()
    };
    let req = Request::from_parts(parts, body);
    let (resp, chain) = match serve(&shared, &lc, &conn, req, &mut x).await {
        Ok((resp, chain)) => (resp, chain),
        Err((e, chain)) => (local_error(e, &mut x), chain),
    };
    finish(shared, listener, x, resp, chain)
}

/// The request path proper. On error, the chain (if started) is handed back so its done
/// hooks still run.
async fn serve(
    shared: &Arc<Shared>,
    lc: &ListenerConfig,
    conn: &ConnInfo,
    req: Request<Body>,
    x: &mut Exchange,
) -> Result<(Response<Body>, Option<ChainRun>), (ProxyError, Option<ChainRun>)> {
    let (mut parts, body) = req.into_parts();

    // The request id first, so that a refused request is found in the log by it too.
    x.request_id = Some(ensure_request_id(&mut parts.headers));

    // 1. Reject what must never reach an upstream (request smuggling, bad paths). Framing
    // is judged once, where it is read: the HTTP/1.1 server marks what it cannot trust (it
    // has read no body of it and closes the connection after the answer); the h2 crate
    // refuses Transfer-Encoding and lengths that disagree itself.
    if let Some(u) = parts.extensions.get::<crate::h1_server::UntrustedFraming>() {
        return Err((ProxyError::BadRequest(u.0), None));
    }
    check_host(&parts).map_err(|e| (e, None))?;
    check_target(&parts).map_err(|e| (e, None))?;
    if parts.headers.len() > lc.spec.limits.max_headers_count {
        // hyper enforces the count for HTTP/1.1 only; HTTP/2 requests are counted here.
        return Err((ProxyError::TooManyHeaders, None));
    }
    strip_internal_headers(&mut parts.headers);
    x.client = client_address(&parts.headers, conn.peer, lc.spec.xff_num_trusted_hops);
    if lc.spec.xff_num_trusted_hops == 0 {
        // An edge listener: the client cannot tell the upstream it came over TLS (Envoy
        // overwrites x-forwarded-proto when it trusts no hop).
        parts.headers.remove(&X_FORWARDED_PROTO);
    }
    // From here on the request's URI carries the normalized path: routing, filters and
    // the upstream all see the same one (the access log keeps the original).
    let (path, query) = split_path(&parts.uri);
    match normalize_path(path, &lc.spec.path_normalization) {
        Ok(None) => {}
        Ok(Some(normalized)) => {
            let query = query.map(str::to_string);
            set_path(&mut parts.uri, &normalized, query.as_deref());
        }
        Err(crate::routing::PathError::EscapedSlash) => {
            return Err((ProxyError::BadRequest("encoded slash in path"), None))
        }
        Err(crate::routing::PathError::Invalid) => {
            return Err((ProxyError::BadRequest("invalid path"), None))
        }
    }

    // 2. Route. A fully qualified name (`admin.local.`) is the name without its dot: a
    // route on `admin.local` must not be passed by the dot.
    let host = host_without_port(&x.authority);
    let host = host.strip_suffix('.').unwrap_or(host);
    let routes = &lc.routes;
    let (path, query) = split_path(&parts.uri);
    let view = RequestView {
        host,
        path,
        query,
        method: &parts.method,
        headers: &parts.headers,
    };
    let route: &Route = routes.find(&view).ok_or((ProxyError::NoRoute, None))?;
    x.route = Some(route.name.clone());
    x.trace.set_route(&route.template);

    match &route.action {
        RouteAction::Redirect {
            scheme,
            host: rhost,
            path: rpath,
            status,
        } => {
            let (path, query) = split_path(&parts.uri);
            let host = rhost.as_deref().unwrap_or(x.authority.as_str());
            let target = format!(
                "{}{}{}",
                rpath.as_deref().unwrap_or(path),
                if query.is_some() { "?" } else { "" },
                query.unwrap_or_default(),
            );
            // With no host to name (an HTTP/1.0 request without Host, and none configured),
            // a relative reference (RFC 9110 §10.2.2) rather than `http:///path`.
            let location = if host.is_empty() {
                target
            } else {
                format!(
                    "{}://{host}{target}",
                    scheme.as_deref().unwrap_or(conn.scheme())
                )
            };
            let mut resp = Response::new(empty());
            *resp.status_mut() = *status;
            if let Ok(v) = HeaderValue::from_str(&location) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            return Ok((resp, None));
        }
        RouteAction::Direct {
            status,
            body,
            headers,
        } => {
            let mut resp = Response::new(full(body.clone()));
            *resp.status_mut() = *status;
            resp.headers_mut().extend(headers.clone());
            route.response_headers.apply(resp.headers_mut());
            return Ok((resp, None));
        }
        RouteAction::Cluster(_) | RouteAction::Weighted { .. } => {}
    }

    // 3. Request-side filters. From here on the chain goes back with any error.
    let mut chain = if route.chain.is_empty() {
        None
    } else {
        let mut run = route.chain.start(RequestInfo {
            request_id: x.request_id.clone().unwrap_or_default(),
            source_addr: x.client,
            peer_identity: conn.peer_identity.clone(),
            route: route.name.clone(),
            scheme: conn.scheme(),
            trace_ids: x.trace_ids,
        });
        if x.trace.is_recording() {
            run.record_timings();
        }
        Some(run)
    };
    let mut body = body;
    if let Some(run) = chain.as_mut() {
        match run.request_headers(&mut parts).await {
            Verdict::Continue => {}
            Verdict::Respond(local) => return Ok((local_response(local, x), chain)),
        }
        if run.wants_request_body() {
            let limit = lc.spec.limits.max_body_buffer_bytes;
            let buffered = match buffer_body(body, limit).await {
                Ok(b) => b,
                Err(e) => return Err((e, chain)),
            };
            match run.request_body(&mut parts, buffered).await {
                Ok(new) => {
                    parts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(new.len()));
                    parts.headers.remove(header::TRANSFER_ENCODING);
                    body = full(new);
                }
                Err(Verdict::Respond(local)) => return Ok((local_response(local, x), chain)),
                Err(Verdict::Continue) => body = empty(),
            }
        }
    }

    // 4. Cluster and endpoint. A filter's choice overrides the route's (weighted) cluster.
    let cluster = match chain.as_ref().and_then(|c| c.cluster_override()) {
        Some(name) => match shared.snapshot().clusters.get(name) {
            Some(c) => c.clone(),
            None => return Err((ProxyError::NoHealthyUpstream, chain)),
        },
        None => match route.action.pick_cluster() {
            Some(c) => c.clone(),
            None => return Err((ProxyError::NoRoute, chain)),
        },
    };
    x.cluster = Some(cluster.clone());
    // What the balancer hears about this request: its affinity hash and its region.
    // (The region is copied out: the request's headers are rewritten for the upstream
    // before retries pick again; it is only computed when the route routes by locality.)
    let region: Option<String> = route
        .locality_routing
        .as_ref()
        .and_then(|l| l.region(&parts.headers, x.client.ip()))
        .map(str::to_string);
    let pick = PickContext {
        tried: &[],
        hash: route.hash_policy.hash(&parts.headers, x.client.ip()),
        region: region.as_deref(),
    };
    let endpoint = match cluster.pick(&pick) {
        Some(e) => e,
        None => return Err((ProxyError::NoHealthyUpstream, chain)),
    };
    x.endpoint = Some(endpoint.clone());

    // 5. The upstream request.
    // The client's connection is taken over once the upstream agrees (101); only an
    // HTTP/1.1 connection can be (`h1_server` marks the requests).
    let upgrade = parts
        .extensions
        .get::<crate::h1_server::CanUpgrade>()
        .is_some()
        && is_upgrade(&parts.headers);
    prepare_upstream_request(&mut parts, route, &cluster, &endpoint, conn, x, upgrade);
    let resp =
        crate::forward::forward(route, &cluster, endpoint, pick, parts, body, upgrade, x).await;
    let mut resp = match resp {
        Ok(r) => r,
        Err(e) => return Err((e, chain)),
    };

    // 6. Upgrades (WebSocket): splice the two connections once both sides have switched.
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let up = upgrade.then(|| hyper::upgrade::on(&mut resp));
        let (mut rp, _) = resp.into_parts();
        rp.headers.remove(header::TRANSFER_ENCODING);
        if let Some(up) = up {
            // The server splices the two once the 101 is written.
            rp.extensions.insert(crate::h1_server::UpgradeTo(up));
        }
        return Ok((Response::from_parts(rp, empty()), chain));
    }

    // 7. Response side: hop-by-hop headers, route mutations, filters in reverse order.
    let (mut rparts, rbody) = resp.into_parts();
    strip_hop_by_hop(&mut rparts.headers, false);
    route.response_headers.apply(&mut rparts.headers);
    // The upstream's body, under the stream idle timeout from here on (the route's
    // `timeout` ended at its headers).
    let mut rbody: Body = IdleBody::new(rbody, lc.spec.limits.stream_idle_timeout).boxed_unsync();
    if let Some(run) = chain.as_mut() {
        match run.response_headers(&mut rparts).await {
            Verdict::Continue => {}
            Verdict::Respond(local) => return Ok((local_response(local, x), chain)),
        }
        if run.wants_response_body() {
            let limit = lc.spec.limits.max_body_buffer_bytes;
            let buffered = match buffer_body(rbody, limit).await {
                Ok(b) => b,
                Err(ProxyError::RequestBodyTooLarge) => {
                    return Err((ProxyError::ResponseBodyTooLarge, chain))
                }
                // Nothing has gone to the client yet: 408, as Envoy answers.
                Err(ProxyError::StreamIdleTimeout) => {
                    return Err((ProxyError::StreamIdleTimeout, chain))
                }
                Err(_) => return Err((ProxyError::UpstreamReset, chain)),
            };
            match run.response_body(&mut rparts, buffered).await {
                Ok(new) => {
                    rparts
                        .headers
                        .insert(header::CONTENT_LENGTH, HeaderValue::from(new.len()));
                    rbody = full(new);
                }
                Err(Verdict::Respond(local)) => return Ok((local_response(local, x), chain)),
                Err(Verdict::Continue) => rbody = empty(),
            }
        }
    }
    Ok((Response::from_parts(rparts, rbody), chain))
}

/// Wrap the response so the access log and metrics are written when its body ends.
fn finish(
    shared: Arc<Shared>,
    listener: Arc<ListenerRuntime>,
    mut x: Exchange,
    resp: Response<Body>,
    chain: Option<ChainRun>,
) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    if let Some(up) = parts.extensions.remove::<crate::tls::UpstreamIdentity>() {
        // On the caller's side the destination is the upstream; on the callee's side it
        // is this proxy, whatever cluster the request went on to.
        if matches!(listener.direction, Direction::Outbound) {
            x.destination_principal = Some(up.0);
        }
    }
    let status = parts.status.as_u16();
    let done = Done {
        shared,
        listener,
        x,
        status,
        chain,
    };
    let bytes_out = Arc::new(AtomicU64::new(0));
    let body = CountingBody::new(body, bytes_out, Some(done)).boxed_unsync();
    Response::from_parts(parts, body)
}

/// Everything needed to log a request once its response body has been sent (or abandoned).
struct Done {
    shared: Arc<Shared>,
    listener: Arc<ListenerRuntime>,
    x: Exchange,
    status: u16,
    chain: Option<ChainRun>,
}

impl Done {
    fn complete(mut self, bytes_out: u64, end: BodyEnd) {
        match end {
            BodyEnd::Complete => {}
            // The upstream broke off mid-response: the client sees a reset stream/closed connection.
            BodyEnd::Error => self.x.flags.push("UR".into()),
            BodyEnd::IdleTimeout => self.x.flags.push("SI".into()),
            BodyEnd::Abandoned => self.x.flags.push("DC".into()),
        }
        if self.x.flags.iter().any(|f| f == "SI") {
            self.shared
                .metrics
                .downstream_rq_idle_timeout
                .get_or_create(&crate::telemetry::metrics::ListenerLabel {
                    listener: self.listener.name.clone(),
                })
                .inc();
        }
        let duration = self.x.start.elapsed();
        let mut flags: Vec<String> = std::mem::take(&mut self.x.flags);
        let mut filter_timings = Vec::new();
        let mut chain = self.chain.take();
        if let Some(chain) = chain.as_mut() {
            // Building the outcome costs a few allocations: only when a done hook reads it.
            if chain.wants_done() {
                let mut outcome_flags = flags.clone();
                outcome_flags.extend(chain.response_flags().iter().cloned());
                chain.done(&Outcome {
                    status: self.status,
                    response_flags: outcome_flags.join(","),
                    duration,
                    cluster: self.x.cluster.as_ref().map(|c| c.name.to_string()),
                    upstream: self.x.endpoint.as_ref().map(|e| e.addr.to_string()),
                });
            }
            // Read after the done hooks: what they add still belongs in the log line.
            flags.extend(chain.response_flags().iter().cloned());
            filter_timings = chain.take_timings();
        }
        flags.dedup();
        let flags_str: std::borrow::Cow<'static, str> = if flags.is_empty() {
            "-".into()
        } else {
            flags.join(",").into()
        };
        self.x.trace.end(&ServerEnd {
            status: self.status,
            flags: &flags_str,
            route: self.x.route.as_deref(),
            cluster: self.x.cluster.as_ref().map(|c| &*c.name),
            upstream: self.x.endpoint.as_ref().map(|e| e.addr),
            filters: &filter_timings,
        });
        let x = &self.x;
        let shared = &self.shared;
        let route: Arc<str> = x.route.clone().unwrap_or_else(|| Arc::from("-"));
        let cluster: Arc<str> = x
            .cluster
            .as_ref()
            .map(|c| c.name.clone())
            .unwrap_or_else(|| Arc::from("-"));
        let (reporter, dest_service) = match self.listener.direction {
            Direction::Inbound => ("destination", shared.node.workload.clone()),
            Direction::Outbound => ("source", cluster.clone()),
        };
        let labels = RequestLabels {
            reporter,
            source_workload: match self.listener.direction {
                Direction::Outbound => shared.node.workload.clone(),
                Direction::Inbound => shared.unknown.clone(),
            },
            source_principal: x
                .peer_identity
                .clone()
                .unwrap_or_else(|| shared.unknown.clone()),
            destination_workload: match self.listener.direction {
                Direction::Inbound => shared.node.workload.clone(),
                Direction::Outbound => shared.unknown.clone(),
            },
            destination_principal: x
                .destination_principal
                .clone()
                .unwrap_or_else(|| shared.unknown.clone()),
            destination_service: dest_service,
            request_protocol: if x.protocol == "HTTP/2" {
                "http2"
            } else {
                "http"
            },
            response_code: self.status,
            response_flags: if flags.is_empty() {
                shared.no_flags.clone()
            } else {
                Arc::from(&*flags_str)
            },
            route: route.clone(),
            cluster: cluster.clone(),
        };
        shared.metrics.record_request(
            labels,
            duration.as_secs_f64() * 1000.0,
            x.bytes_in.load(Ordering::Relaxed),
            bytes_out,
        );

        if shared.access_log.enabled() {
            let trace_id = x.trace_ids.map(|t| t.trace_hex());
            let span_id = x.trace_ids.map(|t| t.span_hex());
            let filters_ran = chain
                .as_ref()
                .map(ChainRun::filters_ran)
                .unwrap_or_default();
            shared.access_log.log(&Entry {
                time: now_rfc3339(),
                listener: &self.listener.name,
                method: x.method.as_str(),
                authority: &x.authority,
                path: x.original_uri.path_and_query().map_or("/", |p| p.as_str()),
                protocol: x.protocol,
                status: self.status,
                response_flags: &flags_str,
                bytes_received: x.bytes_in.load(Ordering::Relaxed),
                bytes_sent: bytes_out,
                duration_ms: (duration.as_secs_f64() * 1e6).round() / 1e3,
                upstream: x.endpoint.as_ref().map(|e| e.addr.to_string()),
                route: x.route.as_deref(),
                cluster: x.cluster.as_ref().map(|c| &*c.name),
                request_id: x.request_id.as_deref().unwrap_or_default(),
                client_address: x.client.ip().to_string(),
                user_agent: x.user_agent.as_ref().and_then(|v| v.to_str().ok()),
                reason: x.reason.as_deref(),
                filters: &filters_ran,
                attributes: chain.as_ref().map_or(&[], |c| c.attributes()),
                peer_identity: x.peer_identity.as_deref(),
                trace_id: trace_id.as_deref(),
                span_id: span_id.as_deref(),
                local_response: chain
                    .as_ref()
                    .and_then(ChainRun::local_response)
                    .map(|(filter, status)| LocalResponseLog { filter, status }),
            });
        }
    }
}

/// Turn a proxy error into its answer, and note flag and reason for the log.
fn local_error(e: ProxyError, x: &mut Exchange) -> Response<Body> {
    let (status, flag) = e.status_and_flag();
    x.flags.push(flag.to_string());
    let reason = e.to_string();
    let mut resp = Response::new(full(Bytes::from(format!("{reason}\n"))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if matches!(
        e,
        ProxyError::BadRequest(_)
            | ProxyError::DownstreamBody(_)
            | ProxyError::StreamIdleTimeout
            | ProxyError::ConnectUnsupported
    ) {
        // The connection's framing may be unreliable after a bad request (after a CONNECT,
        // the client may already be sending what it meant for the tunnel).
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    x.reason = Some(reason);
    resp
}

/// A filter's local answer.
fn local_response(local: LocalResponse, x: &mut Exchange) -> Response<Body> {
    if let Some(flag) = &local.flag {
        x.flags.push(flag.clone());
    }
    let mut resp = Response::new(full(local.body));
    *resp.status_mut() = local.status;
    *resp.headers_mut() = local.headers;
    resp
}

/// One valid host per request (RFC 9112 §3.2): several Host lines, none in HTTP/1.1, or an
/// invalid one is a 400, since routing and the upstream could otherwise disagree on which
/// host was meant.
fn check_host(parts: &http::request::Parts) -> Result<(), ProxyError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let host = hosts.next();
    match (host, hosts.next()) {
        (_, Some(_)) => return Err(ProxyError::BadRequest("multiple Host headers")),
        (None, None) if parts.version == Version::HTTP_11 && parts.uri.authority().is_none() => {
            return Err(ProxyError::BadRequest("missing Host header"))
        }
        _ => {}
    }
    // What routing will use (`request_authority`): the URI's authority, else Host.
    let authority = match (parts.uri.authority(), host) {
        (Some(a), _) => a.as_str().as_bytes(),
        (None, Some(h)) => h.as_bytes(),
        (None, None) => return Ok(()),
    };
    if valid_authority(authority) {
        Ok(())
    } else {
        Err(ProxyError::BadRequest("invalid Host"))
    }
}

/// The bytes of an RFC 3986 reg-name (unreserved, sub-delims, `%`), as a table: this runs
/// on every request.
const REG_NAME: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
                    | b'%'
            );
        i += 1;
    }
    t
};

/// `uri-host [":" port]` (RFC 9110 §7.2, RFC 3986 §3.2.2): no userinfo (`x@admin.local`,
/// which HTTP/2 forbids too, RFC 9113 §8.3.1), no path or backslash, a port of digits. A
/// route on `admin.local` must not be passed by a host an upstream may read as
/// `admin.local` after all.
fn valid_authority(a: &[u8]) -> bool {
    let (host_ok, rest) = match a.split_first() {
        Some((b'[', after)) => match after.iter().position(|&c| c == b']') {
            Some(end) => (
                end > 0
                    && after[..end]
                        .iter()
                        .all(|&c| c.is_ascii_hexdigit() || c == b':' || c == b'.'),
                &after[end + 1..],
            ),
            None => return false,
        },
        _ => {
            // One pass: the name up to the port's colon.
            let mut end = a.len();
            for (i, &c) in a.iter().enumerate() {
                if c == b':' {
                    end = i;
                    break;
                }
                if !REG_NAME[usize::from(c)] {
                    return false;
                }
            }
            (true, &a[end..])
        }
    };
    host_ok
        && match rest.split_first() {
            None => true,
            Some((b':', port)) => port.iter().all(u8::is_ascii_digit),
            Some(_) => false,
        }
}

/// A target this proxy can forward. CONNECT asks for a tunnel: forwarded as a request, an
/// upstream's 2xx would turn the client's connection into a tunnel the proxy still parses
/// as HTTP. An HTTP/2 request needs a `:path` (RFC 9113 §8.3.1), which the h2 crate does
/// not insist on; without `:authority` either, its URI is empty (it would have gone on as
/// a request for `/`). With `:authority` and `:scheme`, the URI cannot tell a missing
/// `:path` from `/`, and `/` is what is forwarded.
fn check_target(parts: &http::request::Parts) -> Result<(), ProxyError> {
    if parts.method == http::Method::CONNECT {
        return Err(ProxyError::ConnectUnsupported);
    }
    if parts.uri.path().is_empty() {
        return Err(ProxyError::BadRequest("missing path"));
    }
    Ok(())
}

fn strip_internal_headers(h: &mut HeaderMap) {
    let internal: Vec<HeaderName> = h
        .keys()
        .filter(|n| n.as_str().starts_with(INTERNAL_PREFIX))
        .cloned()
        .collect();
    for n in internal {
        h.remove(n);
    }
}

fn ensure_request_id(h: &mut HeaderMap) -> Arc<str> {
    if let Some(id) = h.get(&X_REQUEST_ID).and_then(|v| v.to_str().ok()) {
        if !id.is_empty() && id.len() <= 128 {
            return Arc::from(id);
        }
    }
    // A v4 UUID from the thread-local generator: no syscall per request, and rendered
    // into a stack buffer rather than through `Display`.
    let mut buf = uuid::Uuid::encode_buffer();
    let id: &str = uuid::Builder::from_random_bytes(crate::rng::random::<u128>().to_le_bytes())
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut buf);
    if let Ok(v) = HeaderValue::from_str(id) {
        h.insert(X_REQUEST_ID.clone(), v);
    }
    Arc::from(id)
}

/// The client address policy uses: the connection's peer, or, when the listener trusts N
/// proxies in front of it, the address N hops from the right of `x-forwarded-for`.
fn client_address(h: &HeaderMap, peer: SocketAddr, trusted_hops: u32) -> SocketAddr {
    if trusted_hops == 0 {
        return peer;
    }
    let all: Vec<&str> = h
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let idx = all.len().checked_sub(trusted_hops as usize);
    match idx
        .and_then(|i| all.get(i))
        .and_then(|s| s.parse::<std::net::IpAddr>().ok())
    {
        Some(ip) => SocketAddr::new(ip, 0),
        None => peer,
    }
}

/// `host:port`, `[v6]:port` or a bare host → the host part.
fn host_without_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => authority,
    }
}

fn request_authority(parts: &http::request::Parts) -> Option<&str> {
    parts.uri.authority().map(|a| a.as_str()).or_else(|| {
        parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
    })
}

fn split_path(uri: &Uri) -> (&str, Option<&str>) {
    match uri.path_and_query() {
        Some(pq) => (pq.path(), pq.query()),
        None => ("/", None),
    }
}

fn set_path(uri: &mut Uri, path: &str, query: Option<&str>) {
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut p = std::mem::take(uri).into_parts();
    if let Ok(pq) = http::uri::PathAndQuery::try_from(pq) {
        p.path_and_query = Some(pq);
    }
    *uri = Uri::from_parts(p).unwrap_or_default();
}

/// A protocol switch the proxy splices through (WebSocket and the like). `h2c` is not one:
/// an upstream that switched would carry the client's next requests inside the tunnel,
/// past this proxy's routes and filters ("h2c smuggling"); RFC 9113 §3.1 retired that
/// upgrade anyway. Such a request goes on as a plain request, its `Upgrade` and
/// `HTTP2-Settings` removed as hop-by-hop.
fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION)
            .iter()
            .any(|v| crate::text::has_token(v.as_bytes(), b"upgrade"))
        && !h
            .get_all(header::UPGRADE)
            .iter()
            .any(|v| crate::text::has_token(v.as_bytes(), b"h2c"))
}

/// Remove hop-by-hop headers (RFC 9110 §7.6.1), including those named in `Connection`.
/// `keep_upgrade` leaves `Connection: upgrade` and `Upgrade` for a protocol switch.
/// `Trailer` stays: it is end-to-end (it announces the trailer fields, which pass).
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of these: one pass over the names (cheap comparisons of
    // standard headers) saves a dozen hashed removals per message.
    let any = h.keys().any(|n| {
        n == header::CONNECTION
            || n == header::TE
            || n == header::TRANSFER_ENCODING
            || n == header::UPGRADE
            || n == header::PROXY_AUTHENTICATE
            || n == header::PROXY_AUTHORIZATION
            || n == KEEP_ALIVE
            || n == PROXY_CONNECTION
    });
    if !any {
        return;
    }
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|n| !(keep_upgrade && n == header::UPGRADE))
        .collect();
    for n in named {
        h.remove(n);
    }
    if !keep_upgrade {
        h.remove(header::CONNECTION);
        h.remove(header::UPGRADE);
    }
    h.remove(&KEEP_ALIVE);
    h.remove(&PROXY_CONNECTION);
    h.remove(header::TRANSFER_ENCODING);
    h.remove(header::PROXY_AUTHENTICATE);
    h.remove(header::PROXY_AUTHORIZATION);
    // `TE: trailers` is the one TE value that must pass (gRPC needs it).
    let te_trailers = h
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
        });
    h.remove(header::TE);
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Turn the (filtered) client request into what the upstream receives. Each step leaves
/// alone what it need not change: most requests keep their Host header, path and URI as
/// they came, without a copy.
fn prepare_upstream_request(
    parts: &mut http::request::Parts,
    route: &Route,
    cluster: &Cluster,
    endpoint: &Endpoint,
    conn: &ConnInfo,
    x: &Exchange,
    upgrade: bool,
) {
    let h = &mut parts.headers;
    strip_hop_by_hop(h, upgrade);
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    // Forwarding headers: append the peer to x-forwarded-for; say how the client came in.
    // The hop that connected to us, not the client chosen from x-forwarded-for (Envoy's rule).
    let xff = append_forwarded_for(h, &conn.peer_ip);
    h.insert(X_FORWARDED_FOR.clone(), xff);
    if !h.contains_key(&X_FORWARDED_PROTO) {
        h.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(conn.scheme()),
        );
    }
    // The Host header: rewritten, or the authority we routed on (HTTP/2 clients send
    // :authority only; an absolute-form URI's authority wins over Host, RFC 9112 §3.2.2), so
    // the upstream never sees a different host than routing did.
    if let Some(host) = &route.host_rewrite {
        h.insert(header::HOST, host.clone());
    } else if !x.authority.is_empty()
        && h.get(header::HOST).map(HeaderValue::as_bytes) != Some(x.authority.as_bytes())
    {
        if let Ok(v) = HeaderValue::from_str(&x.authority) {
            h.insert(header::HOST, v);
        }
    }
    route.request_headers.apply(h);

    // The path as it stands now (normalized, perhaps changed by a filter), with the
    // route's prefix rewrite.
    let pq = match (&route.prefix_rewrite, parts.uri.path_and_query()) {
        (Some((old, new)), Some(pq)) => match pq.path().strip_prefix(old.as_str()) {
            Some(rest) => {
                let mut p = format!("{new}{rest}");
                if !p.starts_with('/') {
                    p.insert(0, '/');
                }
                if let Some(q) = pq.query() {
                    p.push('?');
                    p.push_str(q);
                }
                http::uri::PathAndQuery::try_from(p).unwrap_or_else(|_| pq.clone())
            }
            None => pq.clone(),
        },
        (_, Some(pq)) => pq.clone(),
        (_, None) => http::uri::PathAndQuery::from_static("/"),
    };
    // The pool dials the endpoint; the URI carries what the upstream should see: origin-form
    // for HTTP/1.1, and for HTTP/2 an :authority equal to the Host we send (RFC 9113 §8.3.1).
    parts.uri = match cluster.spec.protocol {
        crate::config::UpstreamProtocol::Http1 => Uri::from(pq),
        crate::config::UpstreamProtocol::Http2 => {
            let host = parts
                .headers
                .get(header::HOST)
                .and_then(|v| http::uri::Authority::try_from(v.as_bytes()).ok())
                .unwrap_or_else(|| endpoint.authority.clone());
            Uri::builder()
                .scheme("http")
                .authority(host)
                .path_and_query(pq)
                .build()
                .unwrap_or_default()
        }
    };
    if parts.version == Version::HTTP_2
        && cluster.spec.protocol == crate::config::UpstreamProtocol::Http1
    {
        join_cookie_crumbs(&mut parts.headers);
    }
    parts.version = match cluster.spec.protocol {
        crate::config::UpstreamProtocol::Http1 => Version::HTTP_11,
        crate::config::UpstreamProtocol::Http2 => Version::HTTP_2,
    };
}

/// HTTP/2 clients may send each cookie as its own `cookie` field (browsers do, for HPACK);
/// an HTTP/1.1 upstream must get them as one line, joined by "; " (RFC 9113 §8.2.3).
fn join_cookie_crumbs(h: &mut HeaderMap) {
    let mut crumbs = h.get_all(header::COOKIE).iter();
    let Some(first) = crumbs.next() else {
        return;
    };
    let mut rest = crumbs.peekable();
    if rest.peek().is_none() {
        return;
    }
    let mut joined = first.as_bytes().to_vec();
    for c in rest {
        joined.extend_from_slice(b"; ");
        joined.extend_from_slice(c.as_bytes());
    }
    // Joined valid values with "; " are a valid value.
    if let Ok(v) = HeaderValue::from_bytes(&joined) {
        h.insert(header::COOKIE, v);
    }
}

/// `x-forwarded-for` with `hop` appended: every value the client sent (several header
/// lines count as one comma-separated list, RFC 9110 §5.3), then `hop`.
fn append_forwarded_for(h: &HeaderMap, hop: &HeaderValue) -> HeaderValue {
    let mut prev = h
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter(|v| !v.as_bytes().trim_ascii().is_empty());
    let Some(first) = prev.next() else {
        return hop.clone();
    };
    let mut joined = bytes::BytesMut::with_capacity(first.len() + hop.len() + 2);
    joined.extend_from_slice(first.as_bytes());
    for v in prev {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(v.as_bytes());
    }
    joined.extend_from_slice(b", ");
    joined.extend_from_slice(hop.as_bytes());
    // Joined from valid values with ", ": valid too; fall back to the hop alone if not.
    HeaderValue::from_maybe_shared(joined.freeze()).unwrap_or_else(|_| hop.clone())
}

/// Read a whole body into memory, up to `limit` bytes (filters asked to see it).
async fn buffer_body(body: Body, limit: usize) -> Result<Bytes, ProxyError> {
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                Err(ProxyError::RequestBodyTooLarge)
            } else {
                Err(ProxyError::from_request_body(&*e))
            }
        }
    }
}

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

enum BodyEnd {
    Complete,
    Error,
    /// The upstream's body stalled past the stream idle timeout.
    IdleTimeout,
    Abandoned,
}

pin_project_lite::pin_project! {
    /// Counts the bytes of a body as they stream; on the end of the body (or its drop,
    /// when the peer goes away) runs the request's completion: log and metrics.
    struct CountingBody {
        #[pin]
        inner: Body,
        count: Arc<AtomicU64>,
        done: Option<Done>,
        errored: bool,
        // The body below failed with `StreamIdle` (see `crate::idle`).
        idle_timed_out: bool,
    }
    impl PinnedDrop for CountingBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(done) = this.done.take() {
                // hyper stops polling a body of known length after its last byte, so "at
                // its end" counts as complete even if `None` was never seen.
                let end = if *this.idle_timed_out {
                    BodyEnd::IdleTimeout
                } else if *this.errored {
                    BodyEnd::Error
                } else if this.inner.is_end_stream() {
                    BodyEnd::Complete
                } else {
                    BodyEnd::Abandoned
                };
                done.complete(this.count.load(Ordering::Relaxed), end);
            }
        }
    }
}

impl CountingBody {
    fn new(inner: Body, count: Arc<AtomicU64>, done: Option<Done>) -> Self {
        let mut b = Self {
            inner,
            count,
            done,
            errored: false,
            idle_timed_out: false,
        };
        // An empty body is never polled to its end: complete right away.
        if b.inner.is_end_stream() {
            if let Some(done) = b.done.take() {
                done.complete(0, BodyEnd::Complete);
            }
        }
        b
    }
}

impl http_body::Body for CountingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let r = this.inner.poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.count.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
            }
            Poll::Ready(Some(Err(e))) => {
                *this.errored = true;
                *this.idle_timed_out = e.is::<crate::error::StreamIdle>();
            }
            Poll::Ready(None) => {
                if let Some(done) = this.done.take() {
                    done.complete(this.count.load(Ordering::Relaxed), BodyEnd::Complete);
                }
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_removed_te_trailers_kept() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers, deflate"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        assert!(h.get("x-secret").is_none());
        assert!(h.get("keep-alive").is_none());
        assert!(h.get(header::CONNECTION).is_none());
        assert_eq!(
            h.get(header::TE).map(|v| v.as_bytes()),
            Some(&b"trailers"[..])
        );
        assert!(h.get("x-kept").is_some());
    }

    #[test]
    fn authorities() {
        for ok in [
            "admin.local",
            "admin.local:8080",
            "admin.local:",
            "ADMIN.local.",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:443",
            "[2001:db8::1]",
            "a-b_c~d.e!f$g&h'i(j)k*l+m,n;o=p%41",
            "",
        ] {
            assert!(valid_authority(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "x@admin.local",
            "admin.local@evil",
            "admin.local/x",
            "admin.local\\x",
            "admin.local:abc",
            "admin.local:80:80",
            "admin local",
            "[::1",
            "[]",
            "[::1]x",
            "[::1]:8x",
            "[zz]",
            "admin.local\u{7f}",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn cookie_crumbs_are_joined() {
        let mut h = HeaderMap::new();
        join_cookie_crumbs(&mut h);
        assert!(h.is_empty());
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        join_cookie_crumbs(&mut h);
        assert_eq!(
            h.get_all(header::COOKIE).iter().collect::<Vec<_>>(),
            ["a=1"]
        );
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        h.append(header::COOKIE, HeaderValue::from_static("c=3"));
        join_cookie_crumbs(&mut h);
        assert_eq!(
            h.get_all(header::COOKIE).iter().collect::<Vec<_>>(),
            ["a=1; b=2; c=3"]
        );
    }

    #[test]
    fn xff_trusted_hops() {
        let mut h = HeaderMap::new();
        h.insert(
            &X_FORWARDED_FOR,
            HeaderValue::from_static("1.1.1.1, 10.0.0.1, 10.0.0.2"),
        );
        let peer: SocketAddr = "127.0.0.1:5000".parse().expect("addr");
        assert_eq!(client_address(&h, peer, 0), peer);
        assert_eq!(client_address(&h, peer, 1).ip().to_string(), "10.0.0.2");
        assert_eq!(client_address(&h, peer, 3).ip().to_string(), "1.1.1.1");
        assert_eq!(client_address(&h, peer, 4), peer);
    }
}
