//! Writes that answer nothing (properties, attributes, flags, metric updates, response
//! headers), recorded while a hook runs and handed to the host when it ends: one crossing
//! (`hook.add-effects`) for all of them rather than one call each, none when there are
//! none, in the byte format of the WIT's `effects` type (written straight into one buffer,
//! kept from hook to hook: no allocation per string nor per hook). Also keeps the request
//! data the host passed with the hook (`Hooks::PASS_*`).

use crate::bindings::wasmesh::filter::hook;
use crate::bindings::wasmesh::filter::types::Prefetched;
use std::cell::RefCell;

/// Tags of the `effects` format (see `wit/filter.wit`).
pub(crate) const SET_PROPERTY: u8 = 1;
pub(crate) const SET_ATTRIBUTE: u8 = 2;
pub(crate) const RESPONSE_FLAG: u8 = 3;
pub(crate) const SET_RESPONSE_HEADER: u8 = 4;
pub(crate) const ADD_RESPONSE_HEADER: u8 = 5;
pub(crate) const REMOVE_RESPONSE_HEADER: u8 = 6;
pub(crate) const METRIC: u8 = 7;

/// Metric operations of a [`METRIC`] entry.
pub(crate) enum MetricOp {
    CounterAdd(u64),
    GaugeSet(i64),
    GaugeAdd(i64),
    Observe(f64),
}

struct Current {
    in_hook: bool,
    buf: Vec<u8>,
    pre: Option<Prefetched>,
    /// The hook changed the path: the prefetched one is stale.
    path_changed: bool,
}

/// A value of [`Prefetched`], in the order of its `text`.
#[derive(Clone, Copy)]
pub(crate) enum Pre {
    Id = 0,
    Method = 1,
    Path = 2,
    SourceAddress = 3,
}

thread_local! {
    static CURRENT: RefCell<Current> = const {
        RefCell::new(Current { in_hook: false, buf: Vec::new(), pre: None, path_changed: false })
    };
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    // Strings over 4 GiB cannot come from a 32-bit guest; saturate rather than panic.
    let len = u32::try_from(s.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

/// A hook starts (`pre`: what the host passed with it).
pub(crate) fn begin(pre: Option<Prefetched>) {
    CURRENT.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.in_hook = true;
            c.buf.clear();
            c.pre = pre;
            c.path_changed = false;
        }
    });
}

/// The hook returns: hand the effects it recorded to the host (no call when none).
pub(crate) fn end() {
    CURRENT.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.in_hook = false;
            c.pre = None;
            if !c.buf.is_empty() {
                hook::add_effects(&c.buf);
                c.buf.clear();
            }
        }
    })
}

/// Start the buffer with room for a few entries (one allocation, kept for later hooks,
/// rather than one per growth).
fn room(buf: &mut Vec<u8>) {
    if buf.capacity() == 0 {
        buf.reserve(256);
    }
}

/// Record an entry with string fields for the running hook. False outside a hook.
pub(crate) fn push(tag: u8, fields: &[&str]) -> bool {
    CURRENT.with(|c| match c.try_borrow_mut() {
        Ok(mut c) if c.in_hook => {
            room(&mut c.buf);
            c.buf.push(tag);
            for f in fields {
                put_str(&mut c.buf, f);
            }
            true
        }
        _ => false,
    })
}

/// Record a metric update for the running hook. False outside a hook (e.g. in
/// `configure`): the caller then makes the host call itself.
pub(crate) fn push_metric(metric: u32, labels: &[&str], op: &MetricOp) -> bool {
    CURRENT.with(|c| match c.try_borrow_mut() {
        Ok(mut c) if c.in_hook => {
            let buf = &mut c.buf;
            room(buf);
            buf.push(METRIC);
            buf.extend_from_slice(&metric.to_le_bytes());
            let (code, value) = match op {
                MetricOp::CounterAdd(v) => (0u8, v.to_le_bytes()),
                MetricOp::GaugeSet(v) => (1, v.to_le_bytes()),
                MetricOp::GaugeAdd(v) => (2, v.to_le_bytes()),
                MetricOp::Observe(v) => (3, v.to_le_bytes()),
            };
            buf.push(code);
            buf.extend_from_slice(&value);
            let n = u32::try_from(labels.len()).unwrap_or(u32::MAX);
            buf.extend_from_slice(&n.to_le_bytes());
            for l in labels {
                put_str(buf, l);
            }
            true
        }
        _ => false,
    })
}

/// Reads the buffer this SDK wrote (so it never fails on well-formed input).
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, rest) = self.0.split_at_checked(n)?;
        self.0 = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.bytes(4)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<&'a [u8]> {
        let n = usize::try_from(self.u32()?).ok()?;
        self.bytes(n)
    }
}

/// The value the running hook last gave `key` with `set_property`, if it did: a hook reads
/// its own writes although the host sees them only after it returns.
pub(crate) fn pending_property(key: &str) -> Option<String> {
    CURRENT.with(|c| {
        let c = c.try_borrow().ok()?;
        let mut r = Reader(&c.buf);
        let mut found = None;
        while let Some(&[tag]) = r.bytes(1) {
            match tag {
                SET_PROPERTY | SET_ATTRIBUTE | SET_RESPONSE_HEADER | ADD_RESPONSE_HEADER => {
                    let (k, v) = (r.str()?, r.str()?);
                    if tag == SET_PROPERTY && k == key.as_bytes() {
                        found = Some(v);
                    }
                }
                RESPONSE_FLAG | REMOVE_RESPONSE_HEADER => {
                    r.str()?;
                }
                METRIC => {
                    r.bytes(4 + 1 + 8)?;
                    for _ in 0..r.u32()? {
                        r.str()?;
                    }
                }
                _ => return None,
            }
        }
        found.map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// A value the host passed with the running hook, if it did.
pub(crate) fn prefetched(which: Pre) -> Option<String> {
    CURRENT.with(|c| {
        let c = c.try_borrow().ok()?;
        let p = c.pre.as_ref()?;
        if matches!(which, Pre::Path) && c.path_changed {
            return None;
        }
        let lens = [p.id_len, p.method_len, p.path_len, p.source_address_len];
        let i = which as usize;
        let start = lens
            .get(..i)?
            .iter()
            .flatten()
            .try_fold(0usize, |sum, &n| sum.checked_add(usize::try_from(n).ok()?))?;
        let end = start.checked_add(usize::try_from((*lens.get(i)?)?).ok()?)?;
        p.text.as_deref()?.get(start..end).map(str::to_string)
    })
}

/// Forget the prefetched path (the hook changed it).
pub(crate) fn forget_path() {
    CURRENT.with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            c.path_changed = true;
        }
    });
}
