//! A filter's stdout and stderr: what it writes becomes log lines tagged with the
//! filter's name (stderr at `warn`, stdout at `info`), one line per `\n`.
//!
//! The streams are synchronous and never block (see [`super::wasi`] for why that matters
//! on our current-thread worker runtimes). Output is bounded: lines are cut at
//! [`MAX_LINE`] bytes, and one hook call may log at most [`MAX_BYTES_PER_CALL`] bytes;
//! the rest is dropped and counted in one summary line when the call ends
//! ([`FilterOutput::end_call`]). This is how a filter's panic message reaches the logs.

use bytes::Bytes;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest line logged; the rest of a longer line is cut.
pub const MAX_LINE: usize = 2048;
/// Bytes of stdout + stderr one hook call (or one `configure`) may log.
pub const MAX_BYTES_PER_CALL: usize = 16 * 1024;

#[derive(Default)]
struct Buf {
    /// The current line of each stream (0: stdout, 1: stderr), without its `\n`.
    line: [Vec<u8>; 2],
    /// Bytes accepted for logging in the current call.
    used: usize,
    /// Bytes dropped in the current call (over the budget).
    dropped: usize,
}

/// The output of one filter instance (its store); shared by its stdout and stderr streams.
pub struct FilterOutput {
    filter: Arc<str>,
    buf: Mutex<Buf>,
}

impl FilterOutput {
    pub fn new(filter: &str) -> Arc<Self> {
        Arc::new(FilterOutput {
            filter: Arc::from(filter),
            buf: Mutex::new(Buf::default()),
        })
    }

    /// The stream for WASI `stdout` (`stderr: false`) or `stderr` (`true`).
    pub fn stream(self: &Arc<Self>, stderr: bool) -> LogStream {
        LogStream {
            out: self.clone(),
            stderr,
        }
    }

    fn buf(&self) -> std::sync::MutexGuard<'_, Buf> {
        self.buf.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, stderr: bool, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        if stderr {
            tracing::warn!(target: "wasmesh::filter", filter = %self.filter, stream = "stderr", "{text}");
        } else {
            tracing::info!(target: "wasmesh::filter", filter = %self.filter, stream = "stdout", "{text}");
        }
    }

    fn write(&self, stderr: bool, mut bytes: &[u8]) {
        let mut b = self.buf();
        let room = MAX_BYTES_PER_CALL.saturating_sub(b.used);
        if bytes.len() > room {
            b.dropped += bytes.len() - room;
            bytes = &bytes[..room];
        }
        b.used += bytes.len();
        let idx = usize::from(stderr);
        let mut done = Vec::new();
        for chunk in bytes.split_inclusive(|&c| c == b'\n') {
            let (text, ends) = match chunk.strip_suffix(b"\n") {
                Some(t) => (t, true),
                None => (chunk, false),
            };
            let line = &mut b.line[idx];
            let take = text.len().min(MAX_LINE.saturating_sub(line.len()));
            line.extend_from_slice(&text[..take]);
            if ends {
                done.push(std::mem::take(line));
            }
        }
        drop(b);
        for line in done {
            self.emit(stderr, &line);
        }
    }

    /// A hook call ended: log unfinished lines and what was dropped, and reset the budget.
    pub fn end_call(&self) {
        let mut b = self.buf();
        if b.used == 0 && b.dropped == 0 {
            return;
        }
        let lines = [
            std::mem::take(&mut b.line[0]),
            std::mem::take(&mut b.line[1]),
        ];
        let dropped = std::mem::take(&mut b.dropped);
        b.used = 0;
        drop(b);
        self.emit(false, &lines[0]);
        self.emit(true, &lines[1]);
        if dropped > 0 {
            tracing::warn!(target: "wasmesh::filter", filter = %self.filter, dropped_bytes = dropped,
                "filter output over {MAX_BYTES_PER_CALL} bytes in one call: the rest was dropped");
        }
    }
}

/// One of a filter's output streams.
#[derive(Clone)]
pub struct LogStream {
    out: Arc<FilterOutput>,
    stderr: bool,
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.out.write(self.stderr, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.out.write(self.stderr, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_joined_cut_and_budgeted() {
        let out = FilterOutput::new("t");
        out.write(true, b"hello ");
        out.write(true, b"world\nsecond");
        assert_eq!(out.buf().line[1], b"second");
        out.end_call();
        assert!(out.buf().line[1].is_empty());
        out.write(false, &vec![b'x'; MAX_LINE + 10]);
        assert_eq!(out.buf().line[0].len(), MAX_LINE);
        out.write(false, &vec![b'y'; MAX_BYTES_PER_CALL]);
        assert!(out.buf().dropped > 0);
        out.end_call();
        let b = out.buf();
        assert_eq!((b.used, b.dropped), (0, 0));
    }
}
