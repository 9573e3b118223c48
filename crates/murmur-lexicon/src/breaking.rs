//! Breaking-change check between two versions of a lexicon set.
//!
//! A change is breaking when data valid under the old version can be invalid under the new
//! one, or when code generated from the old one can no longer read new data: a lexicon,
//! definition or field removed, a field made required, a type changed, a constraint
//! tightened, a closed union narrowed, a record key type changed.

use std::fmt;

use crate::LexiconSet;
use crate::schema::{FieldType, ObjectType, UserType};
use crate::set::split_ref;

/// The kind of a breaking change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// A lexicon document or a definition disappeared.
    Removed,
    /// An object field disappeared.
    FieldRemoved,
    /// A field became required (or a new required field appeared).
    MadeRequired,
    /// A definition or field changed type (or ref target).
    TypeChanged,
    /// A constraint was tightened (max lowered, min raised, enum narrowed, format added...).
    ConstraintTightened,
    /// A closed union lost a member, or an open union became closed.
    ClosedUnionNarrowed,
    /// A record's key type changed.
    RecordKeyChanged,
}

impl ChangeKind {
    /// The kind's name, as printed by `murmur lex breaking`.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Removed => "removed",
            ChangeKind::FieldRemoved => "field-removed",
            ChangeKind::MadeRequired => "made-required",
            ChangeKind::TypeChanged => "type-changed",
            ChangeKind::ConstraintTightened => "constraint-tightened",
            ChangeKind::ClosedUnionNarrowed => "closed-union-narrowed",
            ChangeKind::RecordKeyChanged => "record-key-changed",
        }
    }
}

/// One breaking change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakingChange {
    /// The lexicon's NSID.
    pub nsid: String,
    /// JSON path in the old document.
    pub path: String,
    /// What kind of change.
    pub kind: ChangeKind,
    /// Details.
    pub message: String,
}

impl fmt::Display for BreakingChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}: [{}] {}",
            self.nsid,
            self.path,
            self.kind.name(),
            self.message
        )
    }
}

/// Every breaking change from `old` to `new` (empty when `new` is a compatible evolution).
pub fn breaking_changes(old: &LexiconSet, new: &LexiconSet) -> Vec<BreakingChange> {
    let mut d = Diff {
        out: Vec::new(),
        nsid: String::new(),
    };
    for old_doc in old.docs() {
        d.nsid = old_doc.id.clone();
        let Some(new_doc) = new.get(&old_doc.id) else {
            d.push("$", ChangeKind::Removed, "the lexicon was removed");
            continue;
        };
        for (name, old_def) in &old_doc.defs {
            let path = format!("$.defs.{name}");
            let Some(new_def) = new_doc.defs.get(name) else {
                d.push(
                    &path,
                    ChangeKind::Removed,
                    format!("definition `{name}` was removed"),
                );
                continue;
            };
            match (old_def, new_def) {
                (UserType::Record(a), UserType::Record(b)) => {
                    if a.key != b.key {
                        d.push(
                            &format!("{path}.key"),
                            ChangeKind::RecordKeyChanged,
                            format!(
                                "record key `{}` became `{}`",
                                a.key.as_string(),
                                b.key.as_string()
                            ),
                        );
                    }
                    d.object(
                        &format!("{path}.record"),
                        &a.record,
                        &b.record,
                        &old_doc.id,
                        &new_doc.id,
                    );
                }
                (UserType::Type(a), UserType::Type(b)) => {
                    d.field(&path, a, b, &old_doc.id, &new_doc.id)
                }
                (UserType::Query(a), UserType::Query(b))
                | (UserType::Procedure(a), UserType::Procedure(b)) => {
                    if let (Some(pa), Some(pb)) = (&a.parameters, &b.parameters) {
                        d.object(
                            &format!("{path}.parameters"),
                            pa,
                            pb,
                            &old_doc.id,
                            &new_doc.id,
                        );
                    }
                    for (key, ba, bb) in [
                        ("input", &a.input, &b.input),
                        ("output", &a.output, &b.output),
                    ] {
                        match (
                            ba.as_ref().and_then(|x| x.schema.as_ref()),
                            bb.as_ref().and_then(|x| x.schema.as_ref()),
                        ) {
                            (Some(sa), Some(sb)) => d.field(
                                &format!("{path}.{key}.schema"),
                                sa,
                                sb,
                                &old_doc.id,
                                &new_doc.id,
                            ),
                            (Some(_), None) => d.push(
                                &format!("{path}.{key}"),
                                ChangeKind::Removed,
                                format!("the {key} schema was removed"),
                            ),
                            _ => {}
                        }
                    }
                }
                (UserType::Token(_), UserType::Token(_))
                | (UserType::Subscription(_), UserType::Subscription(_))
                | (UserType::PermissionSet(_), UserType::PermissionSet(_)) => {}
                (a, b) => d.push(
                    &path,
                    ChangeKind::TypeChanged,
                    format!("`{name}` changed from {} to {}", kind(a), kind(b)),
                ),
            }
        }
    }
    d.out
}

fn kind(def: &UserType) -> &'static str {
    match def {
        UserType::Record(_) => "record",
        UserType::Query(_) => "query",
        UserType::Procedure(_) => "procedure",
        UserType::Subscription(_) => "subscription",
        UserType::PermissionSet(_) => "permission-set",
        UserType::Token(_) => "token",
        UserType::Type(t) => t.type_name(),
    }
}

struct Diff {
    out: Vec<BreakingChange>,
    nsid: String,
}

impl Diff {
    fn push(&mut self, path: &str, kind: ChangeKind, message: impl Into<String>) {
        self.out.push(BreakingChange {
            nsid: self.nsid.clone(),
            path: path.into(),
            kind,
            message: message.into(),
        });
    }

    fn object(&mut self, path: &str, a: &ObjectType, b: &ObjectType, ctx_a: &str, ctx_b: &str) {
        for (name, old) in &a.properties {
            let fpath = format!("{path}.properties.{name}");
            match b.properties.get(name) {
                None => self.push(
                    &fpath,
                    ChangeKind::FieldRemoved,
                    format!("field `{name}` was removed"),
                ),
                Some(new) => self.field(&fpath, old, new, ctx_a, ctx_b),
            }
        }
        for name in &b.required {
            if !a.required.contains(name) {
                let what = if a.properties.contains_key(name) {
                    "became required"
                } else {
                    "was added as required"
                };
                self.push(
                    &format!("{path}.required"),
                    ChangeKind::MadeRequired,
                    format!("field `{name}` {what}"),
                );
            }
        }
        for name in &a.nullable {
            if !b.nullable.contains(name) && b.properties.contains_key(name) {
                self.push(
                    &format!("{path}.nullable"),
                    ChangeKind::ConstraintTightened,
                    format!("field `{name}` is no longer nullable"),
                );
            }
        }
    }

    fn field(&mut self, path: &str, a: &FieldType, b: &FieldType, ctx_a: &str, ctx_b: &str) {
        use FieldType as F;
        match (a, b) {
            (F::Boolean(x), F::Boolean(y)) => {
                if y.const_value.is_some() && x.const_value != y.const_value {
                    self.push(
                        path,
                        ChangeKind::ConstraintTightened,
                        "`const` added or changed",
                    );
                }
            }
            (F::Integer(x), F::Integer(y)) => {
                self.lower_bound(path, "minimum", x.minimum, y.minimum);
                self.upper_bound(path, "maximum", x.maximum, y.maximum);
                self.enum_narrowed(path, x.enum_values.as_deref(), y.enum_values.as_deref());
                if y.const_value.is_some() && x.const_value != y.const_value {
                    self.push(
                        path,
                        ChangeKind::ConstraintTightened,
                        "`const` added or changed",
                    );
                }
            }
            (F::String(x), F::String(y)) => {
                self.lower_bound(path, "minLength", x.min_length, y.min_length);
                self.upper_bound(path, "maxLength", x.max_length, y.max_length);
                self.lower_bound(path, "minGraphemes", x.min_graphemes, y.min_graphemes);
                self.upper_bound(path, "maxGraphemes", x.max_graphemes, y.max_graphemes);
                self.enum_narrowed(path, x.enum_values.as_deref(), y.enum_values.as_deref());
                if y.format.is_some() && x.format != y.format {
                    self.push(
                        path,
                        ChangeKind::ConstraintTightened,
                        "`format` added or changed",
                    );
                }
                if y.const_value.is_some() && x.const_value != y.const_value {
                    self.push(
                        path,
                        ChangeKind::ConstraintTightened,
                        "`const` added or changed",
                    );
                }
            }
            (F::Bytes(x), F::Bytes(y)) => {
                self.lower_bound(path, "minLength", x.min_length, y.min_length);
                self.upper_bound(path, "maxLength", x.max_length, y.max_length);
            }
            (F::Blob(x), F::Blob(y)) => {
                self.upper_bound(path, "maxSize", x.max_size, y.max_size);
                if let Some(accept) = &y.accept {
                    let narrowed = match &x.accept {
                        None => true,
                        Some(old) => old.iter().any(|m| !accept.contains(m)),
                    };
                    if narrowed {
                        self.push(path, ChangeKind::ConstraintTightened, "`accept` narrowed");
                    }
                }
            }
            (F::Array(x), F::Array(y)) => {
                self.lower_bound(path, "minLength", x.min_length, y.min_length);
                self.upper_bound(path, "maxLength", x.max_length, y.max_length);
                self.field(&format!("{path}.items"), &x.items, &y.items, ctx_a, ctx_b);
            }
            (F::Object(x), F::Object(y)) => self.object(path, x, y, ctx_a, ctx_b),
            (F::Ref(x), F::Ref(y)) => {
                if canonical(&x.reference, ctx_a) != canonical(&y.reference, ctx_b) {
                    self.push(
                        path,
                        ChangeKind::TypeChanged,
                        format!("ref {} became {}", x.reference, y.reference),
                    );
                }
            }
            (F::Union(x), F::Union(y)) => {
                let new: Vec<String> = y.refs.iter().map(|r| canonical(r, ctx_b)).collect();
                let removed: Vec<&String> = x
                    .refs
                    .iter()
                    .filter(|r| !new.contains(&canonical(r, ctx_a)))
                    .collect();
                if y.closed && !x.closed {
                    self.push(
                        path,
                        ChangeKind::ClosedUnionNarrowed,
                        "the open union became closed",
                    );
                } else if y.closed && !removed.is_empty() {
                    self.push(
                        path,
                        ChangeKind::ClosedUnionNarrowed,
                        format!("closed union lost {removed:?}"),
                    );
                } else if !removed.is_empty() {
                    self.push(
                        path,
                        ChangeKind::TypeChanged,
                        format!(
                            "union lost {removed:?}; old data with those types is no longer typed"
                        ),
                    );
                }
            }
            (F::CidLink(_), F::CidLink(_)) | (F::Unknown(_), F::Unknown(_)) => {}
            (x, y) => self.push(
                path,
                ChangeKind::TypeChanged,
                format!("type {} became {}", x.type_name(), y.type_name()),
            ),
        }
    }

    fn lower_bound<T: PartialOrd + Copy + fmt::Display>(
        &mut self,
        path: &str,
        key: &str,
        old: Option<T>,
        new: Option<T>,
    ) {
        if let Some(n) = new
            && old.is_none_or(|o| n > o)
        {
            self.push(
                path,
                ChangeKind::ConstraintTightened,
                format!("`{key}` raised to {n}"),
            );
        }
    }

    fn upper_bound<T: PartialOrd + Copy + fmt::Display>(
        &mut self,
        path: &str,
        key: &str,
        old: Option<T>,
        new: Option<T>,
    ) {
        if let Some(n) = new
            && old.is_none_or(|o| n < o)
        {
            self.push(
                path,
                ChangeKind::ConstraintTightened,
                format!("`{key}` lowered to {n}"),
            );
        }
    }

    fn enum_narrowed<T: PartialEq + fmt::Debug>(
        &mut self,
        path: &str,
        old: Option<&[T]>,
        new: Option<&[T]>,
    ) {
        if let Some(new) = new {
            let narrowed = match old {
                None => true,
                Some(old) => old.iter().any(|v| !new.contains(v)),
            };
            if narrowed {
                self.push(
                    path,
                    ChangeKind::ConstraintTightened,
                    format!("`enum` narrowed to {new:?}"),
                );
            }
        }
    }
}

fn canonical(reference: &str, ctx: &str) -> String {
    let (nsid, name) = split_ref(reference, ctx);
    format!("{nsid}#{name}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(doc: serde_json::Value) -> LexiconSet {
        let mut set = LexiconSet::new();
        set.insert_json(&doc.to_string(), None).unwrap();
        set
    }

    fn base() -> serde_json::Value {
        json!({"lexicon": 1, "id": "com.example.job", "defs": {
            "main": {"type": "record", "key": "tid", "record": {"type": "object", "required": ["name"], "properties": {
                "name": {"type": "string", "maxLength": 100},
                "size": {"type": "integer", "minimum": 0},
                "kind": {"type": "union", "closed": true, "refs": ["#a", "#b"]},
                "tags": {"type": "array", "items": {"type": "string"}}
            }}},
            "a": {"type": "object", "properties": {}},
            "b": {"type": "object", "properties": {}}
        }})
    }

    fn kinds(old: serde_json::Value, new: serde_json::Value) -> Vec<&'static str> {
        breaking_changes(&set(old), &set(new))
            .iter()
            .map(|c| c.kind.name())
            .collect()
    }

    #[test]
    fn compatible_evolution_is_not_breaking() {
        let mut new = base();
        new["defs"]["main"]["record"]["properties"]["extra"] = json!({"type": "string"});
        new["defs"]["main"]["record"]["properties"]["name"]["maxLength"] = json!(200);
        new["defs"]["c"] = json!({"type": "object", "properties": {}});
        assert_eq!(kinds(base(), new), Vec::<&str>::new());
    }

    #[test]
    fn each_breaking_kind_is_detected() {
        let edit = |f: &dyn Fn(&mut serde_json::Value)| {
            let mut v = base();
            f(&mut v);
            kinds(base(), v)
        };
        let props = |v: &mut serde_json::Value| v["defs"]["main"]["record"]["properties"].clone();
        assert_eq!(
            edit(&|v| {
                let mut p = props(v);
                p.as_object_mut().unwrap().remove("size");
                v["defs"]["main"]["record"]["properties"] = p;
            }),
            ["field-removed"]
        );
        assert_eq!(
            edit(&|v| v["defs"]["main"]["record"]["required"] = json!(["name", "size"])),
            ["made-required"]
        );
        assert_eq!(
            edit(&|v| v["defs"]["main"]["record"]["properties"]["size"] = json!({"type": "string"})),
            ["type-changed"]
        );
        assert_eq!(
            edit(&|v| v["defs"]["main"]["record"]["properties"]["name"]["maxLength"] = json!(50)),
            ["constraint-tightened"]
        );
        assert_eq!(
            edit(&|v| v["defs"]["main"]["record"]["properties"]["size"]["minimum"] = json!(1)),
            ["constraint-tightened"]
        );
        assert_eq!(
            edit(&|v| v["defs"]["main"]["record"]["properties"]["kind"]["refs"] = json!(["#a"])),
            ["closed-union-narrowed"]
        );
        assert_eq!(
            edit(&|v| v["defs"]["main"]["key"] = json!("any")),
            ["record-key-changed"]
        );
        assert_eq!(
            edit(
                &|v| v["defs"]["main"]["record"]["properties"]["tags"]["items"] =
                    json!({"type": "integer"})
            ),
            ["type-changed"]
        );
        assert_eq!(
            edit(&|v| {
                v["defs"].as_object_mut().unwrap().remove("b");
                v["defs"]["main"]["record"]["properties"]["kind"]["refs"] = json!(["#a"]);
            }),
            ["removed", "closed-union-narrowed"]
        );
        let other = json!({"lexicon": 1, "id": "com.example.other", "defs": {}});
        assert_eq!(kinds(base(), other), ["removed"]);
    }
}
