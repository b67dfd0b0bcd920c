//! Values built from request data, parsed once at configure time:
//!
//! | variable | value |
//! |---|---|
//! | `%REQ(name)%` | first value of request header `name` (empty when absent) |
//! | `%REQUEST_ID%` | the request id |
//! | `%METHOD%` | the method |
//! | `%PATH%` | the path, without the query |
//! | `%AUTHORITY%` | the `:authority` / Host |
//! | `%SOURCE_ADDRESS%` | the client address, `IP:PORT` |
//! | `%SOURCE_IP%` | the client address without the port |
//! | `%ROUTE%` | the matched route's name |
//! | `%PEER_IDENTITY%` | the client's verified identity (empty without mTLS) |
//! | `%%` | a literal `%` |
//!
//! Anything else between `%` signs is an error at configure time, not an empty string at
//! request time.

use crate::RequestData;

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Header(String),
    RequestId,
    Method,
    Path,
    Authority,
    SourceAddress,
    SourceIp,
    Route,
    PeerIdentity,
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

impl Template {
    /// Parse `text`; the error says what is wrong and where.
    ///
    /// ```
    /// let t = filter_common::template::Template::parse("%METHOD% %PATH%").unwrap();
    /// assert!(!t.is_literal());
    /// ```
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut lit = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('%') {
            lit.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(r) = after.strip_prefix('%') {
                lit.push('%');
                rest = r;
                continue;
            }
            let end = after.find('%').ok_or_else(|| {
                format!(
                    "unterminated variable at {:?} (write %% for a literal %)",
                    &rest[i..]
                )
            })?;
            let var = &after[..end];
            let part = match var {
                "REQUEST_ID" => Part::RequestId,
                "METHOD" => Part::Method,
                "PATH" => Part::Path,
                "AUTHORITY" => Part::Authority,
                "SOURCE_ADDRESS" => Part::SourceAddress,
                "SOURCE_IP" => Part::SourceIp,
                "ROUTE" => Part::Route,
                "PEER_IDENTITY" => Part::PeerIdentity,
                v => match v.strip_prefix("REQ(").and_then(|s| s.strip_suffix(')')) {
                    Some(h) if crate::valid_header_name(&h.to_ascii_lowercase()) => {
                        Part::Header(h.to_ascii_lowercase())
                    }
                    Some(h) => return Err(format!("%REQ({h})%: {h:?} is not a header name")),
                    None => {
                        return Err(format!(
                            "unknown variable %{v}%: use %REQ(header)%, %REQUEST_ID%, %METHOD%, \
                             %PATH%, %AUTHORITY%, %SOURCE_ADDRESS%, %SOURCE_IP%, %ROUTE% or \
                             %PEER_IDENTITY%"
                        ))
                    }
                },
            };
            if !lit.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut lit)));
            }
            parts.push(part);
            rest = &after[end + 1..];
        }
        lit.push_str(rest);
        if !lit.is_empty() {
            parts.push(Part::Text(lit));
        }
        Ok(Template { parts })
    }

    /// No variables: the value is the same for every request.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// The `Hooks::PASS_*` flags that make the host hand this template's request data to
    /// `on_request_headers` (rather than one call per read).
    pub fn pass_flags(&self) -> wasmesh_sdk::Hooks {
        use wasmesh_sdk::Hooks;
        self.parts.iter().fold(Hooks::empty(), |h, p| {
            h | match p {
                Part::RequestId => Hooks::PASS_ID,
                Part::Method => Hooks::PASS_METHOD,
                Part::Path => Hooks::PASS_PATH,
                Part::SourceAddress | Part::SourceIp => Hooks::PASS_SOURCE_ADDRESS,
                _ => Hooks::empty(),
            }
        })
    }

    /// The value is the same all along the request: no header or path in it (a later
    /// filter may change those), only the id, method, client, route or peer identity.
    pub fn is_request_constant(&self) -> bool {
        !self
            .parts
            .iter()
            .any(|p| matches!(p, Part::Header(_) | Part::Path | Part::Authority))
    }

    /// The value for this request. Missing data renders as an empty string.
    pub fn render(&self, req: &impl RequestData) -> String {
        let mut out = String::new();
        self.render_into(req, &mut out);
        out
    }

    /// Call `f` with the value for this request. A template that is one literal or one
    /// request-data variable lends the value as it is (no copy, which costs a filter more
    /// than the call); any other is rendered into `scratch` (cleared first) and lent
    /// from there.
    pub fn with_rendered(
        &self,
        req: &impl RequestData,
        scratch: &mut String,
        f: &mut dyn FnMut(&str),
    ) {
        match self.parts.as_slice() {
            [Part::Text(t)] => f(t),
            [Part::RequestId] => req.with_request_id(f),
            [Part::Method] => req.with_method(f),
            [Part::Path] => req.with_path(f),
            [Part::SourceAddress] => req.with_source_address(f),
            [Part::SourceIp] => req.with_source_address(&mut |a| f(&crate::client_ip(a))),
            _ => {
                scratch.clear();
                self.render_into(req, scratch);
                f(scratch)
            }
        }
    }

    /// [`Template::render`], appended to `out` (reuse one buffer across values).
    pub fn render_into(&self, req: &impl RequestData, out: &mut String) {
        if let [Part::Text(t)] = self.parts.as_slice() {
            out.push_str(t);
            return;
        }
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Header(h) => out.push_str(&req.header(h).unwrap_or_default()),
                // Lent, not copied: the host passes these with the hook (`pass_flags`).
                Part::RequestId => req.with_request_id(&mut |v| out.push_str(v)),
                Part::Method => req.with_method(&mut |v| out.push_str(v)),
                Part::Path => req.with_path(&mut |v| out.push_str(v)),
                Part::Authority => out.push_str(&req.authority().unwrap_or_default()),
                Part::SourceAddress => req.with_source_address(&mut |v| out.push_str(v)),
                Part::SourceIp => {
                    req.with_source_address(&mut |v| out.push_str(&crate::client_ip(v)))
                }
                Part::Route => out.push_str(&req.route()),
                Part::PeerIdentity => out.push_str(&req.peer_identity().unwrap_or_default()),
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for Template {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Template::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeRequest;

    fn render(t: &str) -> String {
        let req = FakeRequest {
            source: "10.0.0.7:4242".into(),
            ..FakeRequest::default()
        }
        .with_header("x-user", "alice");
        let t = Template::parse(t).unwrap();
        let rendered = t.render(&req);
        // Lent or rendered, the value is the same.
        let mut lent = String::new();
        t.with_rendered(&req, &mut String::from("stale"), &mut |v| {
            lent = v.to_string()
        });
        assert_eq!(lent, rendered);
        rendered
    }

    #[test]
    fn variables() {
        assert_eq!(render("plain"), "plain");
        assert_eq!(render(""), "");
        assert_eq!(render("u=%REQ(x-user)%"), "u=alice");
        assert_eq!(render("%REQ(X-User)%"), "alice");
        assert_eq!(render("[%REQ(x-missing)%]"), "[]");
        assert_eq!(
            render("%METHOD% %PATH% %AUTHORITY% %ROUTE% %REQUEST_ID%"),
            "GET /p shop.local api rid-1"
        );
        assert_eq!(
            render("%SOURCE_ADDRESS%|%SOURCE_IP%"),
            "10.0.0.7:4242|10.0.0.7"
        );
        assert_eq!(render("%PEER_IDENTITY%"), "");
        assert_eq!(render("100%% sure"), "100% sure");
        assert_eq!(render("%%%METHOD%%%"), "%GET%");
        assert!(Template::parse("static").unwrap().is_literal());
        assert!(!Template::parse("%PATH%").unwrap().is_literal());
    }

    #[test]
    fn errors() {
        assert!(Template::parse("%NOPE%")
            .unwrap_err()
            .contains("unknown variable %NOPE%"));
        assert!(Template::parse("50%").unwrap_err().contains("unterminated"));
        assert!(Template::parse("%REQ(bad name)%")
            .unwrap_err()
            .contains("not a header name"));
        assert!(Template::parse("%REQ()%").is_err());
    }
}
