//! String formats of the atproto data model (DID, handle, NSID, AT-URI, TID, ...).
//!
//! Each check follows the syntax rules of atproto.com/specs and agrees with the
//! interop vectors under `tests/fixtures/interop/syntax`.

pub use crate::tid::{Tid, TidError};

/// A `format` a lexicon `string` can declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StringFormat {
    /// A handle or a DID.
    AtIdentifier,
    /// An `at://` URI.
    AtUri,
    /// A CID in string form.
    Cid,
    /// An RFC 3339 datetime with timezone.
    Datetime,
    /// A decentralized identifier.
    Did,
    /// A DNS handle.
    Handle,
    /// A namespaced identifier.
    Nsid,
    /// A timestamp identifier.
    Tid,
    /// A record key.
    RecordKey,
    /// A generic URI.
    Uri,
    /// A BCP 47 language tag.
    Language,
}

impl StringFormat {
    /// Every format, in spec order.
    pub const ALL: [StringFormat; 11] = [
        StringFormat::AtIdentifier,
        StringFormat::AtUri,
        StringFormat::Cid,
        StringFormat::Datetime,
        StringFormat::Did,
        StringFormat::Handle,
        StringFormat::Nsid,
        StringFormat::Tid,
        StringFormat::RecordKey,
        StringFormat::Uri,
        StringFormat::Language,
    ];

    /// The name used in lexicon JSON, e.g. `at-uri`.
    pub fn as_str(self) -> &'static str {
        match self {
            StringFormat::AtIdentifier => "at-identifier",
            StringFormat::AtUri => "at-uri",
            StringFormat::Cid => "cid",
            StringFormat::Datetime => "datetime",
            StringFormat::Did => "did",
            StringFormat::Handle => "handle",
            StringFormat::Nsid => "nsid",
            StringFormat::Tid => "tid",
            StringFormat::RecordKey => "record-key",
            StringFormat::Uri => "uri",
            StringFormat::Language => "language",
        }
    }

    /// Parses a lexicon `format` name.
    pub fn parse(name: &str) -> Option<StringFormat> {
        StringFormat::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// Whether `value` is valid in this format.
    pub fn is_valid(self, value: &str) -> bool {
        match self {
            StringFormat::AtIdentifier => is_at_identifier(value),
            StringFormat::AtUri => is_at_uri(value),
            StringFormat::Cid => is_cid(value),
            StringFormat::Datetime => is_datetime(value),
            StringFormat::Did => is_did(value),
            StringFormat::Handle => is_handle(value),
            StringFormat::Nsid => is_nsid(value),
            StringFormat::Tid => is_tid(value),
            StringFormat::RecordKey => is_record_key(value),
            StringFormat::Uri => is_uri(value),
            StringFormat::Language => is_language(value),
        }
    }
}

impl std::fmt::Display for StringFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `did:method:identifier`, at most 2048 characters.
pub fn is_did(s: &str) -> bool {
    if s.len() > 2048 {
        return false;
    }
    let Some(rest) = s.strip_prefix("did:") else {
        return false;
    };
    let Some((method, id)) = rest.split_once(':') else {
        return false;
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_lowercase()) {
        return false;
    }
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'%' | b'-'))
    {
        return false;
    }
    !matches!(id.as_bytes()[id.len() - 1], b':' | b'%')
}

/// A DNS name with at least two labels, a TLD that starts with a letter, at most 253 characters.
pub fn is_handle(s: &str) -> bool {
    if s.len() > 253 {
        return false;
    }
    let labels: Vec<&str> = s.split('.').collect();
    if labels.len() < 2 {
        return false;
    }
    for label in &labels {
        if label.is_empty() || label.len() > 63 {
            return false;
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return false;
        }
        if label.starts_with('-') || label.ends_with('-') {
            return false;
        }
    }
    labels[labels.len() - 1].as_bytes()[0].is_ascii_alphabetic()
}

/// A handle or a DID.
pub fn is_at_identifier(s: &str) -> bool {
    if s.starts_with("did:") {
        is_did(s)
    } else {
        is_handle(s)
    }
}

/// Reversed domain authority plus a name segment, e.g. `agent.comms.task`.
pub fn is_nsid(s: &str) -> bool {
    if s.len() > 317 || !s.is_ascii() {
        return false;
    }
    let segments: Vec<&str> = s.split('.').collect();
    if segments.len() < 3 {
        return false;
    }
    let (name, authority) = segments.split_last().expect("at least 3 segments");
    for (i, seg) in authority.iter().enumerate() {
        if seg.is_empty() || seg.len() > 63 {
            return false;
        }
        if !seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return false;
        }
        if seg.starts_with('-') || seg.ends_with('-') {
            return false;
        }
        if i == 0 && seg.as_bytes()[0].is_ascii_digit() {
            return false;
        }
    }
    !name.is_empty()
        && name.len() <= 63
        && name.as_bytes()[0].is_ascii_alphabetic()
        && name.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// 13 characters of base32-sortable, first one limiting the top bit to zero.
pub fn is_tid(s: &str) -> bool {
    s.parse::<Tid>().is_ok()
}

/// 1 to 512 characters of `A-Za-z0-9 . - _ : ~`, not `.` or `..`.
pub fn is_record_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 512
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'~'))
}

/// `at://AUTHORITY[/COLLECTION[/RKEY]][#/FRAGMENT]`, at most 8 KiB.
pub fn is_at_uri(s: &str) -> bool {
    if s.len() > 8 * 1024 {
        return false;
    }
    let Some(rest) = s.strip_prefix("at://") else {
        return false;
    };
    let (body, fragment) = match rest.split_once('#') {
        Some((body, fragment)) => (body, Some(fragment)),
        None => (rest, None),
    };
    if let Some(fragment) = fragment {
        let ok = fragment.starts_with('/')
            && fragment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._~:@!$&')(*+,;=-[]/\\".contains(&b));
        if !ok {
            return false;
        }
    }
    let mut parts = body.split('/');
    let authority = parts.next().unwrap_or_default();
    if !is_at_identifier(authority) {
        return false;
    }
    if let Some(collection) = parts.next() {
        if !is_nsid(collection) {
            return false;
        }
        if let Some(rkey) = parts.next()
            && !is_record_key(rkey)
        {
            return false;
        }
    }
    parts.next().is_none()
}

/// A CID string, by the loose syntax the spec gives (8 to 256 of `A-Za-z0-9+=`); CIDv0
/// (`Qmb...`) is refused.
pub fn is_cid(s: &str) -> bool {
    (8..=256).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'=')
        && !s.starts_with("Qmb")
}

/// RFC 3339 with a mandatory timezone (`Z` or `+hh:mm`, not `-00:00`), and a real calendar date.
pub fn is_datetime(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 || b.len() > 64 {
        return false;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = &b[range];
        if part.iter().all(u8::is_ascii_digit) {
            Some(part.iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0')))
        } else {
            None
        }
    };
    let (Some(year), Some(month), Some(day), Some(hour), Some(minute), Some(second)) = (
        digits(0..4),
        digits(5..7),
        digits(8..10),
        digits(11..13),
        digits(14..16),
        digits(17..19),
    ) else {
        return false;
    };
    if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return false;
    }
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days_in_month || hour > 23 || minute > 59 || second > 60 {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 || n > 20 {
            return false;
        }
        rest = &frac[n..];
    }
    match rest {
        "Z" => {}
        tz => {
            let tb = tz.as_bytes();
            if tb.len() != 6 || !matches!(tb[0], b'+' | b'-') || tb[3] != b':' {
                return false;
            }
            if !tb[1..3].iter().chain(&tb[4..6]).all(u8::is_ascii_digit) {
                return false;
            }
            if tz == "-00:00" {
                return false;
            }
            let tz_hour = u32::from(tb[1] - b'0') * 10 + u32::from(tb[2] - b'0');
            let tz_min = u32::from(tb[4] - b'0') * 10 + u32::from(tb[5] - b'0');
            if tz_hour > 23 || tz_min > 59 {
                return false;
            }
            // Year 0 with a positive offset would fall before year 0 in UTC.
            if year == 0 && tb[0] == b'+' {
                return false;
            }
        }
    }
    true
}

/// A URI: a scheme, a colon, and at least one non-whitespace character; at most 8 KiB.
pub fn is_uri(s: &str) -> bool {
    if s.len() > 8 * 1024 {
        return false;
    }
    let Some((scheme, rest)) = s.split_once(':') else {
        return false;
    };
    let scheme_ok = scheme.len() <= 81
        && scheme
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_lowercase)
        && scheme.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'+')
        });
    scheme_ok && !rest.is_empty() && rest.bytes().all(|b| (b'!'..=b'~').contains(&b))
}

/// A BCP 47 language tag: a 2-3 letter lowercase language (or `i`/`x` for grandfathered and
/// private-use tags), then `-` subtags.
pub fn is_language(s: &str) -> bool {
    let mut parts = s.split('-');
    let primary = parts.next().unwrap_or_default();
    let primary_ok = matches!(primary, "i" | "I" | "x" | "X")
        || ((2..=3).contains(&primary.len()) && primary.bytes().all(|b| b.is_ascii_lowercase()));
    primary_ok && parts.all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cases(text: &str) -> impl Iterator<Item = &str> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
    }

    macro_rules! vectors {
        ($name:ident, $check:expr, $valid:literal, $invalid:literal) => {
            #[test]
            fn $name() {
                let check: fn(&str) -> bool = $check;
                let dir = concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/interop/syntax/"
                );
                let valid = std::fs::read_to_string(format!("{dir}{}", $valid)).unwrap();
                let invalid = std::fs::read_to_string(format!("{dir}{}", $invalid)).unwrap();
                let mut n = 0;
                for case in cases(&valid) {
                    assert!(check(case), "should be valid: {case:?}");
                    n += 1;
                }
                for case in cases(&invalid) {
                    assert!(!check(case), "should be invalid: {case:?}");
                    n += 1;
                }
                assert!(n > 5);
            }
        };
    }

    vectors!(
        did_vectors,
        is_did,
        "did_syntax_valid.txt",
        "did_syntax_invalid.txt"
    );
    vectors!(
        handle_vectors,
        is_handle,
        "handle_syntax_valid.txt",
        "handle_syntax_invalid.txt"
    );
    vectors!(
        nsid_vectors,
        is_nsid,
        "nsid_syntax_valid.txt",
        "nsid_syntax_invalid.txt"
    );
    vectors!(
        tid_vectors,
        is_tid,
        "tid_syntax_valid.txt",
        "tid_syntax_invalid.txt"
    );
    vectors!(
        record_key_vectors,
        is_record_key,
        "recordkey_syntax_valid.txt",
        "recordkey_syntax_invalid.txt"
    );
    vectors!(
        at_uri_vectors,
        is_at_uri,
        "aturi_syntax_valid.txt",
        "aturi_syntax_invalid.txt"
    );
    vectors!(
        at_identifier_vectors,
        is_at_identifier,
        "atidentifier_syntax_valid.txt",
        "atidentifier_syntax_invalid.txt"
    );
    vectors!(
        cid_vectors,
        is_cid,
        "cid_syntax_valid.txt",
        "cid_syntax_invalid.txt"
    );
    vectors!(
        datetime_vectors,
        is_datetime,
        "datetime_syntax_valid.txt",
        "datetime_syntax_invalid.txt"
    );
    vectors!(
        datetime_parse_vectors,
        is_datetime,
        "datetime_syntax_valid.txt",
        "datetime_parse_invalid.txt"
    );
    vectors!(
        uri_vectors,
        is_uri,
        "uri_syntax_valid.txt",
        "uri_syntax_invalid.txt"
    );
    vectors!(
        language_vectors,
        is_language,
        "language_syntax_valid.txt",
        "language_syntax_invalid.txt"
    );

    #[test]
    fn format_names_round_trip() {
        for f in StringFormat::ALL {
            assert_eq!(StringFormat::parse(f.as_str()), Some(f));
        }
        assert_eq!(StringFormat::parse("email"), None);
    }
}
