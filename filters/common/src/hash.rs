//! A stable, fast, non-cryptographic hash (64-bit FNV-1a with a final avalanche), the
//! same on every worker, instance and proxy: sticky choices and state keys depend on it.

/// Hash `data`, seeded with `salt` (different experiments split users independently).
///
/// ```
/// assert_eq!(filter_common::hash::hash64("", b"alice"), filter_common::hash::hash64("", b"alice"));
/// ```
pub fn hash64(salt: &str, data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in salt.as_bytes().iter().chain([0xffu8].iter()).chain(data) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // FNV's low bits are weak for short inputs: finish with splitmix64's mixer.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// `value` if it is short, else a hash of it: keeps shared-state keys bounded (the host
/// refuses keys over 1 KiB) whatever a client sends.
pub fn bounded_key(value: &str) -> String {
    if value.len() <= 128 {
        value.to_string()
    } else {
        format!("#{:016x}", hash64("key", value.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_evenly() {
        let mut buckets = [0u32; 10];
        for i in 0..100_000 {
            let h = hash64("exp", format!("user-{i}").as_bytes());
            buckets[(h % 10) as usize] += 1;
        }
        for b in buckets {
            assert!((9_500..10_500).contains(&b), "{buckets:?}");
        }
        assert_ne!(hash64("a", b"x"), hash64("b", b"x"));
        assert_eq!(bounded_key("short"), "short");
        assert_eq!(bounded_key(&"x".repeat(500)).len(), 17);
    }
}
