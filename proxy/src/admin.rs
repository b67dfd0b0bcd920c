//! The admin endpoint (default 127.0.0.1:9901), on the control-plane runtime.
//!
//! - `/ready`: 200 once every listener is bound and every filter has loaded; 503 before that
//!   and while draining.
//! - `/live`: 200 while the process runs.
//! - `/metrics`: OpenMetrics 1.0 text to clients that accept it (Prometheus does),
//!   Prometheus text 0.0.4 to the others; the Content-Type says which.
//! - `/config`: the effective manifest as JSON, secrets redacted.
//! - `/clusters`: endpoints and their load-balancer state.
//! - `/filters`: loaded filters, their versions and last errors.
//! - `/listeners`: listener names and their bound addresses (useful with port 0).
//! - `POST /reload`: reload the manifest now (same as SIGHUP).

use crate::proxy::{empty, full};
use crate::server::Shared;
use crate::telemetry::metrics::Format;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

type Resp = Response<crate::cluster::Body>;

pub async fn serve(shared: Arc<Shared>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    let mut draining = false;
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            // Keep accepting during the drain so /ready can say 503 (the task ends with the
            // process).
            _ = stop.changed(), if !draining => { draining = true; continue; }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(route(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Resp {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/ready") => {
            let ready = shared.ready.load(Ordering::SeqCst) && !shared.draining.load(Ordering::SeqCst);
            if ready {
                text(StatusCode::OK, "ready\n")
            } else if shared.draining.load(Ordering::SeqCst) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/metrics") => {
            let format = Format::from_accept(
                req.headers()
                    .get(header::ACCEPT)
                    .and_then(|v| v.to_str().ok()),
            );
            let mut r = Response::new(full(shared.metrics.encode_as(format)));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(format.content_type()),
            );
            r
        }
        (&Method::GET, "/config") => {
            let snap = shared.snapshot();
            let mut v = serde_json::to_value(&snap.manifest).unwrap_or_default();
            redact(&mut v);
            // Exporter headers usually carry a collector's API key.
            if let Some(h) = v
                .pointer_mut("/tracing/headers")
                .and_then(|h| h.as_object_mut())
            {
                h.values_mut()
                    .for_each(|x| *x = serde_json::Value::String("[redacted]".into()));
            }
            json(&serde_json::json!({
                "manifest_path": shared.manifest_path.display().to_string(),
                "last_reload_error": shared.last_reload_error.lock().ok().and_then(|e| e.clone()),
                "manifest": v,
            }))
        }
        (&Method::GET, "/clusters") => {
            let snap = shared.snapshot();
            let mut names: Vec<_> = snap.clusters.keys().collect();
            names.sort();
            json(&serde_json::Value::Array(
                names
                    .into_iter()
                    .filter_map(|n| snap.clusters.get(n))
                    .map(|c| c.status_json())
                    .collect(),
            ))
        }
        (&Method::GET, "/filters") => json(&shared.filters.status_json()),
        (&Method::GET, "/listeners") => json(&serde_json::Value::Array(
            shared
                .listeners
                .iter()
                .map(|l| serde_json::json!({"name": &*l.name, "address": l.address.to_string(), "protocol": l.protocol}))
                .collect(),
        )),
        (&Method::POST, "/reload") => match crate::server::reload(shared).await {
            Ok(()) => text(StatusCode::OK, "reloaded\n"),
            Err(e) => text(StatusCode::BAD_REQUEST, &format!("{e}\n")),
        },
        _ => {
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::NOT_FOUND;
            r
        }
    }
}

/// Field names whose values are secrets, wherever they appear in the manifest (filter
/// configs included); also any name ending in `_` + one of them (`hs256_secret`).
const SECRET_KEYS: &[&str] = &[
    "key",
    "secret",
    "password",
    "token",
    "private_key",
    "authorization",
    "api_key",
];

/// Private and symmetric members of a JSON Web Key (RFC 7518 §6): `k` of an `oct` key,
/// `d`, `p`, `q`, `dp`, `dq`, `qi` of RSA and EC private keys.
const JWK_SECRET_MEMBERS: &[&str] = &["k", "d", "p", "q", "dp", "dq", "qi"];

fn redact(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let is_jwk = map.contains_key("kty");
            for (k, val) in map.iter_mut() {
                let lk = k.to_ascii_lowercase();
                let secret = SECRET_KEYS
                    .iter()
                    .any(|s| lk == *s || lk.ends_with(&format!("_{s}")))
                    || (is_jwk && JWK_SECRET_MEMBERS.contains(&k.as_str()));
                if secret && !val.is_null() {
                    *val = serde_json::Value::String("[redacted]".into());
                } else {
                    redact(val);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(redact),
        _ => {}
    }
}

fn text(status: StatusCode, body: &str) -> Resp {
    let mut r = Response::new(full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(v: &serde_json::Value) -> Resp {
    let mut r = Response::new(full(serde_json::to_vec_pretty(v).unwrap_or_default()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

#[cfg(test)]
mod tests {
    #[test]
    fn secrets_are_redacted() {
        let mut v = serde_json::json!({"filters": [{"config": {"hs256_secret": "s3cr3t", "issuer": "me", "keys": [1],
            "jwks": {"keys": [{"kty": "oct", "kid": "a", "k": "c2VjcmV0"}, {"kty": "RSA", "n": "pub", "d": "priv"}]}}}],
            "telemetry": {"headers": {"authorization": "Bearer x"}},
            "routes": [{"match": {"headers": [{"name": "x-env", "exact": "prod"}]}}]});
        super::redact(&mut v);
        let s = v.to_string();
        assert!(
            !s.contains("s3cr3t")
                && !s.contains("Bearer")
                && !s.contains("c2VjcmV0")
                && !s.contains("priv"),
            "{s}"
        );
        assert!(
            s.contains("\"issuer\":\"me\"") && s.contains("\"n\":\"pub\"") && s.contains("x-env"),
            "{s}"
        );
    }
}
