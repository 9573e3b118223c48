//! Event-stream frames of `com.atproto.sync.subscribeRepos`: header `{op, t}` + DAG-CBOR body.

use cid::Cid;
use serde::Deserialize;

use crate::{StreamError, SyncError, cbor};

/// Size and shape limits applied while decoding (defaults from the atproto specs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame accepted (default 5 MB).
    pub max_frame_bytes: usize,
    /// Largest `blocks` CAR slice in a `#commit` or `#sync` (default 2 MB).
    pub max_blocks_bytes: usize,
    /// Most ops in one `#commit` (default 200).
    pub max_ops: usize,
    /// Largest record block (default 1 MB).
    pub max_record_bytes: usize,
    /// Deepest DAG-CBOR nesting in a frame or record (default 32).
    pub max_depth: usize,
    /// Largest whole-repo CAR fetched with `getRepo` (default 256 MB).
    pub max_repo_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 5 * 1024 * 1024,
            max_blocks_bytes: 2 * 1024 * 1024,
            max_ops: 200,
            max_record_bytes: 1024 * 1024,
            max_depth: 32,
            max_repo_bytes: 256 * 1024 * 1024,
        }
    }
}

/// One decoded `subscribeRepos` message.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// `#commit`: a signed change to one repo (boxed: it is much larger than the others).
    Commit(Box<CommitEvent>),
    /// `#sync`: the repo's current commit, replacing whatever state a consumer had (resets the chain).
    Sync(SyncEvent),
    /// `#identity`: the DID document or handle may have changed; drop cached identity.
    Identity(IdentityEvent),
    /// `#account`: the account's hosting status changed.
    Account(AccountEvent),
    /// `#info`: an informational message from the server (e.g. `OutdatedCursor`).
    Info(InfoEvent),
    /// A message type this crate does not know; not an error, so new types do not break consumers.
    Unknown {
        /// The header's `t`.
        t: String,
    },
}

/// What a repo op did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// A new record.
    Create,
    /// A record replaced.
    Update,
    /// A record removed.
    Delete,
}

impl Action {
    /// The lexicon's name for the action.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Update => "update",
            Action::Delete => "delete",
        }
    }
}

/// One op of a `#commit`: `path` is `collection/rkey`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct RepoOp {
    /// What happened.
    pub action: Action,
    /// `collection/rkey`.
    pub path: String,
    /// The new record's CID (`None` for deletes).
    pub cid: Option<Cid>,
    /// The previous record's CID (sync 1.1; set for updates and deletes).
    #[serde(default)]
    pub prev: Option<Cid>,
}

impl RepoOp {
    /// The collection NSID (the part of `path` before the first `/`).
    pub fn collection(&self) -> &str {
        self.path.split_once('/').map_or(&self.path, |(c, _)| c)
    }

    /// The record key (the part of `path` after the first `/`).
    pub fn rkey(&self) -> &str {
        self.path.split_once('/').map_or("", |(_, r)| r)
    }
}

/// A `#commit` event. `repo` and `ops` are available without touching `blocks`, so a consumer
/// can pre-filter before any CAR parsing or verification.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CommitEvent {
    /// Stream sequence number.
    pub seq: i64,
    /// The repo DID.
    pub repo: String,
    /// CID of the signed commit block (inside `blocks`).
    pub commit: Cid,
    /// The commit's rev (a TID).
    pub rev: String,
    /// The rev of the previous commit of this repo, `None` for the first.
    pub since: Option<String>,
    /// A CAR v1 slice: the commit, changed MST nodes and new records.
    #[serde(with = "serde_bytes")]
    pub blocks: Vec<u8>,
    /// What changed.
    pub ops: Vec<RepoOp>,
    /// The MST root before this commit (sync 1.1).
    #[serde(rename = "prevData", default)]
    pub prev_data: Option<Cid>,
    /// When the server emitted the event (RFC 3339).
    pub time: String,
    /// Deprecated: blocks were left out because the commit was too large.
    #[serde(rename = "tooBig", default)]
    pub too_big: bool,
}

impl CommitEvent {
    /// True when any op satisfies `pred`: the cheap pre-filter before verification.
    pub fn any_op(&self, mut pred: impl FnMut(&RepoOp) -> bool) -> bool {
        self.ops.iter().any(&mut pred)
    }
}

/// A `#sync` event: the repo's current signed commit, with no diff.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct SyncEvent {
    /// Stream sequence number.
    pub seq: i64,
    /// The repo DID.
    pub did: String,
    /// A CAR v1 slice whose root is the commit block.
    #[serde(with = "serde_bytes")]
    pub blocks: Vec<u8>,
    /// The commit's rev.
    pub rev: String,
    /// When the server emitted the event.
    pub time: String,
}

/// An `#identity` event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IdentityEvent {
    /// Stream sequence number.
    pub seq: i64,
    /// The DID whose identity may have changed.
    pub did: String,
    /// When the server emitted the event.
    pub time: String,
    /// The current handle, if the server knows it.
    #[serde(default)]
    pub handle: Option<String>,
}

/// An `#account` event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct AccountEvent {
    /// Stream sequence number.
    pub seq: i64,
    /// The account DID.
    pub did: String,
    /// When the server emitted the event.
    pub time: String,
    /// Whether the account is active (hosting its repo).
    pub active: bool,
    /// Why not active: `takendown`, `suspended`, `deleted`, `deactivated`, `desynchronized`, `throttled`, ...
    #[serde(default)]
    pub status: Option<String>,
}

/// An `#info` event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InfoEvent {
    /// The info name, e.g. `OutdatedCursor`.
    pub name: String,
    /// A human-readable message.
    #[serde(default)]
    pub message: Option<String>,
}

impl InfoEvent {
    /// True for `OutdatedCursor`: the requested cursor was older than the replay window (a gap).
    pub fn is_outdated_cursor(&self) -> bool {
        self.name == "OutdatedCursor"
    }
}

#[derive(Deserialize)]
struct Header {
    op: i64,
    #[serde(default)]
    t: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: Option<String>,
}

/// Splits a frame into its header and body bytes (each one complete DAG-CBOR item, nothing
/// after the body), without decoding either: what a relay needs to pass a frame on with a
/// body of its own (a new `seq`).
pub fn split_frame(bytes: &[u8]) -> Result<(&[u8], &[u8]), SyncError> {
    let limits = Limits::default();
    let split = cbor::item_end(bytes, 0, limits.max_depth, "frame header")?;
    let (head, body) = bytes.split_at(split);
    let end = cbor::item_end(body, 0, limits.max_depth, "frame body")?;
    if end != body.len() {
        return Err(SyncError::Cbor {
            context: "frame body",
            offset: split + end,
            reason: "trailing bytes after the body",
        });
    }
    Ok((head, body))
}

/// The same frame with its body's `seq` set to `seq`, every other byte kept as it was: what
/// a relay sends for an event it numbers itself (the `seq` is not signed; the commit and its
/// CAR slice are passed on untouched). Fails on a frame without a top-level integer `seq`.
pub fn with_seq(frame: &[u8], seq: u64) -> Result<Vec<u8>, SyncError> {
    let (head, body) = split_frame(frame)?;
    let spans = cbor::map_spans(body, Limits::default().max_depth, "frame body")?;
    let (_, start, end) = spans
        .entries
        .iter()
        .find(|(key, _, _)| *key == "seq")
        .copied()
        .ok_or_else(|| SyncError::Frame("the body has no seq".into()))?;
    // DAG-CBOR writes the key "seq" as one head byte and three bytes of text.
    let value = start + 4;
    if body.get(value).is_none_or(|b| b >> 5 != 0) {
        return Err(SyncError::Frame(
            "the body's seq is not an unsigned integer".into(),
        ));
    }
    let mut out = Vec::with_capacity(frame.len() + 8);
    out.extend_from_slice(head);
    out.extend_from_slice(&body[..value]);
    cbor::write_head(&mut out, 0, seq);
    out.extend_from_slice(&body[end..]);
    Ok(out)
}

/// An error frame (header `{op: -1}`, body `{error, message}`): what a server sends before it
/// closes a stream it will not serve (`FutureCursor`, `ConsumerTooSlow`).
pub fn error_frame(error: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + error.len() + message.len());
    cbor::write_head(&mut out, 5, 1);
    cbor::write_text(&mut out, "op");
    cbor::write_head(&mut out, 1, 0);
    cbor::write_head(&mut out, 5, 2);
    cbor::write_text(&mut out, "error");
    cbor::write_text(&mut out, error);
    cbor::write_text(&mut out, "message");
    cbor::write_text(&mut out, message);
    out
}

/// An `#info` frame (header `{op: 1, t: "#info"}`, body `{name, message}`), e.g.
/// `OutdatedCursor`.
pub fn info_frame(name: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(48 + name.len() + message.len());
    cbor::write_head(&mut out, 5, 2);
    cbor::write_text(&mut out, "t");
    cbor::write_text(&mut out, "#info");
    cbor::write_text(&mut out, "op");
    cbor::write_head(&mut out, 0, 1);
    cbor::write_head(&mut out, 5, 2);
    cbor::write_text(&mut out, "name");
    cbor::write_text(&mut out, name);
    cbor::write_text(&mut out, "message");
    cbor::write_text(&mut out, message);
    out
}

impl Frame {
    /// Decodes one frame with the default [`Limits`].
    ///
    /// An error frame (op -1) becomes `Err(SyncError::Stream(..))`; an unknown message type
    /// becomes `Ok(Frame::Unknown { .. })`.
    pub fn decode(bytes: &[u8]) -> Result<Frame, SyncError> {
        Frame::decode_with(bytes, &Limits::default())
    }

    /// Decodes one frame with the given limits.
    pub fn decode_with(bytes: &[u8], limits: &Limits) -> Result<Frame, SyncError> {
        if bytes.len() > limits.max_frame_bytes {
            return Err(SyncError::TooLarge {
                what: "frame",
                size: bytes.len(),
                limit: limits.max_frame_bytes,
            });
        }
        let split = cbor::item_end(bytes, 0, limits.max_depth, "frame header")?;
        let (head_bytes, body) = bytes.split_at(split);
        let end = cbor::item_end(body, 0, limits.max_depth, "frame body")?;
        if end != body.len() {
            return Err(SyncError::Cbor {
                context: "frame body",
                offset: split + end,
                reason: "trailing bytes after the body",
            });
        }
        let header: Header = serde_ipld_dagcbor::from_slice(head_bytes)
            .map_err(|e| SyncError::decode("frame header", e))?;
        match header.op {
            1 => {}
            -1 => {
                let err: ErrorBody = serde_ipld_dagcbor::from_slice(body)
                    .map_err(|e| SyncError::decode("error frame body", e))?;
                let message = err.message;
                return Err(SyncError::Stream(match err.error.as_str() {
                    "FutureCursor" => StreamError::FutureCursor { message },
                    "ConsumerTooSlow" => StreamError::ConsumerTooSlow { message },
                    "OutdatedCursor" => StreamError::OutdatedCursor { message },
                    _ => StreamError::Other {
                        error: err.error,
                        message,
                    },
                }));
            }
            op => return Err(SyncError::Frame(format!("op is {op}, expected 1 or -1"))),
        }
        let t = header
            .t
            .ok_or_else(|| SyncError::Frame("message frame without `t`".into()))?;
        let frame = match t.as_str() {
            "#commit" => {
                let c: CommitEvent = body_of(body, "#commit body")?;
                if c.ops.len() > limits.max_ops {
                    return Err(SyncError::TooManyOps {
                        count: c.ops.len(),
                        limit: limits.max_ops,
                    });
                }
                check_blocks(&c.blocks, limits)?;
                Frame::Commit(Box::new(c))
            }
            "#sync" => {
                let s: SyncEvent = body_of(body, "#sync body")?;
                check_blocks(&s.blocks, limits)?;
                Frame::Sync(s)
            }
            "#identity" => Frame::Identity(body_of(body, "#identity body")?),
            "#account" => Frame::Account(body_of(body, "#account body")?),
            "#info" => Frame::Info(body_of(body, "#info body")?),
            _ => Frame::Unknown { t },
        };
        Ok(frame)
    }

    /// The stream sequence number, for the message types that have one.
    pub fn seq(&self) -> Option<i64> {
        match self {
            Frame::Commit(c) => Some(c.seq),
            Frame::Sync(s) => Some(s.seq),
            Frame::Identity(i) => Some(i.seq),
            Frame::Account(a) => Some(a.seq),
            Frame::Info(_) | Frame::Unknown { .. } => None,
        }
    }

    /// The DID the message is about, for the message types that have one.
    pub fn did(&self) -> Option<&str> {
        match self {
            Frame::Commit(c) => Some(&c.repo),
            Frame::Sync(s) => Some(&s.did),
            Frame::Identity(i) => Some(&i.did),
            Frame::Account(a) => Some(&a.did),
            Frame::Info(_) | Frame::Unknown { .. } => None,
        }
    }
}

fn body_of<T: serde::de::DeserializeOwned>(
    body: &[u8],
    context: &'static str,
) -> Result<T, SyncError> {
    serde_ipld_dagcbor::from_slice(body).map_err(|e| SyncError::decode(context, e))
}

fn check_blocks(blocks: &[u8], limits: &Limits) -> Result<(), SyncError> {
    if blocks.len() > limits.max_blocks_bytes {
        return Err(SyncError::TooLarge {
            what: "blocks",
            size: blocks.len(),
            limit: limits.max_blocks_bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cbor::{write_head, write_text};

    fn frame(op: i64, t: Option<&str>, body: &[u8]) -> Vec<u8> {
        // DAG-CBOR orders keys by length first: "t" before "op".
        let mut out = Vec::new();
        write_head(&mut out, 5, if t.is_some() { 2 } else { 1 });
        if let Some(t) = t {
            write_text(&mut out, "t");
            write_text(&mut out, t);
        }
        write_text(&mut out, "op");
        if op >= 0 {
            write_head(&mut out, 0, op as u64);
        } else {
            write_head(&mut out, 1, (-1 - op) as u64);
        }
        out.extend_from_slice(body);
        out
    }

    fn map(entries: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        write_head(&mut out, 5, entries.len() as u64);
        for (k, v) in entries {
            write_text(&mut out, k);
            write_text(&mut out, v);
        }
        out
    }

    #[test]
    fn written_error_and_info_frames_decode() {
        assert!(matches!(
            Frame::decode(&error_frame("FutureCursor", "ahead")).unwrap_err(),
            SyncError::Stream(StreamError::FutureCursor { message: Some(ref m) }) if m == "ahead"
        ));
        assert!(matches!(
            Frame::decode(&error_frame("ConsumerTooSlow", "slow")).unwrap_err(),
            SyncError::Stream(StreamError::ConsumerTooSlow { .. })
        ));
        match Frame::decode(&info_frame("OutdatedCursor", "old")).unwrap() {
            Frame::Info(info) => {
                assert!(info.is_outdated_cursor());
                assert_eq!(info.message.as_deref(), Some("old"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn with_seq_replaces_only_the_seq() {
        // {seq, did, time, handle}: seq small, then renumbered past one-byte heads.
        let mut body = Vec::new();
        write_head(&mut body, 5, 4);
        write_text(&mut body, "did");
        write_text(&mut body, "did:plc:abc");
        write_text(&mut body, "seq");
        write_head(&mut body, 0, 7);
        write_text(&mut body, "time");
        write_text(&mut body, "2024-01-01T00:00:00Z");
        write_text(&mut body, "handle");
        write_text(&mut body, "a.test");
        let original = frame(1, Some("#identity"), &body);
        for seq in [0, 23, 24, 70_000, 1 << 40] {
            let renumbered = with_seq(&original, seq).unwrap();
            match Frame::decode(&renumbered).unwrap() {
                Frame::Identity(i) => {
                    assert_eq!(i.seq, seq as i64);
                    assert_eq!(i.did, "did:plc:abc");
                    assert_eq!(i.handle.as_deref(), Some("a.test"));
                }
                other => panic!("{other:?}"),
            }
            assert_eq!(with_seq(&renumbered, 7).unwrap(), original);
        }
        let no_seq = frame(1, Some("#identity"), &map(&[("did", "x")]));
        assert!(matches!(with_seq(&no_seq, 1), Err(SyncError::Frame(_))));
        let text_seq = frame(1, Some("#identity"), &map(&[("seq", "x")]));
        assert!(matches!(with_seq(&text_seq, 1), Err(SyncError::Frame(_))));
        assert!(with_seq(&original[..original.len() - 1], 1).is_err());
    }

    #[test]
    fn error_frames_are_typed_errors() {
        let body = map(&[("error", "FutureCursor"), ("message", "too far")]);
        let err = Frame::decode(&frame(-1, None, &body)).unwrap_err();
        assert!(matches!(
            err,
            SyncError::Stream(StreamError::FutureCursor { message: Some(ref m) }) if m == "too far"
        ));
        let body = map(&[("error", "ConsumerTooSlow")]);
        assert!(matches!(
            Frame::decode(&frame(-1, None, &body)).unwrap_err(),
            SyncError::Stream(StreamError::ConsumerTooSlow { message: None })
        ));
        let body = map(&[("error", "Whatever")]);
        assert!(matches!(
            Frame::decode(&frame(-1, None, &body)).unwrap_err(),
            SyncError::Stream(StreamError::Other { .. })
        ));
    }

    #[test]
    fn unknown_message_type_is_not_an_error() {
        let body = map(&[("x", "y")]);
        assert_eq!(
            Frame::decode(&frame(1, Some("#labels"), &body)).unwrap(),
            Frame::Unknown {
                t: "#labels".into()
            }
        );
    }

    #[test]
    fn info_frame_decodes() {
        let body = map(&[("name", "OutdatedCursor")]);
        let Frame::Info(info) = Frame::decode(&frame(1, Some("#info"), &body)).unwrap() else {
            panic!("not info")
        };
        assert!(info.is_outdated_cursor());
    }

    #[test]
    fn limits_and_garbage_are_typed_errors() {
        let body = map(&[("name", "x")]);
        let f = frame(1, Some("#info"), &body);
        let tight = Limits {
            max_frame_bytes: 4,
            ..Limits::default()
        };
        assert!(matches!(
            Frame::decode_with(&f, &tight),
            Err(SyncError::TooLarge { what: "frame", .. })
        ));
        let mut trailing = f.clone();
        trailing.push(0);
        assert!(Frame::decode(&trailing).is_err());
        assert!(Frame::decode(&[]).is_err());
        assert!(matches!(
            Frame::decode(&frame(2, Some("#info"), &body)),
            Err(SyncError::Frame(_))
        ));
        let mut deep = frame(1, Some("#info"), &[]);
        deep.extend(std::iter::repeat_n(0x81, 100));
        deep.push(0);
        assert!(matches!(
            Frame::decode(&deep),
            Err(SyncError::TooDeep { .. })
        ));
    }
}
