//! Every way the proxy answers a request itself, in one place: status, Envoy response flag,
//! and the short reason sent as the body and written to the access log.

use http::StatusCode;

/// Why the proxy answered instead of the upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matched")]
    NoRoute,
    #[error("no healthy upstream")]
    NoHealthyUpstream,
    #[error("upstream connect failure")]
    ConnectFailure,
    #[error("upstream overflow: circuit breaker open")]
    Overflow,
    #[error("upstream reset before response")]
    UpstreamReset,
    #[error("upstream request timeout")]
    UpstreamTimeout,
    #[error("invalid request: {0}")]
    BadRequest(&'static str),
    #[error("request body too large")]
    RequestBodyTooLarge,
    #[error("too many request headers")]
    TooManyHeaders,
    #[error("response body too large for the filter buffer")]
    ResponseBodyTooLarge,
    #[error("downstream request failed: {0}")]
    DownstreamBody(&'static str),
    #[error("proxy is draining")]
    Draining,
    /// The request body stalled longer than the listener's `stream_idle_timeout`.
    #[error("stream idle timeout")]
    StreamIdleTimeout,
    /// CONNECT asks for a tunnel, which wasmesh does not make (raw TCP goes through TCP
    /// listeners).
    #[error("CONNECT is not supported")]
    ConnectUnsupported,
}

impl ProxyError {
    /// HTTP status, and Envoy's response flag for the access log and metrics.
    pub fn status_and_flag(self) -> (StatusCode, &'static str) {
        match self {
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, "NR"),
            ProxyError::NoHealthyUpstream => (StatusCode::SERVICE_UNAVAILABLE, "UH"),
            ProxyError::ConnectFailure => (StatusCode::SERVICE_UNAVAILABLE, "UF"),
            ProxyError::Overflow => (StatusCode::SERVICE_UNAVAILABLE, "UO"),
            ProxyError::UpstreamReset => (StatusCode::SERVICE_UNAVAILABLE, "UR"),
            ProxyError::UpstreamTimeout => (StatusCode::GATEWAY_TIMEOUT, "UT"),
            ProxyError::BadRequest(_) => (StatusCode::BAD_REQUEST, "DPE"),
            ProxyError::RequestBodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "DPE"),
            ProxyError::TooManyHeaders => (StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, "DPE"),
            ProxyError::ResponseBodyTooLarge => (StatusCode::BAD_GATEWAY, "UPE"),
            ProxyError::DownstreamBody(_) => (StatusCode::BAD_REQUEST, "DPE"),
            ProxyError::Draining => (StatusCode::SERVICE_UNAVAILABLE, "DR"),
            // Envoy answers a stream idle timeout before the response with 408.
            ProxyError::StreamIdleTimeout => (StatusCode::REQUEST_TIMEOUT, "SI"),
            // 501: the method is one no resource here supports (RFC 9110 §15.6.2). Envoy
            // answers a CONNECT no route accepts with 404 `NR`; the flag is the same.
            ProxyError::ConnectUnsupported => (StatusCode::NOT_IMPLEMENTED, "NR"),
        }
    }

    /// What a failed read of the client's request body means: a stall past the stream
    /// idle timeout, or anything else the client did wrong (bad chunking, gone).
    pub fn from_request_body(e: &(dyn std::error::Error + 'static)) -> Self {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if err.is::<StreamIdle>() {
                return ProxyError::StreamIdleTimeout;
            }
            cur = err.source();
        }
        ProxyError::DownstreamBody("request body read failed")
    }
}

/// A body (the client's request body, or the upstream's response body) waited longer
/// than the stream idle timeout for its next frame.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("no body data for longer than the stream idle timeout")]
pub struct StreamIdle;
