//! The agent.comms.* coordination record types, generated from Lexicon JSON at build time.
//!
//! Every type here comes from `lexicons/agent/comms/*.json` through
//! [`murmur_lexicon::Builder`] in this crate's build.rs; nothing is hand-written. Each record
//! NSID has a marker type implementing atrium-api's `Collection` (e.g. [`Task`]) and a module
//! with its `RecordData` (the fields) and `Record` (the fields plus unknown ones, kept on
//! round trip). Every type implements [`Validate`].
//!
//! ```
//! use murmur_comms::agent::comms::task;
//! use murmur_comms::{Task, Validate};
//! use atrium_api::types::Collection;
//!
//! let task = task::RecordData {
//!     task_type: "translate".into(),
//!     title: Some("Translate the README to French".into()),
//!     payload: None,
//!     assignee: None,
//!     deadline: None,
//!     lease_seconds: Some(300),
//!     max_attempts: Some(3),
//!     priority: None,
//!     created_at: "2026-11-23T22:00:00.000Z".into(),
//! }
//! .into_record();
//! assert!(task.validate().is_ok());
//! assert_eq!(Task::NSID, "agent.comms.task");
//!
//! let json = serde_json::to_value(&task).unwrap();
//! assert_eq!(json["$type"], "agent.comms.task");
//! assert_eq!(json["taskType"], "translate");
//!
//! let bad = task::RecordData { lease_seconds: Some(0), ..task.data.clone() };
//! let err = bad.validate().unwrap_err();
//! assert_eq!(err.path, "$.leaseSeconds");
//! ```

pub use murmur_lexicon::{Validate, ValidationError};

include!(concat!(env!("OUT_DIR"), "/agent_comms.rs"));
include!(concat!(env!("OUT_DIR"), "/lexicon_files.rs"));

pub use agent::comms::{
    Ack, Assignment, Broadcast, Claim, Handoff, Message, Presence, Profile, Proposal, Result,
    Status, Tally, Task, Vote,
};

/// The agent.comms lexicons as a [`murmur_lexicon::LexiconSet`], for validating records
/// that arrive as JSON or DAG-CBOR.
pub fn lexicons() -> murmur_lexicon::LexiconSet {
    let mut set = murmur_lexicon::LexiconSet::new();
    for (name, text) in LEXICON_FILES {
        if let Err(issues) = set.insert_json(text, Some(std::path::Path::new(name))) {
            unreachable!("the build checked the agent.comms lexicons: {issues:?}");
        }
    }
    set
}

#[cfg(test)]
mod tests;
