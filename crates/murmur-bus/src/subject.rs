//! The subject layout: what consumers filter on, in the server.
//!
//! ```text
//! {prefix}.op.{partition}.{did}.{action}.{collection tokens...}   record ops
//! {prefix}.repo.{partition}.{did}.identity                        #identity events
//! {prefix}.repo.{partition}.{did}.account                         #account events
//! {prefix}.gap                                                    gaps the hub saw
//! ```
//!
//! - `partition` is `0..partitions` (a stable hash of the DID): pools split the stream by it,
//!   so one DID's messages always go to the same member.
//! - `did` is the DID with `%` written `%25` and `.` written `%2E` (a subject token holds no
//!   dot); [`decode_did`] reverses it.
//! - `action` is `create`, `update` or `delete`.
//! - the collection NSID's dots become subject tokens, so `agent.comms.>` selects a namespace.
//!
//! Examples: `murmur.op.*.*.create.agent.comms.task` (every new task),
//! `murmur.op.*.*.*.agent.comms.>` (every agent.comms op),
//! `murmur.op.*.did:plc:abc.>` (everything one repo does).

use murmur_firehose::Action;

/// The default subject prefix (and stream name, upper-cased).
pub const DEFAULT_PREFIX: &str = "murmur";

/// The default number of partitions.
pub const DEFAULT_PARTITIONS: u16 = 16;

/// Writes a DID as one subject token: `%` as `%25`, `.` as `%2E`, so a `did:web` (which may
/// hold dots) is one token and the mapping is reversible.
pub fn encode_did(did: &str) -> String {
    let mut out = String::with_capacity(did.len());
    for c in did.chars() {
        match c {
            '%' => out.push_str("%25"),
            '.' => out.push_str("%2E"),
            c => out.push(c),
        }
    }
    out
}

/// Reverses [`encode_did`]; `None` for a token it cannot have written.
pub fn decode_did(token: &str) -> Option<String> {
    let mut out = String::with_capacity(token.len());
    let mut rest = token;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("%25") => out.push('%'),
            Some("%2E") => out.push('.'),
            _ => return None,
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Some(out)
}

/// The partition of a DID: FNV-1a of its bytes, modulo `partitions` (stable across versions
/// and languages).
pub fn partition_of(did: &str, partitions: u16) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in did.as_bytes() {
        hash ^= u32::from(*b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % u32::from(partitions.max(1))) as u16
}

/// Whether `token` can stand in a subject: non-empty, no whitespace, `.`, `*` or `>`.
fn is_token(token: &str) -> bool {
    !token.is_empty()
        && !token
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>'))
}

/// Builds and reads the subjects of one bus (one prefix, one partition count).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
    partitions: u16,
}

/// A subject that does not follow the layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("subject {subject:?} does not follow the bus layout: {reason}")]
pub struct SubjectError {
    /// The subject.
    pub subject: String,
    /// What is wrong with it.
    pub reason: String,
}

impl Subjects {
    /// The layout under `prefix` (one or more subject tokens, no wildcards) with `partitions`
    /// partitions (at least 1).
    pub fn new(prefix: &str, partitions: u16) -> Result<Subjects, SubjectError> {
        if !prefix.split('.').all(is_token) {
            return Err(SubjectError {
                subject: prefix.to_string(),
                reason: "a prefix is one or more tokens without spaces, '*' or '>'".into(),
            });
        }
        if partitions == 0 {
            return Err(SubjectError {
                subject: prefix.to_string(),
                reason: "at least one partition".into(),
            });
        }
        Ok(Subjects {
            prefix: prefix.to_string(),
            partitions,
        })
    }

    /// The prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The number of partitions.
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// Every subject of the bus (`{prefix}.>`): what the stream stores.
    pub fn all(&self) -> String {
        format!("{}.>", self.prefix)
    }

    /// The subject of a record op; `None` when the collection or DID cannot be written as
    /// tokens (not an NSID).
    pub fn op(&self, did: &str, action: Action, collection: &str) -> Option<String> {
        if !collection.split('.').all(is_token) || collection.contains('/') {
            return None;
        }
        let did_token = encode_did(did);
        if !is_token(&did_token) {
            return None;
        }
        Some(format!(
            "{}.op.{}.{did_token}.{}.{collection}",
            self.prefix,
            partition_of(did, self.partitions),
            action.as_str()
        ))
    }

    /// The subject of an `#identity` (`identity`) or `#account` (`account`) event.
    pub fn repo_event(&self, did: &str, kind: &str) -> Option<String> {
        let did_token = encode_did(did);
        is_token(&did_token).then(|| {
            format!(
                "{}.repo.{}.{did_token}.{kind}",
                self.prefix,
                partition_of(did, self.partitions)
            )
        })
    }

    /// The subject of a relay frame of `did` (`{prefix}-frame.{partition}.{did}`, in the
    /// frame stream); `None` when the DID cannot be a token.
    pub fn frame(&self, did: &str) -> Option<String> {
        let did_token = encode_did(did);
        is_token(&did_token).then(|| {
            format!(
                "{}-frame.{}.{did_token}",
                self.prefix,
                partition_of(did, self.partitions)
            )
        })
    }

    /// Every subject of the frame stream (`{prefix}-frame.>`).
    pub fn frames_all(&self) -> String {
        format!("{}-frame.>", self.prefix)
    }

    /// The subject of gap reports.
    pub fn gap(&self) -> String {
        format!("{}.gap", self.prefix)
    }

    /// The filter subjects for a consumer: ops of the given collection patterns (exact NSIDs
    /// or `prefix.*`; `None` = every collection), `#identity`/`#account` events and gaps,
    /// within one partition (`Some(k)`) or all of them.
    pub fn filters(&self, collections: Option<&[String]>, partition: Option<u16>) -> Vec<String> {
        let p = &self.prefix;
        let part = partition.map_or("*".to_string(), |k| k.to_string());
        let mut out = Vec::new();
        match collections {
            None => out.push(format!("{p}.op.{part}.>")),
            Some(patterns) => {
                for pattern in patterns {
                    let tail = match pattern.strip_suffix('*') {
                        Some(ns) if ns.ends_with('.') => format!("{ns}>"),
                        // `agent.comms.ta*` ends inside a token: take the whole namespace
                        // (the consumer narrows it down).
                        Some(ns) => match ns.rsplit_once('.') {
                            Some((parent, _)) => format!("{parent}.>"),
                            None => ">".to_string(),
                        },
                        None => pattern.clone(),
                    };
                    let subject = format!("{p}.op.{part}.*.*.{tail}");
                    if !out.contains(&subject) {
                        out.push(subject);
                    }
                }
                if out.iter().any(|s| s == &format!("{p}.op.{part}.*.*.>")) {
                    out = vec![format!("{p}.op.{part}.>")];
                }
            }
        }
        out.push(format!("{p}.repo.{part}.>"));
        if partition.is_none() {
            out.push(self.gap());
        }
        out
    }

    /// Reads a subject: `Some((did, partition))` for op and repo-event subjects.
    pub fn did_of(&self, subject: &str) -> Result<(String, u16), SubjectError> {
        let err = |reason: &str| SubjectError {
            subject: subject.to_string(),
            reason: reason.to_string(),
        };
        let rest = subject
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('.'))
            .ok_or_else(|| err("another prefix"))?;
        let mut tokens = rest.split('.');
        match tokens.next() {
            Some("op" | "repo") => {}
            _ => return Err(err("not an op or repo-event subject")),
        }
        let partition = tokens
            .next()
            .and_then(|t| t.parse::<u16>().ok())
            .ok_or_else(|| err("no partition number"))?;
        let did = tokens
            .next()
            .and_then(decode_did)
            .ok_or_else(|| err("no DID token"))?;
        Ok((did, partition))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_tokens_round_trip() {
        for did in [
            "did:plc:abc123",
            "did:web:example.com",
            "did:web:example.com%3A8080",
            "did:web:a%2Eb.c",
        ] {
            let token = encode_did(did);
            assert!(!token.contains('.'), "{token}");
            assert_eq!(decode_did(&token).as_deref(), Some(did));
        }
        assert_eq!(decode_did("did:web:a%2"), None);
        assert_eq!(decode_did("did:web:a%41"), None);
    }

    #[test]
    fn op_subjects_put_collection_tokens_last() {
        let s = Subjects::new("murmur", 16).unwrap();
        let subject = s
            .op("did:web:example.com", Action::Create, "agent.comms.task")
            .unwrap();
        let part = partition_of("did:web:example.com", 16);
        assert_eq!(
            subject,
            format!("murmur.op.{part}.did:web:example%2Ecom.create.agent.comms.task")
        );
        assert_eq!(
            s.did_of(&subject).unwrap(),
            ("did:web:example.com".to_string(), part)
        );
        assert_eq!(s.op("did:plc:a", Action::Create, "bad collection"), None);
        assert_eq!(s.op("did:plc:a", Action::Create, "a.*.b"), None);
        assert_eq!(s.op("did:plc:a b", Action::Create, "a.b.c"), None);
    }

    #[test]
    fn filters_follow_collection_patterns() {
        let s = Subjects::new("m", 4).unwrap();
        let pats = vec![
            "agent.comms.*".to_string(),
            "app.bsky.feed.post".to_string(),
        ];
        assert_eq!(
            s.filters(Some(&pats), None),
            vec![
                "m.op.*.*.*.agent.comms.>",
                "m.op.*.*.*.app.bsky.feed.post",
                "m.repo.*.>",
                "m.gap"
            ]
        );
        assert_eq!(
            s.filters(Some(&["*".to_string()]), Some(2)),
            vec!["m.op.2.>", "m.repo.2.>"]
        );
        assert_eq!(
            s.filters(None, None),
            vec!["m.op.*.>", "m.repo.*.>", "m.gap"]
        );
        assert_eq!(
            s.filters(Some(&["agent.comms.ta*".to_string()]), None)[0],
            "m.op.*.*.*.agent.comms.>"
        );
    }

    #[test]
    fn partitions_are_stable_and_in_range() {
        assert_eq!(partition_of("did:plc:abc", 1), 0);
        let p = partition_of("did:plc:ewvi7nxzyoun6zhxrhs64oiz", 16);
        assert!(p < 16);
        assert_eq!(p, partition_of("did:plc:ewvi7nxzyoun6zhxrhs64oiz", 16));
        assert!(Subjects::new("a b", 1).is_err());
        assert!(Subjects::new("a.>", 1).is_err());
        assert!(Subjects::new("a", 0).is_err());
    }
}
