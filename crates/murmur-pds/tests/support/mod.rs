//! Test fixtures: a record type with a small lexicon of its own, and token helpers.
#![allow(dead_code)]

pub mod recorder;

use murmur_pds::{BlobRef, Collection, Validate, ValidationError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// `test.murmur.note`: text (max 2000 bytes... but records may be larger to test size
/// limits), tags, a priority in 1..=5, an optional blob.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Note {
    pub text: String,
    pub tags: Vec<String>,
    pub priority: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachment: Option<BlobRef>,
}

impl Validate for Note {
    fn validate(&self) -> Result<(), ValidationError> {
        if !(1..=5).contains(&self.priority) {
            return Err(ValidationError {
                path: "$.priority".into(),
                message: format!("{} is outside 1..=5", self.priority),
            });
        }
        if self.tags.len() > 8 {
            return Err(ValidationError {
                path: "$.tags".into(),
                message: "more than maxLength 8 items".into(),
            });
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Notes;

impl Collection for Notes {
    const NSID: &'static str = "test.murmur.note";
    type Record = Note;
}

const B64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64url_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(B64URL[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn b64url_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes() {
        let v = B64URL.iter().position(|&x| x == c).expect("base64url") as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

fn hmac_sha256(key: &[u8], msg: &[u8]) -> Vec<u8> {
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let inner: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x36)
        .chain(msg.iter().copied())
        .collect();
    let inner = Sha256::digest(&inner);
    let outer: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x5c)
        .chain(inner.iter().copied())
        .collect();
    Sha256::digest(&outer).to_vec()
}

/// The same access token, expired an hour ago, signed with the local network's PDS secret
/// (`@atproto/dev-env`'s JWT_SECRET): the PDS answers it with `ExpiredToken`.
pub fn expired_jwt(access_jwt: &str) -> String {
    let mut parts = access_jwt.split('.');
    let header = parts.next().unwrap();
    let header_json: serde_json::Value = serde_json::from_slice(&b64url_decode(header)).unwrap();
    assert_eq!(
        header_json["alg"], "HS256",
        "dev-env signs access tokens with HS256"
    );
    let mut payload: serde_json::Value =
        serde_json::from_slice(&b64url_decode(parts.next().unwrap())).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    payload["iat"] = (now - 7200).into();
    payload["exp"] = (now - 3600).into();
    let signing_input = format!(
        "{header}.{}",
        b64url_encode(&serde_json::to_vec(&payload).unwrap())
    );
    let sig = hmac_sha256(b"jwt-secret", signing_input.as_bytes());
    format!("{signing_input}.{}", b64url_encode(&sig))
}
