//! [`RawConn`]: exact bytes over TCP, for smuggling and malformed-input tests where a real
//! client would refuse to send what the test needs.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RawConn {
    stream: TcpStream,
}

/// What came back on a raw connection.
#[derive(Debug)]
pub struct RawReply {
    pub bytes: Vec<u8>,
    /// The peer closed the connection (EOF or reset) before the wait ended.
    pub closed: bool,
}

impl RawReply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// Status code of the first response in the reply.
    pub fn status(&self) -> Option<u16> {
        statuses(&self.text()).first().copied()
    }

    /// Status codes of every response in the reply (several if requests were pipelined).
    pub fn statuses(&self) -> Vec<u16> {
        statuses(&self.text())
    }
}

fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.")
        .filter_map(|(i, _)| text.get(i + 9..i + 12))
        .filter_map(|s| s.parse().ok())
        .collect()
}

impl RawConn {
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        RawConn { stream }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        // A peer that already closed may reset the write: the test looks at what was read.
        let _ = self.stream.write_all(bytes).await;
    }

    /// Read until the peer closes or `wait` passes.
    pub async fn read_until_close(&mut self, wait: Duration) -> RawReply {
        let mut bytes = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    return RawReply {
                        bytes,
                        closed: true,
                    }
                }
                Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
                Err(_) => {
                    return RawReply {
                        bytes,
                        closed: false,
                    }
                }
            }
        }
    }

    /// Read until `wait` passes without the connection closing, or it closes.
    pub async fn read_for(&mut self, wait: Duration) -> RawReply {
        self.read_until_close(wait).await
    }

    /// Write `bytes` on a new connection and read until it closes (at most 5 s).
    pub async fn exchange(addr: SocketAddr, bytes: &[u8]) -> RawReply {
        let mut c = RawConn::connect(addr).await;
        c.write(bytes).await;
        c.read_until_close(Duration::from_secs(5)).await
    }
}
