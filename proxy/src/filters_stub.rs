//! TEMPORARY stand-in for the filter host (proxy/src/filters/), so the core builds alone.
#![allow(dead_code, unused_variables)]
use crate::config::{FilterEngineSpec, FilterSpec};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
#[error("filter error")]
pub struct FilterError;

pub trait Callout: Send + Sync {
    fn call(
        &self,
        cluster: &str,
        req: http::Request<bytes::Bytes>,
        timeout: std::time::Duration,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<http::Response<bytes::Bytes>, String>>>>;
}

pub struct FilterHost;
impl FilterHost {
    pub fn new(
        spec: &FilterEngineSpec,
        workers: usize,
        registry: &mut prometheus_client::registry::Registry,
        callout: Arc<dyn Callout>,
    ) -> Result<Arc<Self>, FilterError> {
        Ok(Arc::new(FilterHost))
    }
    pub async fn prepare(
        self: &Arc<Self>,
        filter_dir: Option<&std::path::Path>,
        specs: &[FilterSpec],
        clusters: &std::collections::HashSet<String>,
    ) -> Result<FilterSet, Vec<String>> {
        Ok(FilterSet)
    }
    pub fn activate(self: &Arc<Self>, set: &FilterSet) {}
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::json!([])
    }
    pub fn ready(&self) -> bool {
        true
    }
    pub fn set_routes(&self, name: &str, routes: Vec<String>) {}
}
#[derive(Clone)]
pub struct FilterSet;
impl FilterSet {
    pub fn chain(&self, names: &[String]) -> Result<Chain, String> {
        Ok(Chain)
    }
}
#[derive(Clone, Default)]
pub struct Chain;
impl Chain {
    pub fn is_empty(&self) -> bool {
        true
    }
    pub fn start(&self, info: RequestInfo) -> ChainRun {
        ChainRun
    }
}
pub struct RequestInfo {
    pub request_id: String,
    pub source_addr: std::net::SocketAddr,
    pub peer_identity: Option<String>,
    pub route: Arc<str>,
    pub scheme: &'static str,
    pub trace_id: Option<String>,
    pub span_id: Option<String>,
}
pub enum Verdict {
    Continue,
    Respond(LocalResponse),
}
pub struct LocalResponse {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
    pub flag: Option<String>,
}
pub struct Outcome {
    pub status: u16,
    pub response_flags: String,
    pub duration: std::time::Duration,
    pub cluster: Option<String>,
    pub upstream: Option<String>,
}
pub struct ChainRun;
impl ChainRun {
    pub async fn request_headers(&mut self, parts: &mut http::request::Parts) -> Verdict {
        Verdict::Continue
    }
    pub fn wants_request_body(&self) -> bool {
        false
    }
    pub async fn request_body(&mut self, parts: &mut http::request::Parts, body: bytes::Bytes) -> Result<bytes::Bytes, Verdict> {
        Ok(body)
    }
    pub async fn response_headers(&mut self, parts: &mut http::response::Parts) -> Verdict {
        Verdict::Continue
    }
    pub fn wants_response_body(&self) -> bool {
        false
    }
    pub async fn response_body(&mut self, parts: &mut http::response::Parts, body: bytes::Bytes) -> Result<bytes::Bytes, Verdict> {
        Ok(body)
    }
    pub fn done(self, outcome: &Outcome) {}
    pub fn cluster_override(&self) -> Option<&str> {
        None
    }
    pub fn response_flags(&self) -> &[String] {
        &[]
    }
    pub fn attributes(&self) -> &[(String, String)] {
        &[]
    }
    pub fn filters_ran(&self) -> &[String] {
        &[]
    }
}
