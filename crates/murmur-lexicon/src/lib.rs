//! Lexicon v1 toolchain: parse, lint, validate records, Rust codegen from build.rs,
//! breaking-change diff.
//!
//! A [`LexiconSet`] is loaded from a directory of lexicon JSON files and linted as a whole
//! (every problem names its file, JSON path and [`Rule`]). It validates records given as
//! atproto JSON or DAG-CBOR; errors name the JSON path of the offending value.
//!
//! ```
//! use murmur_lexicon::LexiconSet;
//!
//! let mut set = LexiconSet::new();
//! set.insert_json(r#"{
//!     "lexicon": 1,
//!     "id": "com.example.note",
//!     "defs": { "main": { "type": "record", "key": "tid", "record": {
//!         "type": "object", "required": ["text"],
//!         "properties": { "text": { "type": "string", "maxLength": 5 } } } } }
//! }"#, None).unwrap();
//! assert!(set.lint().is_empty());
//!
//! let ok = serde_json::json!({ "$type": "com.example.note", "text": "hi" });
//! assert!(set.validate_record_json("com.example.note", &ok).is_ok());
//!
//! let long = serde_json::json!({ "$type": "com.example.note", "text": "far too long" });
//! let errors = set.validate_record_json("com.example.note", &long).unwrap_err();
//! assert_eq!(errors[0].path, "$.text");
//! ```
//!
//! With the `codegen` feature, `Builder` turns a lexicon directory into Rust types from
//! build.rs, the way prost-build does for protobuf. Every generated type implements
//! [`Validate`].

pub mod breaking;
pub mod check;
#[cfg(feature = "codegen")]
mod codegen;
mod cycles;
pub mod data;
pub mod lint;
pub mod schema;
mod set;
pub mod syntax;
mod tid;
mod validate;

/// Crates that generated code refers to, re-exported so a crate using generated types only
/// needs `murmur-lexicon` as a dependency.
pub mod runtime {
    pub use atrium_api;
    pub use ipld_core;
    pub use serde;
}

use std::fmt;
use std::path::PathBuf;

pub use breaking::{BreakingChange, ChangeKind, breaking_changes};
#[cfg(feature = "codegen")]
pub use codegen::{Builder, generate};
pub use lint::{LintIssue, Rule};
pub use schema::LexiconDoc;
pub use set::{LexiconSet, for_each_type};

/// A value that checks itself against the lexicon constraints it was generated from.
pub trait Validate {
    /// Checks every constraint (required fields, lengths, ranges, formats, enums...).
    ///
    /// The error names the JSON path of the first offending field.
    fn validate(&self) -> Result<(), ValidationError>;

    /// Like [`Validate::validate`], for a value found at JSON path `path` inside a larger one.
    ///
    /// Generated types implement this directly; the default re-roots `validate()`'s path.
    fn validate_at(&self, path: &str) -> Result<(), ValidationError> {
        self.validate().map_err(|e| e.under(path))
    }
}

/// A record or value that breaks its lexicon.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// JSON path of the offending value, e.g. `$.payload.items[2].name`.
    pub path: String,
    /// What is wrong, e.g. `string longer than maxLength 640`.
    pub message: String,
}

impl ValidationError {
    /// An error at `path`.
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            path: path.into(),
            message: message.into(),
        }
    }

    /// The same error for a value that sits at `prefix` (replaces the leading `$`).
    pub fn under(self, prefix: &str) -> Self {
        let rest = self.path.strip_prefix('$').unwrap_or(&self.path);
        ValidationError {
            path: format!("{prefix}{rest}"),
            message: self.message,
        }
    }
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Everything that can go wrong loading, linting or generating code from lexicons.
#[derive(Debug, thiserror::Error)]
pub enum LexiconError {
    /// A file or directory could not be read or written.
    #[error("{}: {source} (check the path exists and is readable)", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The directory holds no `*.json` lexicon files.
    #[error("no lexicon files (*.json) under {}; point at the directory that holds them", .0.display())]
    NoLexicons(PathBuf),
    /// One or more lexicons break the rules; each issue names file, JSON path and rule.
    #[error("{} lexicon problem(s):\n{}", .0.len(), .0.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Lint(Vec<LintIssue>),
    /// Code generation cannot express a definition.
    #[error("cannot generate Rust for {what}: {why}")]
    Codegen {
        /// The definition (`nsid#name` and JSON path).
        what: String,
        /// Why, and what to change.
        why: String,
    },
    /// Definitions refer to each other in a cycle that generated Rust cannot represent.
    #[error("cannot generate Rust for the reference cycle {}: {why}", cycle.join(" -> "))]
    RefCycle {
        /// The cycle as canonical `nsid#name` definitions, the first repeated at the end.
        cycle: Vec<String>,
        /// Why it cannot be represented, and what to change.
        why: String,
    },
}
