//! A bounded, allocation-free DAG-CBOR walker (depth and length checks before serde runs) and
//! the few encoders the MST needs.

use cid::Cid;

use crate::SyncError;

/// Deepest nesting the walker can track; [`crate::Limits::max_depth`] is clamped to it.
pub(crate) const MAX_TRACKED_DEPTH: usize = 128;

/// Reads one item head at `pos`: (major type, argument, position after the head).
#[inline(always)]
fn head(b: &[u8], pos: usize, context: &'static str) -> Result<(u8, u64, usize), SyncError> {
    let Some(&first) = b.get(pos) else {
        return Err(cbor_err(context, pos, "unexpected end of input"));
    };
    let major = first >> 5;
    let info = first & 0x1f;
    let (arg, len) = match info {
        0..=23 => (u64::from(info), 0),
        24..=27 => {
            let n = 1usize << (info - 24);
            let Some(bytes) = b.get(pos + 1..pos + 1 + n) else {
                return Err(cbor_err(
                    context,
                    pos,
                    "unexpected end of input in item head",
                ));
            };
            (
                bytes.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
                n,
            )
        }
        31 => {
            return Err(cbor_err(
                context,
                pos,
                "indefinite-length items are not DAG-CBOR",
            ));
        }
        _ => {
            return Err(cbor_err(
                context,
                pos,
                "reserved additional information value",
            ));
        }
    };
    Ok((major, arg, pos + 1 + len))
}

/// The error for malformed or unexpected DAG-CBOR; built only on the failure path.
#[cold]
#[inline(never)]
pub(crate) fn cbor_err(context: &'static str, offset: usize, reason: &'static str) -> SyncError {
    SyncError::Cbor {
        context,
        offset,
        reason,
    }
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
                pos = pos
                    .checked_add(len)
                    .filter(|&end| end <= b.len())
                    .ok_or_else(|| cbor_err(context, start, "string runs past the end of input"))?;
                0
            }
            4 => arg,
            5 => arg
                .checked_mul(2)
                .ok_or_else(|| cbor_err(context, start, "map length overflows"))?,
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
            .ok_or_else(|| cbor_err(context, start, "map key runs past the end of input"))?;
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

/// A cursor that decodes one DAG-CBOR input in a single pass, borrowing strings and byte
/// strings from it: the decoder behind [`crate::Frame::decode`] and [`crate::CarSlice::parse`].
///
/// Every method checks what it reads (type, bounds, UTF-8) and fails with
/// [`SyncError::Cbor`] naming the context and the byte offset; errors are built only when
/// something is wrong. Nesting is tracked by the caller (see [`Reader::enter`]).
pub(crate) struct Reader<'a> {
    b: &'a [u8],
    pos: usize,
    context: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8], context: &'static str) -> Self {
        Reader::at(b, 0, context)
    }

    /// A reader of `b` whose next item starts at `pos` (offsets stay those of `b`).
    pub(crate) fn at(b: &'a [u8], pos: usize, context: &'static str) -> Self {
        Reader { b, pos, context }
    }

    /// The offset of the next item.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// True when every byte has been read.
    pub(crate) fn at_end(&self) -> bool {
        self.pos == self.b.len()
    }

    /// The error for the item starting at `offset`.
    #[cold]
    #[inline(never)]
    pub(crate) fn err(&self, offset: usize, reason: &'static str) -> SyncError {
        cbor_err(self.context, offset, reason)
    }

    /// Reads a head of major type `major`: its argument. `what` names the expected item.
    #[inline(always)]
    fn expect(&mut self, major: u8, what: &'static str) -> Result<u64, SyncError> {
        let start = self.pos;
        let (m, arg, next) = head(self.b, start, self.context)?;
        if m != major {
            return Err(self.err(start, what));
        }
        self.pos = next;
        Ok(arg)
    }

    /// Reads `len` bytes of string payload.
    #[inline(always)]
    fn payload(&mut self, start: usize, len: u64) -> Result<&'a [u8], SyncError> {
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| self.pos.checked_add(l))
            .filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(self.err(start, "string runs past the end of input"));
        };
        let out = &self.b[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    /// Checks that a container of `count` items (`per_item` CBOR items each) can fit in the
    /// bytes left, and that entering it at `depth` (1 for a top-level container) stays within
    /// `max_depth`, as [`item_end`] counts it (empty containers do not nest).
    pub(crate) fn enter(
        &self,
        start: usize,
        count: u64,
        per_item: u64,
        depth: usize,
        max_depth: usize,
    ) -> Result<usize, SyncError> {
        let left = (self.b.len() - self.pos) as u64;
        if count.saturating_mul(per_item) > left {
            return Err(self.err(start, "container claims more items than there are bytes"));
        }
        if count > 0 && depth > max_depth.min(MAX_TRACKED_DEPTH - 1) {
            return Err(SyncError::TooDeep {
                context: self.context,
                limit: max_depth.min(MAX_TRACKED_DEPTH - 1),
            });
        }
        // Fits in the input, so it fits in usize.
        Ok(count as usize)
    }

    /// Reads a map head entered at `depth`: the number of entries.
    pub(crate) fn map(&mut self, depth: usize, max_depth: usize) -> Result<usize, SyncError> {
        let start = self.pos;
        let n = self.expect(5, "expected a map")?;
        self.enter(start, n, 2, depth, max_depth)
    }

    /// Reads an array head entered at `depth`: the number of items.
    pub(crate) fn array(&mut self, depth: usize, max_depth: usize) -> Result<usize, SyncError> {
        let start = self.pos;
        let n = self.expect(4, "expected an array")?;
        self.enter(start, n, 1, depth, max_depth)
    }

    /// Reads a text string.
    #[inline(always)]
    pub(crate) fn text(&mut self) -> Result<&'a str, SyncError> {
        let start = self.pos;
        let len = self.expect(3, "expected a text string")?;
        let bytes = self.payload(start, len)?;
        std::str::from_utf8(bytes).map_err(|_| self.err(start, "text string is not UTF-8"))
    }

    /// Reads a map key, a text string, as its bytes (checked UTF-8), to be matched against
    /// the keys a reader knows without making a `str` of it.
    #[inline(always)]
    pub(crate) fn key(&mut self) -> Result<&'a [u8], SyncError> {
        let start = self.pos;
        let len = self.expect(3, "expected a text string")?;
        let bytes = self.payload(start, len)?;
        // Keys are short and ASCII: checked here in line; anything else by the full check.
        if !bytes.is_ascii() && std::str::from_utf8(bytes).is_err() {
            return Err(self.err(start, "text string is not UTF-8"));
        }
        Ok(bytes)
    }

    /// Reads a byte string: its offsets in the input.
    #[inline(always)]
    pub(crate) fn bytes(&mut self) -> Result<std::ops::Range<usize>, SyncError> {
        let start = self.pos;
        let len = self.expect(2, "expected a byte string")?;
        let data_start = self.pos;
        self.payload(start, len)?;
        Ok(data_start..self.pos)
    }

    /// Reads an integer that fits in an `i64`.
    pub(crate) fn int(&mut self) -> Result<i64, SyncError> {
        let start = self.pos;
        let (major, arg, next) = head(self.b, start, self.context)?;
        let value = match major {
            0 => i64::try_from(arg).ok(),
            1 => i64::try_from(arg).ok().map(|n| -1 - n),
            _ => return Err(self.err(start, "expected an integer")),
        };
        let Some(value) = value else {
            return Err(self.err(start, "integer does not fit in 64 signed bits"));
        };
        self.pos = next;
        Ok(value)
    }

    /// Reads an unsigned integer.
    pub(crate) fn uint(&mut self) -> Result<u64, SyncError> {
        self.expect(0, "expected an unsigned integer")
    }

    /// Reads `true` or `false`.
    pub(crate) fn bool(&mut self) -> Result<bool, SyncError> {
        let value = match self.b.get(self.pos) {
            Some(0xf4) => false,
            Some(0xf5) => true,
            _ => return Err(self.err(self.pos, "expected a boolean")),
        };
        self.pos += 1;
        Ok(value)
    }

    /// Consumes a `null` if one is next: true when it did.
    #[inline]
    pub(crate) fn null(&mut self) -> bool {
        let null = self.b.get(self.pos) == Some(&0xf6);
        self.pos += usize::from(null);
        null
    }

    /// Reads a CID link: tag 42 over a byte string holding 0x00 and the binary CID.
    #[inline(always)]
    pub(crate) fn cid(&mut self) -> Result<Cid, SyncError> {
        let start = self.pos;
        if self.b.get(start..start + 2) != Some(&[0xd8, 42][..]) {
            return Err(self.err(start, "expected a CID (tag 42)"));
        }
        self.pos += 2;
        let range = self.bytes()?;
        match self.b[range].split_first() {
            Some((0, cid)) => {
                crate::car::cid_from_bytes(cid).ok_or_else(|| self.err(start, "invalid CID"))
            }
            _ => Err(self.err(start, "CID link lacks its 0x00 prefix")),
        }
    }

    /// Skips one item of any kind, checking it as [`item_end`] does, nested inside `depth`
    /// containers.
    pub(crate) fn skip(&mut self, depth: usize, max_depth: usize) -> Result<(), SyncError> {
        // What unknown fields mostly are (scalars, strings, empty containers) ends where its
        // head says, with the checks item_end makes of it; anything else is walked.
        let start = self.pos;
        let (major, arg, next) = head(self.b, start, self.context)?;
        match major {
            0 | 1 | 7 => {
                self.pos = next;
                return Ok(());
            }
            2 | 3 => {
                self.pos = next;
                self.payload(start, arg)?;
                return Ok(());
            }
            4 | 5 if arg == 0 => {
                self.pos = next;
                return Ok(());
            }
            _ => {}
        }
        let left = max_depth.min(MAX_TRACKED_DEPTH - 1).saturating_sub(depth);
        self.pos = item_end(self.b, self.pos, left, self.context).map_err(|e| match e {
            // Report the limit in force, not what was left of it at this depth.
            SyncError::TooDeep { context, .. } => SyncError::TooDeep {
                context,
                limit: max_depth.min(MAX_TRACKED_DEPTH - 1),
            },
            e => e,
        })?;
        Ok(())
    }
}

/// Writes a CBOR item head with the shortest argument encoding (as DAG-CBOR requires).
#[inline]
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

#[inline]
pub(crate) fn write_text(out: &mut Vec<u8>, s: &str) {
    write_head(out, 3, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

#[inline]
pub(crate) fn write_bytes(out: &mut Vec<u8>, b: &[u8]) {
    write_head(out, 2, b.len() as u64);
    out.extend_from_slice(b);
}

#[inline]
pub(crate) fn write_cid(out: &mut Vec<u8>, cid: &Cid) {
    let hash = cid.hash();
    if cid.version() == cid::Version::V1
        && cid.codec() < 0x80
        && hash.code() == 0x12
        && hash.size() == 32
    {
        // The CIDs of a repo (v1, dag-cbor or raw, sha2-256): tag 42, byte string of 37, the
        // 0x00 prefix, then version, codec, hash code and size, one byte each, and the
        // digest. Fixed-size copies (no call to memcpy): written for every link of every
        // node built.
        let mut link = [0u8; 41];
        link[..9].copy_from_slice(&[0xd8, 42, 0x58, 37, 0, 1, cid.codec() as u8, 0x12, 32]);
        link[9..].copy_from_slice(&hash.digest()[..32]);
        out.extend_from_slice(&link);
        return;
    }
    out.extend_from_slice(&[0xd8, 42]);
    write_head(out, 2, cid.encoded_len() as u64 + 1);
    out.push(0);
    // Straight into `out`, no buffer of its own; writing to a Vec cannot fail.
    let _ = cid.write_bytes(&mut *out);
}

#[inline]
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

    /// `skip` ends scalars, strings and empty containers by their head alone: where
    /// [`item_end`] ends them, with the same error where it fails, for every kind of head.
    #[test]
    fn skip_ends_each_item_where_the_walker_does() {
        let items: &[&[u8]] = &[
            &[0x00],
            &[0x17],
            &[0x18, 0x18],
            &[0x19, 0x01, 0x00],
            &[0x1b, 0, 0, 0, 0, 0, 0, 0, 1],
            &[0x20],
            &[0x38, 0xff],
            &[0xf4],
            &[0xf5],
            &[0xf6],
            &[0xf7],
            &[0xf9, 0x3c, 0x00],
            &[0xfb, 0x3f, 0xf0, 0, 0, 0, 0, 0, 0],
            &[0xfc],
            &[0xff],
            &[0x18],
            &[0x19, 0x01],
            &[0x1f],
            &[0x43, 1, 2, 3],
            &[0x43, 1, 2],
            &[0x63, b'a', b'b', b'c'],
            &[0x78, 0x05, b'a'],
            &[0x5f, 0x41, 0x00, 0xff],
            &[0x80],
            &[0xa0],
            &[0x81, 0x00],
            &[0x81],
            &[0xa1, 0x61, b'k', 0xf6],
            &[0x9f, 0xff],
            &[0xd8, 0x2a, 0x42, 0x00, 0x01],
            &[0xc1, 0x00],
            &[0x81, 0x81, 0x81, 0x81, 0x00],
            &[],
        ];
        for item in items {
            for max_depth in [1, 3, 64] {
                let mut with_tail = item.to_vec();
                with_tail.push(0xf6);
                for b in [item.to_vec(), with_tail] {
                    let mut r = Reader::new(&b, "t");
                    let skipped = r.skip(0, max_depth).map(|()| r.pos());
                    let walked = item_end(&b, 0, max_depth, "t");
                    assert_eq!(
                        format!("{skipped:?}"),
                        format!("{walked:?}"),
                        "{b:02x?} at depth limit {max_depth}"
                    );
                }
            }
        }
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
