//! CAR v1 slices with every block re-hashed against its CID.

use cid::Cid;
use multihash::Multihash;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::SyncError;

/// Multicodec of DAG-CBOR blocks.
pub const DAG_CBOR: u64 = 0x71;
/// Multicodec of raw blocks (blobs).
pub const RAW: u64 = 0x55;
const SHA2_256: u64 = 0x12;

/// A parsed CAR v1 slice borrowing its input; every block has been checked to hash to its CID.
#[derive(Debug, Clone)]
pub struct CarSlice<'a> {
    roots: Vec<Cid>,
    /// Sorted by CID for lookup; duplicates removed.
    blocks: Vec<(Cid, &'a [u8])>,
}

#[derive(Deserialize)]
struct CarHeader {
    version: u64,
    roots: Vec<Cid>,
}

fn car_err(offset: usize, reason: impl Into<String>) -> SyncError {
    SyncError::Car {
        offset,
        reason: reason.into(),
    }
}

fn varint(b: &[u8], pos: usize) -> Result<(u64, usize), SyncError> {
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

/// The CID of `data` under `codec` (CIDv1, sha2-256): how atproto names blocks.
pub fn cid_for(codec: u64, data: &[u8]) -> Cid {
    let digest = Sha256::digest(data);
    let mh = Multihash::<64>::wrap(SHA2_256, &digest).expect("a 32-byte digest fits in 64");
    Cid::new_v1(codec, mh)
}

/// Checks that `cid` is the hash of `data` (CIDv1, dag-cbor or raw, sha2-256).
pub fn check_block(cid: &Cid, data: &[u8]) -> Result<(), SyncError> {
    check_cid_kind(cid)?;
    let actual = cid_for(cid.codec(), data);
    if actual != *cid {
        return Err(SyncError::CidMismatch {
            cid: cid.to_string(),
            actual: actual.to_string(),
        });
    }
    Ok(())
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

impl<'a> CarSlice<'a> {
    /// Parses a CAR v1 slice and re-hashes every block.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, SyncError> {
        let (header_len, pos) = varint(bytes, 0)?;
        let header_end = usize::try_from(header_len)
            .ok()
            .and_then(|l| pos.checked_add(l))
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| car_err(0, "header length runs past the end"))?;
        crate::cbor::item_end(&bytes[pos..header_end], 0, 4, "CAR header")?;
        let header: CarHeader = serde_ipld_dagcbor::from_slice(&bytes[pos..header_end])
            .map_err(|e| car_err(pos, format!("header: {e}")))?;
        if header.version != 1 {
            return Err(car_err(pos, format!("version {} is not 1", header.version)));
        }
        let mut blocks = Vec::new();
        let mut pos = header_end;
        while pos < bytes.len() {
            let (len, data_start) = varint(bytes, pos)?;
            let end = usize::try_from(len)
                .ok()
                .and_then(|l| data_start.checked_add(l))
                .filter(|&e| e <= bytes.len())
                .ok_or_else(|| car_err(pos, "block length runs past the end"))?;
            let section = &bytes[data_start..end];
            let mut reader = section;
            let cid = Cid::read_bytes(&mut reader)
                .map_err(|e| car_err(data_start, format!("block CID: {e}")))?;
            let data = &section[section.len() - reader.len()..];
            check_block(&cid, data)?;
            blocks.push((cid, data));
            pos = end;
        }
        blocks.sort_unstable_by_key(|b| b.0);
        blocks.dedup_by(|a, b| a.0 == b.0);
        Ok(CarSlice {
            roots: header.roots,
            blocks,
        })
    }

    /// The header's roots (a commit slice has one: the commit CID).
    pub fn roots(&self) -> &[Cid] {
        &self.roots
    }

    /// The block with this CID, if the slice has it.
    pub fn get(&self, cid: &Cid) -> Option<&'a [u8]> {
        self.blocks
            .binary_search_by(|(c, _)| c.cmp(cid))
            .ok()
            .map(|i| self.blocks[i].1)
    }

    /// Number of distinct blocks.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True when the slice has no blocks.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// All blocks, in CID order.
    pub fn blocks(&self) -> impl Iterator<Item = (&Cid, &'a [u8])> + '_ {
        self.blocks.iter().map(|(c, d)| (c, *d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cbor::{write_cid, write_head, write_text};

    fn car(root: &Cid, blocks: &[(Cid, Vec<u8>)]) -> Vec<u8> {
        let mut header = Vec::new();
        write_head(&mut header, 5, 2);
        write_text(&mut header, "roots");
        write_head(&mut header, 4, 1);
        write_cid(&mut header, root);
        write_text(&mut header, "version");
        write_head(&mut header, 0, 1);
        let mut out = Vec::new();
        write_head_varint(&mut out, header.len());
        out.extend(header);
        for (cid, data) in blocks {
            let c = cid.to_bytes();
            write_head_varint(&mut out, c.len() + data.len());
            out.extend(c);
            out.extend(data);
        }
        out
    }

    fn write_head_varint(out: &mut Vec<u8>, mut n: usize) {
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
}
