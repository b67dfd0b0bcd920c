//! Constructors that make hook answers read well: `Action::respond(403, "denied")`,
//! `Action::delay_ms(50)`, `LocalResponse::new(429).header(..).flag("RL").into()`.

use crate::{Action, CalloutRequest, Delay, LocalResponse};

impl Action {
    /// Answer with `status` and a plain-text `body`, stopping the chain.
    ///
    /// ```ignore
    /// return Action::respond(403, "forbidden");
    /// ```
    pub fn respond(status: u16, body: impl Into<Vec<u8>>) -> Action {
        Action::Respond(LocalResponse::new(status).body(body))
    }

    /// Wait `millis` milliseconds, then go on with the next filter.
    ///
    /// ```ignore
    /// return Action::delay_ms(100);
    /// ```
    pub fn delay_ms(millis: u32) -> Action {
        Action::Delay(Delay { millis, flag: None })
    }

    /// Wait `millis` milliseconds and record a response flag (e.g. "DI").
    ///
    /// ```ignore
    /// return Action::delay_ms_flagged(100, "DI");
    /// ```
    pub fn delay_ms_flagged(millis: u32, flag: &str) -> Action {
        Action::Delay(Delay {
            millis,
            flag: Some(flag.to_string()),
        })
    }
}

impl LocalResponse {
    /// A local answer with `status`, no headers and an empty body.
    ///
    /// ```ignore
    /// let r = LocalResponse::new(429).header("retry-after", "1").flag("RL");
    /// ```
    pub fn new(status: u16) -> LocalResponse {
        LocalResponse {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            flag: None,
        }
    }

    /// Add a header.
    ///
    /// ```ignore
    /// LocalResponse::new(401).header("www-authenticate", "Bearer");
    /// ```
    pub fn header(mut self, name: &str, value: &str) -> LocalResponse {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Set the body.
    ///
    /// ```ignore
    /// LocalResponse::new(200).body("ok");
    /// ```
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> LocalResponse {
        self.body = body.into();
        self
    }

    /// Set the response flag recorded for this answer (e.g. "RL").
    ///
    /// ```ignore
    /// LocalResponse::new(429).flag("RL");
    /// ```
    pub fn flag(mut self, flag: &str) -> LocalResponse {
        self.flag = Some(flag.to_string());
        self
    }
}

impl From<LocalResponse> for Action {
    fn from(r: LocalResponse) -> Action {
        Action::Respond(r)
    }
}

impl CalloutRequest {
    /// A GET to `path` on `cluster` (which must be listed in the filter's `clusters`),
    /// with the host's default timeout.
    ///
    /// ```ignore
    /// return CalloutRequest::get("authz", "/check").header("x-user", &user).timeout_ms(200).into();
    /// ```
    pub fn get(cluster: &str, path: &str) -> CalloutRequest {
        CalloutRequest {
            cluster: cluster.to_string(),
            method: "GET".to_string(),
            path: path.to_string(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout_millis: 0,
        }
    }

    /// A POST of `body` to `path` on `cluster`.
    ///
    /// ```ignore
    /// CalloutRequest::post("audit", "/events", b"{}".to_vec());
    /// ```
    pub fn post(cluster: &str, path: &str, body: impl Into<Vec<u8>>) -> CalloutRequest {
        CalloutRequest {
            method: "POST".to_string(),
            body: body.into(),
            ..CalloutRequest::get(cluster, path)
        }
    }

    /// Add a header.
    ///
    /// ```ignore
    /// CalloutRequest::get("authz", "/check").header("x-user", "alice");
    /// ```
    pub fn header(mut self, name: &str, value: &str) -> CalloutRequest {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Set the timeout in milliseconds (0: host default).
    ///
    /// ```ignore
    /// CalloutRequest::get("authz", "/check").timeout_ms(250);
    /// ```
    pub fn timeout_ms(mut self, millis: u32) -> CalloutRequest {
        self.timeout_millis = millis;
        self
    }
}

impl From<CalloutRequest> for Action {
    fn from(r: CalloutRequest) -> Action {
        Action::Callout(r)
    }
}
