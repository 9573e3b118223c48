//! The lexicon parser: JSON to the [document model](super), with every problem reported.
//!
//! Parsing never stops at the first problem: every issue found is reported with the JSON
//! path inside the document and the rule it breaks.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::{
    ArrayType, BlobType, Body, BooleanType, BytesType, Described, FieldType, IntegerType,
    LexiconDoc, ObjectType, PermissionSetDef, RecordDef, RecordKey, RefType, StringType,
    SubscriptionDef, TokenDef, UnionType, UserType, XrpcDef,
};
use crate::lint::{LintIssue, Rule};
use crate::syntax::{self, StringFormat};

/// Where a type appears, which decides what is allowed there.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Position {
    Def,
    Field,
    Item,
    Param,
}

/// Parses one lexicon document, or reports every problem found in it.
pub fn parse_document(value: &Value) -> Result<LexiconDoc, Vec<LintIssue>> {
    let mut p = Parser::default();
    let doc = p.document(value);
    match doc {
        Some(doc) if p.issues.is_empty() => Ok(doc),
        _ => {
            if p.issues.is_empty() {
                p.issue("$", Rule::WrongType, "not a lexicon document");
            }
            Err(p.issues)
        }
    }
}

#[derive(Default)]
struct Parser {
    issues: Vec<LintIssue>,
}

impl Parser {
    fn issue(&mut self, path: &str, rule: Rule, message: impl Into<String>) {
        self.issues.push(LintIssue {
            file: None,
            path: path.to_owned(),
            rule,
            message: message.into(),
        });
    }

    fn document(&mut self, value: &Value) -> Option<LexiconDoc> {
        let Some(obj) = value.as_object() else {
            self.issue(
                "$",
                Rule::WrongType,
                "a lexicon document must be a JSON object",
            );
            return None;
        };
        let lexicon = match obj.get("lexicon") {
            Some(Value::Number(n)) if n.as_u64() == Some(1) => 1,
            Some(_) => {
                self.issue(
                    "$.lexicon",
                    Rule::LexiconVersion,
                    "`lexicon` must be the integer 1",
                );
                1
            }
            None => {
                self.issue(
                    "$.lexicon",
                    Rule::MissingField,
                    "`lexicon` is required (set it to 1)",
                );
                1
            }
        };
        let id = match obj.get("id") {
            Some(Value::String(id)) => {
                if !syntax::is_nsid(id) {
                    self.issue(
                        "$.id",
                        Rule::BadNsid,
                        format!("`id` {id:?} is not a valid NSID (like `com.example.thing`)"),
                    );
                }
                id.clone()
            }
            Some(_) => {
                self.issue("$.id", Rule::WrongType, "`id` must be an NSID string");
                String::new()
            }
            None => {
                self.issue("$.id", Rule::MissingField, "`id` is required");
                String::new()
            }
        };
        let revision = match obj.get("revision") {
            None => None,
            Some(Value::Number(n)) if n.as_u64().is_some() => n.as_u64(),
            Some(_) => {
                self.issue(
                    "$.revision",
                    Rule::WrongType,
                    "`revision` must be a non-negative integer",
                );
                None
            }
        };
        let description = self.opt_string(obj, "description", "$");
        let mut defs = BTreeMap::new();
        match obj.get("defs") {
            Some(Value::Object(map)) => {
                for (name, def) in map {
                    let path = format!("$.defs.{name}");
                    if !is_def_name(name) {
                        self.issue(&path, Rule::BadName, format!("definition name {name:?} must be alphanumeric, starting with a letter"));
                    }
                    if let Some(def) = self.user_type(def, &path, name == "main") {
                        defs.insert(name.clone(), def);
                    }
                }
            }
            Some(_) => self.issue(
                "$.defs",
                Rule::WrongType,
                "`defs` must be an object of definitions",
            ),
            None => self.issue("$.defs", Rule::MissingField, "`defs` is required"),
        }
        Some(LexiconDoc {
            lexicon,
            id,
            revision,
            description,
            defs,
        })
    }

    fn user_type(&mut self, value: &Value, path: &str, is_main: bool) -> Option<UserType> {
        let obj = self.object(value, path)?;
        let ty = self.type_name(obj, path)?;
        let primary = matches!(
            ty,
            "record" | "query" | "procedure" | "subscription" | "permission-set"
        );
        if primary && !is_main {
            self.issue(path, Rule::MisplacedType, format!("a `{ty}` may only be defined as `main`; rename this definition to `main` or move it to its own file"));
            return None;
        }
        Some(match ty {
            "record" => {
                let description = self.opt_string(obj, "description", path);
                let key = match obj.get("key") {
                    Some(Value::String(k)) => match k.as_str() {
                        "tid" => RecordKey::Tid,
                        "nsid" => RecordKey::Nsid,
                        "any" => RecordKey::Any,
                        other => match other.strip_prefix("literal:") {
                            Some(lit) if syntax::is_record_key(lit) => {
                                RecordKey::Literal(lit.to_owned())
                            }
                            _ => {
                                self.issue(&format!("{path}.key"), Rule::BadRecordKey, format!("record key type {k:?} must be `tid`, `nsid`, `any` or `literal:<record-key>`"));
                                RecordKey::Any
                            }
                        },
                    },
                    Some(_) => {
                        self.issue(
                            &format!("{path}.key"),
                            Rule::BadRecordKey,
                            "record `key` must be a string",
                        );
                        RecordKey::Any
                    }
                    None => {
                        self.issue(
                            &format!("{path}.key"),
                            Rule::MissingField,
                            "a record needs a `key` (`tid`, `nsid`, `any` or `literal:<key>`)",
                        );
                        RecordKey::Any
                    }
                };
                let rpath = format!("{path}.record");
                let record = match obj.get("record") {
                    Some(Value::Object(r))
                        if r.get("type") == Some(&Value::String("object".into())) =>
                    {
                        self.object_type(r, &rpath)
                    }
                    Some(_) => {
                        self.issue(
                            &rpath,
                            Rule::MisplacedType,
                            "a record's `record` must be `{\"type\": \"object\", ...}`",
                        );
                        ObjectType::default()
                    }
                    None => {
                        self.issue(
                            &rpath,
                            Rule::MissingField,
                            "a record needs a `record` object schema",
                        );
                        ObjectType::default()
                    }
                };
                UserType::Record(RecordDef {
                    description,
                    key,
                    record,
                })
            }
            "query" | "procedure" => {
                let description = self.opt_string(obj, "description", path);
                let parameters = self.params(obj, path);
                let input = if ty == "procedure" {
                    self.body(obj, "input", path)
                } else {
                    if obj.contains_key("input") {
                        self.issue(
                            &format!("{path}.input"),
                            Rule::MisplacedType,
                            "a query has no `input`; use a procedure",
                        );
                    }
                    None
                };
                let output = self.body(obj, "output", path);
                let errors = self.errors(obj, path);
                let def = XrpcDef {
                    description,
                    parameters,
                    input,
                    output,
                    errors,
                };
                if ty == "query" {
                    UserType::Query(def)
                } else {
                    UserType::Procedure(def)
                }
            }
            "subscription" => {
                let description = self.opt_string(obj, "description", path);
                let parameters = self.params(obj, path);
                let message = match obj.get("message") {
                    None => None,
                    Some(m) => {
                        let mpath = format!("{path}.message");
                        self.object(m, &mpath).and_then(|m| match m.get("schema") {
                            Some(s) => {
                                let spath = format!("{mpath}.schema");
                                let t = self.field_type(s, &spath, Position::Field)?;
                                if !matches!(t, FieldType::Union(_)) {
                                    self.issue(
                                        &spath,
                                        Rule::MisplacedType,
                                        "a subscription message schema must be a union",
                                    );
                                }
                                Some(t)
                            }
                            None => None,
                        })
                    }
                };
                let errors = self.errors(obj, path);
                UserType::Subscription(SubscriptionDef {
                    description,
                    parameters,
                    message,
                    errors,
                })
            }
            "permission-set" => {
                let title = self.opt_string(obj, "title", path);
                let detail = self.opt_string(obj, "detail", path);
                let mut permissions = Vec::new();
                match obj.get("permissions") {
                    Some(Value::Array(items)) => {
                        for (i, item) in items.iter().enumerate() {
                            let ipath = format!("{path}.permissions[{i}]");
                            if let Some(o) = self.object(item, &ipath) {
                                if o.get("type") != Some(&Value::String("permission".into())) {
                                    self.issue(
                                        &ipath,
                                        Rule::UnknownType,
                                        "a permission must have `\"type\": \"permission\"`",
                                    );
                                }
                                if !matches!(o.get("resource"), Some(Value::String(_))) {
                                    self.issue(
                                        &format!("{ipath}.resource"),
                                        Rule::MissingField,
                                        "a permission needs a `resource` string",
                                    );
                                }
                            }
                            permissions.push(item.clone());
                        }
                    }
                    Some(_) => self.issue(
                        &format!("{path}.permissions"),
                        Rule::WrongType,
                        "`permissions` must be an array",
                    ),
                    None => self.issue(
                        &format!("{path}.permissions"),
                        Rule::MissingField,
                        "a permission-set needs `permissions`",
                    ),
                }
                UserType::PermissionSet(PermissionSetDef {
                    title,
                    detail,
                    permissions,
                })
            }
            "token" => UserType::Token(TokenDef {
                description: self.opt_string(obj, "description", path),
            }),
            _ => UserType::Type(self.field_type(value, path, Position::Def)?),
        })
    }

    fn field_type(&mut self, value: &Value, path: &str, pos: Position) -> Option<FieldType> {
        let obj = self.object(value, path)?;
        let ty = self.type_name(obj, path)?;
        let description = self.opt_string(obj, "description", path);
        let misplaced = matches!(
            (ty, pos),
            ("ref" | "union" | "unknown", Position::Def)
                | (
                    "object" | "bytes" | "cid-link" | "blob" | "ref" | "union",
                    Position::Param
                )
                | (
                    "record"
                        | "query"
                        | "procedure"
                        | "subscription"
                        | "permission-set"
                        | "token"
                        | "params",
                    _,
                )
        );
        if misplaced {
            let place = match pos {
                Position::Def => "as a top-level definition",
                Position::Field => "as an object field",
                Position::Item => "as an array item",
                Position::Param => "as a parameter",
            };
            self.issue(
                path,
                Rule::MisplacedType,
                format!("type `{ty}` is not allowed {place}"),
            );
            return None;
        }
        Some(match ty {
            "boolean" => FieldType::Boolean(BooleanType {
                description,
                default: self.opt_bool(obj, "default", path),
                const_value: self.opt_bool(obj, "const", path),
            }),
            "integer" => {
                let t = IntegerType {
                    description,
                    minimum: self.opt_int(obj, "minimum", path),
                    maximum: self.opt_int(obj, "maximum", path),
                    enum_values: self.opt_list(obj, "enum", path, |v| v.as_i64()),
                    default: self.opt_int(obj, "default", path),
                    const_value: self.opt_int(obj, "const", path),
                };
                self.check_range(t.minimum, t.maximum, path, "minimum", "maximum");
                FieldType::Integer(t)
            }
            "string" => {
                let format = match obj.get("format") {
                    None => None,
                    Some(Value::String(f)) => {
                        let parsed = StringFormat::parse(f);
                        if parsed.is_none() {
                            self.issue(
                                &format!("{path}.format"),
                                Rule::BadConstraint,
                                format!("unknown string format {f:?}"),
                            );
                        }
                        parsed
                    }
                    Some(_) => {
                        self.issue(
                            &format!("{path}.format"),
                            Rule::WrongType,
                            "`format` must be a string",
                        );
                        None
                    }
                };
                let t = StringType {
                    description,
                    format,
                    min_length: self.opt_uint(obj, "minLength", path),
                    max_length: self.opt_uint(obj, "maxLength", path),
                    min_graphemes: self.opt_uint(obj, "minGraphemes", path),
                    max_graphemes: self.opt_uint(obj, "maxGraphemes", path),
                    known_values: self
                        .opt_list(obj, "knownValues", path, |v| v.as_str().map(str::to_owned))
                        .unwrap_or_default(),
                    enum_values: self
                        .opt_list(obj, "enum", path, |v| v.as_str().map(str::to_owned)),
                    default: self.opt_string(obj, "default", path),
                    const_value: self.opt_string(obj, "const", path),
                };
                self.check_range(t.min_length, t.max_length, path, "minLength", "maxLength");
                self.check_range(
                    t.min_graphemes,
                    t.max_graphemes,
                    path,
                    "minGraphemes",
                    "maxGraphemes",
                );
                FieldType::String(t)
            }
            "bytes" => {
                let t = BytesType {
                    description,
                    min_length: self.opt_uint(obj, "minLength", path),
                    max_length: self.opt_uint(obj, "maxLength", path),
                };
                self.check_range(t.min_length, t.max_length, path, "minLength", "maxLength");
                FieldType::Bytes(t)
            }
            "cid-link" => FieldType::CidLink(Described { description }),
            "unknown" => FieldType::Unknown(Described { description }),
            "blob" => FieldType::Blob(BlobType {
                description,
                accept: self.opt_list(obj, "accept", path, |v| v.as_str().map(str::to_owned)),
                max_size: self.opt_uint(obj, "maxSize", path),
            }),
            "array" => {
                let ipath = format!("{path}.items");
                let items = match obj.get("items") {
                    Some(items) => self.field_type(
                        items,
                        &ipath,
                        if pos == Position::Param {
                            Position::Param
                        } else {
                            Position::Item
                        },
                    )?,
                    None => {
                        self.issue(&ipath, Rule::MissingField, "an array needs `items`");
                        return None;
                    }
                };
                let t = ArrayType {
                    description,
                    items: Box::new(items),
                    min_length: self.opt_uint(obj, "minLength", path),
                    max_length: self.opt_uint(obj, "maxLength", path),
                };
                self.check_range(t.min_length, t.max_length, path, "minLength", "maxLength");
                FieldType::Array(t)
            }
            "object" => FieldType::Object(self.object_type(obj, path)),
            "ref" => match obj.get("ref") {
                Some(Value::String(r)) => {
                    self.check_ref(r, &format!("{path}.ref"));
                    FieldType::Ref(RefType {
                        description,
                        reference: r.clone(),
                    })
                }
                _ => {
                    self.issue(
                        &format!("{path}.ref"),
                        Rule::MissingField,
                        "a ref needs a `ref` string (`nsid`, `nsid#name` or `#name`)",
                    );
                    return None;
                }
            },
            "union" => {
                let refs = match obj.get("refs") {
                    Some(Value::Array(items)) => {
                        let mut refs = Vec::new();
                        for (i, r) in items.iter().enumerate() {
                            let rpath = format!("{path}.refs[{i}]");
                            match r.as_str() {
                                Some(r) => {
                                    self.check_ref(r, &rpath);
                                    refs.push(r.to_owned());
                                }
                                None => self.issue(
                                    &rpath,
                                    Rule::WrongType,
                                    "union refs must be strings",
                                ),
                            }
                        }
                        refs
                    }
                    _ => {
                        self.issue(
                            &format!("{path}.refs"),
                            Rule::MissingField,
                            "a union needs a `refs` array",
                        );
                        return None;
                    }
                };
                let closed = self.opt_bool(obj, "closed", path).unwrap_or(false);
                if closed && refs.is_empty() {
                    self.issue(
                        &format!("{path}.refs"),
                        Rule::BadConstraint,
                        "a closed union needs at least one ref",
                    );
                }
                FieldType::Union(UnionType {
                    description,
                    refs,
                    closed,
                })
            }
            other => {
                self.issue(
                    &format!("{path}.type"),
                    Rule::UnknownType,
                    format!("unknown type {other:?}"),
                );
                return None;
            }
        })
    }

    fn object_type(&mut self, obj: &Map<String, Value>, path: &str) -> ObjectType {
        let description = self.opt_string(obj, "description", path);
        let required = self
            .opt_list(obj, "required", path, |v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let nullable = self
            .opt_list(obj, "nullable", path, |v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let mut properties = BTreeMap::new();
        let is_params = obj.get("type") == Some(&Value::String("params".into()));
        match obj.get("properties") {
            Some(Value::Object(props)) => {
                for (name, prop) in props {
                    let ppath = format!("{path}.properties.{name}");
                    let pos = if is_params {
                        Position::Param
                    } else {
                        Position::Field
                    };
                    if let Some(t) = self.field_type(prop, &ppath, pos) {
                        properties.insert(name.clone(), t);
                    }
                }
            }
            Some(_) => self.issue(
                &format!("{path}.properties"),
                Rule::WrongType,
                "`properties` must be an object",
            ),
            None => {}
        }
        for (list, names) in [("required", &required), ("nullable", &nullable)] {
            for name in names {
                if obj.get("properties").and_then(|p| p.get(name)).is_none() {
                    self.issue(
                        &format!("{path}.{list}"),
                        Rule::BadConstraint,
                        format!("{list} field {name:?} is not in `properties`"),
                    );
                }
            }
        }
        ObjectType {
            description,
            required,
            nullable,
            properties,
        }
    }

    fn params(&mut self, obj: &Map<String, Value>, path: &str) -> Option<ObjectType> {
        let v = obj.get("parameters")?;
        let ppath = format!("{path}.parameters");
        let o = self.object(v, &ppath)?;
        if o.get("type") != Some(&Value::String("params".into())) {
            self.issue(
                &ppath,
                Rule::MisplacedType,
                "`parameters` must have `\"type\": \"params\"`",
            );
        }
        Some(self.object_type(o, &ppath))
    }

    fn body(&mut self, obj: &Map<String, Value>, key: &str, path: &str) -> Option<Body> {
        let v = obj.get(key)?;
        let bpath = format!("{path}.{key}");
        let o = self.object(v, &bpath)?;
        let description = self.opt_string(o, "description", &bpath);
        let encoding = match o.get("encoding") {
            Some(Value::String(e)) => e.clone(),
            _ => {
                self.issue(
                    &format!("{bpath}.encoding"),
                    Rule::MissingField,
                    "a body needs an `encoding` MIME type",
                );
                String::new()
            }
        };
        let schema = match o.get("schema") {
            None => None,
            Some(s) => {
                let spath = format!("{bpath}.schema");
                let t = self.field_type(s, &spath, Position::Field)?;
                if !matches!(
                    t,
                    FieldType::Object(_) | FieldType::Ref(_) | FieldType::Union(_)
                ) {
                    self.issue(
                        &spath,
                        Rule::MisplacedType,
                        "a body schema must be an object, ref or union",
                    );
                }
                Some(t)
            }
        };
        Some(Body {
            description,
            encoding,
            schema,
        })
    }

    fn errors(&mut self, obj: &Map<String, Value>, path: &str) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(v) = obj.get("errors") {
            match v.as_array() {
                Some(items) => {
                    for (i, e) in items.iter().enumerate() {
                        match e.get("name").and_then(Value::as_str) {
                            Some(n) => out.push(n.to_owned()),
                            None => self.issue(
                                &format!("{path}.errors[{i}].name"),
                                Rule::MissingField,
                                "an error needs a `name`",
                            ),
                        }
                    }
                }
                None => self.issue(
                    &format!("{path}.errors"),
                    Rule::WrongType,
                    "`errors` must be an array",
                ),
            }
        }
        out
    }

    fn check_ref(&mut self, r: &str, path: &str) {
        let (nsid, name) = match r.split_once('#') {
            Some((n, f)) => (n, Some(f)),
            None => (r, None),
        };
        let nsid_ok = nsid.is_empty() && name.is_some() || syntax::is_nsid(nsid);
        let name_ok = name.is_none_or(is_def_name);
        if !nsid_ok || !name_ok {
            self.issue(
                path,
                Rule::BadRef,
                format!("{r:?} is not a valid reference (`nsid`, `nsid#name` or `#name`)"),
            );
        }
    }

    fn check_range<T: PartialOrd + Copy>(
        &mut self,
        min: Option<T>,
        max: Option<T>,
        path: &str,
        lo: &str,
        hi: &str,
    ) {
        if let (Some(a), Some(b)) = (min, max)
            && a > b
        {
            self.issue(
                path,
                Rule::BadConstraint,
                format!("`{lo}` is larger than `{hi}`"),
            );
        }
    }

    fn object<'v>(&mut self, value: &'v Value, path: &str) -> Option<&'v Map<String, Value>> {
        match value.as_object() {
            Some(o) => Some(o),
            None => {
                self.issue(path, Rule::WrongType, "expected a JSON object");
                None
            }
        }
    }

    fn type_name<'v>(&mut self, obj: &'v Map<String, Value>, path: &str) -> Option<&'v str> {
        match obj.get("type") {
            Some(Value::String(t)) => Some(t),
            Some(_) => {
                self.issue(
                    &format!("{path}.type"),
                    Rule::WrongType,
                    "`type` must be a string",
                );
                None
            }
            None => {
                self.issue(
                    &format!("{path}.type"),
                    Rule::MissingField,
                    "`type` is required",
                );
                None
            }
        }
    }

    fn opt_string(&mut self, obj: &Map<String, Value>, key: &str, path: &str) -> Option<String> {
        match obj.get(key)? {
            Value::String(s) => Some(s.clone()),
            _ => {
                self.issue(
                    &format!("{path}.{key}"),
                    Rule::WrongType,
                    format!("`{key}` must be a string"),
                );
                None
            }
        }
    }

    fn opt_bool(&mut self, obj: &Map<String, Value>, key: &str, path: &str) -> Option<bool> {
        match obj.get(key)? {
            Value::Bool(b) => Some(*b),
            _ => {
                self.issue(
                    &format!("{path}.{key}"),
                    Rule::WrongType,
                    format!("`{key}` must be a boolean"),
                );
                None
            }
        }
    }

    fn opt_int(&mut self, obj: &Map<String, Value>, key: &str, path: &str) -> Option<i64> {
        let v = obj.get(key)?;
        match v.as_i64() {
            Some(i) => Some(i),
            None => {
                self.issue(
                    &format!("{path}.{key}"),
                    Rule::WrongType,
                    format!("`{key}` must be an integer"),
                );
                None
            }
        }
    }

    fn opt_uint(&mut self, obj: &Map<String, Value>, key: &str, path: &str) -> Option<u64> {
        let v = obj.get(key)?;
        match v.as_u64() {
            Some(i) => Some(i),
            None => {
                self.issue(
                    &format!("{path}.{key}"),
                    Rule::WrongType,
                    format!("`{key}` must be a non-negative integer"),
                );
                None
            }
        }
    }

    fn opt_list<T>(
        &mut self,
        obj: &Map<String, Value>,
        key: &str,
        path: &str,
        f: impl Fn(&Value) -> Option<T>,
    ) -> Option<Vec<T>> {
        let v = obj.get(key)?;
        let list: Option<Vec<T>> = v
            .as_array()
            .and_then(|items| items.iter().map(&f).collect());
        if list.is_none() {
            self.issue(
                &format!("{path}.{key}"),
                Rule::WrongType,
                format!("`{key}` must be an array of the right element type"),
            );
        }
        list
    }
}

/// Definition names: a letter, then letters and digits.
fn is_def_name(name: &str) -> bool {
    name.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}
