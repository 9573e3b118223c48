//! A set of lexicon documents that refer to each other, loaded from a directory.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use crate::LexiconError;
use crate::lint::{LintIssue, Rule};
use crate::schema::{FieldType, LexiconDoc, ObjectType, UserType, parse_document};

/// Lexicons every set can refer to without shipping them: the `com.atproto.*` definitions
/// that codegen maps onto atrium-api types.
const BUILTINS: &[&str] = &[include_str!("builtin/com.atproto.repo.strongRef.json")];

/// Lexicon documents by NSID, with the files they came from.
#[derive(Debug, Clone)]
pub struct LexiconSet {
    docs: BTreeMap<String, LexiconDoc>,
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

impl Default for LexiconSet {
    fn default() -> Self {
        Self::new()
    }
}

impl LexiconSet {
    /// A set holding only the built-in `com.atproto.*` definitions (e.g. `com.atproto.repo.strongRef`).
    pub fn new() -> Self {
        let mut set = LexiconSet {
            docs: BTreeMap::new(),
            files: BTreeMap::new(),
            builtin: BTreeSet::new(),
        };
        for text in BUILTINS {
            let value: serde_json::Value =
                serde_json::from_str(text).expect("built-in lexicon is JSON");
            let doc = parse_document(&value).expect("built-in lexicon is valid");
            set.builtin.insert(doc.id.clone());
            set.docs.insert(doc.id.clone(), doc);
        }
        set
    }

    /// Loads every `*.json` file under `dir` (recursively), then lints the whole set.
    ///
    /// Fails with [`LexiconError::Lint`] listing every problem of every file.
    pub fn load_dir(dir: impl AsRef<Path>) -> Result<Self, LexiconError> {
        let (set, issues) = Self::load_dir_unchecked(dir)?;
        let mut issues = issues;
        issues.extend(set.lint());
        if issues.is_empty() {
            Ok(set)
        } else {
            Err(LexiconError::Lint(issues))
        }
    }

    /// Loads what parses under `dir` and returns the per-file problems next to it, without
    /// the set-level lint.
    pub fn load_dir_unchecked(
        dir: impl AsRef<Path>,
    ) -> Result<(Self, Vec<LintIssue>), LexiconError> {
        let dir = dir.as_ref();
        let mut files = Vec::new();
        collect_json_files(dir, &mut files)?;
        if files.is_empty() {
            return Err(LexiconError::NoLexicons(dir.to_path_buf()));
        }
        files.sort();
        let mut set = LexiconSet::new();
        let mut issues = Vec::new();
        for file in files {
            let text = std::fs::read_to_string(&file).map_err(|source| LexiconError::Io {
                path: file.clone(),
                source,
            })?;
            if let Err(mut file_issues) = set.insert_json(&text, Some(&file)) {
                issues.append(&mut file_issues);
            }
        }
        Ok((set, issues))
    }

    /// Parses one lexicon document from JSON text and adds it.
    pub fn insert_json(&mut self, text: &str, file: Option<&Path>) -> Result<(), Vec<LintIssue>> {
        let with_file = |mut issue: LintIssue| {
            issue.file = file.map(Path::to_path_buf);
            issue
        };
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
            vec![with_file(LintIssue {
                file: None,
                path: "$".into(),
                rule: Rule::InvalidJson,
                message: format!("not valid JSON: {e}"),
            })]
        })?;
        let doc = parse_document(&value)
            .map_err(|issues| issues.into_iter().map(with_file).collect::<Vec<_>>())?;
        self.insert(doc, file)
            .map_err(|issue| vec![with_file(issue)])
    }

    /// Adds a parsed document; a second document with the same NSID is refused (a built-in
    /// one is replaced).
    pub fn insert(&mut self, doc: LexiconDoc, file: Option<&Path>) -> Result<(), LintIssue> {
        if self.docs.contains_key(&doc.id) && !self.builtin.remove(&doc.id) {
            let other = self
                .files
                .get(&doc.id)
                .map(|p| format!(" (also in {})", p.display()))
                .unwrap_or_default();
            return Err(LintIssue {
                file: file.map(Path::to_path_buf),
                path: "$.id".into(),
                rule: Rule::DuplicateId,
                message: format!(
                    "NSID {} is defined twice{other}; keep one file per NSID",
                    doc.id
                ),
            });
        }
        if let Some(file) = file {
            self.files.insert(doc.id.clone(), file.to_path_buf());
        }
        self.docs.insert(doc.id.clone(), doc);
        Ok(())
    }

    /// The document for `nsid`.
    pub fn get(&self, nsid: &str) -> Option<&LexiconDoc> {
        self.docs.get(nsid)
    }

    /// Documents that were added (built-ins excluded), by NSID.
    pub fn docs(&self) -> impl Iterator<Item = &LexiconDoc> {
        self.docs.values().filter(|d| !self.builtin.contains(&d.id))
    }

    /// Whether `nsid` is one of the built-in `com.atproto.*` documents.
    pub fn is_builtin(&self, nsid: &str) -> bool {
        self.builtin.contains(nsid)
    }

    /// Number of documents added (built-ins excluded).
    pub fn len(&self) -> usize {
        self.docs.len() - self.builtin.len()
    }

    /// Whether no document was added.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The file `nsid` came from.
    pub fn file(&self, nsid: &str) -> Option<&Path> {
        self.files.get(nsid).map(PathBuf::as_path)
    }

    /// Resolves a reference (`nsid`, `nsid#name`, `#name`) seen in document `from`, giving the
    /// canonical `nsid#name` and the definition.
    pub fn resolve(&self, reference: &str, from: &str) -> Option<(String, &UserType)> {
        let (nsid, name) = split_ref(reference, from);
        let def = self.docs.get(nsid)?.defs.get(name)?;
        Some((format!("{nsid}#{name}"), def))
    }

    /// Set-level rules: every ref resolves to a definition of a kind allowed there, and no
    /// reference cycle is one that no value or no generated Rust type can represent.
    pub fn lint(&self) -> Vec<LintIssue> {
        let mut issues = Vec::new();
        for doc in self.docs() {
            let file = self.files.get(&doc.id).cloned();
            for_each_type(doc, |path, ty| {
                let refs: Vec<(String, &str, bool)> = match ty {
                    FieldType::Ref(r) => vec![(format!("{path}.ref"), r.reference.as_str(), false)],
                    FieldType::Union(u) => u
                        .refs
                        .iter()
                        .enumerate()
                        .map(|(i, r)| (format!("{path}.refs[{i}]"), r.as_str(), true))
                        .collect(),
                    _ => return,
                };
                for (rpath, r, in_union) in refs {
                    let issue = match self.resolve(r, &doc.id) {
                        None => Some((
                            Rule::UnresolvedRef,
                            format!(
                                "{r:?} does not resolve to a definition in this set; add the lexicon that defines it or fix the name"
                            ),
                        )),
                        Some((_, UserType::Type(FieldType::Object(_)) | UserType::Record(_))) => {
                            None
                        }
                        Some((_, UserType::Type(_) | UserType::Token(_))) if !in_union => None,
                        Some((full, other)) => Some((
                            Rule::BadRefTarget,
                            format!(
                                "{full} is a {}, which cannot be used {}",
                                kind(other),
                                if in_union {
                                    "as a union member (use an object)"
                                } else {
                                    "as a ref"
                                }
                            ),
                        )),
                    };
                    if let Some((rule, message)) = issue {
                        issues.push(LintIssue {
                            file: file.clone(),
                            path: rpath,
                            rule,
                            message,
                        });
                    }
                }
            });
        }
        issues.extend(crate::cycles::lint(self));
        issues
    }
}

/// `(nsid, name)` of a reference seen in document `from`.
pub(crate) fn split_ref<'a>(reference: &'a str, from: &'a str) -> (&'a str, &'a str) {
    match reference.split_once('#') {
        Some(("", name)) => (from, name),
        Some((nsid, name)) => (nsid, name),
        None => (reference, "main"),
    }
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

/// Calls `f` on every type in `doc` (nested ones too) with its JSON path.
pub fn for_each_type<'d>(doc: &'d LexiconDoc, mut f: impl FnMut(&str, &'d FieldType)) {
    fn walk<'d>(path: &str, ty: &'d FieldType, f: &mut dyn FnMut(&str, &'d FieldType)) {
        f(path, ty);
        match ty {
            FieldType::Array(a) => walk(&format!("{path}.items"), &a.items, f),
            FieldType::Object(o) => walk_props(path, o, f),
            _ => {}
        }
    }
    fn walk_props<'d>(path: &str, o: &'d ObjectType, f: &mut dyn FnMut(&str, &'d FieldType)) {
        for (name, prop) in &o.properties {
            walk(&format!("{path}.properties.{name}"), prop, f);
        }
    }
    let f: &mut dyn FnMut(&str, &'d FieldType) = &mut f;
    for (name, def) in &doc.defs {
        let path = format!("$.defs.{name}");
        match def {
            UserType::Record(r) => walk_props(&format!("{path}.record"), &r.record, f),
            UserType::Type(t) => walk(&path, t, f),
            UserType::Query(x) | UserType::Procedure(x) => {
                if let Some(p) = &x.parameters {
                    walk_props(&format!("{path}.parameters"), p, f);
                }
                for (key, body) in [("input", &x.input), ("output", &x.output)] {
                    if let Some(schema) = body.as_ref().and_then(|b| b.schema.as_ref()) {
                        walk(&format!("{path}.{key}.schema"), schema, f);
                    }
                }
            }
            UserType::Subscription(s) => {
                if let Some(p) = &s.parameters {
                    walk_props(&format!("{path}.parameters"), p, f);
                }
                if let Some(m) = &s.message {
                    walk(&format!("{path}.message.schema"), m, f);
                }
            }
            UserType::PermissionSet(_) | UserType::Token(_) => {}
        }
    }
}

fn collect_json_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), LexiconError> {
    let entries = std::fs::read_dir(dir).map_err(|source| LexiconError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| LexiconError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let path = entry.path();
        if path.is_dir() {
            collect_json_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "json") {
            out.push(path);
        }
    }
    Ok(())
}
