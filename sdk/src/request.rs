//! [`Request`]: the request a hook works on. A request exists only inside a hook, so its
//! recorded writes always have a hook to go with.
//! Reads and header changes go to the host
//! as they happen; writes that answer nothing (properties, attributes, flags, response
//! headers) are recorded and applied by the host when the hook returns, in order.

use crate::bindings::wasmesh::filter::http::Request as RawRequest;
use crate::effects;

/// The downstream request being proxied, valid during the hook it was passed to. Every
/// method of the WIT `request` resource is available (through `Deref`), e.g.
/// [`header`](RawRequest::header) and [`set_header`](RawRequest::set_header); the methods
/// below add the batched writes and serve prefetched data.
///
/// ```ignore
/// fn on_request_headers(&mut self, req: &Request) -> Action {
///     if req.header("x-debug").is_some() {
///         req.set_attribute("debug", "1");
///     }
///     Action::Continue
/// }
/// ```
#[repr(transparent)]
pub struct Request(RawRequest);

impl std::ops::Deref for Request {
    type Target = RawRequest;
    fn deref(&self) -> &RawRequest {
        &self.0
    }
}

impl Request {
    pub(crate) fn wrap(raw: &RawRequest) -> &Request {
        // SAFETY: `Request` is `repr(transparent)` over `RawRequest`, so the two
        // references have the same layout and lifetime.
        unsafe { &*(raw as *const RawRequest as *const Request) }
    }

    /// Host-generated request id; key per-request state by it.
    ///
    /// ```ignore
    /// self.started.insert(req.id(), wasmesh_sdk::monotonic_nanos());
    /// ```
    pub fn id(&self) -> String {
        effects::prefetched(|p| p.id.clone()).unwrap_or_else(|| self.0.id())
    }

    /// HTTP method, e.g. "GET".
    ///
    /// ```ignore
    /// let read_only = matches!(req.method().as_str(), "GET" | "HEAD");
    /// ```
    pub fn method(&self) -> String {
        effects::prefetched(|p| p.method.clone()).unwrap_or_else(|| self.0.method())
    }

    /// The path, without the query.
    ///
    /// ```ignore
    /// if req.path().starts_with("/admin/") { /* ... */ }
    /// ```
    pub fn path(&self) -> String {
        effects::prefetched(|p| p.path.clone()).unwrap_or_else(|| self.0.path())
    }

    /// Replace the path (and query, if `path` has a '?') sent upstream. Request hooks only.
    ///
    /// ```ignore
    /// req.set_path("/v2/orders")?;
    /// ```
    pub fn set_path(&self, path: &str) -> Result<(), String> {
        effects::forget_path();
        self.0.set_path(path)
    }

    /// Address of the downstream client, `IP:PORT`.
    ///
    /// ```ignore
    /// let client = req.source_address();
    /// ```
    pub fn source_address(&self) -> String {
        effects::prefetched(|p| p.source_address.clone()).unwrap_or_else(|| self.0.source_address())
    }

    /// A value put in the request's bag by this hook, an earlier hook or an earlier filter.
    ///
    /// ```ignore
    /// let user = req.get_property("jwt.sub");
    /// ```
    pub fn get_property(&self, key: &str) -> Option<String> {
        effects::pending_property(key).or_else(|| self.0.get_property(key))
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
}
