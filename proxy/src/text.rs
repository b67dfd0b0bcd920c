//! Small text helpers for hot paths, where `Display` and its formatter cost more than the
//! work around them.

/// `v` in decimal, written into `buf`.
pub fn u16_decimal(v: u16, buf: &mut [u8; 5]) -> &str {
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
    }
}
