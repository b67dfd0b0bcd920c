//! `otlp-sink`: a minimal OTLP/gRPC collector for the benchmark (`bench/run.sh`, scenario
//! `wasmesh-tracing`). It answers every export as a collector does and counts the spans.
//!
//! It shares the load generator's CPU, so what it costs there is taken from the load: by
//! default it counts spans by walking the protobuf wire format of each export (resource
//! spans → scope spans → spans) without building any message, which costs about a tenth
//! of decoding it. `--decode` decodes every export with the official protobuf definitions
//! instead, as the test suite's receiver does (tests/src/otlp.rs), for a spot check that
//! the two agree.
//!
//! Usage: `otlp-sink [--listen 127.0.0.1:0] [--decode]`. Prints `listening on ADDR`, and on
//! SIGTERM or Ctrl-C `spans received: N`, `export bytes received: N` (as sent, compressed
//! or not) and `malformed exports: N` if any were.

use bytes::{Buf, Bytes};
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Default)]
struct Counts {
    spans: AtomicU64,
    malformed: AtomicU64,
    /// Export bodies' bytes as they came over the wire (compressed or not).
    bytes: AtomicU64,
}

/// A field's number and, when length-delimited, its content.
type Field<'a> = (u64, Option<&'a [u8]>);

/// A protobuf wire-format reader over one message: just enough to find fields and skip
/// the rest.
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = self.0.split_first()?;
            self.0 = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    /// The next field: its number and, for a length-delimited one, its bytes. `None` at the
    /// end; `Some(Err(()))` on malformed input.
    fn field(&mut self) -> Option<Result<Field<'a>, ()>> {
        if self.0.is_empty() {
            return None;
        }
        let Some(key) = self.varint() else {
            return Some(Err(()));
        };
        let skipped = match key & 7 {
            0 => self.varint().map(|_| None),
            1 => self.take(8).map(|_| None),
            2 => self
                .varint()
                .and_then(|n| usize::try_from(n).ok())
                .and_then(|n| self.take(n))
                .map(Some),
            5 => self.take(4).map(|_| None),
            _ => None,
        };
        Some(skipped.map(|b| (key >> 3, b)).ok_or(()))
    }

    /// The length-delimited fields numbered `number`.
    fn each(
        mut self,
        number: u64,
        mut f: impl FnMut(&'a [u8]) -> Result<(), ()>,
    ) -> Result<(), ()> {
        while let Some(field) = self.field() {
            if let (n, Some(b)) = field? {
                if n == number {
                    f(b)?;
                }
            }
        }
        Ok(())
    }
}

/// Spans in an `ExportTraceServiceRequest`: resource_spans = 1, scope_spans = 2, spans = 2.
fn count_spans(msg: &[u8]) -> Result<u64, ()> {
    let mut n = 0;
    Wire(msg).each(1, |resource_spans| {
        Wire(resource_spans).each(2, |scope_spans| {
            Wire(scope_spans).each(2, |_span| {
                n += 1;
                Ok(())
            })
        })
    })?;
    Ok(n)
}

fn count_decoded(msg: &[u8]) -> Result<u64, ()> {
    let req = ExportTraceServiceRequest::decode(msg).map_err(|_| ())?;
    Ok(req
        .resource_spans
        .iter()
        .flat_map(|r| &r.scope_spans)
        .map(|s| s.spans.len() as u64)
        .sum())
}

/// The gRPC messages in a request body (5-byte prefix: compressed flag, big-endian length).
/// A compressed message (flag 1) is gzip, the only encoding a proxy sends
/// (`tracing.compression: gzip`).
fn grpc_messages(mut body: Bytes, mut f: impl FnMut(&[u8]) -> Result<(), ()>) -> Result<(), ()> {
    while body.has_remaining() {
        if body.len() < 5 || body[0] > 1 {
            return Err(());
        }
        let compressed = body[0] == 1;
        let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
        body.advance(5);
        if body.len() < len {
            return Err(());
        }
        let msg = body.split_to(len);
        if compressed {
            use std::io::Read as _;
            let mut plain = Vec::new();
            flate2::read::GzDecoder::new(&msg[..])
                .read_to_end(&mut plain)
                .map_err(|_| ())?;
            f(&plain)?;
        } else {
            f(&msg)?;
        }
    }
    Ok(())
}

/// A gRPC answer: at most one message, then the status in trailers.
type Frames = futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;
type Reply = Response<StreamBody<Frames>>;

fn reply(status: &'static str, message: Option<&'static str>) -> Reply {
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static(status));
    if let Some(m) = message {
        trailers.insert("grpc-message", HeaderValue::from_static(m));
    }
    let mut frames = Vec::new();
    if status == "0" {
        // An empty ExportTraceServiceResponse.
        frames.push(Ok(Frame::data(Bytes::from_static(&[0, 0, 0, 0, 0]))));
    }
    frames.push(Ok(Frame::trailers(trailers)));
    let mut resp = Response::new(StreamBody::new(futures_util::stream::iter(frames)));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/grpc"));
    resp
}

async fn export(
    req: Request<Incoming>,
    counts: Arc<Counts>,
    decode: bool,
) -> Result<Reply, Infallible> {
    if req.uri().path() != "/opentelemetry.proto.collector.trace.v1.TraceService/Export" {
        return Ok(reply("12", Some("unimplemented")));
    }
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return Ok(reply("13", Some("body read failed"))),
    };
    counts.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
    let mut n = 0;
    let counted = grpc_messages(body, |msg| {
        n += if decode {
            count_decoded(msg)?
        } else {
            count_spans(msg)?
        };
        Ok(())
    });
    if counted.is_err() {
        counts.malformed.fetch_add(1, Ordering::Relaxed);
        return Ok(reply("3", Some("malformed export")));
    }
    counts.spans.fetch_add(n, Ordering::Relaxed);
    Ok(reply("0", None))
}

fn main() -> anyhow::Result<()> {
    let mut listen = "127.0.0.1:0".to_string();
    let mut decode = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--listen" => listen = args.next().unwrap_or(listen),
            "--decode" => decode = true,
            other => anyhow::bail!(
                "unknown argument `{other}` (usage: otlp-sink [--listen ADDR] [--decode])"
            ),
        }
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&listen).await?;
        println!("listening on {}", listener.local_addr()?);
        let counts = Arc::new(Counts::default());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            let (stream, _) = tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(_) => continue,
                },
            };
            let _ = stream.set_nodelay(true);
            let counts = counts.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req| export(req, counts.clone(), decode));
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
        println!("spans received: {}", counts.spans.load(Ordering::Relaxed));
        println!(
            "export bytes received: {}",
            counts.bytes.load(Ordering::Relaxed)
        );
        let bad = counts.malformed.load(Ordering::Relaxed);
        if bad > 0 {
            println!("malformed exports: {bad}");
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    #[test]
    fn walking_counts_what_decoding_counts() {
        let span = |name: &str| Span {
            name: name.into(),
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            ..Default::default()
        };
        let req = ExportTraceServiceRequest {
            resource_spans: vec![
                ResourceSpans {
                    scope_spans: vec![
                        ScopeSpans {
                            spans: vec![span("a"), span("b")],
                            ..Default::default()
                        },
                        ScopeSpans {
                            spans: vec![span("c")],
                            ..Default::default()
                        },
                    ],
                    ..Default::default()
                },
                ResourceSpans {
                    scope_spans: vec![ScopeSpans {
                        spans: vec![span("d")],
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        };
        let bytes = req.encode_to_vec();
        assert_eq!(count_spans(&bytes), Ok(4));
        assert_eq!(count_decoded(&bytes), Ok(4));
        assert_eq!(count_spans(&bytes[..bytes.len() - 1]), Err(()));

        // The same export as two gRPC messages, the second gzipped.
        let mut zipped = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut zipped, &bytes).expect("gzip");
        let zipped = zipped.finish().expect("gzip");
        let mut body = Vec::new();
        for (flag, msg) in [(0u8, &bytes), (1, &zipped)] {
            body.push(flag);
            body.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            body.extend_from_slice(msg);
        }
        let mut n = 0;
        grpc_messages(Bytes::from(body), |m| {
            n += count_spans(m)?;
            Ok(())
        })
        .expect("both messages");
        assert_eq!(n, 8);
    }
}
