//! The manifest: loading, validation and the error messages a user sees.
//!
//! Loading happens in two steps. [`parse`] turns the JSON text into [`Manifest`] (serde, with
//! the path of the first syntax or type error). [`validate`] then checks everything serde
//! cannot — references between sections, mutually exclusive fields, regexes, addresses — and
//! returns *every* problem it finds, each naming the file, the path inside it and the
//! problem. The runtime (`crate::server`) only ever builds from a manifest that passed both.

pub mod duration;
pub mod spec;

pub use spec::*;

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// One problem in a manifest, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// Path inside the document, e.g. `listeners[0].routes[2].match.prefix`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() || self.path == "." {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.path,
                self.message
            )
        }
    }
}

/// Every problem found in one manifest.
#[derive(Debug, Clone, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// The most worker threads a manifest may ask for.
const MAX_WORKERS: usize = 1024;
/// The largest connection and request limits: the permits of a semaphore.
const MAX_COUNT: usize = u32::MAX as usize;

/// Read, parse and validate a manifest file.
pub fn load(file: &Path) -> Result<Manifest, ConfigErrors> {
    let text = std::fs::read_to_string(file).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: file.to_path_buf(),
            path: String::new(),
            message: format!("cannot read the manifest: {e}"),
        }])
    })?;
    let mut manifest = parse(file, &text).map_err(|e| ConfigErrors(vec![e]))?;
    let errors = validate(file, &manifest);
    if errors.is_empty() {
        if let Some(tls) = manifest.tracing.as_mut().and_then(|t| t.tls.as_mut()) {
            tls.resolve_paths(file.parent());
        }
        Ok(manifest)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Deeper flow collections than this are refused before the YAML parser sees them: its
/// scanner takes time quadratic in the nesting depth (100,000 `[` took over 20 s), and
/// the deserializer stops at 128 levels anyway.
const MAX_FLOW_DEPTH: usize = 128;

/// The line where YAML flow collections (`[...]`, `{...}`) nest past [`MAX_FLOW_DEPTH`],
/// if they do. Brackets inside quoted scalars and comments do not count.
fn too_deep_flow(text: &str) -> Option<usize> {
    let (mut depth, mut line) = (0usize, 1usize);
    let mut quote: Option<u8> = None;
    let mut prev = b'\n';
    let mut bytes = text.bytes();
    while let Some(b) = bytes.next() {
        match (quote, b) {
            (_, b'\n') => {
                line += 1;
                // A single-quoted or double-quoted scalar may span lines; a comment ends here.
            }
            (Some(b'"'), b'\\') => {
                bytes.next();
            }
            (Some(q), _) if b == q => quote = None,
            (Some(_), _) => {}
            (None, b'\'' | b'"') => quote = Some(b),
            (None, b'#') if prev.is_ascii_whitespace() => {
                // A comment: skip to the end of the line.
                for c in bytes.by_ref() {
                    if c == b'\n' {
                        line += 1;
                        break;
                    }
                }
                prev = b'\n';
                continue;
            }
            (None, b'[' | b'{') => {
                depth += 1;
                if depth > MAX_FLOW_DEPTH {
                    return Some(line);
                }
            }
            (None, b']' | b'}') => depth = depth.saturating_sub(1),
            _ => {}
        }
        prev = b;
    }
    None
}

/// What is accepted in a valid manifest but does nothing, for `wasmesh check` and the log.
pub fn warnings(m: &Manifest) -> Vec<String> {
    let mut w = Vec::new();
    if m.filter_engine.instances_per_worker.is_some() {
        w.push(
            "filter_engine.instances_per_worker is ignored: one instance per filter version \
             and worker thread serves every request of that thread"
                .to_string(),
        );
    }
    w
}

/// Whether a manifest file is YAML (by its extension); anything else is read as JSON.
pub fn is_yaml(file: &Path) -> bool {
    matches!(
        file.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

/// Parse manifest text (YAML for a `.yaml`/`.yml` file, JSON otherwise) into a
/// [`Manifest`]; the error carries the field path serde was at.
pub fn parse(file: &Path, text: &str) -> Result<Manifest, ConfigError> {
    if is_yaml(file) {
        return parse_yaml(file, text);
    }
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!(
                "invalid JSON at line {} column {}: {inner}",
                inner.line(),
                inner.column()
            )
        } else {
            // serde_json appends " at line X column Y"; keep it, it helps in long files.
            inner.to_string()
        };
        ConfigError {
            file: file.to_path_buf(),
            path,
            message,
        }
    })
}

fn parse_yaml(file: &Path, text: &str) -> Result<Manifest, ConfigError> {
    if let Some(line) = too_deep_flow(text) {
        return Err(ConfigError {
            file: file.to_path_buf(),
            path: String::new(),
            message: format!("`[` and `{{` nested more than {MAX_FLOW_DEPTH} deep at line {line}"),
        });
    }
    let de = serde_yaml_ng::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_yaml_ng's message already says where (`at line X column Y`) when it knows,
        // and starts with the field path, which the error prints on its own.
        let text = inner.to_string();
        let text = text
            .strip_prefix(&format!("{path}: "))
            .map(str::to_string)
            .unwrap_or(text);
        let message = match inner.location() {
            Some(l) if !text.contains("line") => {
                format!("{text} at line {} column {}", l.line(), l.column())
            }
            _ => text,
        };
        ConfigError {
            file: file.to_path_buf(),
            path,
            message,
        }
    })
}

/// Collects errors with their paths while walking the manifest.
struct Checker<'a> {
    file: &'a Path,
    errors: Vec<ConfigError>,
}

impl Checker<'_> {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_path_buf(),
            path: path.into(),
            message: message.into(),
        });
    }

    /// `v` must be in `min..=max`: counts the proxy allocates or reserves for up front
    /// (a channel's slots, a semaphore's permits, header slots) are bounded here, so that
    /// a typo cannot abort the process after `wasmesh check` said the manifest was fine.
    fn range(&mut self, path: impl Into<String>, v: usize, min: usize, max: usize) {
        if v < min {
            self.err(path, format!("must be at least {min}"));
        } else if v > max {
            self.err(path, format!("must be at most {max}"));
        }
    }

    fn regex(&mut self, path: String, re: &str) {
        if let Err(e) = regex::Regex::new(re) {
            // regex's message spans several lines (pattern, caret, reason): keep one line
            // per error, with the reason.
            let msg = e.to_string();
            let reason = msg
                .lines()
                .last()
                .unwrap_or_default()
                .trim()
                .trim_start_matches("error: ");
            self.err(path, format!("invalid regex `{re}`: {reason}"));
        }
    }

    fn header_name(&mut self, path: String, name: &str) {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            self.err(path, format!("`{name}` is not a valid header name"));
        }
    }

    fn header_value(&mut self, path: String, value: &str) {
        if http::HeaderValue::from_str(value).is_err() {
            self.err(path, "not a valid header value");
        }
    }
}

/// Check everything the types cannot say. Returns every problem found.
pub fn validate(file: &Path, m: &Manifest) -> Vec<ConfigError> {
    let mut c = Checker {
        file,
        errors: Vec::new(),
    };

    if let Some(w) = m.workers {
        c.range("workers", w, 1, MAX_WORKERS);
    }
    if m.admin.address.parse::<SocketAddr>().is_err() {
        c.err(
            "admin.address",
            format!("`{}` is not an IP:PORT address", m.admin.address),
        );
    }
    c.range(
        "access_log.buffer_lines",
        m.access_log.buffer_lines,
        1,
        1 << 20,
    );
    if let Some(fields) = &m.access_log.fields {
        if fields.is_empty() {
            c.err("access_log.fields", "must name at least one field");
        }
        let mut seen = HashSet::new();
        for (i, f) in fields.iter().enumerate() {
            if !seen.insert(f) {
                c.err(
                    format!("access_log.fields[{i}]"),
                    format!("duplicate field `{}`", f.name()),
                );
            }
        }
    }
    if let Some(t) = &m.tracing {
        check_tracing(&mut c, t);
    }

    // Clusters first, so routes can be checked against their names.
    let mut clusters = HashSet::new();
    for (i, cl) in m.clusters.iter().enumerate() {
        let p = format!("clusters[{i}]");
        check_name(&mut c, format!("{p}.name"), &cl.name);
        if !clusters.insert(cl.name.as_str()) {
            c.err(
                format!("{p}.name"),
                format!("duplicate cluster name `{}`", cl.name),
            );
        }
        if cl.endpoints.is_empty() {
            c.err(
                format!("{p}.endpoints"),
                "a cluster needs at least one endpoint",
            );
        }
        for (j, ep) in cl.endpoints.iter().enumerate() {
            if let Err(msg) = crate::cluster::parse_endpoint_address(&ep.address) {
                c.err(format!("{p}.endpoints[{j}].address"), msg);
            }
            if ep.weight == 0 {
                c.err(format!("{p}.endpoints[{j}].weight"), "must be at least 1");
            }
        }
        let cb = &cl.circuit_breakers;
        for (k, v) in [
            ("max_connections", cb.max_connections),
            ("max_pending_requests", cb.max_pending_requests),
            ("max_requests", cb.max_requests),
        ] {
            c.range(format!("{p}.circuit_breakers.{k}"), v, 1, MAX_COUNT);
        }
        c.range(
            format!("{p}.circuit_breakers.max_retries"),
            cb.max_retries,
            0,
            MAX_COUNT,
        );
        if let Some(b) = &cb.retry_budget {
            if !(b.budget_percent > 0.0 && b.budget_percent <= 100.0) {
                c.err(
                    format!("{p}.circuit_breakers.retry_budget.budget_percent"),
                    "must be more than 0 and at most 100",
                );
            }
        }
        if cl.connect_timeout.is_zero() {
            c.err(format!("{p}.connect_timeout"), "must be more than 0s");
        }
        if let Some(t) = &cl.tls {
            let tp = format!("{p}.tls");
            if t.allowed_identities.is_empty() {
                c.err(
                    format!("{tp}.allowed_identities"),
                    "list the SPIFFE IDs the upstream may present (at least one)",
                );
            }
            check_identities(&mut c, &tp, &t.allowed_identities);
            if let Some(sni) = &t.sni {
                if rustls_pki_types::ServerName::try_from(sni.as_str()).is_err() {
                    c.err(
                        format!("{tp}.sni"),
                        format!("`{sni}` is not a valid server name"),
                    );
                }
            }
            check_tls_files(&mut c, &tp, &t.cert, &t.key, &t.trust_bundle);
        }
        check_cluster_health(&mut c, &p, cl, m.node.locality.region.is_some());
    }
    let tls_clusters: HashSet<&str> = m
        .clusters
        .iter()
        .filter(|cl| cl.tls.is_some())
        .map(|cl| cl.name.as_str())
        .collect();

    let mut filters = HashSet::new();
    for (i, f) in m.filters.iter().enumerate() {
        let p = format!("filters[{i}]");
        check_name(&mut c, format!("{p}.name"), &f.name);
        if !filters.insert(f.name.as_str()) {
            c.err(
                format!("{p}.name"),
                format!("duplicate filter name `{}`", f.name),
            );
        }
        if f.file.is_relative() && m.filter_dir.is_none() {
            c.err(format!("{p}.file"), "a relative path needs `filter_dir`");
        }
        if let Some(h) = &f.sha256 {
            if h.len() != 64 || !h.chars().all(|ch| ch.is_ascii_hexdigit()) {
                c.err(format!("{p}.sha256"), "must be 64 hex digits");
            }
        }
        for (j, cl) in f.clusters.iter().enumerate() {
            if !clusters.contains(cl.as_str()) {
                c.err(
                    format!("{p}.clusters[{j}]"),
                    format!("unknown cluster `{cl}`"),
                );
            }
        }
        if let Some(r) = &f.rollout {
            if r.file.is_relative() && m.filter_dir.is_none() {
                c.err(
                    format!("{p}.rollout.file"),
                    "a relative path needs `filter_dir`",
                );
            }
            if let Some(h) = &r.sha256 {
                if h.len() != 64 || !h.chars().all(|ch| ch.is_ascii_hexdigit()) {
                    c.err(format!("{p}.rollout.sha256"), "must be 64 hex digits");
                }
            }
            if !(r.percent > 0.0 && r.percent <= 100.0) {
                c.err(
                    format!("{p}.rollout.percent"),
                    "must be more than 0 and at most 100",
                );
            }
            if !(0.0..=1.0).contains(&r.max_error_rate) {
                c.err(
                    format!("{p}.rollout.max_error_rate"),
                    "must be between 0 and 1",
                );
            }
        }
    }
    if m.filter_engine.call_deadline.is_zero() {
        c.err("filter_engine.call_deadline", "must be more than 0s");
    }
    // wasm32 memories end at 4 GiB.
    c.range(
        "filter_engine.max_instance_memory_mib",
        m.filter_engine.max_instance_memory_mib,
        1,
        4096,
    );

    if m.listeners.is_empty() {
        c.err("listeners", "at least one listener is needed");
    }
    let mut names = HashSet::new();
    let mut addrs = HashSet::new();
    for (i, l) in m.listeners.iter().enumerate() {
        let p = format!("listeners[{i}]");
        check_name(&mut c, format!("{p}.name"), &l.name);
        if !names.insert(l.name.as_str()) {
            c.err(
                format!("{p}.name"),
                format!("duplicate listener name `{}`", l.name),
            );
        }
        match l.address.parse::<SocketAddr>() {
            Ok(a) => {
                if a.port() != 0 && !addrs.insert(a) {
                    c.err(
                        format!("{p}.address"),
                        format!("address {a} is used by another listener"),
                    );
                }
            }
            Err(_) => c.err(
                format!("{p}.address"),
                format!("`{}` is not an IP:PORT address", l.address),
            ),
        }
        for (j, f) in l.filters.iter().enumerate() {
            if !filters.contains(f.as_str()) {
                c.err(format!("{p}.filters[{j}]"), format!("unknown filter `{f}`"));
            }
        }
        check_limits(&mut c, &p, &l.limits);
        if let Some(t) = &l.tls {
            let tp = format!("{p}.tls");
            if let Some(ids) = &t.allowed_identities {
                if ids.is_empty() {
                    c.err(
                        format!("{tp}.allowed_identities"),
                        "an empty list would refuse everyone; leave it out to accept any identity the trust bundle vouches for",
                    );
                }
                check_identities(&mut c, &tp, ids);
            }
            check_tls_files(&mut c, &tp, &t.cert, &t.key, &t.trust_bundle);
        }
        if let Some(pt) = &l.public_tls {
            let pp = format!("{p}.public_tls");
            if l.tls.is_some() {
                c.err(
                    pp.clone(),
                    "use either `tls` (mesh mTLS) or `public_tls`, not both",
                );
            }
            if pt.certificates.is_empty() {
                c.err(
                    format!("{pp}.certificates"),
                    "needs at least one certificate",
                );
            }
            for (j, ck) in pt.certificates.iter().enumerate() {
                let files =
                    crate::tls::TlsFiles::resolve(&ck.cert, &ck.key, &ck.cert, c.file.parent());
                if let Err(e) = crate::tls::public::load_cert(&files) {
                    c.err(format!("{pp}.certificates[{j}]"), e.to_string());
                }
            }
        }
        let passthrough = l.protocol == ListenerProtocol::TlsPassthrough;
        if !passthrough && !l.sni_routes.is_empty() {
            c.err(
                format!("{p}.sni_routes"),
                "only tls_passthrough listeners take sni_routes",
            );
        }
        if passthrough {
            if l.tls.is_some() || l.public_tls.is_some() {
                c.err(
                    p.clone(),
                    "a tls_passthrough listener does not terminate TLS: remove `tls`/`public_tls`",
                );
            }
            if l.sni_routes.is_empty() && l.cluster.is_none() {
                c.err(
                    format!("{p}.sni_routes"),
                    "a tls_passthrough listener needs sni_routes or a cluster",
                );
            }
            for (j, r) in l.sni_routes.iter().enumerate() {
                let rp = format!("{p}.sni_routes[{j}]");
                if r.server_names.is_empty() {
                    c.err(format!("{rp}.server_names"), "needs at least one name");
                }
                for (k, n) in r.server_names.iter().enumerate() {
                    let bare = n.strip_prefix("*.").unwrap_or(n);
                    if rustls_pki_types::DnsName::try_from(bare).is_err() || bare.contains('*') {
                        c.err(
                            format!("{rp}.server_names[{k}]"),
                            format!("`{n}` is not a DNS name or `*.suffix`"),
                        );
                    }
                }
                if !clusters.contains(r.cluster.as_str()) {
                    c.err(
                        format!("{rp}.cluster"),
                        format!("unknown cluster `{}`", r.cluster),
                    );
                }
                if tls_clusters.contains(r.cluster.as_str()) {
                    c.err(format!("{rp}.cluster"), "passthrough forwards the client's TLS; the cluster must not originate its own");
                }
            }
        }
        match l.protocol {
            ListenerProtocol::Tcp | ListenerProtocol::TlsPassthrough => {
                match &l.cluster {
                    None if passthrough => {}
                    None => c.err(format!("{p}.cluster"), "a tcp listener needs a cluster"),
                    Some(cl) if !clusters.contains(cl.as_str()) => {
                        c.err(format!("{p}.cluster"), format!("unknown cluster `{cl}`"))
                    }
                    Some(_) => {}
                }
                if !l.routes.is_empty() {
                    c.err(format!("{p}.routes"), "a tcp listener has no routes");
                }
                if let Some(cl) = &l.cluster {
                    if passthrough && tls_clusters.contains(cl.as_str()) {
                        c.err(
                            format!("{p}.cluster"),
                            "passthrough forwards the client's TLS; the cluster must not originate its own",
                        );
                    }
                }
            }
            ListenerProtocol::Http => {
                if l.cluster.is_some() {
                    c.err(
                        format!("{p}.cluster"),
                        "only tcp listeners take a cluster; use routes",
                    );
                }
                if l.routes.is_empty() {
                    c.err(
                        format!("{p}.routes"),
                        "an http listener needs at least one route",
                    );
                }
                for (j, r) in l.routes.iter().enumerate() {
                    check_route(&mut c, &format!("{p}.routes[{j}]"), r, &clusters, &filters);
                }
            }
        }
    }
    c.errors
}

/// Outlier detection, health checks, panic threshold, locality and hashing of a cluster.
fn check_cluster_health(c: &mut Checker<'_>, p: &str, cl: &ClusterSpec, node_has_region: bool) {
    if !(0.0..=100.0).contains(&cl.healthy_panic_threshold) {
        c.err(
            format!("{p}.healthy_panic_threshold"),
            "must be a percentage between 0 and 100",
        );
    }
    if let Some(od) = &cl.outlier_detection {
        let op = format!("{p}.outlier_detection");
        if od.interval.is_zero() {
            c.err(format!("{op}.interval"), "must be more than 0s");
        }
        if od.base_ejection_time.is_zero() {
            c.err(format!("{op}.base_ejection_time"), "must be more than 0s");
        }
        if od.max_ejection_time < od.base_ejection_time {
            c.err(
                format!("{op}.max_ejection_time"),
                "must be at least base_ejection_time",
            );
        }
        if !(0.0..=100.0).contains(&od.max_ejection_percent) {
            c.err(
                format!("{op}.max_ejection_percent"),
                "must be a percentage between 0 and 100",
            );
        }
    }
    if let Some(hc) = &cl.health_check {
        let hp = format!("{p}.health_check");
        if !hc.path.starts_with('/') || http::uri::PathAndQuery::try_from(hc.path.as_str()).is_err()
        {
            c.err(format!("{hp}.path"), "must be a path starting with '/'");
        }
        if hc.interval.is_zero() {
            c.err(format!("{hp}.interval"), "must be more than 0s");
        }
        if hc.timeout.is_zero() {
            c.err(format!("{hp}.timeout"), "must be more than 0s");
        }
        if hc.healthy_threshold == 0 {
            c.err(format!("{hp}.healthy_threshold"), "must be at least 1");
        }
        if hc.unhealthy_threshold == 0 {
            c.err(format!("{hp}.unhealthy_threshold"), "must be at least 1");
        }
        if let Some(h) = &hc.host {
            if http::HeaderValue::from_str(h).is_err() || h.is_empty() {
                c.err(format!("{hp}.host"), format!("`{h}` is not a valid host"));
            }
        }
        if hc.expected_statuses.is_empty() {
            c.err(
                format!("{hp}.expected_statuses"),
                "needs at least one status range",
            );
        }
        for (j, r) in hc.expected_statuses.iter().enumerate() {
            if !(100..=599).contains(&r.start) || !(101..=600).contains(&r.end) || r.end <= r.start
            {
                c.err(
                    format!("{hp}.expected_statuses[{j}]"),
                    "needs 100 <= start < end <= 600 (end is exclusive)",
                );
            }
        }
    }
    if cl.locality_lb && !node_has_region {
        c.err(
            format!("{p}.locality_lb"),
            "needs `node.locality.region` (the proxy's own locality comes first)",
        );
    }
    match (&cl.ring_hash, cl.lb_policy) {
        (Some(_), lb) if lb != LbPolicy::RingHash => c.err(
            format!("{p}.ring_hash"),
            "only applies with `lb_policy: ring_hash`",
        ),
        (Some(r), _) if r.minimum_ring_size == 0 || r.minimum_ring_size > 8_388_608 => c.err(
            format!("{p}.ring_hash.minimum_ring_size"),
            "must be between 1 and 8388608",
        ),
        _ => {}
    }
}

/// A route's `hash_policy` and `locality_routing`.
fn check_route_balancing(c: &mut Checker<'_>, p: &str, r: &RouteSpec) {
    for (j, h) in r.hash_policy.iter().enumerate() {
        let hp = format!("{p}.hash_policy[{j}]");
        let n = [
            h.header.is_some(),
            h.cookie.is_some(),
            h.connection_properties.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if n != 1 {
            c.err(
                hp.clone(),
                "needs exactly one of `header`, `cookie` and `connection_properties`",
            );
        }
        if let Some(hh) = &h.header {
            c.header_name(format!("{hp}.header.header_name"), &hh.header_name);
        }
        if let Some(ck) = &h.cookie {
            if ck.name.is_empty() || ck.name.contains([';', '=', ' ']) {
                c.err(format!("{hp}.cookie.name"), "not a valid cookie name");
            }
        }
        if let Some(cp) = &h.connection_properties {
            if !cp.source_ip {
                c.err(
                    format!("{hp}.connection_properties.source_ip"),
                    "must be true (the only connection property hashed)",
                );
            }
        }
    }
    if let Some(lr) = &r.locality_routing {
        let lp = format!("{p}.locality_routing");
        if lr.header.is_none() && lr.geo_header.is_none() && lr.client_cidrs.is_empty() {
            c.err(
                lp.clone(),
                "needs at least one of `header`, `geo_header` and `client_cidrs`",
            );
        }
        if let Some(h) = &lr.header {
            if h.starts_with(INTERNAL_HEADER_PREFIX) {
                c.err(
                    format!("{lp}.header"),
                    format!("`{h}`: headers starting with `{INTERNAL_HEADER_PREFIX}` are stripped from requests"),
                );
            }
            c.header_name(format!("{lp}.header"), h);
        }
        if let Some(g) = &lr.geo_header {
            c.header_name(format!("{lp}.geo_header.name"), &g.name);
            for (k, v) in &g.regions {
                if v.is_empty() {
                    c.err(format!("{lp}.geo_header.regions.{k}"), "must name a region");
                }
            }
        }
        for (j, cr) in lr.client_cidrs.iter().enumerate() {
            if let Err(msg) = crate::lb::Cidr::parse(&cr.cidr) {
                c.err(format!("{lp}.client_cidrs[{j}].cidr"), msg);
            }
            if cr.region.is_empty() {
                c.err(
                    format!("{lp}.client_cidrs[{j}].region"),
                    "must name a region",
                );
            }
        }
    }
}

/// Request headers with this prefix are the proxy's own and are stripped on arrival.
const INTERNAL_HEADER_PREFIX: &str = "x-wasmesh-";

fn check_tracing(c: &mut Checker<'_>, t: &TracingSpec) {
    if let Some(e) = &t.endpoint {
        if let Err(msg) = crate::telemetry::otel::check_endpoint(e) {
            c.err("tracing.endpoint", msg);
        }
    }
    for (k, v) in &t.headers {
        c.header_name(format!("tracing.headers.{k}"), k);
        c.header_value(format!("tracing.headers.{k}"), v);
    }
    if let Some(n) = &t.service_name {
        if n.trim().is_empty() {
            c.err("tracing.service_name", "must not be empty");
        }
    }
    if !(0.0..=1.0).contains(&t.sampling.ratio) {
        c.err("tracing.sampling.ratio", "must be between 0 and 1");
    }
    if t.max_queue_size == 0 {
        c.err("tracing.max_queue_size", "must be at least 1");
    }
    if t.batch_size == 0 {
        c.err("tracing.batch_size", "must be at least 1");
    } else if t.batch_size > t.max_queue_size {
        c.err(
            "tracing.batch_size",
            format!("must not exceed max_queue_size ({})", t.max_queue_size),
        );
    }
    if t.batch_delay.is_zero() {
        c.err("tracing.batch_delay", "must be more than 0s");
    }
    if t.export_timeout.is_zero() {
        c.err("tracing.export_timeout", "must be more than 0s");
    }
    if let Some(tls) = &t.tls {
        // Load the files as the exporter will, so a start or `wasmesh check` names a
        // missing or unusable one up front.
        let mut tls = tls.clone();
        tls.resolve_paths(c.file.parent());
        let settings = crate::telemetry::collector_tls::CollectorTls::from_spec(&tls);
        if let Err(e) = crate::telemetry::collector_tls::check_files(&settings) {
            c.err(format!("tracing.tls.{}", e.field), e.message);
        }
    }
}

fn check_identities(c: &mut Checker<'_>, p: &str, ids: &[String]) {
    for (j, id) in ids.iter().enumerate() {
        if let Err(msg) = crate::tls::SpiffeId::parse(id) {
            c.err(format!("{p}.allowed_identities[{j}]"), msg);
        }
    }
}

/// Load the certificate, key and bundle as the proxy will, so `wasmesh check` and a start
/// report a missing file, a key that does not match or an expired certificate up front.
/// Relative paths are relative to the manifest's directory.
fn check_tls_files(c: &mut Checker<'_>, p: &str, cert: &Path, key: &Path, bundle: &Path) {
    use crate::tls::TlsError;
    let files = crate::tls::TlsFiles::resolve(cert, key, bundle, c.file.parent());
    if let Err(e) = crate::tls::load_material(&files) {
        let field = match &e {
            TlsError::Read { file, .. }
            | TlsError::NoCertificate { file }
            | TlsError::Pem { file, .. } => {
                if file == &files.key {
                    "key"
                } else if file == &files.trust_bundle {
                    "trust_bundle"
                } else {
                    "cert"
                }
            }
            TlsError::Key { .. } | TlsError::KeyMismatch { .. } => "key",
            TlsError::Bundle { .. } => "trust_bundle",
            _ => "cert",
        };
        c.err(format!("{p}.{field}"), e.to_string());
    }
}

fn check_name(c: &mut Checker<'_>, path: String, name: &str) {
    if name.is_empty() {
        c.err(path, "must not be empty");
    } else if !name
        .chars()
        .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.'))
    {
        c.err(
            path,
            format!("`{name}` may only hold letters, digits, '-', '_' and '.'"),
        );
    }
}

fn check_limits(c: &mut Checker<'_>, p: &str, l: &ListenerLimits) {
    c.range(
        format!("{p}.limits.max_connections"),
        l.max_connections,
        1,
        MAX_COUNT,
    );
    if l.max_request_headers_kb == 0 || l.max_request_headers_kb > 8192 {
        c.err(
            format!("{p}.limits.max_request_headers_kb"),
            "must be between 1 and 8192",
        );
    }
    c.range(
        format!("{p}.limits.max_headers_count"),
        l.max_headers_count,
        1,
        10_000,
    );
    if l.http2_max_concurrent_streams == 0 {
        c.err(
            format!("{p}.limits.http2_max_concurrent_streams"),
            "must be at least 1",
        );
    }
    if l.request_headers_timeout.is_zero() {
        c.err(
            format!("{p}.limits.request_headers_timeout"),
            "must be more than 0s",
        );
    }
}

fn check_route(
    c: &mut Checker<'_>,
    p: &str,
    r: &RouteSpec,
    clusters: &HashSet<&str>,
    filters: &HashSet<&str>,
) {
    if let Some(n) = &r.name {
        check_name(c, format!("{p}.name"), n);
    }
    let m = &r.matcher;
    let path_kinds = [m.path.is_some(), m.prefix.is_some(), m.regex.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if path_kinds > 1 {
        c.err(
            format!("{p}.match"),
            "use at most one of `path`, `prefix` and `regex`",
        );
    }
    if let Some(a) = &m.authority {
        let bare = a.strip_prefix("*.").unwrap_or(a);
        if bare.is_empty() || bare.contains('*') || bare.contains('/') {
            c.err(
                format!("{p}.match.authority"),
                "use an exact host or `*.suffix`",
            );
        }
    }
    for (k, v) in [("path", &m.path), ("prefix", &m.prefix)] {
        if let Some(v) = v {
            if !v.starts_with('/') {
                c.err(format!("{p}.match.{k}"), "must start with '/'");
            }
        }
    }
    if let Some(re) = &m.regex {
        c.regex(format!("{p}.match.regex"), re);
    }
    for (j, meth) in m.methods.iter().enumerate() {
        if http::Method::from_bytes(meth.as_bytes()).is_err() {
            c.err(
                format!("{p}.match.methods[{j}]"),
                format!("`{meth}` is not a method"),
            );
        }
    }
    for (j, h) in m.headers.iter().enumerate() {
        let hp = format!("{p}.match.headers[{j}]");
        c.header_name(format!("{hp}.name"), &h.name);
        check_value_match(c, &hp, h.exact.as_deref(), h.regex.as_deref(), h.present);
    }
    for (j, q) in m.query.iter().enumerate() {
        let qp = format!("{p}.match.query[{j}]");
        if q.name.is_empty() {
            c.err(format!("{qp}.name"), "must not be empty");
        }
        check_value_match(c, &qp, q.exact.as_deref(), q.regex.as_deref(), q.present);
    }

    let actions = [
        r.cluster.is_some(),
        r.weighted_clusters.is_some(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if actions != 1 {
        c.err(
            p.to_string(),
            "a route needs exactly one of `cluster`, `weighted_clusters`, `redirect` and `direct_response`",
        );
    }
    if let Some(cl) = &r.cluster {
        if !clusters.contains(cl.as_str()) {
            c.err(format!("{p}.cluster"), format!("unknown cluster `{cl}`"));
        }
    }
    if let Some(wc) = &r.weighted_clusters {
        if wc.is_empty() {
            c.err(
                format!("{p}.weighted_clusters"),
                "needs at least one cluster",
            );
        }
        if !wc.is_empty() && wc.iter().all(|w| w.weight == 0) {
            c.err(
                format!("{p}.weighted_clusters"),
                "weights must not all be 0",
            );
        }
        // The route draws a number below the total for each request: it must fit a u32.
        if wc.iter().map(|w| u64::from(w.weight)).sum::<u64>() > u64::from(u32::MAX) {
            c.err(
                format!("{p}.weighted_clusters"),
                format!("weights add up to more than {}", u32::MAX),
            );
        }
        for (j, w) in wc.iter().enumerate() {
            if !clusters.contains(w.name.as_str()) {
                c.err(
                    format!("{p}.weighted_clusters[{j}].name"),
                    format!("unknown cluster `{}`", w.name),
                );
            }
        }
    }
    if let Some(rd) = &r.redirect {
        if ![301, 302, 303, 307, 308].contains(&rd.status) {
            c.err(
                format!("{p}.redirect.status"),
                "must be 301, 302, 303, 307 or 308",
            );
        }
        if let Some(s) = &rd.scheme {
            if s != "http" && s != "https" {
                c.err(format!("{p}.redirect.scheme"), "must be `http` or `https`");
            }
        }
        if let Some(path) = &rd.path {
            if !path.starts_with('/') {
                c.err(format!("{p}.redirect.path"), "must start with '/'");
            }
        }
    }
    if let Some(d) = &r.direct_response {
        if !(200..=599).contains(&d.status) {
            c.err(
                format!("{p}.direct_response.status"),
                "must be between 200 and 599",
            );
        }
        for (k, v) in &d.headers {
            c.header_name(format!("{p}.direct_response.headers.{k}"), k);
            c.header_value(format!("{p}.direct_response.headers.{k}"), v);
        }
    }
    if let Some(rp) = &r.retry_policy {
        let pp = format!("{p}.retry_policy");
        if r.cluster.is_none() && r.weighted_clusters.is_none() {
            c.err(
                pp.clone(),
                "retries need a `cluster` or `weighted_clusters` route",
            );
        }
        if let Err(msg) = crate::retry::parse_retry_on(&rp.retry_on) {
            c.err(format!("{pp}.retry_on"), msg);
        }
        if rp.num_retries > 10 {
            c.err(format!("{pp}.num_retries"), "must be at most 10");
        }
        if rp.per_try_timeout.is_some_and(|t| t.is_zero()) {
            c.err(format!("{pp}.per_try_timeout"), "must be more than 0s");
        }
        for (j, code) in rp.retriable_status_codes.iter().enumerate() {
            if !(100..=599).contains(code) {
                c.err(
                    format!("{pp}.retriable_status_codes[{j}]"),
                    "must be an HTTP status (100 to 599)",
                );
            }
        }
        let bo = &rp.retry_back_off;
        if bo.base_interval.is_zero() {
            c.err(
                format!("{pp}.retry_back_off.base_interval"),
                "must be more than 0s",
            );
        }
        if bo.max_interval.is_some_and(|m| m < bo.base_interval) {
            c.err(
                format!("{pp}.retry_back_off.max_interval"),
                "must be at least `base_interval`",
            );
        }
    }
    for (j, mp) in r.request_mirror_policies.iter().enumerate() {
        let mpp = format!("{p}.request_mirror_policies[{j}]");
        if !clusters.contains(mp.cluster.as_str()) {
            c.err(
                format!("{mpp}.cluster"),
                format!("unknown cluster `{}`", mp.cluster),
            );
        }
        if !(mp.percent > 0.0 && mp.percent <= 100.0) {
            c.err(
                format!("{mpp}.percent"),
                "must be more than 0 and at most 100",
            );
        }
        if mp.timeout.is_zero() {
            c.err(format!("{mpp}.timeout"), "must be more than 0s");
        }
    }
    if r.prefix_rewrite.is_some() && m.prefix.is_none() {
        c.err(format!("{p}.prefix_rewrite"), "needs a `match.prefix`");
    }
    if let Some(h) = &r.host_rewrite {
        if http::uri::Authority::try_from(h.as_str()).is_err() {
            c.err(
                format!("{p}.host_rewrite"),
                format!("`{h}` is not a valid host"),
            );
        }
    }
    for (side, hm) in [
        ("request_headers", &r.request_headers),
        ("response_headers", &r.response_headers),
    ] {
        for (kind, map) in [("add", &hm.add), ("set", &hm.set)] {
            for (k, v) in map {
                c.header_name(format!("{p}.{side}.{kind}.{k}"), k);
                c.header_value(format!("{p}.{side}.{kind}.{k}"), v);
            }
        }
        for (j, k) in hm.remove.iter().enumerate() {
            c.header_name(format!("{p}.{side}.remove[{j}]"), k);
        }
    }
    check_route_balancing(c, p, r);
    if let Some(chain) = &r.filters {
        for (j, f) in chain.iter().enumerate() {
            if !filters.contains(f.as_str()) {
                c.err(format!("{p}.filters[{j}]"), format!("unknown filter `{f}`"));
            }
        }
    }
}

fn check_value_match(
    c: &mut Checker<'_>,
    p: &str,
    exact: Option<&str>,
    re: Option<&str>,
    present: Option<bool>,
) {
    let n = [exact.is_some(), re.is_some(), present.is_some()]
        .iter()
        .filter(|b| **b)
        .count();
    if n != 1 {
        c.err(
            p.to_string(),
            "needs exactly one of `exact`, `regex` and `present`",
        );
    }
    if let Some(re) = re {
        c.regex(format!("{p}.regex"), re);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(json: &str) -> Vec<String> {
        let file = Path::new("m.json");
        match parse(file, json) {
            Err(e) => vec![e.to_string()],
            Ok(m) => validate(file, &m).iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn unknown_field_names_its_path() {
        let e = errors(
            r#"{"listeners":[{"name":"a","address":"127.0.0.1:1","routes":[{"match":{"prefx":"/"}}]}]}"#,
        );
        assert_eq!(e.len(), 1);
        assert!(
            e[0].starts_with("m.json: listeners[0].routes[0].match.prefx: unknown field `prefx`"),
            "{e:?}"
        );
    }

    #[test]
    fn every_semantic_error_is_listed() {
        let e = errors(
            r#"{"listeners":[{"name":"a","address":"nope","routes":[
                {"match":{"prefix":"x"},"cluster":"missing"},
                {"match":{"regex":"("},"direct_response":{"status":200}}]}],
                "clusters":[{"name":"c","endpoints":[]}]}"#,
        );
        let want = [
            "m.json: clusters[0].endpoints: a cluster needs at least one endpoint",
            "m.json: listeners[0].address: `nope` is not an IP:PORT address",
            "m.json: listeners[0].routes[0].match.prefix: must start with '/'",
            "m.json: listeners[0].routes[0].cluster: unknown cluster `missing`",
            "m.json: listeners[0].routes[1].match.regex: invalid regex",
        ];
        for w in want {
            assert!(
                e.iter().any(|x| x.starts_with(w)),
                "missing {w:?} in {e:#?}"
            );
        }
        assert_eq!(e.len(), want.len(), "{e:#?}");
    }

    #[test]
    fn durations_past_a_year_are_refused() {
        // A duration the clock cannot hold would panic every request that adds it to now.
        let e = errors(
            r#"{"listeners":[{"name":"a","address":"127.0.0.1:1","limits":{"idle_timeout":"10000000000000000000s"},"routes":[]}]}"#,
        );
        assert_eq!(e.len(), 1, "{e:#?}");
        assert!(
            e[0].starts_with("m.json: listeners[0].limits.idle_timeout: "),
            "{e:#?}"
        );
        assert!(
            e[0].contains("is too long: durations are at most 365 days"),
            "{e:#?}"
        );
        let e = errors(
            r#"{"listeners":[{"name":"a","address":"127.0.0.1:1","routes":[{"match":{"prefix":"/"},"direct_response":{"status":200},"timeout":"366days"}]}]}"#,
        );
        assert!(e.len() == 1 && e[0].contains("routes[0].timeout"), "{e:#?}");
        let ok = errors(
            r#"{"listeners":[{"name":"a","address":"127.0.0.1:1","routes":[{"match":{"prefix":"/"},"direct_response":{"status":200},"timeout":"365days"}]}]}"#,
        );
        assert!(ok.is_empty(), "{ok:#?}");
    }

    #[test]
    fn weighted_cluster_weights_fit_their_total() {
        let route = |a: u64, b: u64| {
            format!(
                r#"{{"listeners":[{{"name":"l","address":"127.0.0.1:1","routes":[{{"match":{{"prefix":"/"}},
                "weighted_clusters":[{{"name":"a","weight":{a}}},{{"name":"b","weight":{b}}}]}}]}}],
                "clusters":[{{"name":"a","endpoints":[{{"address":"127.0.0.1:2"}}]}},
                            {{"name":"b","endpoints":[{{"address":"127.0.0.1:3"}}]}}]}}"#
            )
        };
        assert!(errors(&route(90, 10)).is_empty());
        assert!(errors(&route(u64::from(u32::MAX) - 1, 1)).is_empty());
        let e = errors(&route(1 << 31, 1 << 31));
        assert_eq!(
            e,
            ["m.json: listeners[0].routes[0].weighted_clusters: weights add up to more than 4294967295"]
        );
    }

    #[test]
    fn sizes_allocated_up_front_are_bounded() {
        // Each of these once passed `wasmesh check` and then aborted the proxy (a channel
        // of 4e9 slots) or every connection (4e9 header slots).
        let e = errors(
            r#"{"workers":100000,"access_log":{"buffer_lines":4000000000},
                "filter_engine":{"max_instance_memory_mib":8192},
                "listeners":[{"name":"a","address":"127.0.0.1:1",
                  "limits":{"max_connections":18446744073709551615,"max_headers_count":4000000000},
                  "routes":[{"match":{"prefix":"/"},"cluster":"c"}]}],
                "clusters":[{"name":"c","endpoints":[{"address":"127.0.0.1:2"}],
                  "circuit_breakers":{"max_requests":18446744073709551615}}]}"#,
        );
        let want = [
            "m.json: workers: must be at most 1024",
            "m.json: access_log.buffer_lines: must be at most 1048576",
            "m.json: filter_engine.max_instance_memory_mib: must be at most 4096",
            "m.json: listeners[0].limits.max_connections: must be at most 4294967295",
            "m.json: listeners[0].limits.max_headers_count: must be at most 10000",
            "m.json: clusters[0].circuit_breakers.max_requests: must be at most 4294967295",
        ];
        for w in want {
            assert!(e.iter().any(|x| x == w), "missing {w:?} in {e:#?}");
        }
        assert_eq!(e.len(), want.len(), "{e:#?}");
    }

    #[test]
    fn yaml_flow_nesting_is_bounded_before_parsing() {
        let file = Path::new("m.yaml");
        let deep = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
        let t = std::time::Instant::now();
        let e = parse(file, &deep).expect_err("too deep");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(
            e.to_string(),
            "m.yaml: `[` and `{` nested more than 128 deep at line 1"
        );
        // Brackets in quotes and comments do not count, and ordinary nesting passes on to
        // the parser (which then names the unknown field).
        let fine = format!(
            "# {}\nx: '{}'\ny: \"{}\"\nz: [[1], {{a: [2]}}]\n",
            "[".repeat(500),
            "[".repeat(500),
            "{".repeat(500)
        );
        let e = parse(file, &fine).expect_err("unknown field");
        assert!(e.to_string().contains("unknown field `x`"), "{e}");
    }

    /// The complete example in the README, without its comments.
    fn readme_example() -> String {
        let readme = include_str!("../../../README.md");
        let start = readme
            .find("```jsonc\n")
            .expect("the README's jsonc example")
            + 9;
        let len = readme[start..].find("```").expect("its end");
        readme[start..start + len]
            .lines()
            .map(|l| match l.find(" //") {
                Some(at) => &l[..at],
                None => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[test]
    fn the_readme_example_is_valid() {
        let e = errors(&readme_example());
        assert!(e.is_empty(), "{e:#?}");
    }

    /// Manifests come from users: every mutation of a valid one (values of the wrong type,
    /// out of range, empty, huge; fields removed) gives a manifest or errors, never a panic
    /// (debug builds panic on arithmetic overflow, so overflowing arithmetic is caught too).
    #[test]
    fn mutated_manifests_are_refused_or_accepted_never_a_panic() {
        use wasmesh_e2e::generate::{mutate_json, Replacements, Rng};
        let base: serde_json::Value = serde_json::from_str(&readme_example()).expect("JSON");
        let with = Replacements::default();
        let mut rng = Rng(0x1234_5678_9abc_def1);
        let file = Path::new("m.json");
        for _ in 0..3_000 {
            let mut m = base.clone();
            mutate_json(&mut rng, &mut m, &with, &|_| false);
            if let Ok(manifest) = parse(file, &m.to_string()) {
                let _ = validate(file, &manifest);
            }
        }
    }
}
