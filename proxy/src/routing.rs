//! Routes: matching a request to a route, and the route's actions.
//!
//! A listener's routes are tried in order and the first match wins (as in Envoy). Matching
//! runs on the *normalized* path (see [`normalize_path`]), so `/a/../admin` and `//admin`
//! cannot slip past a route or a later access rule; the access log keeps the original.

use crate::cluster::Cluster;
use crate::config::{EscapedSlashes, HeaderMutationSpec, PathNormalizationSpec, RouteSpec};
use crate::filters::Chain;
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use regex::Regex;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A compiled route.
pub struct Route {
    pub name: Arc<str>,
    /// The path the route matches as a low-cardinality template (`http.route` in spans):
    /// the exact path, `PREFIX*`, or the regex.
    pub template: Arc<str>,
    matcher: RouteMatch,
    pub action: RouteAction,
    pub prefix_rewrite: Option<(String, String)>,
    pub host_rewrite: Option<HeaderValue>,
    pub request_headers: HeaderMutation,
    pub response_headers: HeaderMutation,
    /// None: no timeout.
    pub timeout: Option<Duration>,
    pub chain: Chain,
    pub retry: Option<crate::retry::RetryPolicy>,
    pub mirrors: Vec<crate::mirror::MirrorPolicy>,
    /// What a hashing load balancer hashes for this route's requests.
    pub hash_policy: crate::lb::HashPolicy,
    /// Which region serves a request (None: the proxy's own locality).
    pub locality_routing: Option<crate::lb::LocalityRouting>,
}

pub enum RouteAction {
    Cluster(Arc<Cluster>),
    Weighted {
        clusters: Vec<(Arc<Cluster>, u32)>,
        total: u32,
    },
    Redirect {
        scheme: Option<String>,
        host: Option<String>,
        path: Option<String>,
        status: StatusCode,
    },
    Direct {
        status: StatusCode,
        body: bytes::Bytes,
        headers: HeaderMap,
    },
}

impl RouteAction {
    /// The cluster for this request (weighted clusters: chosen by weight).
    pub fn pick_cluster(&self) -> Option<&Arc<Cluster>> {
        match self {
            RouteAction::Cluster(c) => Some(c),
            RouteAction::Weighted { clusters, total } => {
                let mut r = rand::random_range(0..*total);
                for (c, w) in clusters {
                    if r < *w {
                        return Some(c);
                    }
                    r -= w;
                }
                clusters.last().map(|(c, _)| c)
            }
            _ => None,
        }
    }
}

enum PathMatch {
    Any,
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

enum ValueMatch {
    Exact(String),
    Regex(Regex),
    Present(bool),
}

impl ValueMatch {
    fn matches(&self, v: Option<&str>) -> bool {
        match (self, v) {
            (ValueMatch::Present(p), v) => *p == v.is_some(),
            (ValueMatch::Exact(e), Some(v)) => e == v,
            (ValueMatch::Regex(r), Some(v)) => r.is_match(v),
            (_, None) => false,
        }
    }
}

struct RouteMatch {
    authority: Option<AuthorityMatch>,
    path: PathMatch,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, ValueMatch)>,
    query: Vec<(String, ValueMatch)>,
}

enum AuthorityMatch {
    Exact(String),
    /// `*.suffix`: stored as `.suffix`.
    Suffix(String),
}

/// What a route looks at, prepared once per request.
pub struct RequestView<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a Method,
    pub headers: &'a HeaderMap,
}

impl RouteMatch {
    fn matches(&self, r: &RequestView<'_>) -> bool {
        if let Some(a) = &self.authority {
            let ok = match a {
                AuthorityMatch::Exact(h) => r.host.eq_ignore_ascii_case(h),
                AuthorityMatch::Suffix(s) => {
                    r.host.len() > s.len() && r.host.to_ascii_lowercase().ends_with(s.as_str())
                }
            };
            if !ok {
                return false;
            }
        }
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => r.path == p,
            PathMatch::Prefix(p) => r.path.starts_with(p.as_str()),
            PathMatch::Regex(re) => re.is_match(r.path),
        };
        if !path_ok {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.contains(r.method) {
            return false;
        }
        for (name, m) in &self.headers {
            // Several values of one header are matched joined by ',' (RFC 9110 §5.3).
            let joined;
            let mut it = r.headers.get_all(name).iter();
            let v = match (it.next(), it.next()) {
                (None, _) => None,
                (Some(v), None) => v.to_str().ok(),
                (Some(_), Some(_)) => {
                    joined = r
                        .headers
                        .get_all(name)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect::<Vec<_>>()
                        .join(",");
                    Some(joined.as_str())
                }
            };
            if !m.matches(v) {
                return false;
            }
        }
        for (name, m) in &self.query {
            let v = r.query.and_then(|q| query_param(q, name));
            if !m.matches(v.as_deref()) {
                return false;
            }
        }
        true
    }
}

/// The value of the first parameter of `query` named `name`, as Envoy's route matcher reads
/// it: keys and values percent-decoded (`?user=j%C3%B6rg` matches `jörg`, and `?%61=1` is
/// parameter `a`), `+` kept as it is. A `%` not followed by two hex digits stays literal.
fn query_param<'q>(query: &'q str, name: &str) -> Option<Cow<'q, str>> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (percent_decode(k) == name).then(|| percent_decode(v))
    })
}

/// `%XX` sequences decoded; borrowed when there are none. Decoded bytes that are not
/// UTF-8 are replaced (U+FFFD), so that a value can still be compared and matched.
fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        let hex = |j: usize| b.get(j).and_then(|d| (*d as char).to_digit(16));
        match (c, hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                // Two hex digits: at most 0xff.
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(u8::MAX));
                i += 3;
            }
            _ => {
                out.push(c);
                i += 1;
            }
        }
    }
    match String::from_utf8(out) {
        Ok(text) => Cow::Owned(text),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    }
}

/// Request or response header edits of a route.
#[derive(Default)]
pub struct HeaderMutation {
    add: Vec<(HeaderName, HeaderValue)>,
    set: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderMutation {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }

    fn build(spec: &HeaderMutationSpec) -> Result<Self, String> {
        let pair = |(k, v): (&String, &String)| -> Result<(HeaderName, HeaderValue), String> {
            Ok((
                HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header `{k}`: {e}"))?,
                HeaderValue::from_str(v).map_err(|e| format!("header `{k}`: {e}"))?,
            ))
        };
        Ok(Self {
            add: spec.add.iter().map(pair).collect::<Result<_, _>>()?,
            set: spec.set.iter().map(pair).collect::<Result<_, _>>()?,
            remove: spec
                .remove
                .iter()
                .map(|k| {
                    HeaderName::from_bytes(k.as_bytes()).map_err(|e| format!("header `{k}`: {e}"))
                })
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Resolves a route's `filters` (None: the listener's default chain) to a chain.
pub type ChainFor<'a> = dyn Fn(Option<&Vec<String>>) -> Result<Chain, String> + 'a;

/// A listener's ordered routes.
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    /// Compile routes from a validated manifest. Errors here mean validation missed something.
    pub fn build(
        listener: &str,
        specs: &[RouteSpec],
        clusters: &HashMap<String, Arc<Cluster>>,
        chain_for: &ChainFor<'_>,
    ) -> Result<Self, String> {
        let mut routes = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            let ctx = |e: String| format!("listener `{listener}` route {i}: {e}");
            let name: Arc<str> = Arc::from(
                s.name
                    .clone()
                    .unwrap_or_else(|| format!("{listener}/{i}"))
                    .as_str(),
            );
            let cluster = |n: &str| {
                clusters
                    .get(n)
                    .cloned()
                    .ok_or_else(|| ctx(format!("unknown cluster `{n}`")))
            };
            let action = if let Some(c) = &s.cluster {
                RouteAction::Cluster(cluster(c)?)
            } else if let Some(wc) = &s.weighted_clusters {
                let clusters = wc
                    .iter()
                    .map(|w| Ok((cluster(&w.name)?, w.weight)))
                    .collect::<Result<Vec<_>, String>>()?;
                let total = clusters.iter().map(|(_, w)| *w).sum();
                RouteAction::Weighted { clusters, total }
            } else if let Some(r) = &s.redirect {
                RouteAction::Redirect {
                    scheme: r.scheme.clone(),
                    host: r.host.clone(),
                    path: r.path.clone(),
                    status: StatusCode::from_u16(r.status).map_err(|e| ctx(e.to_string()))?,
                }
            } else if let Some(d) = &s.direct_response {
                let mut headers = HeaderMap::new();
                for (k, v) in &d.headers {
                    headers.append(
                        HeaderName::from_bytes(k.as_bytes()).map_err(|e| ctx(e.to_string()))?,
                        HeaderValue::from_str(v).map_err(|e| ctx(e.to_string()))?,
                    );
                }
                RouteAction::Direct {
                    status: StatusCode::from_u16(d.status).map_err(|e| ctx(e.to_string()))?,
                    body: bytes::Bytes::from(d.body.clone()),
                    headers,
                }
            } else {
                return Err(ctx("no action".into()));
            };
            let m = &s.matcher;
            let re = |r: &str| Regex::new(r).map_err(|e| ctx(e.to_string()));
            let value = |exact: &Option<String>,
                         regex: &Option<String>,
                         present: Option<bool>|
             -> Result<ValueMatch, String> {
                Ok(match (exact, regex, present) {
                    (Some(e), _, _) => ValueMatch::Exact(e.clone()),
                    (_, Some(r), _) => ValueMatch::Regex(re(r)?),
                    (_, _, Some(p)) => ValueMatch::Present(p),
                    _ => ValueMatch::Present(true),
                })
            };
            let matcher = RouteMatch {
                authority: m.authority.as_ref().map(|a| match a.strip_prefix('*') {
                    Some(suffix) => AuthorityMatch::Suffix(suffix.to_ascii_lowercase()),
                    None => AuthorityMatch::Exact(a.to_ascii_lowercase()),
                }),
                path: match (&m.path, &m.prefix, &m.regex) {
                    (Some(p), _, _) => PathMatch::Exact(p.clone()),
                    (_, Some(p), _) => PathMatch::Prefix(p.clone()),
                    (_, _, Some(r)) => PathMatch::Regex(re(&format!("^(?:{r})$"))?),
                    _ => PathMatch::Any,
                },
                methods: m
                    .methods
                    .iter()
                    .map(|x| Method::from_bytes(x.as_bytes()).map_err(|e| ctx(e.to_string())))
                    .collect::<Result<_, _>>()?,
                headers: m
                    .headers
                    .iter()
                    .map(|h| {
                        Ok((
                            HeaderName::from_bytes(h.name.as_bytes())
                                .map_err(|e| ctx(e.to_string()))?,
                            value(&h.exact, &h.regex, h.present)?,
                        ))
                    })
                    .collect::<Result<_, String>>()?,
                query: m
                    .query
                    .iter()
                    .map(|q| Ok((q.name.clone(), value(&q.exact, &q.regex, q.present)?)))
                    .collect::<Result<_, String>>()?,
            };
            let template: Arc<str> = Arc::from(match (&m.path, &m.prefix, &m.regex) {
                (Some(p), _, _) => p.clone(),
                (_, Some(p), _) => format!("{p}*"),
                (_, _, Some(r)) => r.clone(),
                _ => "/*".to_string(),
            });
            routes.push(Route {
                name,
                template,
                matcher,
                action,
                prefix_rewrite: match (&s.prefix_rewrite, &m.prefix) {
                    (Some(new), Some(old)) => Some((old.clone(), new.clone())),
                    _ => None,
                },
                host_rewrite: s
                    .host_rewrite
                    .as_ref()
                    .map(|h| HeaderValue::from_str(h).map_err(|e| ctx(e.to_string())))
                    .transpose()?,
                request_headers: HeaderMutation::build(&s.request_headers).map_err(ctx)?,
                response_headers: HeaderMutation::build(&s.response_headers).map_err(ctx)?,
                timeout: (!s.timeout.is_zero()).then_some(s.timeout),
                chain: chain_for(s.filters.as_ref()).map_err(ctx)?,
                retry: s.retry_policy.as_ref().map(crate::retry::RetryPolicy::new),
                mirrors: s
                    .request_mirror_policies
                    .iter()
                    .map(|m| {
                        Ok(crate::mirror::MirrorPolicy {
                            cluster: cluster(&m.cluster)?,
                            fraction: m.percent / 100.0,
                            max_body: m.max_body_bytes,
                            timeout: m.timeout,
                        })
                    })
                    .collect::<Result<_, String>>()?,
                hash_policy: crate::lb::HashPolicy::build(&s.hash_policy).map_err(ctx)?,
                locality_routing: s
                    .locality_routing
                    .as_ref()
                    .map(crate::lb::LocalityRouting::build)
                    .transpose()
                    .map_err(ctx)?,
            });
        }
        Ok(Self { routes })
    }

    /// The first route that matches.
    pub fn find(&self, req: &RequestView<'_>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matcher.matches(req))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }
}

/// Why a path was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum PathError {
    /// `%2F`/`%5C` with `escaped_slashes: reject`.
    EscapedSlash,
    /// Not an origin-form path.
    Invalid,
}

/// Normalize a request path before routing: decode percent-encoded unreserved characters,
/// remove dot-segments (RFC 3986 §5.2.4, with `%2E` treated as '.'), optionally merge `//`,
/// and apply the listener's policy for encoded slashes. Returns `None` when the path is
/// already normal (the common case allocates nothing).
pub fn normalize_path(
    path: &str,
    opts: &PathNormalizationSpec,
) -> Result<Option<String>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::Invalid);
    }
    // One pass over the bytes decides whether there is anything to do: most paths are
    // clean, and four substring searches cost more than the pass.
    let mut needs_work = false;
    let mut prev = 0u8;
    for &b in path.as_bytes() {
        match b {
            b'%' | b'\\' => needs_work = true,
            b'.' if prev == b'/' => needs_work = true,
            b'/' if prev == b'/' && opts.merge_slashes => needs_work = true,
            _ => {}
        }
        prev = b;
    }
    if !needs_work {
        return Ok(None);
    }
    // 1. Percent-decoding of unreserved characters only (RFC 3986 §6.2.2.2), plus the
    //    configured handling of encoded slashes. Other escapes stay as they are.
    let mut decoded = String::with_capacity(path.len());
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' && i + 2 < bytes.len() {
            let hex = |c: u8| (c as char).to_digit(16);
            match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    let c = (h * 16 + l) as u8;
                    if c == b'/' || c == b'\\' {
                        match opts.escaped_slashes {
                            EscapedSlashes::Reject => return Err(PathError::EscapedSlash),
                            EscapedSlashes::Unescape => decoded.push('/'),
                            EscapedSlashes::Keep => {
                                decoded.push('%');
                                decoded.push(bytes[i + 1].to_ascii_uppercase() as char);
                                decoded.push(bytes[i + 2].to_ascii_uppercase() as char);
                            }
                        }
                    } else if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                        decoded.push(c as char);
                    } else {
                        decoded.push('%');
                        decoded.push(bytes[i + 1].to_ascii_uppercase() as char);
                        decoded.push(bytes[i + 2].to_ascii_uppercase() as char);
                    }
                    i += 3;
                    continue;
                }
                _ => return Err(PathError::Invalid),
            }
        } else if b == b'%' {
            return Err(PathError::Invalid);
        }
        // A backslash is a separator to some upstreams (IIS, some frameworks): treat it as one.
        decoded.push(if b == b'\\' { '/' } else { b as char });
        i += 1;
    }
    // 2. Dot-segment removal over '/'-separated segments.
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    // Dot-segments first, then slash merging, as Envoy orders them: `/a//../b` is `/a/b`.
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    if opts.merge_slashes {
        out.retain(|s| !s.is_empty());
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if result.is_empty() || (trailing && !result.ends_with('/')) {
        result.push('/');
    }
    if result == path {
        Ok(None)
    } else {
        Ok(Some(result))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_parameters_are_percent_decoded() {
        assert_eq!(query_param("a=1&v=2", "v").as_deref(), Some("2"));
        assert_eq!(
            query_param("v=1&v=2", "v").as_deref(),
            Some("1"),
            "first one"
        );
        assert_eq!(query_param("flag&v=2", "flag").as_deref(), Some(""));
        assert_eq!(
            query_param("user=j%C3%B6rg", "user").as_deref(),
            Some("jörg")
        );
        assert_eq!(query_param("%75ser=x", "user").as_deref(), Some("x"));
        assert_eq!(query_param("q=a+b%20c", "q").as_deref(), Some("a+b c"));
        assert_eq!(query_param("q=100%&r=%zz%4", "q").as_deref(), Some("100%"));
        assert_eq!(query_param("r=%zz%4", "r").as_deref(), Some("%zz%4"));
        assert_eq!(query_param("q=%ff", "q").as_deref(), Some("\u{fffd}"));
        assert_eq!(query_param("a=1", "b"), None);
    }

    fn norm(p: &str) -> String {
        normalize_path(p, &PathNormalizationSpec::default())
            .expect("valid")
            .unwrap_or_else(|| p.to_string())
    }

    /// Generated paths, under every option: a normalized path has no dot-segment, no
    /// backslash and (merging) no empty segment, and normalizing it again changes nothing
    /// (a second pass, e.g. by the upstream, must not see a different path).
    #[test]
    fn normalization_is_complete_and_idempotent() {
        const PIECES: &[&str] = &[
            "/", "/", ".", "..", "a", "b", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", "%41", "%25",
            "%252e", "~", "-", "%7e",
        ];
        let mut rng = wasmesh_e2e::generate::Rng(0x2545_f491_4f6c_dd1d);
        for case in 0..20_000 {
            let mut path = String::from("/");
            for _ in 0..1 + rng.below(10) {
                path.push_str(rng.pick::<&str>(PIECES));
            }
            for merge_slashes in [true, false] {
                for escaped_slashes in [
                    EscapedSlashes::Keep,
                    EscapedSlashes::Reject,
                    EscapedSlashes::Unescape,
                ] {
                    let opts = PathNormalizationSpec {
                        merge_slashes,
                        escaped_slashes,
                    };
                    let once = match normalize_path(&path, &opts) {
                        Ok(n) => n.unwrap_or_else(|| path.clone()),
                        Err(_) => continue,
                    };
                    let ctx = format!("case {case}: {path:?} -> {once:?} ({opts:?})");
                    assert!(once.starts_with('/'), "{ctx}");
                    assert!(!once.contains('\\'), "{ctx}");
                    for seg in once.split('/').skip(1) {
                        assert!(seg != "." && seg != "..", "{ctx}");
                    }
                    if merge_slashes {
                        assert!(!once.contains("//"), "{ctx}");
                    }
                    match normalize_path(&once, &opts) {
                        Ok(None) => {}
                        other => panic!("{ctx}: again: {other:?}"),
                    }
                }
            }
        }
    }

    #[test]
    fn dot_segments_and_slashes() {
        assert_eq!(norm("/a/b"), "/a/b");
        assert_eq!(norm("/a/../admin"), "/admin");
        assert_eq!(norm("/a/./b/"), "/a/b/");
        assert_eq!(norm("//admin"), "/admin");
        assert_eq!(norm("/a//b///c"), "/a/b/c");
        assert_eq!(norm("/../../etc/passwd"), "/etc/passwd");
        assert_eq!(norm("/a/%2e%2e/admin"), "/admin");
        assert_eq!(norm("/a/%2E./admin"), "/admin");
        assert_eq!(norm("/%61dmin"), "/admin");
        assert_eq!(norm("/a/.."), "/");
        assert_eq!(norm("/a\\..\\admin"), "/admin");
        assert_eq!(norm("/a%2Fb"), "/a%2Fb");
        assert_eq!(norm("/a%20b"), "/a%20b");
    }

    #[test]
    fn escaped_slash_policies() {
        let mut o = PathNormalizationSpec {
            escaped_slashes: EscapedSlashes::Reject,
            ..Default::default()
        };
        assert_eq!(normalize_path("/a%2fb", &o), Err(PathError::EscapedSlash));
        o.escaped_slashes = EscapedSlashes::Unescape;
        assert_eq!(
            normalize_path("/a/%2F../admin", &o),
            Ok(Some("/a/admin".into()))
        );
        assert_eq!(normalize_path("/a%zz", &o), Err(PathError::Invalid));
        assert_eq!(normalize_path("/a%2", &o), Err(PathError::Invalid));
    }

    #[test]
    fn merge_slashes_off_keeps_empty_segments() {
        let o = PathNormalizationSpec {
            merge_slashes: false,
            ..Default::default()
        };
        assert_eq!(normalize_path("/a//b", &o), Ok(None));
        assert_eq!(normalize_path("/a//../b", &o), Ok(Some("/a/b".into())));
    }
}
