//! The Lexicon v1 document model: the types a lexicon document is made of. The parser that
//! builds them from JSON is [`parse_document`].

mod parse;

use std::collections::BTreeMap;

use serde_json::Value;

use crate::syntax::{self, StringFormat};

pub use parse::parse_document;

/// One lexicon file: an NSID and its named definitions.
#[derive(Debug, Clone, PartialEq)]
pub struct LexiconDoc {
    /// Lexicon language version; always 1.
    pub lexicon: u32,
    /// The NSID this document defines.
    pub id: String,
    /// Optional revision number of the document.
    pub revision: Option<u64>,
    /// Human description of the document.
    pub description: Option<String>,
    /// Named definitions; `main` is the one the bare NSID refers to.
    pub defs: BTreeMap<String, UserType>,
}

/// A top-level definition.
#[derive(Debug, Clone, PartialEq)]
pub enum UserType {
    /// A repository record type (only as `main`).
    Record(RecordDef),
    /// An XRPC query (HTTP GET), only as `main`.
    Query(XrpcDef),
    /// An XRPC procedure (HTTP POST), only as `main`.
    Procedure(XrpcDef),
    /// An event-stream subscription, only as `main`.
    Subscription(SubscriptionDef),
    /// A permission set (OAuth scopes bundle), only as `main`.
    PermissionSet(PermissionSetDef),
    /// A named constant with no data.
    Token(TokenDef),
    /// A reusable data type (object, string, array, ...).
    Type(FieldType),
}

/// `record`: a collection's schema.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordDef {
    /// What the record is for.
    pub description: Option<String>,
    /// How record keys are chosen.
    pub key: RecordKey,
    /// The record's fields.
    pub record: ObjectType,
}

/// A record's key type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordKey {
    /// A timestamp identifier.
    Tid,
    /// An NSID.
    Nsid,
    /// Any valid record key.
    Any,
    /// Exactly this key (e.g. `literal:self`).
    Literal(String),
}

impl RecordKey {
    /// The lexicon spelling (`tid`, `literal:self`, ...).
    pub fn as_string(&self) -> String {
        match self {
            RecordKey::Tid => "tid".into(),
            RecordKey::Nsid => "nsid".into(),
            RecordKey::Any => "any".into(),
            RecordKey::Literal(k) => format!("literal:{k}"),
        }
    }

    /// Whether `rkey` fits this key type.
    pub fn accepts(&self, rkey: &str) -> bool {
        match self {
            RecordKey::Tid => syntax::is_tid(rkey),
            RecordKey::Nsid => syntax::is_nsid(rkey),
            RecordKey::Any => syntax::is_record_key(rkey),
            RecordKey::Literal(k) => k == rkey,
        }
    }
}

/// `query` / `procedure`.
#[derive(Debug, Clone, PartialEq)]
pub struct XrpcDef {
    /// What the endpoint does.
    pub description: Option<String>,
    /// Query-string parameters.
    pub parameters: Option<ObjectType>,
    /// Request body (procedures only).
    pub input: Option<Body>,
    /// Response body.
    pub output: Option<Body>,
    /// Named errors the endpoint can return.
    pub errors: Vec<String>,
}

/// An XRPC body: an encoding and, for JSON, a schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Body {
    /// Body description.
    pub description: Option<String>,
    /// MIME type, e.g. `application/json`.
    pub encoding: String,
    /// The schema (object, ref or union).
    pub schema: Option<FieldType>,
}

/// `subscription`.
#[derive(Debug, Clone, PartialEq)]
pub struct SubscriptionDef {
    /// What the stream carries.
    pub description: Option<String>,
    /// Query-string parameters.
    pub parameters: Option<ObjectType>,
    /// The message union.
    pub message: Option<FieldType>,
    /// Named errors.
    pub errors: Vec<String>,
}

/// `permission-set`.
#[derive(Debug, Clone, PartialEq)]
pub struct PermissionSetDef {
    /// Title shown to users.
    pub title: Option<String>,
    /// Longer description shown to users.
    pub detail: Option<String>,
    /// The permissions, kept as JSON (`resource` decides the other fields).
    pub permissions: Vec<Value>,
}

/// `token`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenDef {
    /// What the token means.
    pub description: Option<String>,
}

/// A data type usable as a field, array item, or reusable definition.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldType {
    /// `boolean`.
    Boolean(BooleanType),
    /// `integer` (64-bit signed).
    Integer(IntegerType),
    /// `string`.
    String(StringType),
    /// `bytes`.
    Bytes(BytesType),
    /// `cid-link`.
    CidLink(Described),
    /// `blob`.
    Blob(BlobType),
    /// `array`.
    Array(ArrayType),
    /// `object`.
    Object(ObjectType),
    /// `ref` to another definition.
    Ref(RefType),
    /// `union` of definitions, told apart by `$type`.
    Union(UnionType),
    /// `unknown`: any object.
    Unknown(Described),
}

impl FieldType {
    /// The lexicon `type` name.
    pub fn type_name(&self) -> &'static str {
        match self {
            FieldType::Boolean(_) => "boolean",
            FieldType::Integer(_) => "integer",
            FieldType::String(_) => "string",
            FieldType::Bytes(_) => "bytes",
            FieldType::CidLink(_) => "cid-link",
            FieldType::Blob(_) => "blob",
            FieldType::Array(_) => "array",
            FieldType::Object(_) => "object",
            FieldType::Ref(_) => "ref",
            FieldType::Union(_) => "union",
            FieldType::Unknown(_) => "unknown",
        }
    }

    /// The `description`, if any.
    pub fn description(&self) -> Option<&str> {
        match self {
            FieldType::Boolean(t) => t.description.as_deref(),
            FieldType::Integer(t) => t.description.as_deref(),
            FieldType::String(t) => t.description.as_deref(),
            FieldType::Bytes(t) => t.description.as_deref(),
            FieldType::CidLink(t) | FieldType::Unknown(t) => t.description.as_deref(),
            FieldType::Blob(t) => t.description.as_deref(),
            FieldType::Array(t) => t.description.as_deref(),
            FieldType::Object(t) => t.description.as_deref(),
            FieldType::Ref(t) => t.description.as_deref(),
            FieldType::Union(t) => t.description.as_deref(),
        }
    }
}

/// A type with nothing but a description.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Described {
    /// Description.
    pub description: Option<String>,
}

/// `boolean` constraints.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BooleanType {
    /// Description.
    pub description: Option<String>,
    /// Default value.
    pub default: Option<bool>,
    /// The only allowed value.
    pub const_value: Option<bool>,
}

/// `integer` constraints.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct IntegerType {
    /// Description.
    pub description: Option<String>,
    /// Smallest allowed value.
    pub minimum: Option<i64>,
    /// Largest allowed value.
    pub maximum: Option<i64>,
    /// Closed set of allowed values.
    pub enum_values: Option<Vec<i64>>,
    /// Default value.
    pub default: Option<i64>,
    /// The only allowed value.
    pub const_value: Option<i64>,
}

/// `string` constraints.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StringType {
    /// Description.
    pub description: Option<String>,
    /// Required syntax.
    pub format: Option<StringFormat>,
    /// Minimum length in UTF-8 bytes.
    pub min_length: Option<u64>,
    /// Maximum length in UTF-8 bytes.
    pub max_length: Option<u64>,
    /// Minimum length in grapheme clusters.
    pub min_graphemes: Option<u64>,
    /// Maximum length in grapheme clusters.
    pub max_graphemes: Option<u64>,
    /// Suggested values (open set; not enforced).
    pub known_values: Vec<String>,
    /// Closed set of allowed values.
    pub enum_values: Option<Vec<String>>,
    /// Default value.
    pub default: Option<String>,
    /// The only allowed value.
    pub const_value: Option<String>,
}

/// `bytes` constraints.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BytesType {
    /// Description.
    pub description: Option<String>,
    /// Minimum size in bytes.
    pub min_length: Option<u64>,
    /// Maximum size in bytes.
    pub max_length: Option<u64>,
}

/// `blob` constraints.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct BlobType {
    /// Description.
    pub description: Option<String>,
    /// Accepted MIME types; `image/*` and `*/*` patterns allowed.
    pub accept: Option<Vec<String>>,
    /// Maximum size in bytes.
    pub max_size: Option<u64>,
}

/// `array` constraints.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrayType {
    /// Description.
    pub description: Option<String>,
    /// Type of every element.
    pub items: Box<FieldType>,
    /// Minimum number of elements.
    pub min_length: Option<u64>,
    /// Maximum number of elements.
    pub max_length: Option<u64>,
}

/// `object` (also `params`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObjectType {
    /// Description.
    pub description: Option<String>,
    /// Fields that must be present.
    pub required: Vec<String>,
    /// Fields that may be `null`.
    pub nullable: Vec<String>,
    /// The fields, by name.
    pub properties: BTreeMap<String, FieldType>,
}

/// `ref`.
#[derive(Debug, Clone, PartialEq)]
pub struct RefType {
    /// Description.
    pub description: Option<String>,
    /// Target: `nsid`, `nsid#name` or `#name`.
    pub reference: String,
}

/// `union`.
#[derive(Debug, Clone, PartialEq)]
pub struct UnionType {
    /// Description.
    pub description: Option<String>,
    /// Member definitions.
    pub refs: Vec<String>,
    /// Closed unions refuse `$type`s not listed.
    pub closed: bool,
}
