//! Small text helpers for hot paths, where `Display` and its formatter cost more than the
//! work around them.

/// `v` in decimal, written into `buf`.
pub fn u16_decimal(v: u16, buf: &mut [u8; 5]) -> &str {
    // ASCII digits: always UTF-8.
    std::str::from_utf8(decimal(u64::from(v), buf)).unwrap_or_default()
}

/// `v` in decimal ASCII digits, written into `buf`.
pub fn u64_decimal(v: u64, buf: &mut [u8; 20]) -> &[u8] {
    decimal(v, buf)
}

/// `v` in decimal, written at the end of `buf` (which must have room for it).
fn decimal(mut v: u64, buf: &mut [u8]) -> &[u8] {
    let mut i = buf.len();
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
    buf.get(i..).unwrap_or_default()
}

/// `v` without leading and trailing spaces and tabs (HTTP's optional whitespace).
pub fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !matches!(b, b' ' | b'\t'));
    let end = v.iter().rposition(|b| !matches!(b, b' ' | b'\t'));
    match (start, end) {
        (Some(s), Some(e)) => v.get(s..=e).unwrap_or_default(),
        _ => &[],
    }
}

/// The items of a comma-separated header value (RFC 9110 §5.6.1), without their optional
/// whitespace. Empty items are kept (as empty slices); no token matches them.
pub fn list_items(v: &[u8]) -> impl DoubleEndedIterator<Item = &[u8]> {
    v.split(|&c| c == b',').map(trim_ows)
}

/// Call `f` with each item of the list `v`, as [`list_items`] gives them; true when `v`
/// was a list (had a comma). A single value, which nearly every header is, is only
/// trimmed: no splitting iterator on the request path.
pub fn each_list_item(v: &[u8], f: impl FnMut(&[u8])) -> bool {
    let listed = v.contains(&b',');
    if listed {
        list_items(v).for_each(f);
    } else {
        let mut f = f;
        f(trim_ows(v));
    }
    listed
}

/// Whether the list `v` holds `token`, compared case-insensitively.
pub fn has_token(v: &[u8], token: &[u8]) -> bool {
    list_items(v).any(|t| t.eq_ignore_ascii_case(token))
}

/// Whether the last item of the list `v` is `token` (e.g. `chunked` in Transfer-Encoding).
pub fn last_token_is(v: &[u8], token: &[u8]) -> bool {
    list_items(v)
        .next_back()
        .is_some_and(|t| t.eq_ignore_ascii_case(token))
}

/// A decimal number of 1 to 19 digits and nothing else (a Content-Length).
pub fn parse_decimal(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 {
        return None;
    }
    v.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u64::from(b - b'0'))
    })
}

/// The size of a chunk-size line (`1a;ext=x`), or `None` if it is not one.
///
/// RFC 9112 §7.1.1: hex digits, then optional whitespace and extensions, each starting
/// with `;`. Extensions are ignored but must hold no control characters (a bare CR or LF
/// in one is where two parsers disagree about where the line ends), and anything else
/// after the size (`3 xyz`) makes the line invalid, as in hyper.
pub fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 16 {
        return None;
    }
    let rest = line.get(digits..).unwrap_or_default();
    let ext_at = rest
        .iter()
        .position(|&b| b != b' ' && b != b'\t')
        .unwrap_or(rest.len());
    if let Some(ext) = rest.get(ext_at..).filter(|e| !e.is_empty()) {
        let is_ctl = |b: &u8| (*b < 0x20 && *b != b'\t') || *b == 0x7f;
        if ext[0] != b';' || ext.iter().any(is_ctl) {
            return None;
        }
    }
    let hex = std::str::from_utf8(line.get(..digits)?).ok()?;
    u64::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn list_tokens() {
        assert!(super::has_token(b"keep-alive, Upgrade", b"upgrade"));
        assert!(super::has_token(b"\tupgrade\t", b"upgrade"));
        assert!(!super::has_token(b"upgrades, keep-alive", b"upgrade"));
        assert!(!super::has_token(b"", b"upgrade"));
        assert!(super::last_token_is(b"gzip, chunked", b"chunked"));
        assert!(!super::last_token_is(b"chunked, gzip", b"chunked"));
        assert!(!super::last_token_is(b"chunked,", b"chunked"));
    }

    #[test]
    fn chunk_size_lines() {
        use super::chunk_size;
        for (line, want) in [
            (&b"1a"[..], Some(26)),
            (b"0", Some(0)),
            (b"00A", Some(10)),
            (b"3;name=value", Some(3)),
            (b"3 ;name", Some(3)),
            (b"3\t; a = \"q\"", Some(3)),
            (b"3 ", Some(3)),
            (b"ffffffffffffffff", Some(u64::MAX)),
            (b"", None),
            (b";x", None),
            (b"3 xyz", None),
            (b"3x", None),
            (b"-1", None),
            (b"0x3", None),
            (b"3;a\rb", None),
            (b"3;a\x00", None),
            (b"3;a\x7f", None),
            (b"1ffffffffffffffff", None),
        ] {
            assert_eq!(chunk_size(line), want, "{}", line.escape_ascii());
        }
    }

    #[test]
    fn as_display_writes_them() {
        for v in [0u16, 7, 10, 200, 404, 503, 9999, 10000, 65535] {
            assert_eq!(super::u16_decimal(v, &mut [0; 5]), v.to_string());
        }
        for v in [0u64, 9, 10, 1 << 32, 10_000_000_000_000_000_000, u64::MAX] {
            assert_eq!(
                super::u64_decimal(v, &mut [0; 20]),
                v.to_string().as_bytes()
            );
        }
    }
}
