//! Turning a typed record into what goes on the wire: validated, `$type`d, size-checked,
//! with its CID computed locally. Everything here runs before any HTTP call.

use atrium_api::types::{Collection, DataModel, Unknown};
use ipld_core::cid::Cid;
use ipld_core::ipld::Ipld;
use murmur_lexicon::Validate;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Largest record, DAG-CBOR encoded, that atproto accepts (1 MiB, as the reference relay).
pub const MAX_RECORD_CBOR_BYTES: usize = 1024 * 1024;
/// Largest JSON request body the reference PDS accepts on createRecord, putRecord and
/// applyWrites.
pub const MAX_REQUEST_JSON_BYTES: usize = 1_000_000;

const DAG_CBOR: u64 = 0x71;
/// The multicodec of a blob's CID: raw bytes.
pub(crate) const RAW: u64 = 0x55;
pub(crate) const SHA2_256: u64 = 0x12;

/// A record ready to send.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub nsid: String,
    pub value: Unknown,
    /// The CID the PDS will give this record (CIDv1, dag-cbor, sha2-256).
    pub cid: Cid,
    /// Size of the record in the JSON request body.
    pub json_len: usize,
}

/// Validates `record` against its lexicon, adds `$type`, checks the size limits and
/// computes the CID. Never touches the network.
pub(crate) fn encode<C>(record: &C::Record) -> Result<Encoded>
where
    C: Collection,
    C::Record: Validate,
{
    let nsid = C::NSID;
    record.validate().map_err(|e| Error::InvalidRecord {
        nsid: nsid.to_string(),
        path: e.path,
        message: e.message,
    })?;
    let ipld = ipld_core::serde::to_ipld(record).map_err(|e| Error::InvalidRecord {
        nsid: nsid.to_string(),
        path: "$".into(),
        message: format!("cannot be encoded: {e}"),
    })?;
    encode_value(nsid, ipld)
}

/// The checks after validation, for a record already in data-model form: adds `$type`,
/// refuses floats, checks sizes and computes the CID.
pub(crate) fn encode_value(nsid: &str, mut ipld: Ipld) -> Result<Encoded> {
    let invalid = |path: String, message: String| Error::InvalidRecord {
        nsid: nsid.to_string(),
        path,
        message,
    };
    let Ipld::Map(map) = &mut ipld else {
        return Err(invalid(
            "$".into(),
            "a record must serialize to an object".into(),
        ));
    };
    match map.get("$type") {
        None => {
            map.insert("$type".into(), Ipld::String(nsid.into()));
        }
        Some(Ipld::String(t)) if t == nsid => {}
        Some(other) => {
            return Err(invalid(
                "$.$type".into(),
                format!("is {other:?}, but the record is written to collection {nsid}"),
            ));
        }
    }
    check_data_model(&ipld, &mut "$".to_string()).map_err(|(p, m)| invalid(p, m))?;

    let cbor = serde_ipld_dagcbor::to_vec(&ipld)
        .map_err(|e| invalid("$".into(), format!("cannot be encoded as DAG-CBOR: {e}")))?;
    if cbor.len() > MAX_RECORD_CBOR_BYTES {
        return Err(Error::RecordTooLarge {
            nsid: nsid.into(),
            encoding: "DAG-CBOR",
            size: cbor.len(),
            limit: MAX_RECORD_CBOR_BYTES,
        });
    }
    let cid = cid_of(&cbor);

    let json = to_json(&ipld);
    let json_len = serde_json::to_vec(&json).map(|v| v.len()).unwrap_or(0);
    if json_len > MAX_REQUEST_JSON_BYTES {
        return Err(Error::RecordTooLarge {
            nsid: nsid.into(),
            encoding: "JSON request body",
            size: json_len,
            limit: MAX_REQUEST_JSON_BYTES,
        });
    }
    let value =
        Unknown::Other(DataModel::try_from(ipld).map_err(|e| invalid("$".into(), e.to_string()))?);
    Ok(Encoded {
        nsid: nsid.to_string(),
        value,
        cid,
        json_len,
    })
}

/// The CID a record will have once written (CIDv1, dag-cbor, sha2-256 of its DAG-CBOR
/// encoding with `$type` set), after the same validation and size checks as a write.
/// Lets an agent know its own record on the stream before the write returns.
pub fn record_cid<C>(record: &C::Record) -> Result<Cid>
where
    C: Collection,
    C::Record: Validate,
{
    encode::<C>(record).map(|e| e.cid)
}

/// The CID a record given in data-model form will have once written to `collection`, after
/// the same NSID, `$type`, data-model and size checks as
/// [`Writer::create_untyped`](crate::Writer::create_untyped) (lexicon validation is the
/// caller's). Never touches the network, so a tool can refuse a bad or oversized record
/// before it logs in.
pub fn record_cid_untyped(collection: &str, value: &Ipld) -> Result<Cid> {
    crate::arguments::nsid(collection)?;
    encode_value(collection, value.clone()).map(|e| e.cid)
}

/// CIDv1 (dag-cbor, sha2-256) of DAG-CBOR bytes: what the PDS computes for a record.
pub(crate) fn cid_of(cbor: &[u8]) -> Cid {
    let digest = Sha256::digest(cbor);
    // A 32-byte digest always fits the 64-byte multihash.
    let mh =
        ipld_core::cid::multihash::Multihash::<64>::wrap(SHA2_256, &digest).unwrap_or_default();
    Cid::new_v1(DAG_CBOR, mh)
}

/// The CID a blob has (CIDv1, raw, sha2-256 of its bytes): what the PDS computes on upload,
/// and what [`Reader::get_blob`](crate::Reader::get_blob) checks the bytes it is served
/// against.
pub fn blob_cid(bytes: &[u8]) -> Cid {
    let digest = Sha256::digest(bytes);
    // A 32-byte digest always fits the 64-byte multihash.
    let mh =
        ipld_core::cid::multihash::Multihash::<64>::wrap(SHA2_256, &digest).unwrap_or_default();
    Cid::new_v1(RAW, mh)
}

/// The atproto data model has no floats; report the first one with its path.
fn check_data_model(v: &Ipld, path: &mut String) -> std::result::Result<(), (String, String)> {
    match v {
        Ipld::Float(_) => Err((
            path.clone(),
            "floats are not allowed in atproto records; use an integer or a string".into(),
        )),
        Ipld::List(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                check_data_model(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Ipld::Map(map) => {
            for (k, item) in map {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                check_data_model(item, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// The atproto JSON form of a data-model value (`$link` for CIDs, `$bytes` for bytes).
pub(crate) fn to_json(v: &Ipld) -> serde_json::Value {
    use serde_json::Value;
    match v {
        Ipld::Null => Value::Null,
        Ipld::Bool(b) => Value::Bool(*b),
        Ipld::Integer(i) => i64::try_from(*i)
            .map(Value::from)
            .unwrap_or_else(|_| Value::from(*i as f64)),
        Ipld::Float(f) => Value::from(*f),
        Ipld::String(s) => Value::String(s.clone()),
        Ipld::Bytes(b) => serde_json::json!({ "$bytes": base64(b) }),
        Ipld::List(items) => Value::Array(items.iter().map(to_json).collect()),
        Ipld::Map(map) => Value::Object(map.iter().map(|(k, v)| (k.clone(), to_json(v))).collect()),
        Ipld::Link(cid) => serde_json::json!({ "$link": cid.to_string() }),
    }
}

/// Decodes a record read back from the PDS into its Rust type.
pub(crate) fn decode<R: DeserializeOwned>(uri: &str, nsid: &str, value: &Unknown) -> Result<R> {
    let json = serde_json::to_value(value).map_err(|e| Error::Decode {
        uri: uri.into(),
        nsid: nsid.into(),
        message: e.to_string(),
    })?;
    serde_json::from_value(json).map_err(|e| Error::Decode {
        uri: uri.into(),
        nsid: nsid.into(),
        message: e.to_string(),
    })
}

/// Standard base64 without padding, as atproto's `$bytes`.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use murmur_lexicon::ValidationError;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct Note {
        text: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        score: Option<f64>,
    }
    impl Validate for Note {
        fn validate(&self) -> std::result::Result<(), ValidationError> {
            if self.text.len() > 10 {
                return Err(ValidationError {
                    path: "$.text".into(),
                    message: "string longer than maxLength 10".into(),
                });
            }
            Ok(())
        }
    }
    #[derive(Debug)]
    struct Notes;
    impl Collection for Notes {
        const NSID: &'static str = "test.murmur.note";
        type Record = Note;
    }

    #[test]
    fn adds_type_and_computes_the_cid_the_pds_will_use() {
        let enc = encode::<Notes>(&Note {
            text: "hi".into(),
            score: None,
        })
        .unwrap();
        let json = serde_json::to_value(&enc.value).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"$type": "test.murmur.note", "text": "hi"})
        );
        assert_eq!(enc.cid.codec(), DAG_CBOR);
        assert!(enc.cid.to_string().starts_with("bafyrei"));
    }

    #[test]
    fn validation_error_names_the_field() {
        let err = encode::<Notes>(&Note {
            text: "far too long for the lexicon".into(),
            score: None,
        })
        .unwrap_err();
        match err {
            Error::InvalidRecord { path, nsid, .. } => {
                assert_eq!(path, "$.text");
                assert_eq!(nsid, "test.murmur.note");
            }
            other => panic!("{other}"),
        }
    }

    #[test]
    fn floats_are_refused_with_their_path() {
        let err = encode::<Notes>(&Note {
            text: "x".into(),
            score: Some(0.5),
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidRecord { path, .. } if path == "$.score"),
            "{err}"
        );
    }

    #[test]
    fn base64_matches_rfc4648_without_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg");
        assert_eq!(base64(b"fo"), "Zm8");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn blob_cid_is_raw_sha256_cidv1() {
        // The well-known CID of no bytes at all.
        assert_eq!(
            blob_cid(b"").to_string(),
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        );
        assert_ne!(blob_cid(b"a"), blob_cid(b"b"));
        assert_eq!(blob_cid(b"a").codec(), RAW);
    }
}
