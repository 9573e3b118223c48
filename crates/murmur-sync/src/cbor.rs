//! A bounded, allocation-free DAG-CBOR walker (depth and length checks before serde runs) and
//! the few encoders the MST needs.

use cid::Cid;

use crate::SyncError;

/// Deepest nesting the walker can track; [`crate::Limits::max_depth`] is clamped to it.
pub(crate) const MAX_TRACKED_DEPTH: usize = 128;

/// Reads one item head at `pos`: (major type, argument, position after the head).
fn head(b: &[u8], pos: usize, context: &'static str) -> Result<(u8, u64, usize), SyncError> {
    let err = |offset, reason| SyncError::Cbor {
        context,
        offset,
        reason,
    };
    let first = *b.get(pos).ok_or(err(pos, "unexpected end of input"))?;
    let major = first >> 5;
    let info = first & 0x1f;
    let (arg, len) = match info {
        0..=23 => (u64::from(info), 0),
        24..=27 => {
            let n = 1usize << (info - 24);
            let bytes = b
                .get(pos + 1..pos + 1 + n)
                .ok_or(err(pos, "unexpected end of input in item head"))?;
            (
                bytes.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
                n,
            )
        }
        31 => return Err(err(pos, "indefinite-length items are not DAG-CBOR")),
        _ => return Err(err(pos, "reserved additional information value")),
    };
    Ok((major, arg, pos + 1 + len))
}

/// Returns the end offset of the single item starting at `pos`, checking that it is complete,
/// definite-length, uses only tag 42, and nests no deeper than `max_depth`.
pub(crate) fn item_end(
    b: &[u8],
    pos: usize,
    max_depth: usize,
    context: &'static str,
) -> Result<usize, SyncError> {
    let max_depth = max_depth.min(MAX_TRACKED_DEPTH - 1);
    let mut remaining = [0u64; MAX_TRACKED_DEPTH];
    let mut depth = 0usize;
    remaining[0] = 1;
    let mut pos = pos;
    loop {
        let start = pos;
        let (major, arg, next) = head(b, pos, context)?;
        pos = next;
        let children = match major {
            0 | 1 => 0,
            2 | 3 => {
                let len = usize::try_from(arg).unwrap_or(usize::MAX);
                pos =
                    pos.checked_add(len)
                        .filter(|&end| end <= b.len())
                        .ok_or(SyncError::Cbor {
                            context,
                            offset: start,
                            reason: "string runs past the end of input",
                        })?;
                0
            }
            4 => arg,
            5 => arg.checked_mul(2).ok_or(SyncError::Cbor {
                context,
                offset: start,
                reason: "map length overflows",
            })?,
            6 => {
                if arg != 42 {
                    return Err(SyncError::Cbor {
                        context,
                        offset: start,
                        reason: "tags other than 42 (CID) are not DAG-CBOR",
                    });
                }
                // The tagged item follows; tag and item count as one item.
                continue;
            }
            _ => 0,
        };
        if children > (b.len() - pos) as u64 {
            return Err(SyncError::Cbor {
                context,
                offset: start,
                reason: "container claims more items than there are bytes",
            });
        }
        remaining[depth] -= 1;
        if children > 0 {
            depth += 1;
            if depth > max_depth {
                return Err(SyncError::TooDeep {
                    context,
                    limit: max_depth,
                });
            }
            remaining[depth] = children;
        }
        while remaining[depth] == 0 {
            if depth == 0 {
                return Ok(pos);
            }
            depth -= 1;
        }
    }
}

/// The byte spans of one top-level map: (text key, entry start, entry end) per entry.
pub(crate) struct MapSpans<'a> {
    pub entries: Vec<(&'a str, usize, usize)>,
}

/// Splits a top-level DAG-CBOR map into its entries without decoding the values.
pub(crate) fn map_spans<'a>(
    b: &'a [u8],
    max_depth: usize,
    context: &'static str,
) -> Result<MapSpans<'a>, SyncError> {
    let (major, count, mut pos) = head(b, 0, context)?;
    if major != 5 {
        return Err(SyncError::Cbor {
            context,
            offset: 0,
            reason: "expected a map",
        });
    }
    let mut entries = Vec::with_capacity(count.min(16) as usize);
    for _ in 0..count {
        let start = pos;
        let (kmajor, klen, kpos) = head(b, pos, context)?;
        if kmajor != 3 {
            return Err(SyncError::Cbor {
                context,
                offset: start,
                reason: "map key is not a text string",
            });
        }
        let kend = kpos
            .checked_add(usize::try_from(klen).unwrap_or(usize::MAX))
            .filter(|&e| e <= b.len())
            .ok_or(SyncError::Cbor {
                context,
                offset: start,
                reason: "map key runs past the end of input",
            })?;
        let key = std::str::from_utf8(&b[kpos..kend]).map_err(|_| SyncError::Cbor {
            context,
            offset: kpos,
            reason: "map key is not UTF-8",
        })?;
        let end = item_end(b, kend, max_depth, context)?;
        entries.push((key, start, end));
        pos = end;
    }
    if pos != b.len() {
        return Err(SyncError::Cbor {
            context,
            offset: pos,
            reason: "trailing bytes after the map",
        });
    }
    Ok(MapSpans { entries })
}

/// Writes a CBOR item head with the shortest argument encoding (as DAG-CBOR requires).
pub(crate) fn write_head(out: &mut Vec<u8>, major: u8, n: u64) {
    let m = major << 5;
    if n < 24 {
        out.push(m | n as u8);
    } else if n <= 0xff {
        out.extend_from_slice(&[m | 24, n as u8]);
    } else if n <= 0xffff {
        out.push(m | 25);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    } else if n <= 0xffff_ffff {
        out.push(m | 26);
        out.extend_from_slice(&(n as u32).to_be_bytes());
    } else {
        out.push(m | 27);
        out.extend_from_slice(&n.to_be_bytes());
    }
}

pub(crate) fn write_text(out: &mut Vec<u8>, s: &str) {
    write_head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

pub(crate) fn write_bytes(out: &mut Vec<u8>, b: &[u8]) {
    write_head(out, 2, b.len() as u64);
    out.extend_from_slice(b);
}

pub(crate) fn write_cid(out: &mut Vec<u8>, cid: &Cid) {
    out.extend_from_slice(&[0xd8, 42]);
    let hash = cid.hash();
    if cid.version() == cid::Version::V1
        && cid.codec() < 0x80
        && hash.code() == 0x12
        && hash.size() == 32
    {
        // The CIDs of a repo (v1, dag-cbor or raw, sha2-256): byte string of 37, the 0x00
        // prefix, then version, codec, hash code and size, one byte each, and the digest.
        out.extend_from_slice(&[0x58, 37, 0, 1, cid.codec() as u8, 0x12, 32]);
        out.extend_from_slice(hash.digest());
        return;
    }
    write_head(out, 2, cid.encoded_len() as u64 + 1);
    out.push(0);
    // Straight into `out`, no buffer of its own; writing to a Vec cannot fail.
    let _ = cid.write_bytes(&mut *out);
}

pub(crate) fn write_null(out: &mut Vec<u8>) {
    out.push(0xf6);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_nested_items_and_rejects_deep_ones() {
        // [[[1]]]
        let b = [0x81, 0x81, 0x81, 0x01];
        assert_eq!(item_end(&b, 0, 8, "t").unwrap(), 4);
        assert!(matches!(
            item_end(&b, 0, 2, "t"),
            Err(SyncError::TooDeep { limit: 2, .. })
        ));
    }

    #[test]
    fn rejects_truncated_indefinite_and_foreign_tags() {
        assert!(item_end(&[0x82, 0x01], 0, 8, "t").is_err());
        assert!(item_end(&[0x9f, 0xff], 0, 8, "t").is_err());
        assert!(item_end(&[0xc1, 0x01], 0, 8, "t").is_err());
        assert!(item_end(&[0x5a, 0xff, 0xff, 0xff, 0xff], 0, 8, "t").is_err());
        assert!(
            item_end(
                &[0x9b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                0,
                8,
                "t"
            )
            .is_err()
        );
    }

    #[test]
    fn head_encoding_is_shortest() {
        for (n, len) in [
            (0u64, 1),
            (23, 1),
            (24, 2),
            (255, 2),
            (256, 3),
            (65536, 5),
            (1 << 33, 9),
        ] {
            let mut out = Vec::new();
            write_head(&mut out, 0, n);
            assert_eq!(out.len(), len, "{n}");
            assert_eq!(head(&out, 0, "t").unwrap(), (0, n, len));
        }
    }
}
