//! Runtime validation of data-model values (from JSON or DAG-CBOR) against a [`LexiconSet`].

use ipld_core::ipld::Ipld;
use unicode_segmentation::UnicodeSegmentation;

use crate::data::{self, child};
use crate::schema::{
    ArrayType, BlobType, BytesType, FieldType, IntegerType, ObjectType, StringType, UnionType,
    UserType,
};
use crate::set::split_ref;
use crate::{LexiconSet, ValidationError};

/// Refs may be recursive; data nested deeper than this is refused rather than followed.
const MAX_DEPTH: usize = 64;
/// Stop collecting after this many errors.
const MAX_ERRORS: usize = 64;

impl LexiconSet {
    /// Validates a record (its data-model value) against the record type `nsid`.
    ///
    /// Returns every problem found, each naming its JSON path.
    pub fn validate_record(&self, nsid: &str, value: &Ipld) -> Result<(), Vec<ValidationError>> {
        let Some(doc) = self.get(nsid) else {
            return Err(vec![ValidationError::new(
                "$",
                format!("no lexicon for {nsid} in this set"),
            )]);
        };
        let Some(UserType::Record(record)) = doc.defs.get("main") else {
            return Err(vec![ValidationError::new(
                "$",
                format!("{nsid} is not a record type"),
            )]);
        };
        let mut v = Validator {
            set: self,
            errors: Vec::new(),
        };
        if let Err(e) = data::check_data(value, "$") {
            return Err(vec![e]);
        }
        match value {
            Ipld::Map(map) => match map.get("$type") {
                Some(Ipld::String(t)) if t == nsid => {}
                Some(Ipld::String(t)) => {
                    v.error("$.$type", format!("$type is {t:?}, expected {nsid:?}"))
                }
                _ => v.error("$.$type", format!("a record needs \"$type\": {nsid:?}")),
            },
            _ => v.error("$", "a record must be an object"),
        }
        v.object(&record.record, value, "$", nsid, 0);
        if v.errors.is_empty() {
            Ok(())
        } else {
            Err(v.errors)
        }
    }

    /// Validates a record given as atproto JSON.
    pub fn validate_record_json(
        &self,
        nsid: &str,
        json: &serde_json::Value,
    ) -> Result<(), Vec<ValidationError>> {
        let value = data::json_to_data(json).map_err(|e| vec![e])?;
        self.validate_record(nsid, &value)
    }

    /// Validates a record given as DAG-CBOR bytes.
    pub fn validate_record_dag_cbor(
        &self,
        nsid: &str,
        bytes: &[u8],
    ) -> Result<(), Vec<ValidationError>> {
        let value = data::dag_cbor_to_data(bytes).map_err(|e| vec![e])?;
        self.validate_record(nsid, &value)
    }

    /// Validates a value against one definition (`nsid#name`, or `nsid` for `main`).
    pub fn validate_value(
        &self,
        reference: &str,
        value: &Ipld,
    ) -> Result<(), Vec<ValidationError>> {
        let (nsid, _) = split_ref(reference, "");
        let mut v = Validator {
            set: self,
            errors: Vec::new(),
        };
        v.reference(reference, value, "$", nsid, 0);
        if v.errors.is_empty() {
            Ok(())
        } else {
            Err(v.errors)
        }
    }
}

struct Validator<'s> {
    set: &'s LexiconSet,
    errors: Vec<ValidationError>,
}

impl Validator<'_> {
    fn error(&mut self, path: &str, message: impl Into<String>) {
        if self.errors.len() < MAX_ERRORS {
            self.errors.push(ValidationError::new(path, message));
        }
    }

    fn field(&mut self, ty: &FieldType, value: &Ipld, path: &str, ctx: &str, depth: usize) {
        if depth > MAX_DEPTH {
            return self.error(path, "data nested too deeply");
        }
        match ty {
            FieldType::Boolean(t) => match value {
                Ipld::Bool(b) => {
                    if t.const_value.is_some_and(|c| c != *b) {
                        self.error(
                            path,
                            format!("must be {}", t.const_value.unwrap_or_default()),
                        );
                    }
                }
                _ => self.error(path, "expected a boolean"),
            },
            FieldType::Integer(t) => match value {
                Ipld::Integer(i) => match i64::try_from(*i) {
                    Ok(i) => self.integer(t, i, path),
                    Err(_) => self.error(path, "integer out of 64-bit range"),
                },
                _ => self.error(path, "expected an integer"),
            },
            FieldType::String(t) => match value {
                Ipld::String(s) => self.string(t, s, path),
                _ => self.error(path, "expected a string"),
            },
            FieldType::Bytes(t) => match value {
                Ipld::Bytes(b) => self.bytes(t, b, path),
                _ => self.error(path, "expected bytes ({\"$bytes\": base64} in JSON)"),
            },
            FieldType::CidLink(_) => {
                if !matches!(value, Ipld::Link(_)) {
                    self.error(path, "expected a CID link ({\"$link\": cid} in JSON)");
                }
            }
            FieldType::Blob(t) => self.blob(t, value, path),
            FieldType::Array(t) => self.array(t, value, path, ctx, depth),
            FieldType::Object(t) => self.object(t, value, path, ctx, depth),
            FieldType::Ref(r) => self.reference(&r.reference, value, path, ctx, depth),
            FieldType::Union(u) => self.union(u, value, path, ctx, depth),
            FieldType::Unknown(_) => {
                if !matches!(value, Ipld::Map(_)) {
                    self.error(path, "expected an object (type unknown)");
                }
            }
        }
    }

    fn integer(&mut self, t: &IntegerType, i: i64, path: &str) {
        if let Some(c) = t.const_value.filter(|c| *c != i) {
            self.error(path, format!("must be {c}"));
        }
        if let Some(values) = t.enum_values.as_ref().filter(|e| !e.contains(&i)) {
            self.error(path, format!("must be one of {values:?}"));
        }
        if let Some(min) = t.minimum.filter(|m| i < *m) {
            self.error(path, format!("{i} is below the minimum {min}"));
        }
        if let Some(max) = t.maximum.filter(|m| i > *m) {
            self.error(path, format!("{i} is above the maximum {max}"));
        }
    }

    fn string(&mut self, t: &StringType, s: &str, path: &str) {
        if let Some(c) = t.const_value.as_ref().filter(|c| *c != s) {
            self.error(path, format!("must be {c:?}"));
        }
        if let Some(values) = t.enum_values.as_ref().filter(|e| !e.iter().any(|v| v == s)) {
            self.error(path, format!("must be one of {values:?}"));
        }
        let len = s.len() as u64;
        if let Some(min) = t.min_length.filter(|m| len < *m) {
            self.error(
                path,
                format!("string shorter than minLength {min} (UTF-8 bytes)"),
            );
        }
        if let Some(max) = t.max_length.filter(|m| len > *m) {
            self.error(
                path,
                format!("string longer than maxLength {max} (UTF-8 bytes)"),
            );
        }
        if t.min_graphemes.is_some() || t.max_graphemes.is_some() {
            let graphemes = s.graphemes(true).count() as u64;
            if let Some(min) = t.min_graphemes.filter(|m| graphemes < *m) {
                self.error(path, format!("string shorter than minGraphemes {min}"));
            }
            if let Some(max) = t.max_graphemes.filter(|m| graphemes > *m) {
                self.error(path, format!("string longer than maxGraphemes {max}"));
            }
        }
        if let Some(format) = t.format.filter(|f| !f.is_valid(s)) {
            self.error(path, format!("not a valid {format}"));
        }
    }

    fn bytes(&mut self, t: &BytesType, b: &[u8], path: &str) {
        let len = b.len() as u64;
        if let Some(min) = t.min_length.filter(|m| len < *m) {
            self.error(path, format!("{len} bytes, below minLength {min}"));
        }
        if let Some(max) = t.max_length.filter(|m| len > *m) {
            self.error(path, format!("{len} bytes, above maxLength {max}"));
        }
    }

    fn blob(&mut self, t: &BlobType, value: &Ipld, path: &str) {
        let Ipld::Map(map) = value else {
            return self.error(path, "expected a blob object");
        };
        let (mime, size) = match map.get("$type") {
            Some(Ipld::String(ty)) if ty == "blob" => (map.get("mimeType"), map.get("size")),
            // Legacy blob: {cid, mimeType}.
            None if matches!(map.get("cid"), Some(Ipld::String(_))) => (map.get("mimeType"), None),
            _ => {
                return self.error(
                    path,
                    "expected a blob ({\"$type\": \"blob\", ref, mimeType, size})",
                );
            }
        };
        let Some(Ipld::String(mime)) = mime else {
            return self.error(&child(path, "mimeType"), "a blob needs a mimeType");
        };
        if let Some(accept) = &t.accept
            && !accept.iter().any(|pattern| mime_matches(pattern, mime))
        {
            self.error(
                &child(path, "mimeType"),
                format!("{mime:?} is not accepted (accept: {accept:?})"),
            );
        }
        if let (Some(max), Some(Ipld::Integer(size))) = (t.max_size, size)
            && *size > i128::from(max)
        {
            self.error(
                &child(path, "size"),
                format!("blob of {size} bytes is above maxSize {max}"),
            );
        }
    }

    fn array(&mut self, t: &ArrayType, value: &Ipld, path: &str, ctx: &str, depth: usize) {
        let Ipld::List(items) = value else {
            return self.error(path, "expected an array");
        };
        let len = items.len() as u64;
        if let Some(min) = t.min_length.filter(|m| len < *m) {
            self.error(path, format!("{len} items, below minLength {min}"));
        }
        if let Some(max) = t.max_length.filter(|m| len > *m) {
            self.error(path, format!("{len} items, above maxLength {max}"));
        }
        for (i, item) in items.iter().enumerate() {
            self.field(&t.items, item, &format!("{path}[{i}]"), ctx, depth + 1);
        }
    }

    fn object(&mut self, t: &ObjectType, value: &Ipld, path: &str, ctx: &str, depth: usize) {
        let Ipld::Map(map) = value else {
            return self.error(path, "expected an object");
        };
        for name in &t.required {
            if !map.contains_key(name) {
                self.error(&child(path, name), "required field is missing");
            }
        }
        for (name, ty) in &t.properties {
            let Some(v) = map.get(name) else { continue };
            let fpath = child(path, name);
            if matches!(v, Ipld::Null) {
                if !t.nullable.contains(name) {
                    self.error(&fpath, "must not be null");
                }
                continue;
            }
            self.field(ty, v, &fpath, ctx, depth + 1);
        }
    }

    fn reference(&mut self, reference: &str, value: &Ipld, path: &str, ctx: &str, depth: usize) {
        let (nsid, _) = split_ref(reference, ctx);
        let nsid = nsid.to_owned();
        match self.set.resolve(reference, ctx) {
            Some((_, UserType::Type(t))) => self.field(t, value, path, &nsid, depth + 1),
            Some((_, UserType::Record(r))) => self.object(&r.record, value, path, &nsid, depth + 1),
            Some((full, UserType::Token(_))) => {
                let full = full.strip_suffix("#main").unwrap_or(&full);
                if !matches!(value, Ipld::String(s) if s == full) {
                    self.error(path, format!("expected the token {full:?}"));
                }
            }
            Some((full, _)) => self.error(path, format!("{full} cannot describe data")),
            None => self.error(path, format!("reference {reference:?} does not resolve")),
        }
    }

    fn union(&mut self, u: &UnionType, value: &Ipld, path: &str, ctx: &str, depth: usize) {
        let Ipld::Map(map) = value else {
            return self.error(path, "expected an object with $type (union)");
        };
        let Some(Ipld::String(ty)) = map.get("$type") else {
            return self.error(&child(path, "$type"), "a union member needs a $type");
        };
        let normalize = |r: &str| -> String {
            let (nsid, name) = split_ref(r, ctx);
            if name == "main" {
                nsid.to_owned()
            } else {
                format!("{nsid}#{name}")
            }
        };
        let wanted = normalize(ty);
        match u.refs.iter().find(|r| normalize(r) == wanted) {
            Some(r) => {
                let r = r.clone();
                self.reference(&r, value, path, ctx, depth)
            }
            None if u.closed => {
                let options: Vec<String> = u.refs.iter().map(|r| normalize(r)).collect();
                self.error(
                    &child(path, "$type"),
                    format!("{ty:?} is not one of the closed union's types {options:?}"),
                )
            }
            None => {}
        }
    }
}

/// `image/*` matches `image/png`; `*/*` and `*` match anything.
fn mime_matches(pattern: &str, mime: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some("*") => true,
        Some(prefix) => mime.split_once('/').is_some_and(|(ty, _)| ty == prefix),
        None => pattern == "*" || pattern == mime,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn catalog() -> LexiconSet {
        let dir = format!(
            "{}/tests/fixtures/interop/lexicon/catalog",
            env!("CARGO_MANIFEST_DIR")
        );
        LexiconSet::load_dir_unchecked(dir).unwrap().0
    }

    const NSID: &str = "example.lexicon.record";

    #[test]
    fn interop_valid_records_are_accepted() {
        let set = catalog();
        let path = format!(
            "{}/tests/fixtures/interop/lexicon/record-data-valid.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for case in cases.as_array().unwrap() {
            let result = set.validate_record_json(NSID, &case["data"]);
            assert!(result.is_ok(), "{}: {result:?}", case["name"]);
            // The same record as DAG-CBOR validates the same.
            let bytes =
                serde_ipld_dagcbor::to_vec(&data::json_to_data(&case["data"]).unwrap()).unwrap();
            assert!(set.validate_record_dag_cbor(NSID, &bytes).is_ok());
        }
    }

    /// Invalid records against the catalog, each with the JSON path that must be named.
    pub(crate) fn invalid_records() -> Vec<(&'static str, serde_json::Value, &'static str)> {
        let base = |extra: serde_json::Value| {
            let mut v = json!({"$type": NSID, "integer": 1});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            v
        };
        vec![
            ("missing required", json!({"$type": NSID}), "$.integer"),
            (
                "wrong $type",
                json!({"$type": "example.lexicon.other", "integer": 1}),
                "$.$type",
            ),
            (
                "boolean as string",
                base(json!({"boolean": "true"})),
                "$.boolean",
            ),
            (
                "integer as string",
                base(json!({"integer": "1"})),
                "$.integer",
            ),
            ("float", base(json!({"integer": 1.5})), "$.integer"),
            (
                "null not nullable",
                base(json!({"string": null})),
                "$.string",
            ),
            ("bytes as string", base(json!({"bytes": "AAAA"})), "$.bytes"),
            (
                "array item type",
                base(json!({"array": [1, "two"]})),
                "$.array[1]",
            ),
            (
                "object field type",
                base(json!({"object": {"a": "x"}})),
                "$.object.a",
            ),
            (
                "ref field type",
                base(json!({"ref": {"b": false}})),
                "$.ref.b",
            ),
            (
                "union without $type",
                base(json!({"union": {"a": 1}})),
                "$.union.$type",
            ),
            (
                "closed union other",
                base(
                    json!({"closedUnion": {"$type": "example.lexicon.record#demoObjectTwo", "c": 1}}),
                ),
                "$.closedUnion.$type",
            ),
            ("const", base(json!({"constInteger": 41})), "$.constInteger"),
            (
                "enum integer",
                base(json!({"enumInteger": 5})),
                "$.enumInteger",
            ),
            ("range", base(json!({"rangeInteger": 21})), "$.rangeInteger"),
            ("length", base(json!({"lenString": "short"})), "$.lenString"),
            (
                "graphemes",
                base(json!({"graphemeString": "🇩🇪🇩🇪"})),
                "$.graphemeString",
            ),
            (
                "enum string",
                base(json!({"enumString": "cloud"})),
                "$.enumString",
            ),
            (
                "bytes size",
                base(json!({"sizeBytes": {"$bytes": "AAAA"}})),
                "$.sizeBytes",
            ),
            ("array length", base(json!({"lenArray": [1]})), "$.lenArray"),
            (
                "blob size",
                base(
                    json!({"sizeBlob": {"$type": "blob", "mimeType": "text/plain", "size": 21, "ref": {"$link": "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq"}}}),
                ),
                "$.sizeBlob.size",
            ),
            (
                "blob accept",
                base(
                    json!({"acceptBlob": {"$type": "blob", "mimeType": "text/plain", "size": 1, "ref": {"$link": "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq"}}}),
                ),
                "$.acceptBlob.mimeType",
            ),
            (
                "unknown not object",
                base(json!({"unknown": 3})),
                "$.unknown",
            ),
            (
                "did format",
                base(json!({"formats": {"did": "did:nope"}})),
                "$.formats.did",
            ),
            (
                "datetime format",
                base(json!({"formats": {"datetime": "yesterday"}})),
                "$.formats.datetime",
            ),
            (
                "at-uri format",
                base(json!({"formats": {"aturi": "https://x.com"}})),
                "$.formats.aturi",
            ),
            (
                "tid format",
                base(json!({"formats": {"tid": "1234"}})),
                "$.formats.tid",
            ),
        ]
    }

    #[test]
    fn invalid_records_are_refused_naming_the_path() {
        let set = catalog();
        for (name, record, path) in invalid_records() {
            let errors = set.validate_record_json(NSID, &record).expect_err(name);
            assert!(
                errors.iter().any(|e| e.path == path),
                "{name}: expected {path}, got {errors:?}"
            );
        }
    }

    #[test]
    fn unknown_nsid_and_non_record_are_errors_not_panics() {
        let set = catalog();
        assert!(
            set.validate_record_json("com.example.none", &json!({}))
                .is_err()
        );
        assert!(
            set.validate_record_json("example.lexicon.query", &json!({}))
                .is_err()
        );
        assert!(set.validate_record_json(NSID, &json!([1, 2])).is_err());
        assert!(
            set.validate_record_dag_cbor(NSID, b"\x00\x01garbage")
                .is_err()
        );
    }

    #[test]
    fn mime_patterns() {
        assert!(mime_matches("image/*", "image/png"));
        assert!(!mime_matches("image/*", "text/plain"));
        assert!(mime_matches("*/*", "text/plain"));
        assert!(mime_matches("text/plain", "text/plain"));
    }
}
