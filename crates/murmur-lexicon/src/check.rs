//! Constraint checks called by generated `validate()` code, and [`Validate`] for the
//! atrium-api types generated code uses.
//!
//! Each generated field check passes the field's JSON path and its constraints as a
//! constant; the first broken constraint is returned.

use atrium_api::types::{BlobRef, Object, TypedBlobRef, Union};
use unicode_segmentation::UnicodeSegmentation;

pub use crate::syntax::StringFormat;
use crate::{Validate, ValidationError};

/// The JSON path of field `name` under `parent`.
pub fn field(parent: &str, name: &str) -> String {
    crate::data::child(parent, name)
}

/// The JSON path of element `index` under `parent`.
pub fn index(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// Constraints of a lexicon `string`.
#[derive(Debug, Clone, Copy)]
pub struct StringRules {
    /// Required syntax.
    pub format: Option<StringFormat>,
    /// Minimum UTF-8 length.
    pub min_length: Option<u64>,
    /// Maximum UTF-8 length.
    pub max_length: Option<u64>,
    /// Minimum grapheme count.
    pub min_graphemes: Option<u64>,
    /// Maximum grapheme count.
    pub max_graphemes: Option<u64>,
    /// Closed set of values (empty: any).
    pub enum_values: &'static [&'static str],
    /// The only allowed value.
    pub const_value: Option<&'static str>,
}

impl StringRules {
    /// No constraint at all; generated code overrides the fields it needs.
    pub const NONE: StringRules = StringRules {
        format: None,
        min_length: None,
        max_length: None,
        min_graphemes: None,
        max_graphemes: None,
        enum_values: &[],
        const_value: None,
    };
}

/// Constraints of a lexicon `integer`.
#[derive(Debug, Clone, Copy)]
pub struct IntegerRules {
    /// Smallest allowed value.
    pub minimum: Option<i64>,
    /// Largest allowed value.
    pub maximum: Option<i64>,
    /// Closed set of values (empty: any).
    pub enum_values: &'static [i64],
    /// The only allowed value.
    pub const_value: Option<i64>,
}

impl IntegerRules {
    /// No constraint at all.
    pub const NONE: IntegerRules = IntegerRules {
        minimum: None,
        maximum: None,
        enum_values: &[],
        const_value: None,
    };
}

/// Checks a string.
pub fn string(value: &str, path: &str, rules: &StringRules) -> Result<(), ValidationError> {
    let err = |m: String| Err(ValidationError::new(path, m));
    if let Some(c) = rules.const_value.filter(|c| *c != value) {
        return err(format!("must be {c:?}"));
    }
    if !rules.enum_values.is_empty() && !rules.enum_values.contains(&value) {
        return err(format!("must be one of {:?}", rules.enum_values));
    }
    let len = value.len() as u64;
    if let Some(min) = rules.min_length.filter(|m| len < *m) {
        return err(format!("string shorter than minLength {min} (UTF-8 bytes)"));
    }
    if let Some(max) = rules.max_length.filter(|m| len > *m) {
        return err(format!("string longer than maxLength {max} (UTF-8 bytes)"));
    }
    if rules.min_graphemes.is_some() || rules.max_graphemes.is_some() {
        let n = value.graphemes(true).count() as u64;
        if let Some(min) = rules.min_graphemes.filter(|m| n < *m) {
            return err(format!("string shorter than minGraphemes {min}"));
        }
        if let Some(max) = rules.max_graphemes.filter(|m| n > *m) {
            return err(format!("string longer than maxGraphemes {max}"));
        }
    }
    if let Some(format) = rules.format.filter(|f| !f.is_valid(value)) {
        return err(format!("not a valid {format}"));
    }
    Ok(())
}

/// Checks an integer.
pub fn integer(value: i64, path: &str, rules: &IntegerRules) -> Result<(), ValidationError> {
    let err = |m: String| Err(ValidationError::new(path, m));
    if let Some(c) = rules.const_value.filter(|c| *c != value) {
        return err(format!("must be {c}"));
    }
    if !rules.enum_values.is_empty() && !rules.enum_values.contains(&value) {
        return err(format!("must be one of {:?}", rules.enum_values));
    }
    if let Some(min) = rules.minimum.filter(|m| value < *m) {
        return err(format!("{value} is below the minimum {min}"));
    }
    if let Some(max) = rules.maximum.filter(|m| value > *m) {
        return err(format!("{value} is above the maximum {max}"));
    }
    Ok(())
}

/// Checks a boolean against its `const`.
pub fn boolean(value: bool, path: &str, const_value: Option<bool>) -> Result<(), ValidationError> {
    match const_value {
        Some(c) if c != value => Err(ValidationError::new(path, format!("must be {c}"))),
        _ => Ok(()),
    }
}

/// Checks a length (array elements or bytes) against min/max.
pub fn length(
    len: usize,
    path: &str,
    min: Option<u64>,
    max: Option<u64>,
) -> Result<(), ValidationError> {
    let len = len as u64;
    if let Some(min) = min.filter(|m| len < *m) {
        return Err(ValidationError::new(
            path,
            format!("length {len} is below minLength {min}"),
        ));
    }
    if let Some(max) = max.filter(|m| len > *m) {
        return Err(ValidationError::new(
            path,
            format!("length {len} is above maxLength {max}"),
        ));
    }
    Ok(())
}

/// Checks a blob's MIME type and size.
pub fn blob(
    value: &BlobRef,
    path: &str,
    accept: &[&str],
    max_size: Option<u64>,
) -> Result<(), ValidationError> {
    let (mime, size) = match value {
        BlobRef::Typed(TypedBlobRef::Blob(b)) => (b.mime_type.as_str(), Some(b.size as u64)),
        BlobRef::Untyped(b) => (b.mime_type.as_str(), None),
    };
    if !accept.is_empty() && !accept.iter().any(|p| mime_matches(p, mime)) {
        return Err(ValidationError::new(
            field(path, "mimeType"),
            format!("{mime:?} is not accepted (accept: {accept:?})"),
        ));
    }
    if let (Some(max), Some(size)) = (max_size, size)
        && size > max
    {
        return Err(ValidationError::new(
            field(path, "size"),
            format!("blob of {size} bytes is above maxSize {max}"),
        ));
    }
    Ok(())
}

fn mime_matches(pattern: &str, mime: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some("*") => true,
        Some(prefix) => mime.split_once('/').is_some_and(|(ty, _)| ty == prefix),
        None => pattern == "*" || pattern == mime,
    }
}

impl<T: Validate> Validate for Object<T> {
    fn validate(&self) -> Result<(), ValidationError> {
        self.data.validate()
    }
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        self.data.validate_at(path)
    }
}

/// An open union accepts members it does not know; known ones are checked.
impl<T: Validate> Validate for Union<T> {
    fn validate(&self) -> Result<(), ValidationError> {
        self.validate_at("$")
    }
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        match self {
            Union::Refs(t) => t.validate_at(path),
            Union::Unknown(_) => Ok(()),
        }
    }
}

impl<T: Validate> Validate for Box<T> {
    fn validate(&self) -> Result<(), ValidationError> {
        (**self).validate()
    }
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        (**self).validate_at(path)
    }
}

/// `com.atproto.repo.strongRef`: an AT-URI and a CID.
impl Validate for atrium_api::com::atproto::repo::strong_ref::MainData {
    fn validate(&self) -> Result<(), ValidationError> {
        self.validate_at("$")
    }
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        let uri = StringRules {
            format: Some(StringFormat::AtUri),
            ..StringRules::NONE
        };
        string(&self.uri, &field(path, "uri"), &uri)?;
        let cid = StringRules {
            format: Some(StringFormat::Cid),
            ..StringRules::NONE
        };
        string(
            self.cid.as_ref().to_string().as_str(),
            &field(path, "cid"),
            &cid,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_rules_report_the_path() {
        let rules = StringRules {
            max_length: Some(3),
            ..StringRules::NONE
        };
        assert!(string("abc", "$.a", &rules).is_ok());
        let e = string("abcd", "$.a", &rules).unwrap_err();
        assert_eq!(e.path, "$.a");
        let rules = StringRules {
            format: Some(StringFormat::Did),
            ..StringRules::NONE
        };
        assert!(string("did:plc:abc", "$", &rules).is_ok());
        assert!(string("nope", "$", &rules).is_err());
    }

    #[test]
    fn integer_rules() {
        let rules = IntegerRules {
            minimum: Some(1),
            maximum: Some(10),
            ..IntegerRules::NONE
        };
        assert!(integer(5, "$", &rules).is_ok());
        assert!(integer(0, "$", &rules).is_err());
        assert!(integer(11, "$", &rules).is_err());
        assert!(length(3, "$", Some(1), Some(2)).is_err());
    }

    #[test]
    fn strong_ref_is_checked() {
        use atrium_api::com::atproto::repo::strong_ref::MainData;
        let good: MainData = serde_json::from_value(serde_json::json!({
            "uri": "at://did:plc:abc/agent.comms.task/3kznmn7xqxl22",
            "cid": "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq"
        }))
        .unwrap();
        assert!(good.validate().is_ok());
        let bad = MainData {
            uri: "https://example.com".into(),
            ..good
        };
        assert_eq!(bad.validate_at("$.task").unwrap_err().path, "$.task.uri");
    }
}
