//! Lint: every rule a lexicon file or a set of files can break, reported with file, JSON path
//! and rule name.

use std::fmt;
use std::path::PathBuf;

/// A rule a lexicon can break.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// The file is not valid JSON.
    InvalidJson,
    /// `lexicon` is not 1.
    LexiconVersion,
    /// A required field is missing.
    MissingField,
    /// A field has the wrong JSON type.
    WrongType,
    /// `id` (or a ref's NSID) is not a valid NSID.
    BadNsid,
    /// A definition name is not valid.
    BadName,
    /// A `type` value the Lexicon language does not have.
    UnknownType,
    /// A type used where it is not allowed (record not `main`, top-level ref/union/unknown...).
    MisplacedType,
    /// A record key type that is not `tid`, `nsid`, `any` or `literal:<key>`.
    BadRecordKey,
    /// A malformed reference string.
    BadRef,
    /// A reference to a definition that is not in the set.
    UnresolvedRef,
    /// A reference to a definition of the wrong kind (e.g. a union member that is not an object).
    BadRefTarget,
    /// Two files define the same NSID.
    DuplicateId,
    /// Inconsistent constraints (min above max, required field not in properties...).
    BadConstraint,
    /// Definitions that refer to each other in a cycle no value or no Rust type can
    /// represent (e.g. arrays whose items refer back, or objects requiring each other).
    RefCycle,
}

impl Rule {
    /// The rule's name, as printed by `murmur lex lint`.
    pub fn name(self) -> &'static str {
        match self {
            Rule::InvalidJson => "invalid-json",
            Rule::LexiconVersion => "lexicon-version",
            Rule::MissingField => "missing-field",
            Rule::WrongType => "wrong-type",
            Rule::BadNsid => "bad-nsid",
            Rule::BadName => "bad-name",
            Rule::UnknownType => "unknown-type",
            Rule::MisplacedType => "misplaced-type",
            Rule::BadRecordKey => "bad-record-key",
            Rule::BadRef => "bad-ref",
            Rule::UnresolvedRef => "unresolved-ref",
            Rule::BadRefTarget => "bad-ref-target",
            Rule::DuplicateId => "duplicate-id",
            Rule::BadConstraint => "bad-constraint",
            Rule::RefCycle => "ref-cycle",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One problem in a lexicon file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LintIssue {
    /// The file, when the lexicon came from one.
    pub file: Option<PathBuf>,
    /// JSON path inside the document, e.g. `$.defs.main.record.properties.text`.
    pub path: String,
    /// The rule broken.
    pub rule: Rule,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl fmt::Display for LintIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}: ", file.display())?;
        }
        write!(f, "{}: [{}] {}", self.path, self.rule, self.message)
    }
}

#[cfg(test)]
mod tests {
    use crate::LexiconSet;
    use crate::schema::parse_document;

    fn fixture(name: &str) -> serde_json::Value {
        let path = format!(
            "{}/tests/fixtures/interop/lexicon/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn interop_valid_lexicons_parse_and_lint_clean() {
        for case in fixture("lexicon-valid.json").as_array().unwrap() {
            let doc = parse_document(&case["lexicon"]);
            assert!(doc.is_ok(), "{}: {:?}", case["name"], doc);
            let mut set = LexiconSet::new();
            set.insert(doc.unwrap(), None).unwrap();
            assert_eq!(set.lint(), vec![], "{}", case["name"]);
        }
    }

    #[test]
    fn interop_invalid_lexicons_are_refused_with_a_reason() {
        let cases = fixture("lexicon-invalid.json");
        assert_eq!(cases.as_array().unwrap().len(), 7);
        for case in cases.as_array().unwrap() {
            let issues =
                parse_document(&case["lexicon"]).expect_err(case["name"].as_str().unwrap());
            assert!(!issues.is_empty());
            for issue in &issues {
                assert!(issue.path.starts_with('$'), "{issue}");
                assert!(!issue.message.is_empty());
            }
        }
    }

    #[test]
    fn catalog_lexicons_lint_clean() {
        let dir = format!(
            "{}/tests/fixtures/interop/lexicon/catalog",
            env!("CARGO_MANIFEST_DIR")
        );
        let (set, file_issues) = LexiconSet::load_dir_unchecked(&dir).unwrap();
        assert_eq!(file_issues, vec![]);
        assert_eq!(set.len(), 5);
        // The catalog's procedure refers to app.bsky.actor.defs, which the catalog does not ship.
        let issues = set.lint();
        assert_eq!(issues.len(), 1, "{issues:?}");
        assert_eq!(issues[0].rule.name(), "unresolved-ref");
        assert_eq!(
            issues[0].path,
            "$.defs.main.input.schema.properties.preferences.ref"
        );
    }

    #[test]
    fn unresolved_and_misdirected_refs_are_named() {
        let doc = serde_json::json!({
            "lexicon": 1, "id": "com.example.thing",
            "defs": {
                "main": { "type": "record", "key": "tid", "record": { "type": "object", "properties": {
                    "a": { "type": "ref", "ref": "#missing" },
                    "b": { "type": "union", "refs": ["#tok"] },
                    "c": { "type": "ref", "ref": "com.example.other#x" }
                }}},
                "tok": { "type": "token" }
            }
        });
        let mut set = LexiconSet::new();
        set.insert(parse_document(&doc).unwrap(), None).unwrap();
        let issues = set.lint();
        let rules: Vec<_> = issues
            .iter()
            .map(|i| (i.path.as_str(), i.rule.name()))
            .collect();
        assert!(
            rules.contains(&("$.defs.main.record.properties.a.ref", "unresolved-ref")),
            "{rules:?}"
        );
        assert!(
            rules.contains(&("$.defs.main.record.properties.b.refs[0]", "bad-ref-target")),
            "{rules:?}"
        );
        assert!(
            rules.contains(&("$.defs.main.record.properties.c.ref", "unresolved-ref")),
            "{rules:?}"
        );
    }

    #[test]
    fn duplicate_ids_and_bad_record_keys_are_named() {
        let doc = serde_json::json!({
            "lexicon": 1, "id": "com.example.thing",
            "defs": { "main": { "type": "record", "key": "literal:", "record": { "type": "object" } } }
        });
        let issues = parse_document(&doc).unwrap_err();
        assert_eq!(issues[0].rule.name(), "bad-record-key");
        assert_eq!(issues[0].path, "$.defs.main.key");

        let ok = serde_json::json!({ "lexicon": 1, "id": "com.example.thing", "defs": {} });
        let mut set = LexiconSet::new();
        set.insert(parse_document(&ok).unwrap(), None).unwrap();
        let dup = set.insert(parse_document(&ok).unwrap(), None).unwrap_err();
        assert_eq!(dup.rule.name(), "duplicate-id");
    }
}
