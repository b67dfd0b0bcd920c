//! [`RawH2`]: HTTP/2 frames written by hand, for requests a real client refuses to send:
//! connection-specific fields, upper-case names, CR/LF in values, pseudo-headers out of
//! order, a `content-length` that the DATA frames contradict.
//!
//! Header blocks are encoded as HPACK literals without indexing and without Huffman
//! coding, so any byte can be sent. Of an answer only the `:status` is decoded: enough to
//! tell a response from a refusal. Each case should use its own connection, so that the
//! `:status` is never a reference into a dynamic table this decoder does not keep.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
pub const CONTINUATION: u8 = 0x9;
pub const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// A header block of these fields, in this order, as given: HPACK literals without
/// indexing, new names (RFC 7541 §6.2.2), so any byte can be sent.
pub fn header_block_of(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        block.push(0x00);
        encode_string(&mut block, name);
        encode_string(&mut block, value);
    }
    block
}

/// How the server ended a stream.
#[derive(Debug, PartialEq, Eq)]
pub enum H2Outcome {
    /// A response head (and the body that followed it, up to END_STREAM or the wait's
    /// end). `status` is `None` if it could not be decoded.
    Response { status: Option<u16>, body: Vec<u8> },
    /// RST_STREAM with this error code (1: PROTOCOL_ERROR).
    Reset(u32),
    /// GOAWAY with this error code, before any answer on the stream.
    GoAway(u32),
    /// The connection closed before any answer on the stream.
    Closed,
    /// Nothing decisive before the wait ended.
    TimedOut,
}

impl H2Outcome {
    /// The request was refused: reset, the connection ended, or a 4xx answer.
    pub fn refused(&self) -> bool {
        match self {
            H2Outcome::Response { status, .. } => status.is_some_and(|s| (400..500).contains(&s)),
            H2Outcome::Reset(_) | H2Outcome::GoAway(_) | H2Outcome::Closed => true,
            H2Outcome::TimedOut => false,
        }
    }
}

pub struct RawH2 {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawH2 {
    /// Connect and send the client preface and an empty SETTINGS frame.
    pub async fn connect(addr: SocketAddr) -> RawH2 {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        let mut c = RawH2 {
            stream,
            buf: Vec::new(),
        };
        c.write(PREFACE).await;
        c.frame(SETTINGS, 0, 0, &[]).await;
        c
    }

    /// A HEADERS frame (END_HEADERS set) with these fields, in this order, as given.
    pub async fn headers(&mut self, stream_id: u32, fields: &[(&[u8], &[u8])], end_stream: bool) {
        let block = header_block_of(fields);
        let flags = END_HEADERS | if end_stream { END_STREAM } else { 0 };
        self.frame(HEADERS, flags, stream_id, &block).await;
    }

    /// Any frame, as given (`kind` and `flags` from RFC 9113 §6).
    pub async fn send_frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        self.frame(kind, flags, stream_id, payload).await;
    }

    /// Bytes as they are: a frame cut anywhere, or trickled.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.write(bytes).await;
    }

    pub async fn data(&mut self, stream_id: u32, data: &[u8], end_stream: bool) {
        let flags = if end_stream { END_STREAM } else { 0 };
        self.frame(DATA, flags, stream_id, data).await;
    }

    /// Read until the stream `stream_id` is answered, reset or the connection ends;
    /// SETTINGS and PING are acknowledged along the way.
    pub async fn outcome(&mut self, stream_id: u32, wait: Duration) -> H2Outcome {
        let deadline = tokio::time::Instant::now() + wait;
        let mut response: Option<(Option<u16>, Vec<u8>)> = None;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.read_frame()).await {
                Ok(Some(f)) => f,
                Ok(None) => {
                    return match response {
                        Some((status, body)) => H2Outcome::Response { status, body },
                        None => H2Outcome::Closed,
                    }
                }
                Err(_) => {
                    return match response {
                        Some((status, body)) => H2Outcome::Response { status, body },
                        None => H2Outcome::TimedOut,
                    }
                }
            };
            let (kind, flags, id, payload) = frame;
            match kind {
                SETTINGS if flags & ACK == 0 => self.frame(SETTINGS, ACK, 0, &[]).await,
                PING if flags & ACK == 0 => self.frame(PING, ACK, 0, &payload).await,
                GOAWAY if response.is_none() => {
                    let code = payload
                        .get(4..8)
                        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    return H2Outcome::GoAway(code);
                }
                RST_STREAM if id == stream_id => {
                    let code = payload
                        .get(..4)
                        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                    return match response {
                        Some((status, body)) => H2Outcome::Response { status, body },
                        None => H2Outcome::Reset(code),
                    };
                }
                HEADERS if id == stream_id && response.is_none() => {
                    response = Some((decode_status(header_block(flags, &payload)), Vec::new()));
                    if flags & END_STREAM != 0 {
                        let (status, body) = response.take().unwrap_or_default();
                        return H2Outcome::Response { status, body };
                    }
                }
                DATA if id == stream_id => {
                    if let Some((_, body)) = response.as_mut() {
                        body.extend_from_slice(data_payload(flags, &payload));
                    }
                    if flags & END_STREAM != 0 {
                        let (status, body) = response.take().unwrap_or_default();
                        return H2Outcome::Response { status, body };
                    }
                }
                _ => {}
            }
        }
    }

    /// The server's first SETTINGS frame, as (identifier, value) pairs.
    pub async fn server_settings(&mut self, wait: Duration) -> Vec<(u16, u32)> {
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some((kind, flags, _, payload))) =
            tokio::time::timeout_at(deadline, self.read_frame()).await
        {
            if kind == SETTINGS && flags & ACK == 0 {
                self.frame(SETTINGS, ACK, 0, &[]).await;
                return payload
                    .chunks_exact(6)
                    .map(|c| {
                        (
                            u16::from_be_bytes([c[0], c[1]]),
                            u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
                        )
                    })
                    .collect();
            }
        }
        panic!("no SETTINGS from the server");
    }

    async fn frame(&mut self, kind: u8, flags: u8, stream_id: u32, payload: &[u8]) {
        let len = u32::try_from(payload.len()).expect("frame fits");
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&len.to_be_bytes()[1..]);
        f.push(kind);
        f.push(flags);
        f.extend_from_slice(&(stream_id & 0x7fff_ffff).to_be_bytes());
        f.extend_from_slice(payload);
        self.write(&f).await;
    }

    async fn write(&mut self, bytes: &[u8]) {
        // The server may have reset the connection already: that is an outcome, read later.
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next frame, or `None` at EOF or on a reset connection.
    async fn read_frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let kind = self.buf[3];
                    let flags = self.buf[4];
                    let id =
                        u32::from_be_bytes([self.buf[5], self.buf[6], self.buf[7], self.buf[8]])
                            & 0x7fff_ffff;
                    let payload = self.buf[9..9 + len].to_vec();
                    self.buf.drain(..9 + len);
                    return Some((kind, flags, id, payload));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_int(out, 0x00, 7, s.len());
    out.extend_from_slice(s);
}

/// An HPACK integer with an `n`-bit prefix, the first byte's other bits set to `first`.
fn encode_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// An HPACK integer with an `n`-bit prefix at the front of `b`, and the bytes it took.
fn decode_int(b: &[u8], n: u32) -> Option<(usize, usize)> {
    let max = (1usize << n) - 1;
    let mut v = (*b.first()? as usize) & max;
    if v < max {
        return Some((v, 1));
    }
    let mut shift = 0;
    for (i, byte) in b.iter().enumerate().skip(1) {
        v += ((byte & 0x7f) as usize) << shift;
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
        shift += 7;
        if shift > 28 {
            return None;
        }
    }
    None
}

/// The header block fragment of a HEADERS frame (padding and priority removed).
fn header_block(flags: u8, payload: &[u8]) -> &[u8] {
    let (mut start, mut end) = (0, payload.len());
    if flags & 0x8 != 0 {
        let pad = payload.first().copied().unwrap_or(0) as usize;
        start = 1;
        end = end.saturating_sub(pad);
    }
    if flags & 0x20 != 0 {
        start += 5;
    }
    payload.get(start..end).unwrap_or_default()
}

fn data_payload(flags: u8, payload: &[u8]) -> &[u8] {
    if flags & 0x8 == 0 {
        return payload;
    }
    let pad = payload.first().copied().unwrap_or(0) as usize;
    payload
        .get(1..payload.len().saturating_sub(pad))
        .unwrap_or_default()
}

/// `:status` from the first field of a response's header block, read on a connection
/// whose dynamic table is still empty.
fn decode_status(block: &[u8]) -> Option<u16> {
    let mut b = block;
    // Dynamic table size updates may come first (RFC 7541 §6.3).
    while b.first().is_some_and(|x| x & 0xe0 == 0x20) {
        let (_, used) = decode_int(b, 5)?;
        b = &b[used..];
    }
    let first = *b.first()?;
    if first & 0x80 != 0 {
        // Indexed field: the static table holds seven `:status` entries (8-14).
        let (index, _) = decode_int(b, 7)?;
        return [200, 204, 206, 304, 400, 404, 500]
            .get(index.checked_sub(8)?)
            .copied();
    }
    // A literal whose name is a static `:status` entry.
    let prefix = if first & 0x40 != 0 { 6 } else { 4 };
    let (name_index, used) = decode_int(b, prefix)?;
    if !(8..=14).contains(&name_index) {
        return None;
    }
    let b = &b[used..];
    let huffman = b.first()? & 0x80 != 0;
    let (len, used) = decode_int(b, 7)?;
    let value = b.get(used..used + len)?;
    let text = if huffman {
        huffman_digits(value)?
    } else {
        String::from_utf8(value.to_vec()).ok()?
    };
    text.parse().ok()
}

/// Huffman-coded decimal digits (RFC 7541 Appendix B: `0`-`2` have 5-bit codes
/// 00000-00010, `3`-`9` 6-bit codes 011001-011111); the rest must be EOS padding.
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let mut out = String::new();
    let mut i = 0;
    while i + 5 <= bits.len() {
        let five = bits[i..i + 5].iter().fold(0u8, |a, b| a << 1 | b);
        if five <= 2 {
            out.push(char::from(b'0' + five));
            i += 5;
        } else if i + 6 <= bits.len() {
            let six = five << 1 | bits[i + 5];
            if (0x19..=0x1f).contains(&six) {
                out.push(char::from(b'0' + six - 0x19 + 3));
                i += 6;
            } else {
                break;
            }
        } else {
            break;
        }
    }
    // Whatever is left is padding: fewer than 8 bits, all ones.
    (bits.len() - i < 8 && bits[i..].iter().all(|b| *b == 1)).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_from_static_index_and_huffman_literal() {
        assert_eq!(decode_status(&[0x88]), Some(200));
        assert_eq!(decode_status(&[0x8d]), Some(404));
        // "418", Huffman: 011010 00001 011110, then seven bits of padding (ones).
        assert_eq!(decode_status(&[0x48, 0x83, 0x68, 0x2f, 0x7f]), Some(418));
        // "503" in plain text, literal without indexing, name index 8.
        assert_eq!(decode_status(&[0x08, 0x03, b'5', b'0', b'3']), Some(503));
        assert_eq!(decode_status(&[0x41, 0x01, b'x']), None, "not :status");
    }

    #[test]
    fn integers_round_trip() {
        for v in [0usize, 1, 126, 127, 128, 300, 16_384, 1 << 20] {
            let mut out = Vec::new();
            encode_int(&mut out, 0, 7, v);
            assert_eq!(decode_int(&out, 7), Some((v, out.len())), "{v}");
        }
    }
}
