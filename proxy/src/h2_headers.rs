//! A deadline for HTTP/2 header blocks: slowloris over HTTP/2.
//!
//! hyper's HTTP/2 server has no header read timeout. A client that sends a HEADERS frame
//! without END_HEADERS and then trickles CONTINUATION frames, or trickles a HEADERS
//! frame's own payload, keeps bytes moving, so the connection's idle timeout never fires,
//! and it holds a connection slot for as long as it likes. The HTTP/1.1 server closes such
//! a connection after the listener's `request_headers_timeout`; this gives HTTP/2 the same
//! rule.
//!
//! [`watch`] sees the client's bytes as hyper reads them and follows the 9-byte header of
//! every frame (nothing else is parsed; hyper still does all of HTTP/2). When a header
//! block opens it records the time in a [`HeaderBlockClock`], and clears it when the block
//! ends; the connection's serving loop closes the connection once a block has been open
//! for longer than the timeout. A block that arrives whole in one read never touches the
//! clock, so ordinary requests cost a few comparisons per frame.

use crate::idle::AtomicInstant;
use std::sync::Arc;
use tokio::sync::Notify;
use tokio::time::Instant;

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` (RFC 9113 §3.4): read before the first frame.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const HEADERS: u8 = 0x1;
const PUSH_PROMISE: u8 = 0x5;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// When the header block the client is sending began, shared by the connection's reader
/// and its serving loop.
pub struct HeaderBlockClock {
    open_since: AtomicInstant,
    opened: Notify,
}

impl HeaderBlockClock {
    pub fn new() -> Arc<Self> {
        Arc::new(HeaderBlockClock {
            open_since: AtomicInstant::none(),
            opened: Notify::new(),
        })
    }

    /// When the header block now open began, if one is.
    pub fn open_since(&self) -> Option<Instant> {
        self.open_since.get()
    }

    /// Resolves when a header block opens; at once if one opened since the last call
    /// (the serving loop then re-arms its deadline).
    pub async fn opened(&self) {
        self.opened.notified().await;
    }

    fn set_open(&self, open: bool) {
        if open {
            self.open_since.set_now();
            self.opened.notify_one();
        } else {
            self.open_since.clear();
        }
    }
}

/// Where the reader is in the client's frame stream.
#[derive(Debug)]
struct FrameScan {
    /// Preface bytes still to pass.
    skip: usize,
    head: [u8; FRAME_HEADER_LEN],
    head_len: usize,
    /// Payload bytes of the current frame still to pass.
    remaining: usize,
    /// The current frame carries a header block fragment.
    in_header_frame: bool,
    /// A header block began without END_HEADERS and no frame has ended it yet.
    in_block: bool,
}

impl FrameScan {
    fn new() -> Self {
        FrameScan {
            skip: PREFACE_LEN,
            head: [0; FRAME_HEADER_LEN],
            head_len: 0,
            remaining: 0,
            in_header_frame: false,
            in_block: false,
        }
    }

    /// A header block is being received: a block without its END_HEADERS yet, or a
    /// header frame whose payload has not all arrived.
    fn open(&self) -> bool {
        self.in_block || (self.in_header_frame && self.remaining > 0)
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let n = if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                n
            } else if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                n
            } else {
                let n = (FRAME_HEADER_LEN - self.head_len).min(data.len());
                self.head[self.head_len..self.head_len + n].copy_from_slice(&data[..n]);
                self.head_len += n;
                if self.head_len == FRAME_HEADER_LEN {
                    self.head_len = 0;
                    self.frame_begins();
                }
                n
            };
            data = &data[n..];
        }
    }

    fn frame_begins(&mut self) {
        let [l0, l1, l2, kind, flags, ..] = self.head;
        self.remaining = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
        self.in_header_frame = matches!(kind, HEADERS | PUSH_PROMISE | CONTINUATION);
        if self.in_header_frame {
            self.in_block = flags & END_HEADERS == 0;
        }
    }
}

/// What to run on each read of an HTTP/2 client's bytes (with
/// `tokio_util::io::InspectReader`, from the connection preface on): keeps `clock` told
/// whether a header block is open.
pub fn watch(clock: Arc<HeaderBlockClock>) -> impl FnMut(&[u8]) {
    let mut scan = FrameScan::new();
    move |bytes| {
        let was = scan.open();
        scan.feed(bytes);
        let now = scan.open();
        if was != now {
            clock.set_open(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const DATA: u8 = 0x0;
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;

    fn frame(kind: u8, flags: u8, payload_len: usize) -> Vec<u8> {
        let l = payload_len.to_be_bytes();
        let mut f = vec![l[5], l[6], l[7], kind, flags, 0, 0, 0, 1];
        f.resize(FRAME_HEADER_LEN + payload_len, 0xab);
        f
    }

    /// Feed `bytes` in pieces of `step`, returning whether a block was open after each.
    fn open_after(bytes: &[u8], step: usize) -> Vec<bool> {
        let mut s = FrameScan::new();
        bytes
            .chunks(step)
            .map(|c| {
                s.feed(c);
                s.open()
            })
            .collect()
    }

    #[test]
    fn whole_frames_never_leave_a_block_open() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(SETTINGS, 0, 18));
        bytes.extend(frame(HEADERS, END_HEADERS | 0x1, 40));
        bytes.extend(frame(DATA, 0x1, 100));
        bytes.extend(frame(HEADERS, 0, 10));
        bytes.extend(frame(CONTINUATION, 0, 10));
        bytes.extend(frame(CONTINUATION, END_HEADERS, 10));
        bytes.extend(frame(PING, 0, 8));
        // Read all at once, or in pieces that end exactly where the block ends.
        assert_eq!(open_after(&bytes, bytes.len()), vec![false]);
        let mut s = FrameScan::new();
        let block_end = bytes.len() - FRAME_HEADER_LEN - 8;
        s.feed(&bytes[..block_end]);
        assert!(!s.open());
        s.feed(&bytes[block_end..]);
        assert!(!s.open());
    }

    #[test]
    fn a_block_is_open_until_its_end_headers_and_its_last_byte() {
        let mut s = FrameScan::new();
        s.feed(PREFACE);
        s.feed(&frame(HEADERS, 0, 10));
        assert!(s.open(), "HEADERS without END_HEADERS");
        let cont = frame(CONTINUATION, END_HEADERS, 10);
        s.feed(&cont[..FRAME_HEADER_LEN + 3]);
        assert!(s.open(), "the last fragment has not all arrived");
        s.feed(&cont[FRAME_HEADER_LEN + 3..]);
        assert!(!s.open());

        // A single HEADERS frame trickled a byte at a time is open until its last byte.
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(HEADERS, END_HEADERS, 5));
        let open = open_after(&bytes, 1);
        let first_payload_byte = PREFACE_LEN + FRAME_HEADER_LEN;
        assert!(open[..first_payload_byte - 1].iter().all(|o| !o));
        assert!(open[first_payload_byte - 1..bytes.len() - 1]
            .iter()
            .all(|o| *o));
        assert_eq!(open.last(), Some(&false));
    }

    #[test]
    fn frames_split_anywhere_are_followed() {
        let mut bytes = PREFACE.to_vec();
        for _ in 0..20 {
            bytes.extend(frame(DATA, 0, 300));
            bytes.extend(frame(HEADERS, END_HEADERS, 17));
        }
        bytes.extend(frame(HEADERS, 0, 17));
        for step in [1, 2, 7, 9, 10, 64, 1000] {
            let open = open_after(&bytes, step);
            assert_eq!(open.last(), Some(&true), "step {step}");
        }
    }

    #[tokio::test]
    async fn the_clock_records_and_announces_an_open_block() {
        let clock = HeaderBlockClock::new();
        assert!(clock.open_since().is_none());
        clock.set_open(true);
        let since = clock.open_since().expect("open");
        assert!(since <= Instant::now());
        // The announcement waits for the loop even if it was not listening yet.
        tokio::time::timeout(Duration::from_secs(5), clock.opened())
            .await
            .expect("announced");
        clock.set_open(false);
        assert!(clock.open_since().is_none());
    }
}
