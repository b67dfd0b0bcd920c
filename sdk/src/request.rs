//! [`Request`] and [`Response`]: the request and response a hook works on. They exist
//! only inside a hook, so recorded writes always have a hook to go with. Reads and header
//! changes go to the host as they happen; writes that answer nothing (properties,
//! attributes, flags, response headers) are recorded and applied by the host when the
//! hook returns, in order.

use crate::bindings::wasmesh::filter::{request as raw, response as raw_resp};
use crate::effects::{self, Pre};
use crate::Header;

/// The downstream request being proxied, valid during the hook it was passed to. Reads
/// and changes go to the host when made; the batched writes ([`Request::set_property`]
/// and the like) are applied when the hook returns.
///
/// ```ignore
/// fn on_request_headers(&mut self, req: &Request) -> Action {
///     if req.header("x-debug").is_some() {
///         req.set_attribute("debug", "1");
///     }
///     Action::Continue
/// }
/// ```
pub struct Request {
    /// The host knows which request a hook works on: nothing to carry.
    _private: (),
}

/// The response of a response hook, valid during that hook.
///
/// ```ignore
/// fn on_response_headers(&mut self, _req: &Request, resp: &Response) -> Action {
///     let _ = resp.set_header("x-served-by", "edge");
///     Action::Continue
/// }
/// ```
pub struct Response {
    _private: (),
}

/// Call `f` with the value `which` the host passed with the hook, or else with the one
/// `read` asks the host for.
fn with_value<R>(which: Pre, read: fn() -> String, f: impl FnOnce(&str) -> R) -> R {
    effects::with_prefetched(which, |v| match v {
        Some(v) => f(v),
        None => f(&read()),
    })
}

/// The one request (and response) value hooks are given.
pub(crate) static REQUEST: Request = Request { _private: () };
pub(crate) static RESPONSE: Response = Response { _private: () };

impl Request {
    /// Host-generated request id; key per-request state by it.
    ///
    /// ```ignore
    /// self.started.insert(req.id(), wasmesh_sdk::monotonic_nanos());
    /// ```
    pub fn id(&self) -> String {
        self.with_id(str::to_owned)
    }

    /// [`Request::id`] lent to `f` rather than returned: no copy when the host passed it
    /// with the hook (`Hooks::PASS_ID`). `f` may use the request freely.
    ///
    /// ```ignore
    /// req.with_id(|id| req.set_response_header("x-request-id", id));
    /// ```
    pub fn with_id<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        with_value(Pre::Id, raw::id, f)
    }

    /// HTTP method, e.g. "GET".
    ///
    /// ```ignore
    /// let read_only = matches!(req.method().as_str(), "GET" | "HEAD");
    /// ```
    pub fn method(&self) -> String {
        self.with_method(str::to_owned)
    }

    /// [`Request::method`] lent to `f`: no copy with `Hooks::PASS_METHOD` (see
    /// [`Request::with_id`]).
    ///
    /// ```ignore
    /// let read_only = req.with_method(|m| matches!(m, "GET" | "HEAD"));
    /// ```
    pub fn with_method<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        with_value(Pre::Method, raw::method, f)
    }

    /// The path, without the query.
    ///
    /// ```ignore
    /// if req.path().starts_with("/admin/") { /* ... */ }
    /// ```
    pub fn path(&self) -> String {
        self.with_path(str::to_owned)
    }

    /// [`Request::path`] lent to `f`: no copy with `Hooks::PASS_PATH` (see
    /// [`Request::with_id`]).
    ///
    /// ```ignore
    /// let admin = req.with_path(|p| p.starts_with("/admin/"));
    /// ```
    pub fn with_path<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        with_value(Pre::Path, raw::path, f)
    }

    /// Replace the path (and query, if `path` has a '?') sent upstream. Request hooks only.
    ///
    /// ```ignore
    /// req.set_path("/v2/orders")?;
    /// ```
    pub fn set_path(&self, path: &str) -> Result<(), String> {
        effects::forget_path();
        raw::set_path(path)
    }

    /// Address of the downstream client, `IP:PORT`.
    ///
    /// ```ignore
    /// let client = req.source_address();
    /// ```
    pub fn source_address(&self) -> String {
        self.with_source_address(str::to_owned)
    }

    /// [`Request::source_address`] lent to `f`: no copy with `Hooks::PASS_SOURCE_ADDRESS`
    /// (see [`Request::with_id`]).
    ///
    /// ```ignore
    /// let local = req.with_source_address(|a| a.starts_with("127."));
    /// ```
    pub fn with_source_address<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        with_value(Pre::SourceAddress, raw::source_address, f)
    }

    /// A value put in the request's bag by this hook, an earlier hook or an earlier filter.
    ///
    /// ```ignore
    /// let user = req.get_property("jwt.sub");
    /// ```
    pub fn get_property(&self, key: &str) -> Option<String> {
        effects::pending_property(key).or_else(|| raw::get_property(key))
    }

    /// Put a value in the request's bag, for later filters and later hooks.
    ///
    /// ```ignore
    /// req.set_property("tenant", "acme");
    /// ```
    pub fn set_property(&self, key: &str, value: &str) {
        effects::push(effects::SET_PROPERTY, &[key, value]);
    }

    /// Add an attribute to the request's span and access-log line.
    ///
    /// ```ignore
    /// req.set_attribute("authz.rule", "admins");
    /// ```
    pub fn set_attribute(&self, key: &str, value: &str) {
        effects::push(effects::SET_ATTRIBUTE, &[key, value]);
    }

    /// Record a response flag (e.g. "RL", "FI"), shown in the access log and metrics.
    ///
    /// ```ignore
    /// req.set_response_flag("RL");
    /// ```
    pub fn set_response_flag(&self, flag: &str) {
        effects::push(effects::RESPONSE_FLAG, &[flag]);
    }

    /// Replace response header `name` with `value` on the response to this request,
    /// without implementing `on_response_headers`: from a request hook the host applies it
    /// when the response head arrives (where this filter's response hook would run). Not
    /// applied to local answers. An invalid name or value is skipped (and logged).
    ///
    /// ```ignore
    /// req.set_response_header("x-request-id", &req.id());
    /// ```
    pub fn set_response_header(&self, name: &str, value: &str) {
        effects::push(effects::SET_RESPONSE_HEADER, &[name, value]);
    }

    /// Append a value to response header `name`; see [`Request::set_response_header`].
    ///
    /// ```ignore
    /// req.add_response_header("vary", "x-user");
    /// ```
    pub fn add_response_header(&self, name: &str, value: &str) {
        effects::push(effects::ADD_RESPONSE_HEADER, &[name, value]);
    }

    /// Remove response header `name`; see [`Request::set_response_header`].
    ///
    /// ```ignore
    /// req.remove_response_header("server");
    /// ```
    pub fn remove_response_header(&self, name: &str) {
        effects::push(effects::REMOVE_RESPONSE_HEADER, &[name]);
    }

    /// "http" or "https".
    ///
    /// ```ignore
    /// let secure = req.scheme() == "https";
    /// ```
    pub fn scheme(&self) -> String {
        raw::scheme()
    }

    /// The :authority / Host (with port if given), if any.
    ///
    /// ```ignore
    /// let host = req.authority().unwrap_or_default();
    /// ```
    pub fn authority(&self) -> Option<String> {
        raw::authority()
    }

    /// The query string without '?', if any.
    ///
    /// ```ignore
    /// let debug = req.query().is_some_and(|q| q.contains("debug=1"));
    /// ```
    pub fn query(&self) -> Option<String> {
        raw::query()
    }

    /// The first value of header `name` (case-insensitive), if present.
    ///
    /// ```ignore
    /// let user = req.header("x-user");
    /// ```
    pub fn header(&self, name: &str) -> Option<String> {
        raw::header(name)
    }

    /// Every value of header `name`, in order.
    ///
    /// ```ignore
    /// let forwarded = req.header_all("x-forwarded-for");
    /// ```
    pub fn header_all(&self, name: &str) -> Vec<String> {
        raw::header_all(name)
    }

    /// All headers, in order. Copies every header: prefer [`Request::header`].
    ///
    /// ```ignore
    /// for (name, value) in req.headers() { /* ... */ }
    /// ```
    pub fn headers(&self) -> Vec<Header> {
        raw::headers()
    }

    /// Replace header `name` with one value. Request hooks only. `content-length` and
    /// `transfer-encoding` are refused: the proxy frames the message from its body.
    ///
    /// ```ignore
    /// req.set_header("x-tenant", "acme")?;
    /// ```
    pub fn set_header(&self, name: &str, value: &str) -> Result<(), String> {
        raw::set_header(name, value)
    }

    /// Append a value to header `name`. Same rules as [`set_header`](Self::set_header).
    /// Request hooks only.
    ///
    /// ```ignore
    /// req.add_header("via", "wasmesh")?;
    /// ```
    pub fn add_header(&self, name: &str, value: &str) -> Result<(), String> {
        raw::add_header(name, value)
    }

    /// Remove every value of header `name`. `content-length` and `transfer-encoding` are
    /// refused, as in [`set_header`](Self::set_header). Request hooks only.
    ///
    /// ```ignore
    /// req.remove_header("cookie")?;
    /// ```
    pub fn remove_header(&self, name: &str) -> Result<(), String> {
        raw::remove_header(name)
    }

    /// The buffered request body (in `on_request_body`; empty elsewhere).
    ///
    /// ```ignore
    /// let body = req.body();
    /// ```
    pub fn body(&self) -> Vec<u8> {
        raw::body()
    }

    /// Replace the request body (in `on_request_body`); the host fixes content-length.
    ///
    /// ```ignore
    /// req.set_body(b"{}")?;
    /// ```
    pub fn set_body(&self, body: &[u8]) -> Result<(), String> {
        raw::set_body(body)
    }

    /// The client's verified identity (e.g. a SPIFFE id from mTLS), if any.
    ///
    /// ```ignore
    /// let caller = req.peer_identity();
    /// ```
    pub fn peer_identity(&self) -> Option<String> {
        raw::peer_identity()
    }

    /// Name of the matched route.
    ///
    /// ```ignore
    /// let route = req.route_name();
    /// ```
    pub fn route_name(&self) -> String {
        raw::route_name()
    }

    /// Trace id (32 hex digits) from the request's `traceparent` (or B3) header, if any.
    ///
    /// ```ignore
    /// let trace = req.trace_id();
    /// ```
    pub fn trace_id(&self) -> Option<String> {
        raw::trace_id()
    }

    /// Span id (16 hex digits) of the caller's span, if any.
    ///
    /// ```ignore
    /// let parent = req.span_id();
    /// ```
    pub fn span_id(&self) -> Option<String> {
        raw::span_id()
    }

    /// Send the request to `cluster` (one of the entry's `clusters`) instead of the route's.
    ///
    /// ```ignore
    /// req.set_cluster("canary")?;
    /// ```
    pub fn set_cluster(&self, cluster: &str) -> Result<(), String> {
        raw::set_cluster(cluster)
    }
}

impl Response {
    /// HTTP status.
    ///
    /// ```ignore
    /// let failed = resp.status() >= 500;
    /// ```
    pub fn status(&self) -> u16 {
        raw_resp::status()
    }

    /// Change the status (200..=599, a final one).
    ///
    /// ```ignore
    /// resp.set_status(503)?;
    /// ```
    pub fn set_status(&self, status: u16) -> Result<(), String> {
        raw_resp::set_status(status)
    }

    /// The first value of header `name`, if present.
    ///
    /// ```ignore
    /// let ct = resp.header("content-type");
    /// ```
    pub fn header(&self, name: &str) -> Option<String> {
        raw_resp::header(name)
    }

    /// Every value of header `name`, in order.
    ///
    /// ```ignore
    /// let cookies = resp.header_all("set-cookie");
    /// ```
    pub fn header_all(&self, name: &str) -> Vec<String> {
        raw_resp::header_all(name)
    }

    /// All headers, in order.
    ///
    /// ```ignore
    /// let n = resp.headers().len();
    /// ```
    pub fn headers(&self) -> Vec<Header> {
        raw_resp::headers()
    }

    /// Replace header `name` with one value. `content-length` and `transfer-encoding`
    /// are refused: the proxy frames the message from its body.
    ///
    /// ```ignore
    /// resp.set_header("cache-control", "no-store")?;
    /// ```
    pub fn set_header(&self, name: &str, value: &str) -> Result<(), String> {
        raw_resp::set_header(name, value)
    }

    /// Append a value to header `name`. Same rules as [`set_header`](Self::set_header).
    ///
    /// ```ignore
    /// resp.add_header("vary", "x-user")?;
    /// ```
    pub fn add_header(&self, name: &str, value: &str) -> Result<(), String> {
        raw_resp::add_header(name, value)
    }

    /// Remove every value of header `name`. `content-length` and `transfer-encoding` are
    /// refused, as in [`set_header`](Self::set_header).
    ///
    /// ```ignore
    /// resp.remove_header("server")?;
    /// ```
    pub fn remove_header(&self, name: &str) -> Result<(), String> {
        raw_resp::remove_header(name)
    }

    /// The buffered response body (in `on_response_body`; empty elsewhere).
    ///
    /// ```ignore
    /// let body = resp.body();
    /// ```
    pub fn body(&self) -> Vec<u8> {
        raw_resp::body()
    }

    /// Replace the response body (in `on_response_body`).
    ///
    /// ```ignore
    /// resp.set_body(b"redacted")?;
    /// ```
    pub fn set_body(&self, body: &[u8]) -> Result<(), String> {
        raw_resp::set_body(body)
    }
}
