//! The two pattern languages of the policy.
//!
//! - [`Glob`], for identities and property values: `*` matches any run of characters
//!   (`/` included): `spiffe://mesh.local/ns/shop/sa/*`. A lone `*` matches any value.
//! - [`PathPattern`], for paths, by segment: a `*` segment matches one segment
//!   (`/api/*/orders`), a final `**` matches the rest, zero segments or more
//!   (`/api/**`), and a segment with `*` inside globs within it (`/v*/items`).
//!   `{"prefix": "/x/"}` is a plain prefix.
//!
//! Matching is linear in the input (no backtracking explosion on hostile paths).

/// `*` = any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob(String);

impl Glob {
    pub fn new(p: &str) -> Glob {
        Glob(p.to_string())
    }

    pub fn matches(&self, s: &str) -> bool {
        wildcard(self.0.as_bytes(), s.as_bytes())
    }
}

/// Classic two-pointer wildcard match: `*` only, O(len(p) * len(s)) worst case, no recursion.
fn wildcard(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(c) if *c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    pi = sp + 1;
                    si = ss + 1;
                    star = Some((sp, ss + 1));
                }
                None => return false,
            },
        }
    }
    p.get(pi..)
        .is_some_and(|rest| rest.iter().all(|c| *c == b'*'))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    Literal(String),
    /// `*` alone: one whole segment.
    Any,
    /// A segment with `*` inside.
    Glob(String),
}

/// A path pattern (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
    Segments {
        segments: Vec<Segment>,
        /// Ends in `/**`.
        rest: bool,
    },
}

impl PathPattern {
    /// Parse a string pattern; errors name the problem.
    pub fn parse(p: &str) -> Result<PathPattern, String> {
        if !p.starts_with('/') {
            return Err(format!("path pattern {p:?} must start with '/'"));
        }
        if !p.contains('*') {
            return Ok(PathPattern::Exact(p.to_string()));
        }
        let mut parts: Vec<&str> = p[1..].split('/').collect();
        let rest = parts.last() == Some(&"**");
        if rest {
            parts.pop();
        }
        let mut segments = Vec::new();
        for part in parts {
            segments.push(match part {
                "**" => return Err(format!("in {p:?}: `**` is only allowed at the end")),
                "*" => Segment::Any,
                s if s.contains('*') => Segment::Glob(s.to_string()),
                s => Segment::Literal(s.to_string()),
            });
        }
        Ok(PathPattern::Segments { segments, rest })
    }

    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathPattern::Exact(p) => path == p,
            PathPattern::Prefix(p) => path.starts_with(p.as_str()),
            PathPattern::Segments { segments, rest } => {
                let Some(tail) = path.strip_prefix('/') else {
                    return false;
                };
                let mut parts = tail.split('/');
                for seg in segments {
                    let Some(part) = parts.next() else {
                        return false;
                    };
                    let ok = match seg {
                        Segment::Literal(l) => part == l,
                        Segment::Any => !part.is_empty(),
                        Segment::Glob(g) => wildcard(g.as_bytes(), part.as_bytes()),
                    };
                    if !ok {
                        return false;
                    }
                }
                *rest || parts.next().is_none()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        let g = Glob::new("spiffe://mesh.local/ns/shop/sa/*");
        assert!(g.matches("spiffe://mesh.local/ns/shop/sa/checkout"));
        assert!(!g.matches("spiffe://mesh.local/ns/other/sa/checkout"));
        assert!(Glob::new("*").matches(""));
        assert!(Glob::new("a*b*c").matches("axxbyyc"));
        assert!(!Glob::new("a*b*c").matches("axxbyy"));
        assert!(Glob::new("alice").matches("alice"));
        assert!(!Glob::new("alice").matches("alice2"));
    }

    #[test]
    fn paths() {
        let p = |s: &str| PathPattern::parse(s).expect("valid");
        assert!(p("/api/*/orders").matches("/api/v1/orders"));
        assert!(!p("/api/*/orders").matches("/api/v1/x/orders"));
        assert!(!p("/api/*/orders").matches("/api/v1/orders/1"));
        assert!(!p("/api/*/orders").matches("/api//orders"));
        assert!(p("/api/**").matches("/api/"));
        assert!(p("/api/**").matches("/api/a/b/c"));
        assert!(p("/api/**").matches("/api"));
        assert!(!p("/api/**").matches("/apix"));
        assert!(p("/v*/items").matches("/v2/items"));
        assert!(p("/exact").matches("/exact"));
        assert!(!p("/exact").matches("/exact/"));
        assert!(PathPattern::parse("/a/**/b").is_err());
        assert!(PathPattern::parse("a").is_err());
    }
}
