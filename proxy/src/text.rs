//! Small text helpers for hot paths, where `Display` and its formatter cost more than the
//! work around them.

/// `v` in decimal, written into `buf`.
pub fn u16_decimal(v: u16, buf: &mut [u8; 5]) -> &str {
    digits(u64::from(v), buf)
}

/// `v` in decimal, written into `buf`.
pub fn u64_decimal(v: u64, buf: &mut [u8; 20]) -> &str {
    digits(v, buf)
}

/// `v` in decimal, at the end of `buf` (which must have room for its digits).
fn digits(v: u64, buf: &mut [u8]) -> &str {
    let mut i = buf.len();
    let mut v = v;
    loop {
        i -= 1;
        if let Some(b) = buf.get_mut(i) {
            *b = b'0' + (v % 10) as u8;
        }
        v /= 10;
        if v == 0 || i == 0 {
            break;
        }
    }
    // ASCII digits: always UTF-8.
    std::str::from_utf8(buf.get(i..).unwrap_or_default()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    #[test]
    fn as_display_writes_them() {
        for v in [0u16, 7, 10, 200, 404, 503, 9999, 10000, 65535] {
            assert_eq!(super::u16_decimal(v, &mut [0; 5]), v.to_string());
        }
        for v in [0u64, 9, 10, 1_234_567_890_123, u64::MAX] {
            assert_eq!(super::u64_decimal(v, &mut [0; 20]), v.to_string());
        }
    }
}
