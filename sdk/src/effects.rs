//! Writes that answer nothing (properties, attributes, flags, metric updates, response
//! headers), recorded while a hook runs and handed to the host when it ends: one crossing
//! (`hook.add-effects`) for all of them rather than one call each, none when there are
//! none, in the byte format of the WIT's `effects` type (written straight into one buffer,
//! kept from hook to hook: no allocation per string nor per hook). Also keeps the request
//! data the host passed with the hook (`Hooks::PASS_*`), lent to readers without a copy.

use crate::bindings::wasmesh::filter::hook;
use crate::bindings::wasmesh::filter::types::Prefetched;
use std::cell::{Cell, RefCell};

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

impl MetricOp {
    /// The op code and the 8 value bytes of the entry.
    fn encode(&self) -> (u8, [u8; 8]) {
        match *self {
            MetricOp::CounterAdd(v) => (0, v.to_le_bytes()),
            MetricOp::GaugeSet(v) => (1, v.to_le_bytes()),
            MetricOp::GaugeAdd(v) => (2, v.to_le_bytes()),
            MetricOp::Observe(v) => (3, v.to_le_bytes()),
        }
    }
}

/// The effects of the running hook.
struct Effects {
    in_hook: bool,
    /// The entries recorded so far are `bytes[..len]`. The rest is scratch space that is
    /// already initialized (zeroed when it grows, and kept from hook to hook), so an entry
    /// is written in place with plain stores: no growth check per field, and no unsafe
    /// code to write into spare capacity.
    bytes: Vec<u8>,
    len: usize,
}

impl Effects {
    /// The next `n` bytes of the buffer, to write one entry into (recorded as written).
    /// `None` only when `n` does not fit in memory at all.
    fn room(&mut self, n: usize) -> Option<&mut [u8]> {
        let end = self.len.checked_add(n)?;
        if end > self.bytes.len() {
            // Room for a few entries at first, then doubling: growing (and its zero fill)
            // happens a few times in the life of an instance, not per hook.
            let size = end.max(256).checked_next_power_of_two()?;
            self.bytes.resize(size, 0);
        }
        let room = self.bytes.get_mut(self.len..end)?;
        self.len = end;
        Some(room)
    }

    fn recorded(&self) -> &[u8] {
        self.bytes.get(..self.len).unwrap_or_default()
    }
}

thread_local! {
    static EFFECTS: RefCell<Effects> = const {
        RefCell::new(Effects { in_hook: false, bytes: Vec::new(), len: 0 })
    };
    /// What the host passed with the running hook. Apart from the effects, so that a value
    /// lent to a reader (`with_prefetched`) stays borrowed while the reader records effects.
    static PREFETCHED: RefCell<Option<Prefetched>> = const { RefCell::new(None) };
    /// The running hook changed the path: the prefetched one is stale.
    static PATH_CHANGED: Cell<bool> = const { Cell::new(false) };
}

/// A value of [`Prefetched`], in the order of its `text`.
#[derive(Clone, Copy)]
pub(crate) enum Pre {
    Id = 0,
    Method = 1,
    Path = 2,
    SourceAddress = 3,
}

/// Copy `src` into `dst` (same length; otherwise nothing is copied). Strings of up to 64
/// bytes (header names and values, labels, ids) are copied with a few loads and stores of
/// fixed size: a copy whose length is unknown at compile time becomes a `memory.copy`,
/// which the engine runs as a call into the host (tens of instructions before copying a
/// byte), more than the whole copy of a short string costs this way.
fn copy(dst: &mut [u8], src: &[u8]) {
    if dst.len() != src.len() {
        return;
    }
    match src.len() {
        0 => {}
        1..=3 => {
            // First, middle and last byte cover 1, 2 and 3 bytes.
            for i in [0, src.len() / 2, src.len() - 1] {
                if let (Some(d), Some(s)) = (dst.get_mut(i), src.get(i)) {
                    *d = *s;
                }
            }
        }
        4..=7 => copy_ends::<4>(dst, src),
        8..=15 => copy_ends::<8>(dst, src),
        16..=31 => copy_ends::<16>(dst, src),
        32..=64 => copy_ends::<32>(dst, src),
        _ => dst.copy_from_slice(src),
    }
}

/// Copy the first and the last `N` bytes (they overlap when the length is under `2 * N`):
/// the whole of a slice of `N..=2 * N` bytes.
fn copy_ends<const N: usize>(dst: &mut [u8], src: &[u8]) {
    if let (Some(d), Some(s)) = (dst.first_chunk_mut::<N>(), src.first_chunk::<N>()) {
        *d = *s;
    }
    if let (Some(d), Some(s)) = (dst.last_chunk_mut::<N>(), src.last_chunk::<N>()) {
        *d = *s;
    }
}

/// Writes one entry into the room [`Effects::room`] gave (sized for it exactly).
struct Writer<'a>(&'a mut [u8]);

impl Writer<'_> {
    /// The next `n` bytes of the room (empty if there are fewer, which sizing rules out).
    fn next(&mut self, n: usize) -> &mut [u8] {
        match std::mem::take(&mut self.0).split_at_mut_checked(n) {
            Some((head, rest)) => {
                self.0 = rest;
                head
            }
            None => &mut [],
        }
    }
    fn u8(&mut self, v: u8) {
        self.bytes(&[v]);
    }
    fn bytes(&mut self, v: &[u8]) {
        copy(self.next(v.len()), v);
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        // Strings over 4 GiB cannot come from a 32-bit guest; saturate rather than panic.
        self.u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.bytes(s.as_bytes());
    }
}

/// The bytes an entry of fixed size `head` and these strings takes.
fn entry_size(head: usize, strs: &[&str]) -> Option<usize> {
    strs.iter()
        .try_fold(head, |n, s| n.checked_add(4)?.checked_add(s.len()))
}

/// A hook starts (`pre`: what the host passed with it).
pub(crate) fn begin(pre: Option<Prefetched>) {
    EFFECTS.with(|e| {
        if let Ok(mut e) = e.try_borrow_mut() {
            e.in_hook = true;
            e.len = 0;
        }
    });
    PREFETCHED.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            *p = pre;
        }
    });
    PATH_CHANGED.with(|c| c.set(false));
}

/// The hook returns: hand the effects it recorded to the host (no call when none).
pub(crate) fn end() {
    EFFECTS.with(|e| {
        if let Ok(mut e) = e.try_borrow_mut() {
            e.in_hook = false;
            if e.len != 0 {
                hook::add_effects(e.recorded());
                e.len = 0;
            }
        }
    });
    PREFETCHED.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            *p = None;
        }
    });
}

/// Record an entry with string fields for the running hook. False outside a hook.
pub(crate) fn push(tag: u8, fields: &[&str]) -> bool {
    EFFECTS.with(|e| match e.try_borrow_mut() {
        Ok(mut e) if e.in_hook => {
            // One size check and one bounds check for the whole entry, then plain writes.
            let Some(room) = entry_size(1, fields).and_then(|n| e.room(n)) else {
                return false;
            };
            let mut w = Writer(room);
            w.u8(tag);
            for f in fields {
                w.str(f);
            }
            true
        }
        _ => false,
    })
}

/// Record a metric update for the running hook. False outside a hook (e.g. in
/// `configure`): the caller then makes the host call itself.
pub(crate) fn push_metric(metric: u32, labels: &[&str], op: &MetricOp) -> bool {
    EFFECTS.with(|e| match e.try_borrow_mut() {
        Ok(mut e) if e.in_hook => {
            // Tag, metric, op, value, label count, then the labels.
            let Some(room) = entry_size(1 + 4 + 1 + 8 + 4, labels).and_then(|n| e.room(n)) else {
                return false;
            };
            let mut w = Writer(room);
            w.u8(METRIC);
            w.u32(metric);
            let (code, value) = op.encode();
            w.u8(code);
            w.bytes(&value);
            w.u32(u32::try_from(labels.len()).unwrap_or(u32::MAX));
            for l in labels {
                w.str(l);
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
    EFFECTS.with(|e| {
        let e = e.try_borrow().ok()?;
        let mut r = Reader(e.recorded());
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

/// The value `which` in what the host passed with a hook, if it passed it.
fn value(p: &Prefetched, which: Pre) -> Option<&str> {
    // Values come back to back in `text`: this one starts after those before it. Fields
    // are read where they are (each read from a filter's memory costs a bounds check).
    // Sums saturate: a length past the text makes the value absent, never a panic.
    let n = |len: Option<u32>| len.map_or(0, |n| n as usize);
    let (start, len) = match which {
        Pre::Id => (0, p.id_len),
        Pre::Method => (n(p.id_len), p.method_len),
        Pre::Path => (n(p.id_len).saturating_add(n(p.method_len)), p.path_len),
        Pre::SourceAddress => (
            n(p.id_len)
                .saturating_add(n(p.method_len))
                .saturating_add(n(p.path_len)),
            p.source_address_len,
        ),
    };
    let end = start.checked_add(len? as usize)?;
    p.text.as_deref()?.get(start..end)
}

/// Call `f` with the value `which` the host passed with the running hook (`None` when it
/// did not), lent rather than copied. While `f` runs the hook may read and write anything
/// else, effects included.
pub(crate) fn with_prefetched<R>(which: Pre, f: impl FnOnce(Option<&str>) -> R) -> R {
    if matches!(which, Pre::Path) && PATH_CHANGED.with(Cell::get) {
        return f(None);
    }
    PREFETCHED.with(|p| {
        let p = p.try_borrow().ok();
        f(p.as_deref()
            .and_then(Option::as_ref)
            .and_then(|p| value(p, which)))
    })
}

/// Forget the prefetched path (the hook changed it).
pub(crate) fn forget_path() {
    PATH_CHANGED.with(|c| c.set(true));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_takes_every_length() {
        let src: Vec<u8> = (1..=100).collect();
        for n in 0..=src.len() {
            let mut dst = vec![0; n];
            copy(&mut dst, &src[..n]);
            assert_eq!(dst, &src[..n], "{n} bytes");
        }
    }

    #[test]
    fn prefetched_values_follow_each_other() {
        let mut p = Prefetched {
            text: Some("idGET/p1.2.3.4:5".into()),
            id_len: Some(2),
            method_len: Some(3),
            path_len: Some(2),
            source_address_len: Some(9),
        };
        assert_eq!(value(&p, Pre::Id), Some("id"));
        assert_eq!(value(&p, Pre::Method), Some("GET"));
        assert_eq!(value(&p, Pre::Path), Some("/p"));
        assert_eq!(value(&p, Pre::SourceAddress), Some("1.2.3.4:5"));
        p.text = Some("GET1.2.3.4:5".into());
        (p.id_len, p.path_len) = (None, None);
        assert_eq!(value(&p, Pre::Id), None);
        assert_eq!(value(&p, Pre::Method), Some("GET"));
        assert_eq!(value(&p, Pre::SourceAddress), Some("1.2.3.4:5"));
        p.source_address_len = Some(99);
        assert_eq!(value(&p, Pre::SourceAddress), None);
    }
}
