//! Lexicon v1 toolchain: parse, lint, validate records, Rust codegen from build.rs,
//! breaking-change diff.
//!
//! Work in progress (issue 3). The contract below is already relied on by generated code
//! and by the writer (murmur-pds): every generated type implements [`Validate`].

use std::fmt;

/// A value that checks itself against the lexicon constraints it was generated from.
pub trait Validate {
    /// Checks every constraint (required fields, lengths, ranges, formats, enums...).
    ///
    /// The error names the JSON path of the first offending field.
    fn validate(&self) -> Result<(), ValidationError>;
}

/// A record or value that breaks its lexicon.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationError {
    /// JSON path of the offending value, e.g. `$.payload.items[2].name`.
    pub path: String,
    /// What is wrong, e.g. `string longer than maxLength 640`.
    pub message: String,
}

impl fmt::Display for ValidationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}
