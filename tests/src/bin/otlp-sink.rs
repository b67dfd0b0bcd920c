//! `otlp-sink`: a minimal OTLP/gRPC collector for the benchmark (`bench/run.sh`, scenario
//! `wasmesh-tracing`). It decodes every export with the official protobuf definitions,
//! counts the spans and keeps nothing, so it costs the machine little.
//!
//! Usage: `otlp-sink [--listen 127.0.0.1:0]`. Prints `listening on ADDR`, and on SIGTERM or
//! Ctrl-C `spans received: N`.

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

struct Sink(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .get_ref()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:0".to_string();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or(listen),
            other => anyhow::bail!("unknown argument `{other}` (usage: otlp-sink [--listen ADDR])"),
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let count = Arc::new(AtomicU64::new(0));
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let stop = async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
        };
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Sink(count.clone())))
            .serve_with_incoming_shutdown(incoming, stop)
            .await?;
        println!("spans received: {}", count.load(Ordering::Relaxed));
        Ok(())
    })
}
