//! The atproto interop vectors (CC0, tests/fixtures/interop): signatures incl. high-S and
//! DER cases, did:key encodings, MST key heights, DAG-CBOR/CID data model.

use murmur_sync::{DAG_CBOR, PublicKey, SignatureFault, cid_for, decode_record, key_height};
use serde_json::Value;

fn fixture(path: &str) -> Value {
    let full = format!(
        "{}/tests/fixtures/interop/{path}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(&full).unwrap()).unwrap()
}

fn b64(s: &str) -> Vec<u8> {
    // The fixtures use unpadded standard base64.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in s.bytes().filter(|&c| c != b'=') {
        acc = (acc << 6) | ALPHABET.iter().position(|&a| a == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[test]
fn signature_fixtures_verify_exactly_when_valid() {
    let fixtures = fixture("crypto/signature-fixtures.json");
    let fixtures = fixtures.as_array().unwrap();
    assert_eq!(fixtures.len(), 6);
    for f in fixtures {
        let comment = f["comment"].as_str().unwrap();
        let key = PublicKey::from_did_key(f["publicKeyDid"].as_str().unwrap()).unwrap();
        let legacy = PublicKey::from_legacy_multibase(
            f["didDocSuite"].as_str().unwrap(),
            f["publicKeyMultibase"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(key, legacy, "{comment}");
        let message = b64(f["messageBase64"].as_str().unwrap());
        let sig = b64(f["signatureBase64"].as_str().unwrap());
        let result = key.verify(&message, &sig);
        assert_eq!(
            result.is_ok(),
            f["validSignature"].as_bool().unwrap(),
            "{comment}: {result:?}"
        );
        let tags: Vec<&str> = f["tags"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        if tags.contains(&"high-s") {
            assert_eq!(result, Err(SignatureFault::HighS), "{comment}");
        }
        if tags.contains(&"der-encoded") {
            assert_eq!(result, Err(SignatureFault::Malformed), "{comment}");
        }
    }
}

#[test]
fn w3c_did_key_vectors_round_trip() {
    for (file, curve) in [
        ("crypto/w3c_didkey_K256.json", "k256"),
        ("crypto/w3c_didkey_P256.json", "p256"),
    ] {
        for v in fixture(file).as_array().unwrap() {
            let did_key = v["publicDidKey"].as_str().unwrap();
            let key = PublicKey::from_did_key(did_key).unwrap();
            assert_eq!(key.to_did_key(), did_key);
            let secret: Vec<u8> =
                match (v.get("privateKeyBytesHex"), v.get("privateKeyBytesBase58")) {
                    (Some(hex), _) => {
                        let hex = hex.as_str().unwrap();
                        (0..hex.len() / 2)
                            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                            .collect()
                    }
                    (None, Some(b58)) => {
                        multibase::decode(format!("z{}", b58.as_str().unwrap()))
                            .unwrap()
                            .1
                    }
                    (None, None) => panic!("vector without a private key: {v}"),
                };
            let derived = match curve {
                "k256" => PublicKey::K256(
                    *k256::ecdsa::SigningKey::from_slice(&secret)
                        .unwrap()
                        .verifying_key(),
                ),
                _ => PublicKey::P256(
                    *p256::ecdsa::SigningKey::from_slice(&secret)
                        .unwrap()
                        .verifying_key(),
                ),
            };
            assert_eq!(derived, key, "{did_key}");
        }
    }
}

#[test]
fn mst_key_heights() {
    let vectors = fixture("mst/key_heights.json");
    for v in vectors.as_array().unwrap() {
        let key = v["key"].as_str().unwrap();
        assert_eq!(
            u64::from(key_height(key.as_bytes())),
            v["height"].as_u64().unwrap(),
            "{key:?}"
        );
    }
}

#[test]
fn data_model_cbor_hashes_to_the_fixture_cid_and_decodes() {
    let vectors = fixture("data-model/data-model-fixtures.json");
    for v in vectors.as_array().unwrap() {
        let cbor = b64(v["cbor_base64"].as_str().unwrap());
        assert_eq!(
            cid_for(DAG_CBOR, &cbor).to_string(),
            v["cid"].as_str().unwrap()
        );
        murmur_sync::check_block(&cid_for(DAG_CBOR, &cbor), &cbor).unwrap();
        let value: ipld_core::ipld::Ipld =
            decode_record(&cbor, &murmur_sync::Limits::default()).unwrap();
        assert!(matches!(value, ipld_core::ipld::Ipld::Map(_)));
    }
}
