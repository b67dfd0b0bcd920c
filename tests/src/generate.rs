//! Generated test input: a small seeded random number generator, and mutations of JSON
//! documents (manifests). Used by the randomized tests here and in the proxy's unit
//! tests; a failing case names its seed or number, so it can be run again.

use serde_json::{json, Value};

/// splitmix64: seedable, small, and enough to spread test cases (not for anything that
/// needs unpredictability).
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next_u64() % 100 < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// 1 to `max` characters from `alphabet`.
    pub fn token(&mut self, alphabet: &[u8], max: usize) -> String {
        let n = 1 + self.below(max);
        (0..n).map(|_| *self.pick(alphabet) as char).collect()
    }

    /// 0 to `max` arbitrary bytes.
    pub fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Replace, insert or drop one to three bytes of `buf` at or after `from` (the new byte
/// mostly from `interesting`); where the first change is, or `None` if `buf` has nothing
/// at or after `from`.
pub fn mutate_bytes(
    rng: &mut Rng,
    buf: &mut Vec<u8>,
    from: usize,
    interesting: &[u8],
) -> Option<usize> {
    if buf.len() <= from {
        return None;
    }
    let mut first = usize::MAX;
    for _ in 0..1 + rng.below(3) {
        if buf.len() <= from {
            break;
        }
        let at = from + rng.below(buf.len() - from);
        let byte = if rng.chance(70) && !interesting.is_empty() {
            *rng.pick(interesting)
        } else {
            rng.next_u64() as u8
        };
        match rng.below(3) {
            0 => buf[at] = byte,
            1 => buf.insert(at, byte),
            _ => {
                buf.remove(at);
            }
        }
        first = first.min(at);
    }
    Some(first)
}

/// Replacement values for a mutated leaf: mostly of the leaf's own type (so that the
/// document gets past parsing to the checks behind it), sometimes of another.
pub struct Replacements {
    pub numbers: Vec<Value>,
    pub strings: Vec<Value>,
    pub others: Vec<Value>,
}

impl Default for Replacements {
    /// Out-of-range numbers, empty and huge strings, durations past any clock, invalid
    /// regexes and wildcards, and values of the wrong type.
    fn default() -> Self {
        Replacements {
            numbers: vec![
                json!(0),
                json!(-1),
                json!(1),
                json!(65536),
                json!(4_294_967_296u64),
                json!(u64::MAX),
                json!(i64::MIN),
                json!(1.5),
                json!(1e300),
            ],
            strings: vec![
                json!(""),
                json!("0s"),
                json!("1ms"),
                json!("-1s"),
                json!("10000000000000000000s"),
                json!("99999999999999h"),
                json!("(("),
                json!("*"),
                json!("*."),
                json!("/"),
                json!("x".repeat(5000)),
            ],
            others: vec![json!(null), json!(true), json!([]), json!({}), json!([""])],
        }
    }
}

/// Mutate `doc` once or twice: replace a value (see [`Replacements`]) or remove a field
/// or an array item. Values under keys for which `keep` is true are left alone (e.g.
/// addresses, which tests must keep on loopback).
pub fn mutate_json(
    rng: &mut Rng,
    doc: &mut Value,
    with: &Replacements,
    keep: &dyn Fn(&str) -> bool,
) {
    for _ in 0..1 + rng.below(2) {
        let mut all = Vec::new();
        paths(doc, &mut Vec::new(), &mut all, keep);
        let path = all[rng.below(all.len())].clone();
        let Some((last, parent)) = path.split_last() else {
            continue;
        };
        if rng.below(4) == 0 {
            match (at(doc, parent), last) {
                (Some(Value::Object(o)), Value::String(k)) => {
                    o.remove(k);
                }
                (Some(Value::Array(a)), Value::Number(i)) => {
                    let i = i.as_u64().and_then(|i| usize::try_from(i).ok());
                    if let Some(i) = i.filter(|i| *i < a.len()) {
                        a.remove(i);
                    }
                }
                _ => {}
            }
        } else if let Some(v) = at(doc, &path) {
            let pool = match (v.is_number(), v.is_string(), rng.below(5)) {
                (_, _, 0) => &with.others,
                (true, _, _) => &with.numbers,
                (_, true, _) => &with.strings,
                _ => &with.others,
            };
            *v = rng.pick(pool).clone();
        }
    }
}

/// Every path in `v` (object keys and array indices), the root included.
fn paths(v: &Value, path: &mut Vec<Value>, out: &mut Vec<Vec<Value>>, keep: &dyn Fn(&str) -> bool) {
    out.push(path.clone());
    match v {
        Value::Object(m) => {
            for (k, x) in m.iter().filter(|(k, _)| !keep(k)) {
                path.push(Value::String(k.clone()));
                paths(x, path, out, keep);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                path.push(json!(i));
                paths(x, path, out, keep);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at<'a>(v: &'a mut Value, path: &[Value]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, p| match p {
        Value::String(k) => v.get_mut(k.as_str()),
        Value::Number(i) => v.get_mut(usize::try_from(i.as_u64()?).ok()?),
        _ => None,
    })
}
