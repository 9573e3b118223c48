//! The atproto data model: JSON and DAG-CBOR values as one [`Ipld`] tree.
//!
//! JSON uses `{"$link": cid}` for CID links and `{"$bytes": base64}` for bytes; DAG-CBOR
//! carries both natively. Floats are not part of the data model; `$type` must be a
//! non-empty string; a `blob` must carry `ref`, `mimeType` and `size`.

use std::collections::BTreeMap;

use base64::Engine as _;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
pub use ipld_core::ipld::Ipld;
use serde::{Deserialize, Serialize};

use crate::ValidationError;

/// Standard base64 alphabet, padding optional, trailing bits tolerated (as the reference
/// implementation decodes `$bytes`).
const BASE64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// Converts atproto JSON into a data-model value, checking the data-model rules.
///
/// The top level must be an object (a record).
pub fn json_to_data(value: &serde_json::Value) -> Result<Ipld, ValidationError> {
    if !value.is_object() {
        return Err(ValidationError::new(
            "$",
            "expected an object at the top level",
        ));
    }
    json_value(value, "$")
}

fn json_value(value: &serde_json::Value, path: &str) -> Result<Ipld, ValidationError> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => Ipld::Null,
        Value::Bool(b) => Ipld::Bool(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ipld::Integer(i.into())
            } else if let Some(u) = n.as_u64() {
                Ipld::Integer(u.into())
            } else {
                let f = n.as_f64().unwrap_or(f64::NAN);
                if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 {
                    // Integer-valued floats (`123.0`) are integers in the data model.
                    Ipld::Integer(f as i128)
                } else {
                    return Err(ValidationError::new(
                        path,
                        "floats are not allowed in the data model; use an integer or a string",
                    ));
                }
            }
        }
        Value::String(s) => Ipld::String(s.clone()),
        Value::Array(items) => Ipld::List(
            items
                .iter()
                .enumerate()
                .map(|(i, v)| json_value(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => {
            if let Some(link) = map.get("$link") {
                let Value::String(link) = link else {
                    return Err(ValidationError::new(path, "$link must be a CID string"));
                };
                if map.len() != 1 {
                    return Err(ValidationError::new(
                        path,
                        "an object with $link must have no other fields",
                    ));
                }
                let cid = cid::Cid::try_from(link.as_str()).map_err(|e| {
                    ValidationError::new(path, format!("$link is not a valid CID: {e}"))
                })?;
                return Ok(Ipld::Link(cid));
            }
            if let Some(bytes) = map.get("$bytes") {
                let Value::String(bytes) = bytes else {
                    return Err(ValidationError::new(path, "$bytes must be a base64 string"));
                };
                if map.len() != 1 {
                    return Err(ValidationError::new(
                        path,
                        "an object with $bytes must have no other fields",
                    ));
                }
                let decoded = BASE64.decode(bytes).map_err(|e| {
                    ValidationError::new(path, format!("$bytes is not valid base64: {e}"))
                })?;
                return Ok(Ipld::Bytes(decoded));
            }
            let mut out = BTreeMap::new();
            for (k, v) in map {
                out.insert(k.clone(), json_value(v, &child(path, k))?);
            }
            let out = Ipld::Map(out);
            check_object(&out, path)?;
            out
        }
    })
}

/// Converts a data-model value to atproto JSON (`$link`, `$bytes`).
pub fn data_to_json(value: &Ipld) -> serde_json::Value {
    use serde_json::Value;
    match value {
        Ipld::Null => Value::Null,
        Ipld::Bool(b) => Value::Bool(*b),
        Ipld::Integer(i) => match i64::try_from(*i) {
            Ok(i) => Value::from(i),
            Err(_) => Value::from(*i as f64),
        },
        Ipld::Float(f) => Value::from(*f),
        Ipld::String(s) => Value::String(s.clone()),
        Ipld::Bytes(b) => serde_json::json!({ "$bytes": BASE64.encode(b) }),
        Ipld::List(items) => Value::Array(items.iter().map(data_to_json).collect()),
        Ipld::Map(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), data_to_json(v)))
                .collect(),
        ),
        Ipld::Link(cid) => serde_json::json!({ "$link": cid.to_string() }),
    }
}

/// Decodes DAG-CBOR into a data-model value, checking the data-model rules.
pub fn dag_cbor_to_data(bytes: &[u8]) -> Result<Ipld, ValidationError> {
    let value: Ipld = serde_ipld_dagcbor::from_slice(bytes)
        .map_err(|e| ValidationError::new("$", format!("not valid DAG-CBOR: {e}")))?;
    if !matches!(value, Ipld::Map(_)) {
        return Err(ValidationError::new("$", "expected a map at the top level"));
    }
    check_data(&value, "$")?;
    Ok(value)
}

/// Encodes a data-model value as DAG-CBOR (canonical key order).
pub fn to_dag_cbor(value: &Ipld) -> Result<Vec<u8>, ValidationError> {
    serde_ipld_dagcbor::to_vec(value)
        .map_err(|e| ValidationError::new("$", format!("cannot encode as DAG-CBOR: {e}")))
}

/// Checks the data-model rules (no floats, `$type`, blob shape) on a whole value.
pub fn check_data(value: &Ipld, path: &str) -> Result<(), ValidationError> {
    match value {
        Ipld::Float(_) => Err(ValidationError::new(
            path,
            "floats are not allowed in the data model",
        )),
        Ipld::List(items) => {
            for (i, item) in items.iter().enumerate() {
                check_data(item, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        Ipld::Map(map) => {
            for (k, v) in map {
                check_data(v, &child(path, k))?;
            }
            check_object(value, path)
        }
        _ => Ok(()),
    }
}

/// `$type` and blob rules for one map.
fn check_object(value: &Ipld, path: &str) -> Result<(), ValidationError> {
    let Ipld::Map(map) = value else { return Ok(()) };
    match map.get("$type") {
        None => Ok(()),
        Some(Ipld::String(t)) if t.is_empty() => Err(ValidationError::new(
            child(path, "$type"),
            "$type must not be empty",
        )),
        Some(Ipld::String(t)) if t == "blob" => {
            if !matches!(map.get("ref"), Some(Ipld::Link(_))) {
                return Err(ValidationError::new(
                    child(path, "ref"),
                    "a blob needs a `ref` CID link",
                ));
            }
            if !matches!(map.get("mimeType"), Some(Ipld::String(_))) {
                return Err(ValidationError::new(
                    child(path, "mimeType"),
                    "a blob needs a `mimeType` string",
                ));
            }
            if !matches!(map.get("size"), Some(Ipld::Integer(_))) {
                return Err(ValidationError::new(
                    child(path, "size"),
                    "a blob needs an integer `size`",
                ));
            }
            Ok(())
        }
        Some(Ipld::String(_)) => Ok(()),
        Some(_) => Err(ValidationError::new(
            child(path, "$type"),
            "$type must be a string",
        )),
    }
}

/// The JSON path of field `key` under `path`.
pub(crate) fn child(path: &str, key: &str) -> String {
    if !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b == b'-')
    {
        format!("{path}.{key}")
    } else {
        format!("{path}[{}]", serde_json::Value::String(key.to_owned()))
    }
}

/// A `bytes` field: base64 `{"$bytes": ...}` in JSON, a byte string in DAG-CBOR.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Bytes(pub Vec<u8>);

impl Serialize for Bytes {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            use serde::ser::SerializeMap;
            let mut map = serializer.serialize_map(Some(1))?;
            map.serialize_entry("$bytes", &BASE64.encode(&self.0))?;
            map.end()
        } else {
            serializer.serialize_bytes(&self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match Ipld::deserialize(deserializer)? {
            Ipld::Bytes(b) => Ok(Bytes(b)),
            Ipld::Map(map) if map.len() == 1 => match map.get("$bytes") {
                Some(Ipld::String(s)) => BASE64
                    .decode(s)
                    .map(Bytes)
                    .map_err(serde::de::Error::custom),
                _ => Err(serde::de::Error::custom("expected {\"$bytes\": base64}")),
            },
            _ => Err(serde::de::Error::custom("expected bytes")),
        }
    }
}

impl From<Vec<u8>> for Bytes {
    fn from(v: Vec<u8>) -> Self {
        Bytes(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> serde_json::Value {
        let path = format!(
            "{}/tests/fixtures/interop/data-model/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn data_model_valid_vectors_convert() {
        let cases = fixture("data-model-valid.json");
        for case in cases.as_array().unwrap() {
            let data = json_to_data(&case["json"]);
            assert!(data.is_ok(), "{}: {:?}", case["note"], data);
        }
    }

    #[test]
    fn data_model_invalid_vectors_are_refused() {
        let cases = fixture("data-model-invalid.json");
        for case in cases.as_array().unwrap() {
            assert!(
                json_to_data(&case["json"]).is_err(),
                "should be refused: {}",
                case["note"]
            );
        }
    }

    #[test]
    fn data_model_fixtures_match_dag_cbor_and_cid() {
        use base64::engine::general_purpose::STANDARD_NO_PAD;
        use cid::multihash::Multihash;
        use sha2::{Digest, Sha256};
        let cases = fixture("data-model-fixtures.json");
        for case in cases.as_array().unwrap() {
            let data = json_to_data(&case["json"]).unwrap();
            let cbor = serde_ipld_dagcbor::to_vec(&data).unwrap();
            let expected = STANDARD_NO_PAD
                .decode(case["cbor_base64"].as_str().unwrap())
                .unwrap();
            assert_eq!(cbor, expected, "DAG-CBOR bytes");
            let digest = Sha256::digest(&cbor);
            let cid = cid::Cid::new_v1(0x71, Multihash::wrap(0x12, &digest).unwrap());
            assert_eq!(cid.to_string(), case["cid"].as_str().unwrap());
            // And back: DAG-CBOR -> data model -> JSON equals the original JSON.
            let back = dag_cbor_to_data(&cbor).unwrap();
            assert_eq!(data_to_json(&back), case["json"]);
        }
    }

    #[test]
    fn dag_cbor_floats_are_refused() {
        let mut map = BTreeMap::new();
        map.insert("a".to_owned(), Ipld::Float(1.5));
        let bytes = serde_ipld_dagcbor::to_vec(&Ipld::Map(map)).unwrap();
        let err = dag_cbor_to_data(&bytes).unwrap_err();
        assert_eq!(err.path, "$.a");
    }

    #[test]
    fn garbage_never_panics() {
        for bytes in [
            &b""[..],
            b"\xff",
            b"\xa1\x61",
            b"\x9f\x9f\x9f",
            b"\xd8\x2a\x41\x00",
        ] {
            assert!(dag_cbor_to_data(bytes).is_err());
        }
    }

    #[test]
    fn deeply_nested_input_is_refused_not_overflowing() {
        // A map holding 100 000 nested one-element arrays: DAG-CBOR from the network.
        let depth = 100_000;
        let mut bytes = vec![0xa1, 0x61, b'a'];
        bytes.extend(std::iter::repeat_n(0x81, depth));
        bytes.push(0x80);
        let err = dag_cbor_to_data(&bytes).unwrap_err();
        assert!(err.message.starts_with("not valid DAG-CBOR"), "{err}");
        // Shallow nesting of the same shape decodes.
        let mut ok = vec![0xa1, 0x61, b'a'];
        ok.extend(std::iter::repeat_n(0x81, 8));
        ok.push(0x80);
        assert!(dag_cbor_to_data(&ok).is_ok());
        // The same as JSON: serde_json's own recursion limit refuses it.
        let json = format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth));
        assert!(serde_json::from_str::<serde_json::Value>(&json).is_err());
    }

    #[test]
    fn bytes_round_trip_both_encodings() {
        let b = Bytes(vec![1, 2, 3, 250]);
        let json = serde_json::to_string(&b).unwrap();
        assert_eq!(json, r#"{"$bytes":"AQID+g"}"#);
        assert_eq!(serde_json::from_str::<Bytes>(&json).unwrap(), b);
        let cbor = serde_ipld_dagcbor::to_vec(&b).unwrap();
        assert_eq!(serde_ipld_dagcbor::from_slice::<Bytes>(&cbor).unwrap(), b);
    }
}
