//! CAR v1: slices parsed with every block re-hashed against its CID, and written.

use cid::Cid;
use multihash::Multihash;
use sha2::{Digest, Sha256};

use crate::SyncError;
use crate::cbor::Reader;

/// Multicodec of DAG-CBOR blocks.
pub const DAG_CBOR: u64 = 0x71;
/// Multicodec of raw blocks (blobs).
pub const RAW: u64 = 0x55;
const SHA2_256: u64 = 0x12;

/// A parsed CAR v1 slice borrowing its input; every block has been checked to hash to its CID.
#[derive(Debug, Clone)]
pub struct CarSlice<'a> {
    roots: Vec<Cid>,
    /// Each distinct block once, in CID order. Small entries borrowing the input: sorting
    /// and searching them moves and compares 32 bytes, not a whole `Cid` (about 100 bytes,
    /// compared field by field and digest by memcmp), and no `Cid` is built while parsing.
    blocks: Vec<Block<'a>>,
}

/// One block of a slice: its CID as its [`order_key`] (codec and the digest's first 63
/// bits) and its whole digest, both from the input, and its bytes.
#[derive(Debug, Clone, Copy)]
struct Block<'a> {
    key: u64,
    digest: &'a [u8; 32],
    data: &'a [u8],
}

impl Block<'_> {
    /// Its CID (every block a slice keeps is CIDv1, dag-cbor or raw, sha2-256).
    fn cid(&self) -> Cid {
        let codec = if self.key >> 63 == 1 { DAG_CBOR } else { RAW };
        let mh = Multihash::<64>::wrap(SHA2_256, self.digest).expect("a 32-byte digest fits in 64");
        Cid::new_v1(codec, mh)
    }

    /// Its place in CID order: the key, then (for keys equal in 63 digest bits) the digest.
    #[inline]
    fn order(&self, other: &Block<'_>) -> std::cmp::Ordering {
        self.key
            .cmp(&other.key)
            .then_with(|| self.digest.cmp(other.digest))
    }
}

/// A key whose order agrees with the CIDs' for every CID a slice can hold (v1, dag-cbor or
/// raw, sha2-256 of 32 bytes; `Cid`'s own order is codec, then digest bytes): the codec in
/// the top bit (raw before dag-cbor, as 0x55 < 0x71), then the first 63 bits of the digest.
/// Equal keys leave the full CIDs to compare. `None` for a CID no slice holds.
#[inline]
fn order_key(cid: &Cid) -> Option<u64> {
    let codec = match cid.codec() {
        RAW => 0,
        DAG_CBOR => 1u64 << 63,
        _ => return None,
    };
    let hash = cid.hash();
    if cid.version() != cid::Version::V1 || hash.code() != SHA2_256 || hash.size() != 32 {
        return None;
    }
    Some(codec | digest_key(hash.digest()))
}

/// The first 63 bits of a 32-byte digest, as [`order_key`] takes them.
#[inline]
fn digest_key(digest: &[u8]) -> u64 {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first) >> 1
}

#[cold]
#[inline(never)]
fn car_err(offset: usize, reason: impl Into<String>) -> SyncError {
    SyncError::Car {
        offset,
        reason: reason.into(),
    }
}

#[inline]
fn varint(b: &[u8], pos: usize) -> Result<(u64, usize), SyncError> {
    // Sections under 128 bytes and the CAR header: one byte.
    if let Some(&byte) = b.get(pos)
        && byte < 0x80
    {
        return Ok((u64::from(byte), pos + 1));
    }
    let mut value = 0u64;
    for i in 0..9 {
        let byte = *b
            .get(pos + i)
            .ok_or_else(|| car_err(pos, "varint runs past the end"))?;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            if byte == 0 && i > 0 {
                return Err(car_err(pos, "varint is not minimally encoded"));
            }
            return Ok((value, pos + i + 1));
        }
    }
    Err(car_err(pos, "varint longer than 9 bytes"))
}

fn write_varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Writes a CAR v1 file with one root: the header `{roots: [root], version: 1}` in
/// DAG-CBOR, then one varint-length-prefixed section (CID bytes, block bytes) per block, in
/// the order given.
///
/// The blocks are written as they are: no hash is checked and duplicates are kept (give each
/// block once). [`CarSlice::parse`] reads the result back, re-hashing every block.
pub fn write_car<B: AsRef<[u8]>>(root: Cid, blocks: impl IntoIterator<Item = (Cid, B)>) -> Vec<u8> {
    let mut header = Vec::with_capacity(64);
    crate::cbor::write_head(&mut header, 5, 2);
    crate::cbor::write_text(&mut header, "roots");
    crate::cbor::write_head(&mut header, 4, 1);
    crate::cbor::write_cid(&mut header, &root);
    crate::cbor::write_text(&mut header, "version");
    crate::cbor::write_head(&mut header, 0, 1);
    let mut out = Vec::with_capacity(header.len() + 1024);
    write_varint(&mut out, header.len() as u64);
    out.extend_from_slice(&header);
    for (cid, data) in blocks {
        let data = data.as_ref();
        let cid = cid.to_bytes();
        write_varint(&mut out, (cid.len() + data.len()) as u64);
        out.extend_from_slice(&cid);
        out.extend_from_slice(data);
    }
    out
}

/// The CID of `data` under `codec` (CIDv1, sha2-256): how atproto names blocks.
pub fn cid_for(codec: u64, data: &[u8]) -> Cid {
    let digest = Sha256::digest(data);
    let mh = Multihash::<64>::wrap(SHA2_256, &digest).expect("a 32-byte digest fits in 64");
    Cid::new_v1(codec, mh)
}

/// Checks that `cid` is the hash of `data` (CIDv1, dag-cbor or raw, sha2-256).
pub fn check_block(cid: &Cid, data: &[u8]) -> Result<(), SyncError> {
    check_cid_kind(cid)?;
    let digest = Sha256::digest(data);
    if *cid.hash().digest() != digest[..] {
        return Err(cid_mismatch(cid, &digest));
    }
    Ok(())
}

#[cold]
#[inline(never)]
fn cid_mismatch(cid: &Cid, digest: &[u8]) -> SyncError {
    let mh = Multihash::<64>::wrap(SHA2_256, digest).expect("a 32-byte digest fits in 64");
    SyncError::CidMismatch {
        cid: cid.to_string(),
        actual: Cid::new_v1(cid.codec(), mh).to_string(),
    }
}

/// The binary form of every CID atproto accepts: CIDv1, a one-byte codec (dag-cbor or
/// raw), sha2-256 with its 32-byte digest.
const ATPROTO_CID_LEN: usize = 36;

/// The codec of `b` if it is a CID in atproto's binary form ([`ATPROTO_CID_LEN`] bytes).
#[inline]
fn atproto_cid_codec(b: &[u8]) -> Option<u8> {
    match *b {
        [1, codec @ (0x71 | 0x55), 0x12, 32, ..] if b.len() == ATPROTO_CID_LEN => Some(codec),
        _ => None,
    }
}

/// Parses a binary CID that fills `b` exactly; atproto's form without the generic decoder.
#[inline]
pub(crate) fn cid_from_bytes(b: &[u8]) -> Option<Cid> {
    if let Some(codec) = atproto_cid_codec(b) {
        let mh = Multihash::<64>::wrap(SHA2_256, &b[4..]).ok()?;
        return Some(Cid::new_v1(u64::from(codec), mh));
    }
    let mut rest = b;
    let cid = Cid::read_bytes(&mut rest).ok()?;
    rest.is_empty().then_some(cid)
}

fn check_cid_kind(cid: &Cid) -> Result<(), SyncError> {
    let reason = if cid.version() != cid::Version::V1 {
        "not CIDv1"
    } else if cid.codec() != DAG_CBOR && cid.codec() != RAW {
        "codec is neither dag-cbor nor raw"
    } else if cid.hash().code() != SHA2_256 || cid.hash().size() != 32 {
        "hash is not sha2-256"
    } else {
        return Ok(());
    };
    Err(SyncError::UnsupportedCid {
        cid: cid.to_string(),
        reason,
    })
}

/// Decodes the CAR header `{roots: [CID...], version: 1}`: its roots. Offsets in errors are
/// relative to the header.
fn parse_header(b: &[u8]) -> Result<Vec<Cid>, SyncError> {
    const MAX_DEPTH: usize = 4;
    let mut r = Reader::new(b, "CAR header");
    let (mut roots, mut version) = (None, None);
    for _ in 0..r.map(1, MAX_DEPTH)? {
        let key_at = r.pos();
        match r.key()? {
            b"roots" if roots.is_none() => {
                let n = r.array(2, MAX_DEPTH)?;
                let mut list = Vec::with_capacity(n);
                for _ in 0..n {
                    list.push(r.cid()?);
                }
                roots = Some(list);
            }
            b"version" if version.is_none() => version = Some(r.uint()?),
            b"roots" | b"version" => return Err(car_err(key_at, "header: duplicate key")),
            _ => r.skip(1, MAX_DEPTH)?,
        }
    }
    if !r.at_end() {
        return Err(car_err(r.pos(), "header: trailing bytes"));
    }
    match (roots, version) {
        (Some(roots), Some(1)) => Ok(roots),
        (_, Some(v)) if v != 1 => Err(car_err(0, format!("version {v} is not 1"))),
        (None, _) => Err(car_err(0, "header: missing field `roots`")),
        (Some(_), _) => Err(car_err(0, "header: missing field `version`")),
    }
}

impl<'a> CarSlice<'a> {
    /// Parses a CAR v1 slice and re-hashes every block.
    ///
    /// One pass over the input; blocks are borrowed from it, not copied.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, SyncError> {
        let (header_len, pos) = varint(bytes, 0)?;
        let header_end = usize::try_from(header_len)
            .ok()
            .and_then(|l| pos.checked_add(l))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| car_err(0, "header length runs past the end"))?;
        let roots = parse_header(&bytes[pos..header_end]).map_err(|e| match e {
            SyncError::Car { offset, reason } => SyncError::Car {
                offset: pos + offset,
                reason,
            },
            e => e,
        })?;
        // Commit slices carry about one block per 400-500 bytes.
        let mut blocks: Vec<Block<'a>> = Vec::with_capacity((bytes.len() / 384).clamp(4, 64));
        let mut pos = header_end;
        while pos < bytes.len() {
            let (len, data_start) = varint(bytes, pos)?;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| data_start.checked_add(l))
                .filter(|&e| e <= bytes.len())
                .ok_or_else(|| car_err(pos, "block length runs past the end"))?;
            let section = &bytes[data_start..end];
            let (cid_len, codec) = match section.get(..ATPROTO_CID_LEN).and_then(atproto_cid_codec)
            {
                // The usual case: the digest compared in place, no CID built.
                Some(codec) => (ATPROTO_CID_LEN, u64::from(codec)),
                None => {
                    let mut reader = section;
                    let cid = Cid::read_bytes(&mut reader)
                        .map_err(|e| car_err(data_start, format!("block CID: {e}")))?;
                    // Accepted below only as CIDv1, dag-cbor or raw, sha2-256 of 32 bytes: the
                    // digest is the last 32 bytes of the CID.
                    check_cid_kind(&cid)?;
                    (section.len() - reader.len(), cid.codec())
                }
            };
            let (cid_bytes, data) = section.split_at(cid_len);
            let digest: &'a [u8; 32] = cid_bytes[cid_len - 32..]
                .try_into()
                .expect("a sha2-256 CID ends with its 32-byte digest");
            let actual = Sha256::digest(data);
            if digest[..] != actual[..] {
                let cid = cid_from_bytes(cid_bytes).expect("a CID read above");
                return Err(cid_mismatch(&cid, &actual));
            }
            let top = if codec == DAG_CBOR { 1u64 << 63 } else { 0 };
            blocks.push(Block {
                key: top | digest_key(digest),
                digest,
                data,
            });
            pos = end;
        }
        blocks.sort_unstable_by(Block::order);
        // The same block given twice (same CID, so the same bytes) is kept once.
        blocks.dedup_by(|a, b| a.key == b.key && a.digest == b.digest);
        Ok(CarSlice { roots, blocks })
    }

    /// The header's roots (a commit slice has one: the commit CID).
    pub fn roots(&self) -> &[Cid] {
        &self.roots
    }

    /// The block with this CID, if the slice has it.
    #[inline]
    pub fn get(&self, cid: &Cid) -> Option<&'a [u8]> {
        let key = order_key(cid)?;
        let digest = cid.hash().digest();
        let first = self.blocks.partition_point(|b| b.key < key);
        self.blocks[first..]
            .iter()
            .take_while(|b| b.key == key)
            .find(|b| b.digest[..] == *digest)
            .map(|b| b.data)
    }

    /// Number of distinct blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True when the slice has no blocks.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// All blocks, each once, in CID order: `(cid, bytes)`.
    pub fn blocks(&self) -> impl ExactSizeIterator<Item = (Cid, &'a [u8])> + '_ {
        self.blocks.iter().map(|b| (b.cid(), b.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn car(root: &Cid, blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
        write_car(*root, blocks.iter().map(|(c, d)| (*c, d)))
    }

    #[test]
    fn parses_and_rehashes() {
        let data = vec![0xa0];
        let cid = cid_for(DAG_CBOR, &data);
        let bytes = car(&cid, &[(cid, data.clone())]);
        let slice = CarSlice::parse(&bytes).unwrap();
        assert_eq!(slice.roots(), &[cid]);
        assert_eq!(slice.get(&cid), Some(&data[..]));
        assert_eq!(slice.len(), 1);
    }

    #[test]
    fn rejects_a_block_that_does_not_hash_to_its_cid() {
        let cid = cid_for(DAG_CBOR, &[0xa0]);
        let bytes = car(&cid, &[(cid, vec![0x80])]);
        assert!(matches!(
            CarSlice::parse(&bytes),
            Err(SyncError::CidMismatch { .. })
        ));
    }

    #[test]
    fn rejects_truncation_anywhere() {
        let data = vec![0xa1, 0x61, 0x61, 0x01];
        let cid = cid_for(DAG_CBOR, &data);
        let bytes = car(&cid, &[(cid, data)]);
        for cut in 0..bytes.len() {
            let r = CarSlice::parse(&bytes[..cut]);
            assert!(r.is_err() || cut == bytes.len() - 41, "cut {cut}");
        }
    }

    #[test]
    fn written_cars_parse_back_with_the_same_root_and_blocks() {
        let blocks: Vec<(Cid, Vec<u8>)> = (0..200u32)
            .map(|i| {
                // Sizes up to a few kB, so section lengths take one and two varint bytes.
                let mut data = vec![0x59, 0, 0];
                data[1..3].copy_from_slice(&((i * 17) as u16).to_be_bytes());
                data.extend((0..i * 17).map(|j| j as u8));
                (cid_for(DAG_CBOR, &data), data)
            })
            .chain([(cid_for(RAW, b"raw blob"), b"raw blob".to_vec())])
            .collect();
        let root = blocks[3].0;
        let bytes = write_car(root, blocks.iter().map(|(c, d)| (*c, d.as_slice())));
        let slice = CarSlice::parse(&bytes).unwrap();
        assert_eq!(slice.roots(), &[root]);
        assert_eq!(slice.len(), blocks.len());
        for (cid, data) in &blocks {
            assert_eq!(slice.get(cid), Some(data.as_slice()), "{cid}");
        }
        // The header is the canonical DAG-CBOR a generic encoder writes.
        let header =
            serde_ipld_dagcbor::to_vec(&ipld_core::ipld!({"roots": [root], "version": 1})).unwrap();
        assert_eq!(bytes[0] as usize, header.len());
        assert_eq!(&bytes[1..1 + header.len()], header.as_slice());
        // No blocks at all is a valid CAR too.
        let empty = write_car(root, std::iter::empty::<(Cid, &[u8])>());
        let slice = CarSlice::parse(&empty).unwrap();
        assert_eq!((slice.roots(), slice.len()), (&[root][..], 0));
    }

    #[test]
    fn blocks_are_listed_once_each_in_cid_order_and_found_by_cid() {
        // Raw and dag-cbor blocks mixed, some given twice, in no particular order.
        let mut blocks: Vec<(Cid, Vec<u8>)> = Vec::new();
        for i in 0..40u32 {
            let data = i.to_be_bytes().to_vec();
            let codec = if i % 3 == 0 { RAW } else { DAG_CBOR };
            blocks.push((cid_for(codec, &data), data));
        }
        let twice: Vec<(Cid, Vec<u8>)> = blocks.iter().step_by(7).cloned().collect();
        blocks.extend(twice);
        let root = blocks[0].0;
        let bytes = car(&root, &blocks);
        let slice = CarSlice::parse(&bytes).unwrap();
        let mut want: Vec<(Cid, &[u8])> = blocks.iter().map(|(c, d)| (*c, d.as_slice())).collect();
        want.sort();
        want.dedup();
        let listed: Vec<(Cid, &[u8])> = slice.blocks().collect();
        assert_eq!(listed, want);
        assert_eq!(slice.len(), 40);
        for (cid, data) in &want {
            assert_eq!(slice.get(cid), Some(*data), "{cid}");
        }
        // Absent: another digest, the same digest under the other codec or another hash.
        let absent = cid_for(DAG_CBOR, b"not in the slice");
        let other_codec = Cid::new_v1(
            if want[0].0.codec() == RAW {
                DAG_CBOR
            } else {
                RAW
            },
            *want[0].0.hash(),
        );
        let sha512 = Cid::new_v1(DAG_CBOR, Multihash::<64>::wrap(0x13, &[7; 64]).unwrap());
        for cid in [
            absent,
            other_codec,
            sha512,
            Cid::new_v0(*want[0].0.hash()).unwrap(),
        ] {
            assert_eq!(slice.get(&cid), None, "{cid}");
        }
    }

    /// A CAR with this header (DAG-CBOR) and one block section of raw bytes.
    fn car_with(header: &ipld_core::ipld::Ipld, section: &[u8]) -> Vec<u8> {
        let header = serde_ipld_dagcbor::to_vec(header).unwrap();
        let mut out = Vec::new();
        write_varint(&mut out, header.len() as u64);
        out.extend_from_slice(&header);
        write_varint(&mut out, section.len() as u64);
        out.extend_from_slice(section);
        out
    }

    #[test]
    fn a_bad_header_is_a_typed_error() {
        let cid = cid_for(DAG_CBOR, &[0xa0]);
        let mut section = cid.to_bytes();
        section.push(0xa0);
        let ok = car_with(&ipld_core::ipld!({"roots": [cid], "version": 1}), &section);
        assert_eq!(CarSlice::parse(&ok).unwrap().roots(), &[cid]);
        for (header, reason) in [
            (
                ipld_core::ipld!({"roots": [cid], "version": 2}),
                "version 2",
            ),
            (ipld_core::ipld!({"version": 1}), "roots"),
            (ipld_core::ipld!({"roots": [cid]}), "version"),
            (ipld_core::ipld!({"roots": ["x"], "version": 1}), "CID"),
            (ipld_core::ipld!([cid]), "map"),
        ] {
            let err = CarSlice::parse(&car_with(&header, &section)).unwrap_err();
            let message = err.to_string();
            assert!(
                matches!(err, SyncError::Car { .. } | SyncError::Cbor { .. }),
                "{header:?}: {message}"
            );
            assert!(message.contains(reason), "{header:?}: {message}");
        }
    }

    #[test]
    fn a_mismatch_names_both_cids_and_foreign_cids_are_refused() {
        let data = vec![0xa1, 0x61, 0x61, 0x01];
        let cid = cid_for(DAG_CBOR, &data);
        let other = cid_for(DAG_CBOR, &[0xa0]);
        // Raw blocks hash like dag-cbor ones; only the codec differs.
        let raw = cid_for(RAW, &data);
        let slice = car(&cid, &[(raw, data.clone())]);
        assert_eq!(CarSlice::parse(&slice).unwrap().get(&raw), Some(&data[..]));
        let forged = car(&cid, &[(other, data.clone())]);
        match CarSlice::parse(&forged) {
            Err(SyncError::CidMismatch {
                cid: claimed,
                actual,
            }) => {
                assert_eq!((claimed, actual), (other.to_string(), cid.to_string()));
            }
            r => panic!("{r:?}"),
        }
        assert!(check_block(&other, &data).is_err());
        assert!(check_block(&cid, &data).is_ok());
        // A CID of another hash or codec goes through the generic decoder and is refused.
        let sha512 = Multihash::<64>::wrap(0x13, &[7; 64]).unwrap();
        for foreign in [
            Cid::new_v1(DAG_CBOR, sha512),
            Cid::new_v1(0x70, *cid.hash()),
        ] {
            let err = CarSlice::parse(&car(&cid, &[(foreign, data.clone())])).unwrap_err();
            assert!(matches!(err, SyncError::UnsupportedCid { .. }), "{err}");
        }
        // Binary CIDs parse the same through the fast path and the generic decoder.
        for c in [cid, raw, Cid::new_v1(0x70, *cid.hash())] {
            assert_eq!(cid_from_bytes(&c.to_bytes()), Some(c));
            let mut longer = c.to_bytes();
            longer.push(0);
            assert_eq!(cid_from_bytes(&longer), None);
        }
    }
}
