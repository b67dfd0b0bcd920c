//! Durations written as in the manifest: an integer and a unit, `"250ms"`, `"5s"`, `"2m"`,
//! `"1h"` (also `"us"`/`"ns"` for completeness). [`Duration`] deserializes from that text.

use serde::{Deserialize, Deserializer};

/// A parsed duration, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub u64);

impl Duration {
    /// Nanoseconds.
    pub fn nanos(self) -> u64 {
        self.0
    }
    /// Milliseconds, rounded down.
    pub fn millis(self) -> u64 {
        self.0 / 1_000_000
    }
}

/// Parse `"250ms"` and the like into nanoseconds.
///
/// ```
/// assert_eq!(filter_common::duration::parse("2s"), Ok(2_000_000_000));
/// ```
pub fn parse(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. \"250ms\", \"5s\""))?;
    let scale: u64 = match unit {
        "ns" => 1,
        "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => {
            return Err(format!(
                "invalid duration {text:?}: the unit must be one of ms, s, m, h"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("duration {text:?} is too long"))
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Duration).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(parse("250ms"), Ok(250_000_000));
        assert_eq!(parse("1m"), Ok(60_000_000_000));
        assert_eq!(parse("0s"), Ok(0));
        assert!(parse("5").is_err());
        assert!(parse("ms").is_err());
        assert!(parse("5 days").is_err());
        assert!(parse("99999999999h").is_err());
    }
}
