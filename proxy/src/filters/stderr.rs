//! A filter's stderr: each write becomes a log line tagged with the filter's name.
//!
//! wasmtime-wasi's inherited stderr blocks on a Tokio runtime of its own, which panics
//! inside a worker's runtime; this stream is synchronous and never blocks. It is how a
//! filter's panic message reaches the logs. Output is capped per write.

use bytes::Bytes;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest part of one write that is logged.
const MAX_LOGGED: usize = 2048;

#[derive(Clone)]
pub struct LogStderr {
    filter: Arc<str>,
}

impl LogStderr {
    pub fn new(filter: &str) -> Self {
        LogStderr {
            filter: Arc::from(filter),
        }
    }

    fn emit(&self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_LOGGED)]);
        let text = text.trim_end();
        if !text.is_empty() {
            tracing::warn!(target: "wasmesh::filter", filter = %self.filter, "stderr: {text}");
        }
    }
}

impl IsTerminal for LogStderr {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStderr {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStderr {
    async fn ready(&mut self) {}
}

impl OutputStream for LogStderr {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.emit(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LogStderr {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.emit(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
