//! The filter's configuration: serde types that mirror the manifest entry's `config`, and
//! their resolution into the [`Settings`] the request path uses. Everything that can be
//! checked at load is checked here, so a mistake fails `configure` (shown on `/filters`).

use crate::jwk::KeySet;
use serde::Deserialize;

/// `config` as written in the manifest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    /// Accepted `iss` values (one of them must match); empty: any issuer.
    #[serde(default)]
    issuers: Vec<String>,
    /// Accepted `aud` values (the token's `aud` must contain one); empty: any audience.
    #[serde(default)]
    audiences: Vec<String>,
    /// Tolerance for `exp` and `nbf`, e.g. "60s".
    #[serde(default = "default_skew")]
    clock_skew: String,
    /// A JWKS document, inline.
    #[serde(default)]
    jwks: Option<serde_json::Value>,
    /// A JWKS fetched from a cluster.
    #[serde(default)]
    remote_jwks: Option<RawRemote>,
    /// Accepted `alg` values; default all of RS256, ES256, HS256.
    #[serde(default)]
    algorithms: Option<Vec<String>>,
    /// Header that carries the token.
    #[serde(default = "default_header")]
    header: String,
    /// Scheme before the token in that header (matched case-insensitively); "" for none.
    #[serde(default = "default_prefix")]
    prefix: String,
    /// Keep the token header on the request sent upstream.
    #[serde(default)]
    forward_token: bool,
    /// Claims copied into request headers.
    #[serde(default)]
    forward_claims: Vec<RawForward>,
    /// Claims put in the request's property bag as `jwt.claim.NAME`.
    #[serde(default)]
    claims_to_properties: Vec<String>,
    /// Reject tokens without `exp`.
    #[serde(default = "yes")]
    require_expiration: bool,
    /// Paths that need a valid token. Default: every path.
    #[serde(default)]
    require_token: Option<Vec<RawPath>>,
    /// Paths where a missing token is fine (a token that is present must still be valid).
    #[serde(default)]
    allow_unauthenticated: Vec<RawPath>,
    /// Verified tokens kept (per instance).
    #[serde(default = "default_cache_size")]
    cache_size: usize,
    /// `realm` in `www-authenticate`.
    #[serde(default)]
    realm: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemote {
    cluster: String,
    path: String,
    #[serde(default = "default_refresh")]
    refresh_interval: String,
    #[serde(default = "default_timeout")]
    timeout: String,
    #[serde(default = "default_min_refresh")]
    min_refresh_interval: String,
    #[serde(default = "default_retry")]
    retry_interval: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForward {
    claim: String,
    header: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPath {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
}

fn default_skew() -> String {
    "60s".into()
}
fn default_header() -> String {
    "authorization".into()
}
fn default_prefix() -> String {
    "Bearer ".into()
}
fn yes() -> bool {
    true
}
fn default_cache_size() -> usize {
    1024
}
fn default_refresh() -> String {
    "5m".into()
}
fn default_timeout() -> String {
    "1s".into()
}
fn default_min_refresh() -> String {
    "30s".into()
}
fn default_retry() -> String {
    "1s".into()
}

/// A path rule: exact path or prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathRule {
    Exact(String),
    Prefix(String),
}

impl PathRule {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathRule::Exact(p) => path == p,
            PathRule::Prefix(p) => path.starts_with(p.as_str()),
        }
    }
}

/// Signature algorithms this filter knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
    Hs256,
}

impl Alg {
    pub fn parse(s: &str) -> Option<Alg> {
        match s {
            "RS256" => Some(Alg::Rs256),
            "ES256" => Some(Alg::Es256),
            "HS256" => Some(Alg::Hs256),
            _ => None,
        }
    }
}

/// Where the keys come from.
pub enum KeySource {
    Inline(KeySet),
    Remote(Remote),
}

/// A JWKS on a cluster, and how often to fetch it.
#[derive(Debug, Clone)]
pub struct Remote {
    pub cluster: String,
    pub path: String,
    pub refresh_ms: u64,
    pub timeout_ms: u32,
    pub min_refresh_ms: u64,
    pub retry_ms: u64,
}

/// What a path asks of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// A valid token is needed.
    Required,
    /// No token is fine; a token that is present must be valid.
    Optional,
    /// Not checked.
    Skip,
}

/// The resolved configuration.
pub struct Settings {
    pub issuers: Vec<String>,
    pub audiences: Vec<String>,
    pub skew_secs: i64,
    pub keys: KeySource,
    pub algorithms: Vec<Alg>,
    pub header: String,
    pub prefix: String,
    pub forward_token: bool,
    /// (claim, header), header lower-case.
    pub forward_claims: Vec<(String, String)>,
    pub claims_to_properties: Vec<String>,
    pub require_expiration: bool,
    pub require_token: Vec<PathRule>,
    pub allow_unauthenticated: Vec<PathRule>,
    pub cache_size: usize,
    pub realm: Option<String>,
}

impl Settings {
    /// Parse and check `config` (JSON text).
    pub fn parse(config: &str) -> Result<Settings, String> {
        let raw: Raw = serde_json::from_str(config).map_err(|e| format!("config: {e}"))?;
        let keys = match (raw.jwks, raw.remote_jwks) {
            (Some(doc), None) => {
                let set = KeySet::from_value(&doc).map_err(|e| format!("config: jwks: {e}"))?;
                if set.is_empty() {
                    return Err("config: jwks: no usable key".into());
                }
                KeySource::Inline(set)
            }
            (None, Some(r)) => {
                if r.cluster.is_empty() {
                    return Err("config: remote_jwks.cluster: empty".into());
                }
                if !r.path.starts_with('/') {
                    return Err("config: remote_jwks.path: must start with '/'".into());
                }
                let ms = |field: &str, v: &str| {
                    parse_duration_ms(v).map_err(|e| format!("config: remote_jwks.{field}: {e}"))
                };
                let timeout_ms = ms("timeout", &r.timeout)?;
                KeySource::Remote(Remote {
                    cluster: r.cluster,
                    path: r.path,
                    refresh_ms: ms("refresh_interval", &r.refresh_interval)?.max(1000),
                    timeout_ms: u32::try_from(timeout_ms.clamp(1, 60_000)).unwrap_or(1000),
                    min_refresh_ms: ms("min_refresh_interval", &r.min_refresh_interval)?,
                    retry_ms: ms("retry_interval", &r.retry_interval)?,
                })
            }
            (Some(_), Some(_)) => {
                return Err("config: give one of `jwks` and `remote_jwks`, not both".into())
            }
            (None, None) => return Err("config: `jwks` or `remote_jwks` is required".into()),
        };
        let algorithms = match raw.algorithms {
            None => vec![Alg::Rs256, Alg::Es256, Alg::Hs256],
            Some(list) => list
                .iter()
                .map(|a| Alg::parse(a).ok_or_else(|| format!("config: algorithms: unknown {a:?}")))
                .collect::<Result<_, _>>()?,
        };
        let skew_ms =
            parse_duration_ms(&raw.clock_skew).map_err(|e| format!("config: clock_skew: {e}"))?;
        let header = raw.header.to_ascii_lowercase();
        let mut forward_claims = Vec::new();
        for f in raw.forward_claims {
            let h = f.header.to_ascii_lowercase();
            if h.is_empty() || h == header || h.starts_with(':') {
                return Err(format!(
                    "config: forward_claims: bad header name {:?}",
                    f.header
                ));
            }
            forward_claims.push((f.claim, h));
        }
        let rules = |list: Vec<RawPath>, field: &str| -> Result<Vec<PathRule>, String> {
            list.into_iter()
                .map(|r| match (r.path, r.prefix) {
                    (Some(p), None) if p.starts_with('/') => Ok(PathRule::Exact(p)),
                    (None, Some(p)) if p.starts_with('/') => Ok(PathRule::Prefix(p)),
                    _ => Err(format!(
                        "config: {field}: each rule is {{\"path\": \"/..\"}} or {{\"prefix\": \"/..\"}}"
                    )),
                })
                .collect()
        };
        Ok(Settings {
            issuers: raw.issuers,
            audiences: raw.audiences,
            skew_secs: i64::try_from(skew_ms / 1000).unwrap_or(i64::MAX),
            keys,
            algorithms,
            header,
            prefix: raw.prefix,
            forward_token: raw.forward_token,
            forward_claims,
            claims_to_properties: raw.claims_to_properties,
            require_expiration: raw.require_expiration,
            require_token: match raw.require_token {
                None => vec![PathRule::Prefix("/".into())],
                Some(list) => rules(list, "require_token")?,
            },
            allow_unauthenticated: rules(raw.allow_unauthenticated, "allow_unauthenticated")?,
            cache_size: raw.cache_size,
            realm: raw.realm,
        })
    }

    /// What `path` asks for: exceptions (`allow_unauthenticated`) win over `require_token`.
    pub fn requirement(&self, path: &str) -> Requirement {
        if self.allow_unauthenticated.iter().any(|r| r.matches(path)) {
            Requirement::Optional
        } else if self.require_token.iter().any(|r| r.matches(path)) {
            Requirement::Required
        } else {
            Requirement::Skip
        }
    }
}

/// "250ms", "5s", "2m", "1h" (or a bare number of seconds) to milliseconds.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let mult = match unit {
        "ms" => 1,
        "" | "s" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return Err(format!("bad duration {s:?} (use ms, s, m or h)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("duration {s:?} too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration_ms("250ms"), Ok(250));
        assert_eq!(parse_duration_ms("5s"), Ok(5000));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        assert_eq!(parse_duration_ms("30"), Ok(30_000));
        assert!(parse_duration_ms("5 days").is_err());
    }

    #[test]
    // Parsing the JWKS imports its keys through the host (`verifying-key.from-jwk`), which
    // exists only inside the proxy: natively this test would abort. The e2e JWT tests
    // cover it there.
    #[cfg_attr(
        not(target_arch = "wasm32"),
        ignore = "calls the host's crypto; covered by the e2e JWT tests"
    )]
    fn rules_and_errors() {
        let s = Settings::parse(
            r#"{"jwks":{"keys":[{"kty":"oct","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}]},
                "require_token":[{"prefix":"/api/"}],
                "allow_unauthenticated":[{"prefix":"/api/public/"},{"path":"/api/ping"}]}"#,
        )
        .expect("valid");
        assert_eq!(s.requirement("/api/x"), Requirement::Required);
        assert_eq!(s.requirement("/api/public/x"), Requirement::Optional);
        assert_eq!(s.requirement("/api/ping"), Requirement::Optional);
        assert_eq!(s.requirement("/other"), Requirement::Skip);
        assert!(Settings::parse("{}").is_err());
        assert!(Settings::parse(r#"{"jwks":{"keys":[]},"bogus":1}"#).is_err());
    }
}
