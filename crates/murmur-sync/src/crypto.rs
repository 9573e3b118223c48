//! atproto signing keys: did:key / multikey decoding and low-S ECDSA verification (secp256k1
//! through libsecp256k1, P-256 through p256).

use sha2::{Digest, Sha256};

use crate::SyncError;

/// A repo signing public key (the `#atproto` verification method of a DID document).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// secp256k1 (ES256K), the default on the reference PDS.
    K256(k256::ecdsa::VerifyingKey),
    /// NIST P-256 (ES256).
    P256(p256::ecdsa::VerifyingKey),
}

/// Why a signature did not verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureFault {
    /// Not 64 bytes of r || s, or r/s out of range.
    Malformed,
    /// Valid ECDSA but with a high S value, which atproto forbids (malleability).
    HighS,
    /// Does not verify with this key.
    Mismatch,
}

impl SignatureFault {
    /// What went wrong, as a sentence fragment (used in [`crate::SyncError::BadSignature`]).
    pub fn as_str(self) -> &'static str {
        match self {
            SignatureFault::Malformed => "signature is malformed",
            SignatureFault::HighS => "signature has a high S value (atproto requires low-S)",
            SignatureFault::Mismatch => "signature does not verify with the DID's signing key",
        }
    }
}

const K256_MULTICODEC: [u8; 2] = [0xe7, 0x01];
const P256_MULTICODEC: [u8; 2] = [0x80, 0x24];

fn invalid(key: &str, reason: impl Into<String>) -> SyncError {
    SyncError::InvalidKey {
        key: key.to_string(),
        reason: reason.into(),
    }
}

impl PublicKey {
    /// Decodes a `did:key:z...` (multicodec secp256k1-pub or p256-pub, compressed point).
    pub fn from_did_key(did_key: &str) -> Result<Self, SyncError> {
        let mb = did_key
            .strip_prefix("did:key:")
            .ok_or_else(|| invalid(did_key, "does not start with did:key:"))?;
        PublicKey::from_multikey(mb)
    }

    /// Decodes a `publicKeyMultibase` of type `Multikey`: base58btc, multicodec-prefixed.
    pub fn from_multikey(multibase: &str) -> Result<Self, SyncError> {
        let bytes = decode_base58btc(multibase)?;
        if let Some(point) = bytes.strip_prefix(&K256_MULTICODEC) {
            k256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(PublicKey::K256)
                .map_err(|_| invalid(multibase, "not a valid secp256k1 point"))
        } else if let Some(point) = bytes.strip_prefix(&P256_MULTICODEC) {
            p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(PublicKey::P256)
                .map_err(|_| invalid(multibase, "not a valid P-256 point"))
        } else {
            Err(invalid(
                multibase,
                "multicodec is neither secp256k1-pub nor p256-pub",
            ))
        }
    }

    /// Decodes a legacy `publicKeyMultibase` of the given DID document suite
    /// (`EcdsaSecp256k1VerificationKey2019` / `EcdsaSecp256r1VerificationKey2019`): raw SEC1 bytes.
    pub fn from_legacy_multibase(suite: &str, multibase: &str) -> Result<Self, SyncError> {
        let bytes = decode_base58btc(multibase)?;
        match suite {
            "EcdsaSecp256k1VerificationKey2019" => {
                k256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes)
                    .map(PublicKey::K256)
                    .map_err(|_| invalid(multibase, "not a valid secp256k1 point"))
            }
            "EcdsaSecp256r1VerificationKey2019" => {
                p256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes)
                    .map(PublicKey::P256)
                    .map_err(|_| invalid(multibase, "not a valid P-256 point"))
            }
            other => Err(invalid(multibase, format!("unsupported key type {other}"))),
        }
    }

    /// The `did:key:` form (compressed point).
    pub fn to_did_key(&self) -> String {
        let mut bytes = Vec::with_capacity(35);
        match self {
            PublicKey::K256(k) => {
                bytes.extend_from_slice(&K256_MULTICODEC);
                bytes.extend_from_slice(k.to_encoded_point(true).as_bytes());
            }
            PublicKey::P256(k) => {
                bytes.extend_from_slice(&P256_MULTICODEC);
                bytes.extend_from_slice(k.to_encoded_point(true).as_bytes());
            }
        }
        format!(
            "did:key:{}",
            multibase::encode(multibase::Base::Base58Btc, bytes)
        )
    }

    /// Verifies a 64-byte compact (r || s) signature over `message` (hashed with SHA-256).
    /// High-S signatures are rejected, as atproto requires.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), SignatureFault> {
        self.verify_prehash(&Sha256::digest(message).into(), signature)
    }

    /// [`PublicKey::verify`] of a message already hashed: `prehash` is its SHA-256 digest
    /// (e.g. hashed from the pieces it is made of, without putting them together).
    pub fn verify_prehash(
        &self,
        prehash: &[u8; 32],
        signature: &[u8],
    ) -> Result<(), SignatureFault> {
        use k256::ecdsa::signature::hazmat::PrehashVerifier;
        match self {
            PublicKey::K256(key) => {
                // k256 parses (r, s in range, S low); libsecp256k1 does the arithmetic.
                let sig = k256::ecdsa::Signature::from_slice(signature)
                    .map_err(|_| SignatureFault::Malformed)?;
                if sig.normalize_s().is_some() {
                    return Err(SignatureFault::HighS);
                }
                verify_secp256k1(key, prehash, signature)
            }
            PublicKey::P256(key) => {
                let sig = p256::ecdsa::Signature::from_slice(signature)
                    .map_err(|_| SignatureFault::Malformed)?;
                if sig.normalize_s().is_some() {
                    return Err(SignatureFault::HighS);
                }
                key.verify_prehash(prehash, &sig)
                    .map_err(|_| SignatureFault::Mismatch)
            }
        }
    }
}

/// ECDSA verification of a secp256k1 signature (`r || s`, both in range and S low: the
/// caller checked) by libsecp256k1, about twice as fast as k256's. libsecp256k1 also refuses
/// high S on its own. The key goes over as its uncompressed point, which libsecp256k1 only
/// has to check is on the curve (no square root).
fn verify_secp256k1(
    key: &k256::ecdsa::VerifyingKey,
    prehash: &[u8; 32],
    signature: &[u8],
) -> Result<(), SignatureFault> {
    let point = key.to_encoded_point(false);
    // A k256 key is a point on the curve, not the identity: libsecp256k1 takes it.
    let key =
        secp256k1::PublicKey::from_slice(point.as_bytes()).map_err(|_| SignatureFault::Mismatch)?;
    let sig = secp256k1::ecdsa::Signature::from_compact(signature)
        .map_err(|_| SignatureFault::Malformed)?;
    secp256k1::ecdsa::verify(&sig, secp256k1::Message::from_digest(*prehash), &key)
        .map_err(|_| SignatureFault::Mismatch)
}

fn decode_base58btc(multibase: &str) -> Result<Vec<u8>, SyncError> {
    if !multibase.starts_with('z') {
        return Err(invalid(multibase, "multibase is not base58btc ('z')"));
    }
    let (_, bytes) = multibase::decode(multibase).map_err(|e| invalid(multibase, e.to_string()))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_key_round_trips_for_both_curves() {
        for k in [
            "did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc",
            "did:key:zDnaembgSGUhZULN2Caob4HLJPaxBh92N7rtH21TErzqf8HQo",
        ] {
            assert_eq!(PublicKey::from_did_key(k).unwrap().to_did_key(), k);
        }
    }

    #[test]
    fn verify_prehash_is_verify_of_the_hashed_message() {
        use k256::ecdsa::signature::Signer;
        let msg = b"an unsigned commit";
        let digest: [u8; 32] = Sha256::digest(msg).into();
        let other: [u8; 32] = Sha256::digest(b"another commit").into();
        let k = k256::ecdsa::SigningKey::from_slice(&[1u8; 32]).unwrap();
        let k_sig: k256::ecdsa::Signature = k.sign(msg);
        let p = p256::ecdsa::SigningKey::from_slice(&[1u8; 32]).unwrap();
        let p_sig: p256::ecdsa::Signature = p.sign(msg);
        let p_sig = p_sig.normalize_s().unwrap_or(p_sig);
        for (key, sig) in [
            (
                PublicKey::K256(*k.verifying_key()),
                k_sig.to_bytes().to_vec(),
            ),
            (
                PublicKey::P256(*p.verifying_key()),
                p_sig.to_bytes().to_vec(),
            ),
        ] {
            assert_eq!(key.verify(msg, &sig), Ok(()));
            assert_eq!(key.verify_prehash(&digest, &sig), Ok(()));
            assert_eq!(
                key.verify_prehash(&other, &sig),
                Err(SignatureFault::Mismatch)
            );
            assert_eq!(
                key.verify_prehash(&digest, &sig[..63]),
                Err(SignatureFault::Malformed)
            );
        }
        // The high-S twin of a valid signature.
        let (r, s) = k_sig.split_scalars();
        let high = k256::ecdsa::Signature::from_scalars(r, -*s).unwrap();
        let key = PublicKey::K256(*k.verifying_key());
        assert_eq!(
            key.verify_prehash(&digest, &high.to_bytes()),
            Err(SignatureFault::HighS)
        );
    }

    /// libsecp256k1 (what [`PublicKey::verify_prehash`] runs for secp256k1) and k256 on its
    /// own give the same verdict: valid signatures, each with one bit of its digest, r or s
    /// flipped, and r or s at the edges of their range.
    #[test]
    fn secp256k1_verdicts_are_k256_verdicts() {
        use k256::ecdsa::signature::hazmat::{PrehashSigner, PrehashVerifier};
        let order_minus_one =
            hex_bytes("fffffffffffffffffffffffffffffffebaaedce6af48a03bbfd25e8cd0364140");
        for seed in 1u8..=24 {
            let signer = k256::ecdsa::SigningKey::from_slice(&[seed; 32]).unwrap();
            let verifying = *signer.verifying_key();
            let key = PublicKey::K256(verifying);
            let digest: [u8; 32] = Sha256::digest([seed]).into();
            let sig: k256::ecdsa::Signature = signer.sign_prehash(&digest).unwrap();
            let sig = sig.normalize_s().unwrap_or(sig).to_bytes().to_vec();
            let k256_verdict = |digest: &[u8; 32], sig: &[u8]| {
                let Ok(sig) = k256::ecdsa::Signature::from_slice(sig) else {
                    return Err(SignatureFault::Malformed);
                };
                if sig.normalize_s().is_some() {
                    return Err(SignatureFault::HighS);
                }
                verifying
                    .verify_prehash(digest, &sig)
                    .map_err(|_| SignatureFault::Mismatch)
            };
            let mut cases: Vec<([u8; 32], Vec<u8>)> = vec![(digest, sig.clone())];
            for bit in [0, 7, 100, 255] {
                let mut d = digest;
                d[bit / 8] ^= 1 << (bit % 8);
                cases.push((d, sig.clone()));
            }
            for byte in [0, 31, 32, 63] {
                let mut s = sig.clone();
                s[byte] ^= 0x01;
                cases.push((digest, s));
            }
            for (at, value) in [(0, [0u8; 32]), (32, [0u8; 32]), (0, [0xff; 32])] {
                let mut s = sig.clone();
                s[at..at + 32].copy_from_slice(&value);
                cases.push((digest, s));
            }
            let mut s = sig.clone();
            s[..32].copy_from_slice(&order_minus_one);
            cases.push((digest, s));
            for (digest, sig) in cases {
                assert_eq!(
                    key.verify_prehash(&digest, &sig),
                    k256_verdict(&digest, &sig),
                    "seed {seed}"
                );
            }
            assert_eq!(key.verify_prehash(&digest, &sig), Ok(()));
        }
    }

    fn hex_bytes(hex: &str) -> Vec<u8> {
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn bad_keys_are_errors() {
        assert!(PublicKey::from_did_key("did:web:x").is_err());
        assert!(PublicKey::from_did_key("did:key:zzzz").is_err());
        assert!(PublicKey::from_did_key("did:key:mAAAA").is_err());
        assert!(PublicKey::from_multikey("z").is_err());
    }
}
