//! Timestamp identifiers (TIDs): the one parser and printer of the workspace (record keys,
//! commit revs).

use std::fmt;
use std::str::FromStr;

const ALPHABET: &[u8; 32] = b"234567abcdefghijklmnopqrstuvwxyz";
const TID_LEN: usize = 13;

/// A timestamp identifier: 53 bits of microseconds since the Unix epoch and a 10-bit clock
/// id, written as 13 base32-sortable characters (`3jzfcijpj2z2a`).
///
/// TIDs sort lexically in the order they were generated, so records created by one
/// generator (such as `murmur_pds::TidGenerator`) list in creation order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tid(u64);

impl Tid {
    /// Builds a TID from a timestamp in microseconds since the epoch and a clock id.
    ///
    /// Bits above the 53-bit timestamp and the 10-bit clock id are dropped.
    pub fn from_parts(micros: u64, clock_id: u16) -> Tid {
        Tid(((micros & ((1 << 53) - 1)) << 10) | u64::from(clock_id & 0x3ff))
    }

    /// Microseconds since the Unix epoch.
    pub fn micros(self) -> u64 {
        self.0 >> 10
    }

    /// The 10-bit clock id.
    pub fn clock_id(self) -> u16 {
        (self.0 & 0x3ff) as u16
    }

    /// The 13-character string form.
    pub fn as_string(self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = [0u8; TID_LEN];
        let mut v = self.0;
        for slot in out.iter_mut().rev() {
            *slot = ALPHABET[(v & 31) as usize];
            v >>= 5;
        }
        // The alphabet is ASCII, so this never fails.
        f.write_str(std::str::from_utf8(&out).unwrap_or_default())
    }
}

impl fmt::Debug for Tid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tid({self})")
    }
}

/// Why a string is not a TID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a TID: {reason}")]
pub struct TidError {
    /// The string given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for Tid {
    type Err = TidError;

    fn from_str(s: &str) -> Result<Tid, TidError> {
        let bad = |reason: &'static str| TidError {
            input: s.to_string(),
            reason,
        };
        if s.len() != TID_LEN {
            return Err(bad("expected 13 characters"));
        }
        let bytes = s.as_bytes();
        // The top bit of the 64-bit value must be zero, so the first character is one of
        // the first 16 symbols.
        if !(b'2'..=b'7').contains(&bytes[0]) && !(b'a'..=b'j').contains(&bytes[0]) {
            return Err(bad("first character must be one of 234567abcdefghij"));
        }
        let mut v: u64 = 0;
        for &b in bytes {
            let digit = ALPHABET
                .iter()
                .position(|&a| a == b)
                .ok_or_else(|| bad("characters must be in 234567abcdefghijklmnopqrstuvwxyz"))?;
            v = (v << 5) | digit as u64;
        }
        Ok(Tid(v))
    }
}
