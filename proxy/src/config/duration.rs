//! Durations in the manifest ("250ms", "5s", "2m"), read as humantime writes them, and at
//! most [`MAX`]. Every duration ends up added to a clock reading or multiplied (backoffs,
//! ejection times), and one the clock cannot hold would panic the worker doing it, on
//! every request: a manifest with a longer one is refused at load, naming the field.

use serde::{Deserializer, Serializer};
use std::time::Duration;

/// The longest duration a manifest may give.
pub const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

fn check<E: serde::de::Error>(d: Duration) -> Result<Duration, E> {
    if d > MAX {
        return Err(E::custom(format!(
            "`{}` is too long: durations are at most 365 days",
            humantime_serde::re::humantime::format_duration(d)
        )));
    }
    Ok(d)
}

pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    humantime_serde::serialize(d, s)
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    check(humantime_serde::deserialize(d)?)
}

/// For `Option<Duration>` fields.
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        humantime_serde::option::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        humantime_serde::option::deserialize(d)?
            .map(check)
            .transpose()
    }
}
