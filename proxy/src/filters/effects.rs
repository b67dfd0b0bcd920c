//! Reading the `effects` a hook returns: the byte format described at the WIT's
//! `effects` type (a tag byte per entry, little-endian numbers, strings as a u32 length
//! and UTF-8 bytes). The bytes come from the filter, so every length is checked; entries
//! borrow from the buffer, nothing is copied until the host keeps a value.

/// One entry of an `effects` buffer.
#[derive(Debug, PartialEq)]
pub enum Effect<'a> {
    SetProperty(&'a str, &'a str),
    SetAttribute(&'a str, &'a str),
    ResponseFlag(&'a str),
    SetResponseHeader(&'a [u8], &'a [u8]),
    AddResponseHeader(&'a [u8], &'a [u8]),
    RemoveResponseHeader(&'a [u8]),
    /// `labels`: the label count and values as encoded (see [`encode_labels`]), which is
    /// also how an instance's series cache keys them.
    Metric {
        metric: u32,
        op: MetricOp,
        labels: &'a [u8],
    },
}

/// The operation of a metric entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MetricOp {
    CounterAdd(u64),
    GaugeSet(i64),
    GaugeAdd(i64),
    Observe(f64),
}

/// Iterates over the entries of an `effects` buffer; yields an error (and stops) at the
/// first byte that does not follow the format.
pub struct Effects<'a> {
    rest: &'a [u8],
    failed: bool,
}

/// The entries of `buf`.
pub fn decode(buf: &[u8]) -> Effects<'_> {
    Effects {
        rest: buf,
        failed: false,
    }
}

const TRUNCATED: &str = "effects: truncated entry";

impl<'a> Effects<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], String> {
        let (head, rest) = self.rest.split_at_checked(n).ok_or(TRUNCATED)?;
        self.rest = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b: [u8; 4] = self.bytes(4)?.try_into().map_err(|_| TRUNCATED)?;
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let b: [u8; 8] = self.bytes(8)?.try_into().map_err(|_| TRUNCATED)?;
        Ok(u64::from_le_bytes(b))
    }

    fn raw(&mut self) -> Result<&'a [u8], String> {
        let n = usize::try_from(self.u32()?).map_err(|_| TRUNCATED)?;
        self.bytes(n)
    }

    fn text(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.raw()?).map_err(|_| "effects: a string is not UTF-8".to_string())
    }

    fn entry(&mut self, tag: u8) -> Result<Effect<'a>, String> {
        Ok(match tag {
            1 => Effect::SetProperty(self.text()?, self.text()?),
            2 => Effect::SetAttribute(self.text()?, self.text()?),
            3 => Effect::ResponseFlag(self.text()?),
            4 => Effect::SetResponseHeader(self.raw()?, self.raw()?),
            5 => Effect::AddResponseHeader(self.raw()?, self.raw()?),
            6 => Effect::RemoveResponseHeader(self.raw()?),
            7 => {
                let metric = self.u32()?;
                let code = self.bytes(1)?;
                let v = self.u64()?;
                let op = match code {
                    [0] => MetricOp::CounterAdd(v),
                    // Two's complement and IEEE 754 bits, as the SDK wrote them.
                    [1] => MetricOp::GaugeSet(v as i64),
                    [2] => MetricOp::GaugeAdd(v as i64),
                    [3] => MetricOp::Observe(f64::from_bits(v)),
                    _ => return Err(format!("effects: unknown metric operation {code:?}")),
                };
                let start = self.rest;
                let n = self.u32()?;
                for _ in 0..n {
                    self.text()?;
                }
                let used = start.len() - self.rest.len();
                Effect::Metric {
                    metric,
                    op,
                    labels: start.get(..used).ok_or(TRUNCATED)?,
                }
            }
            t => return Err(format!("effects: unknown tag {t}")),
        })
    }
}

impl<'a> Iterator for Effects<'a> {
    type Item = Result<Effect<'a>, String>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let (&tag, rest) = self.rest.split_first()?;
        self.rest = rest;
        let e = self.entry(tag);
        self.failed = e.is_err();
        Some(e)
    }
}

/// Label values in the encoding of a metric entry: a u32 count, then each value.
pub fn encode_labels(labels: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + labels.iter().map(|l| 4 + l.len()).sum::<usize>());
    let put_len = |out: &mut Vec<u8>, n: usize| {
        out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
    };
    put_len(&mut out, labels.len());
    for l in labels {
        put_len(&mut out, l.len());
        out.extend_from_slice(l.as_bytes());
    }
    out
}

/// The label values of an encoded label list (from a decoded metric entry, so well formed).
pub fn decode_labels(raw: &[u8]) -> Result<Vec<String>, String> {
    let mut r = Effects {
        rest: raw,
        failed: false,
    };
    let n = r.u32()?;
    (0..n).map(|_| r.text().map(str::to_string)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    }

    #[test]
    fn round_trip_and_errors() {
        let mut b = vec![1];
        s(&mut b, "k");
        s(&mut b, "v");
        b.push(7);
        b.extend_from_slice(&3u32.to_le_bytes());
        b.push(0);
        b.extend_from_slice(&5u64.to_le_bytes());
        let labels = encode_labels(&["a".to_string(), "bc".to_string()]);
        b.extend_from_slice(&labels);
        b.push(6);
        s(&mut b, "server");
        let all: Vec<_> = decode(&b).collect::<Result<_, _>>().expect("valid");
        assert_eq!(
            all,
            vec![
                Effect::SetProperty("k", "v"),
                Effect::Metric {
                    metric: 3,
                    op: MetricOp::CounterAdd(5),
                    labels: &labels
                },
                Effect::RemoveResponseHeader(b"server"),
            ]
        );
        assert_eq!(decode_labels(&labels).expect("labels"), vec!["a", "bc"]);
        // Cut anywhere inside: an error, never a panic.
        for cut in 1..b.len() {
            let r: Result<Vec<_>, _> = decode(&b[..cut]).collect();
            let complete = [11, 11 + 1 + 4 + 1 + 8 + labels.len()];
            assert_eq!(r.is_ok(), complete.contains(&cut), "cut at {cut}");
        }
        assert!(decode(&[9]).next().expect("one").is_err());
        assert!(decode(&[3, 1, 0, 0, 0, 0xff]).next().expect("one").is_err());
    }

    /// The bytes come from the filter: whatever they are, decoding ends (after an error,
    /// nothing more is decoded) without a panic, and `decode_labels` too.
    #[test]
    fn arbitrary_bytes_decode_or_fail() {
        let mut valid = vec![1];
        s(&mut valid, "key");
        s(&mut valid, "value");
        valid.push(7);
        valid.extend_from_slice(&3u32.to_le_bytes());
        valid.push(3);
        valid.extend_from_slice(&1.5f64.to_bits().to_le_bytes());
        valid.extend_from_slice(&encode_labels(&["x".to_string()]));
        valid.push(4);
        s(&mut valid, "x-h");
        s(&mut valid, "v");
        let mut rng = wasmesh_e2e::generate::Rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..50_000 {
            let mut b = valid.clone();
            wasmesh_e2e::generate::mutate_bytes(&mut rng, &mut b, 0, &[0, 1, 4, 7, 0xff, 0x80, 12]);
            // Each entry takes at least its tag byte, and an error ends the iteration.
            assert!(decode(&b).count() <= b.len());
            let _ = decode_labels(&b);
        }
    }
}
