//! Event-stream frames of `com.atproto.sync.subscribeRepos`: header `{op, t}` + DAG-CBOR body.

use bytes::Bytes;
use cid::Cid;
use serde::Deserialize;

use crate::cbor::{self, Reader};
use crate::{StreamError, SyncError};

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
#[derive(Debug, Clone, PartialEq)]
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
    /// A CAR v1 slice: the commit, changed MST nodes and new records. When the frame was
    /// decoded from a [`Bytes`], this shares its buffer (no copy; cloning is cheap).
    pub blocks: Bytes,
    /// What changed.
    pub ops: Vec<RepoOp>,
    /// The MST root before this commit (sync 1.1).
    pub prev_data: Option<Cid>,
    /// When the server emitted the event (RFC 3339).
    pub time: String,
    /// Deprecated: blocks were left out because the commit was too large.
    pub too_big: bool,
}

impl CommitEvent {
    /// True when any op satisfies `pred`: the cheap pre-filter before verification.
    pub fn any_op(&self, mut pred: impl FnMut(&RepoOp) -> bool) -> bool {
        self.ops.iter().any(&mut pred)
    }
}

/// A `#sync` event: the repo's current signed commit, with no diff.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncEvent {
    /// Stream sequence number.
    pub seq: i64,
    /// The repo DID.
    pub did: String,
    /// A CAR v1 slice whose root is the commit block (shares the frame's buffer when the
    /// frame was decoded from a [`Bytes`]).
    pub blocks: Bytes,
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
struct ErrorBody {
    error: String,
    #[serde(default)]
    message: Option<String>,
}

/// The bytes of one frame, as [`Frame::decode`] takes them: `[u8]` and `Vec<u8>` (the CAR
/// slice of a `#commit` or `#sync` is copied out once), or [`Bytes`], as tokio-tungstenite
/// and async-nats hand frames over (the decoded event shares the buffer: no copy).
pub trait FrameBytes: sealed::Sealed {
    /// The frame's bytes, and the shared buffer holding them if there is one.
    #[doc(hidden)]
    fn frame_parts(&self) -> (&[u8], Option<&Bytes>);
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for [u8] {}
    impl<const N: usize> Sealed for [u8; N] {}
    impl Sealed for Vec<u8> {}
    impl Sealed for bytes::Bytes {}
    impl<T: Sealed + ?Sized> Sealed for &T {}
}

impl FrameBytes for [u8] {
    fn frame_parts(&self) -> (&[u8], Option<&Bytes>) {
        (self, None)
    }
}

impl<const N: usize> FrameBytes for [u8; N] {
    fn frame_parts(&self) -> (&[u8], Option<&Bytes>) {
        (self, None)
    }
}

impl FrameBytes for Vec<u8> {
    fn frame_parts(&self) -> (&[u8], Option<&Bytes>) {
        (self, None)
    }
}

impl FrameBytes for Bytes {
    fn frame_parts(&self) -> (&[u8], Option<&Bytes>) {
        (self, Some(self))
    }
}

impl<T: FrameBytes + ?Sized> FrameBytes for &T {
    fn frame_parts(&self) -> (&[u8], Option<&Bytes>) {
        (**self).frame_parts()
    }
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
    // DAG-CBOR writes the key "seq" as one head byte and three bytes of text; a longer
    // head (not the shortest form) would put the value elsewhere, so it is refused.
    if body.get(start..start + 4) != Some(&b"\x63seq"[..]) {
        return Err(SyncError::Frame(
            "the body's seq key is not in its shortest form".into(),
        ));
    }
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
    /// becomes `Ok(Frame::Unknown { .. })`. Give it a [`Bytes`] and the `blocks` of a
    /// `#commit` or `#sync` are a view of the same buffer; from a slice they are copied once.
    pub fn decode<B: FrameBytes + ?Sized>(bytes: &B) -> Result<Frame, SyncError> {
        Frame::decode_with(bytes, &Limits::default())
    }

    /// Decodes one frame with the given limits.
    ///
    /// `#commit` and `#sync` bodies are read in one pass that checks them as it goes
    /// (well-formed DAG-CBOR, nesting, the limits, every field's type); nothing but the
    /// strings of the event is copied.
    pub fn decode_with<B: FrameBytes + ?Sized>(
        bytes: &B,
        limits: &Limits,
    ) -> Result<Frame, SyncError> {
        let (bytes, shared) = bytes.frame_parts();
        decode_frame(bytes, shared, limits)
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

fn decode_frame(b: &[u8], shared: Option<&Bytes>, limits: &Limits) -> Result<Frame, SyncError> {
    if b.len() > limits.max_frame_bytes {
        return Err(SyncError::TooLarge {
            what: "frame",
            size: b.len(),
            limit: limits.max_frame_bytes,
        });
    }
    let max_depth = limits.max_depth;
    let mut r = Reader::new(b, "frame header");
    let (mut op, mut t) = (None, None);
    for _ in 0..r.map(1, max_depth)? {
        let key_at = r.pos();
        match r.key()? {
            b"op" if op.is_none() => op = Some(r.int()?),
            b"t" if t.is_none() => t = Some(r.text()?),
            b"op" | b"t" => return Err(r.err(key_at, "duplicate key in the header")),
            _ => r.skip(1, max_depth)?,
        }
    }
    let split = r.pos();
    let body = &b[split..];
    let Some(op) = op else {
        return Err(SyncError::Decode {
            context: "frame header",
            reason: "missing field `op`".into(),
        });
    };
    let blocks_of = |range: std::ops::Range<usize>| -> Bytes {
        match shared {
            Some(frame) => frame.slice(range),
            None => Bytes::copy_from_slice(&b[range]),
        }
    };
    match (op, t) {
        (1, Some("#commit")) => {
            let commit = commit_body(b, split, limits)?;
            Ok(Frame::Commit(Box::new(commit.into_event(blocks_of))))
        }
        (1, Some("#sync")) => {
            let sync = sync_body(b, split, limits)?;
            Ok(Frame::Sync(sync.into_event(blocks_of)))
        }
        (1, Some(t)) => {
            check_body(body, split, limits)?;
            Ok(match t {
                "#identity" => Frame::Identity(body_of(body, "#identity body")?),
                "#account" => Frame::Account(body_of(body, "#account body")?),
                "#info" => Frame::Info(body_of(body, "#info body")?),
                _ => Frame::Unknown { t: t.to_string() },
            })
        }
        (1, None) => {
            check_body(body, split, limits)?;
            Err(SyncError::Frame("message frame without `t`".into()))
        }
        (-1, _) => {
            check_body(body, split, limits)?;
            let err: ErrorBody = body_of(body, "error frame body")?;
            let message = err.message;
            Err(SyncError::Stream(match err.error.as_str() {
                "FutureCursor" => StreamError::FutureCursor { message },
                "ConsumerTooSlow" => StreamError::ConsumerTooSlow { message },
                "OutdatedCursor" => StreamError::OutdatedCursor { message },
                _ => StreamError::Other {
                    error: err.error,
                    message,
                },
            }))
        }
        (op, _) => {
            check_body(body, split, limits)?;
            Err(SyncError::Frame(format!("op is {op}, expected 1 or -1")))
        }
    }
}

/// Checks that `body` is one complete DAG-CBOR item within the nesting limit.
fn check_body(body: &[u8], split: usize, limits: &Limits) -> Result<(), SyncError> {
    let end = cbor::item_end(body, 0, limits.max_depth, "frame body")?;
    if end != body.len() {
        return Err(SyncError::Cbor {
            context: "frame body",
            offset: split + end,
            reason: "trailing bytes after the body",
        });
    }
    Ok(())
}

fn body_of<T: serde::de::DeserializeOwned>(
    body: &[u8],
    context: &'static str,
) -> Result<T, SyncError> {
    serde_ipld_dagcbor::from_slice(body).map_err(|e| SyncError::decode(context, e))
}

#[cold]
#[inline(never)]
fn missing(context: &'static str, field: &'static str) -> SyncError {
    SyncError::Decode {
        context,
        reason: format!("missing field `{field}`"),
    }
}

fn check_blocks(len: usize, limits: &Limits) -> Result<(), SyncError> {
    if len > limits.max_blocks_bytes {
        return Err(SyncError::TooLarge {
            what: "blocks",
            size: len,
            limit: limits.max_blocks_bytes,
        });
    }
    Ok(())
}

/// Stores the value of a map key seen for the first time; a repeated key is an error.
#[inline(always)]
fn once<'a, T>(
    r: &mut Reader<'a>,
    slot: &mut Option<T>,
    key_at: usize,
    read: impl FnOnce(&mut Reader<'a>) -> Result<T, SyncError>,
) -> Result<(), SyncError> {
    if slot.is_some() {
        return Err(r.err(key_at, "duplicate key"));
    }
    *slot = Some(read(r)?);
    Ok(())
}

/// A nullable field: `null` is `None`.
#[inline(always)]
fn nullable<'a, T>(
    r: &mut Reader<'a>,
    read: impl FnOnce(&mut Reader<'a>) -> Result<T, SyncError>,
) -> Result<Option<T>, SyncError> {
    if r.null() {
        Ok(None)
    } else {
        read(r).map(Some)
    }
}

/// A `#commit` body as read, borrowing its strings from the frame.
struct CommitBody<'a> {
    seq: i64,
    repo: &'a str,
    commit: Cid,
    rev: &'a str,
    since: Option<&'a str>,
    blocks: std::ops::Range<usize>,
    ops: Vec<RepoOp>,
    prev_data: Option<Cid>,
    time: &'a str,
    too_big: bool,
}

impl CommitBody<'_> {
    fn into_event(self, blocks: impl FnOnce(std::ops::Range<usize>) -> Bytes) -> CommitEvent {
        CommitEvent {
            seq: self.seq,
            repo: self.repo.to_owned(),
            commit: self.commit,
            rev: self.rev.to_owned(),
            since: self.since.map(str::to_owned),
            blocks: blocks(self.blocks),
            ops: self.ops,
            prev_data: self.prev_data,
            time: self.time.to_owned(),
            too_big: self.too_big,
        }
    }
}

/// Reads the `#commit` body starting at `start` of `frame` (a map, nesting at most 3 deep:
/// body, ops, op) in one pass; offsets and ranges are the frame's.
fn commit_body<'a>(
    frame: &'a [u8],
    start: usize,
    limits: &Limits,
) -> Result<CommitBody<'a>, SyncError> {
    const CONTEXT: &str = "#commit body";
    let max_depth = limits.max_depth;
    let mut r = Reader::at(frame, start, CONTEXT);
    let (mut seq, mut repo, mut commit, mut rev, mut since) = (None, None, None, None, None);
    let (mut blocks, mut ops, mut prev_data, mut time, mut too_big) =
        (None, None, None, None, None);
    for _ in 0..r.map(1, max_depth)? {
        let key_at = r.pos();
        match r.key()? {
            b"seq" => once(&mut r, &mut seq, key_at, Reader::int)?,
            b"repo" => once(&mut r, &mut repo, key_at, Reader::text)?,
            b"commit" => once(&mut r, &mut commit, key_at, Reader::cid)?,
            b"rev" => once(&mut r, &mut rev, key_at, Reader::text)?,
            b"since" => once(&mut r, &mut since, key_at, |r| nullable(r, Reader::text))?,
            b"blocks" => once(&mut r, &mut blocks, key_at, |r| {
                let range = r.bytes()?;
                check_blocks(range.len(), limits)?;
                Ok(range)
            })?,
            b"ops" => once(&mut r, &mut ops, key_at, |r| repo_ops(r, limits))?,
            b"prevData" => once(&mut r, &mut prev_data, key_at, |r| nullable(r, Reader::cid))?,
            b"time" => once(&mut r, &mut time, key_at, Reader::text)?,
            b"tooBig" => once(&mut r, &mut too_big, key_at, Reader::bool)?,
            _ => r.skip(1, max_depth)?,
        }
    }
    if !r.at_end() {
        return Err(r.err(r.pos(), "trailing bytes after the body"));
    }
    Ok(CommitBody {
        seq: seq.ok_or_else(|| missing(CONTEXT, "seq"))?,
        repo: repo.ok_or_else(|| missing(CONTEXT, "repo"))?,
        commit: commit.ok_or_else(|| missing(CONTEXT, "commit"))?,
        rev: rev.ok_or_else(|| missing(CONTEXT, "rev"))?,
        since: since.flatten(),
        blocks: blocks.ok_or_else(|| missing(CONTEXT, "blocks"))?,
        ops: ops.ok_or_else(|| missing(CONTEXT, "ops"))?,
        prev_data: prev_data.flatten(),
        time: time.ok_or_else(|| missing(CONTEXT, "time"))?,
        too_big: too_big.unwrap_or(false),
    })
}

/// Reads `ops`: an array of `{action, path, cid, prev}` maps, at most `limits.max_ops`.
fn repo_ops(r: &mut Reader<'_>, limits: &Limits) -> Result<Vec<RepoOp>, SyncError> {
    const CONTEXT: &str = "#commit op";
    let max_depth = limits.max_depth;
    let count = r.array(2, max_depth)?;
    if count > limits.max_ops {
        return Err(SyncError::TooManyOps {
            count,
            limit: limits.max_ops,
        });
    }
    let mut ops = Vec::with_capacity(count);
    for _ in 0..count {
        let (mut action, mut path, mut cid, mut prev) = (None, None, None, None);
        for _ in 0..r.map(3, max_depth)? {
            let key_at = r.pos();
            match r.key()? {
                b"action" => once(r, &mut action, key_at, |r| {
                    let at = r.pos();
                    // A text string; read as bytes, as a key is.
                    match r.key()? {
                        b"create" => Ok(Action::Create),
                        b"update" => Ok(Action::Update),
                        b"delete" => Ok(Action::Delete),
                        _ => Err(r.err(at, "action is not create, update or delete")),
                    }
                })?,
                b"path" => once(r, &mut path, key_at, Reader::text)?,
                b"cid" => once(r, &mut cid, key_at, |r| nullable(r, Reader::cid))?,
                b"prev" => once(r, &mut prev, key_at, |r| nullable(r, Reader::cid))?,
                _ => r.skip(3, max_depth)?,
            }
        }
        ops.push(RepoOp {
            action: action.ok_or_else(|| missing(CONTEXT, "action"))?,
            path: path.ok_or_else(|| missing(CONTEXT, "path"))?.to_owned(),
            cid: cid.flatten(),
            prev: prev.flatten(),
        });
    }
    Ok(ops)
}

/// A `#sync` body as read, borrowing its strings from the frame.
struct SyncBody<'a> {
    seq: i64,
    did: &'a str,
    blocks: std::ops::Range<usize>,
    rev: &'a str,
    time: &'a str,
}

impl SyncBody<'_> {
    fn into_event(self, blocks: impl FnOnce(std::ops::Range<usize>) -> Bytes) -> SyncEvent {
        SyncEvent {
            seq: self.seq,
            did: self.did.to_owned(),
            blocks: blocks(self.blocks),
            rev: self.rev.to_owned(),
            time: self.time.to_owned(),
        }
    }
}

/// Reads the `#sync` body starting at `start` of `frame` in one pass.
fn sync_body<'a>(
    frame: &'a [u8],
    start: usize,
    limits: &Limits,
) -> Result<SyncBody<'a>, SyncError> {
    const CONTEXT: &str = "#sync body";
    let max_depth = limits.max_depth;
    let mut r = Reader::at(frame, start, CONTEXT);
    let (mut seq, mut did, mut blocks, mut rev, mut time) = (None, None, None, None, None);
    for _ in 0..r.map(1, max_depth)? {
        let key_at = r.pos();
        match r.key()? {
            b"seq" => once(&mut r, &mut seq, key_at, Reader::int)?,
            b"did" => once(&mut r, &mut did, key_at, Reader::text)?,
            b"blocks" => once(&mut r, &mut blocks, key_at, |r| {
                let range = r.bytes()?;
                check_blocks(range.len(), limits)?;
                Ok(range)
            })?,
            b"rev" => once(&mut r, &mut rev, key_at, Reader::text)?,
            b"time" => once(&mut r, &mut time, key_at, Reader::text)?,
            _ => r.skip(1, max_depth)?,
        }
    }
    if !r.at_end() {
        return Err(r.err(r.pos(), "trailing bytes after the body"));
    }
    Ok(SyncBody {
        seq: seq.ok_or_else(|| missing(CONTEXT, "seq"))?,
        did: did.ok_or_else(|| missing(CONTEXT, "did"))?,
        blocks: blocks.ok_or_else(|| missing(CONTEXT, "blocks"))?,
        rev: rev.ok_or_else(|| missing(CONTEXT, "rev"))?,
        time: time.ok_or_else(|| missing(CONTEXT, "time"))?,
    })
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
        // The key "seq" with a longer head than it needs (7a 00 00 00 03): refused, not
        // renumbered over the key's length.
        let mut long_key = Vec::new();
        write_head(&mut long_key, 5, 2);
        write_text(&mut long_key, "did");
        write_text(&mut long_key, "did:plc:abc");
        long_key.extend_from_slice(&[0x7a, 0, 0, 0, 3]);
        long_key.extend_from_slice(b"seq");
        write_head(&mut long_key, 0, 3);
        let long_key = frame(1, Some("#identity"), &long_key);
        assert!(
            matches!(with_seq(&long_key, 9), Err(SyncError::Frame(ref m)) if m.contains("shortest")),
            "{:?}",
            with_seq(&long_key, 9)
        );
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

    use std::collections::BTreeMap;

    use ipld_core::ipld::Ipld;

    use crate::{DAG_CBOR, cid_for, write_car};

    fn text(s: &str) -> Ipld {
        Ipld::String(s.into())
    }

    /// A well-formed `#commit` body (two ops, one of them a delete) with a real CAR slice.
    fn commit_body() -> BTreeMap<String, Ipld> {
        let record = vec![0xa1, 0x61, 0x61, 0x01];
        let record_cid = cid_for(DAG_CBOR, &record);
        let commit = vec![0xa0];
        let commit_cid = cid_for(DAG_CBOR, &commit);
        let car = write_car(commit_cid, [(commit_cid, commit), (record_cid, record)]);
        let op = |action: &str, path: &str, cid: Option<Cid>| {
            Ipld::Map(BTreeMap::from([
                ("action".to_string(), text(action)),
                ("path".to_string(), text(path)),
                ("cid".to_string(), cid.map_or(Ipld::Null, Ipld::Link)),
            ]))
        };
        BTreeMap::from([
            ("seq".to_string(), Ipld::Integer(42)),
            ("repo".to_string(), text("did:plc:abc")),
            ("commit".to_string(), Ipld::Link(commit_cid)),
            ("rev".to_string(), text("3kabcdefghij2")),
            ("since".to_string(), Ipld::Null),
            ("blocks".to_string(), Ipld::Bytes(car)),
            (
                "ops".to_string(),
                Ipld::List(vec![
                    op("create", "agent.comms.task/3k1", Some(record_cid)),
                    op("delete", "agent.comms.task/3k0", None),
                ]),
            ),
            ("prevData".to_string(), Ipld::Null),
            ("time".to_string(), text("2026-12-07T12:00:00.000Z")),
            ("tooBig".to_string(), Ipld::Bool(false)),
            // Fields this crate does not use are skipped.
            ("rebase".to_string(), Ipld::Bool(false)),
            ("blobs".to_string(), Ipld::List(vec![])),
        ])
    }

    fn commit_frame(body: BTreeMap<String, Ipld>) -> Vec<u8> {
        let body = serde_ipld_dagcbor::to_vec(&Ipld::Map(body)).unwrap();
        frame(1, Some("#commit"), &body)
    }

    #[test]
    fn commit_decodes_the_same_from_bytes_and_slices_and_shares_the_buffer() {
        let f = commit_frame(commit_body());
        let Frame::Commit(c) = Frame::decode(&f).unwrap() else {
            panic!("not a commit")
        };
        assert_eq!(
            (c.seq, c.repo.as_str(), c.rev.as_str()),
            (42, "did:plc:abc", "3kabcdefghij2")
        );
        assert_eq!(
            (c.since.as_deref(), c.prev_data, c.too_big),
            (None, None, false)
        );
        assert_eq!(c.ops.len(), 2);
        assert_eq!((c.ops[0].action, c.ops[0].rkey()), (Action::Create, "3k1"));
        assert_eq!((c.ops[1].action, c.ops[1].cid), (Action::Delete, None));
        let car = crate::CarSlice::parse(&c.blocks).unwrap();
        assert_eq!(car.roots(), &[c.commit]);

        let shared = Bytes::from(f.clone());
        let Frame::Commit(from_bytes) = Frame::decode(&shared).unwrap() else {
            panic!("not a commit")
        };
        assert_eq!(from_bytes, c);
        // The CAR slice is a view of the frame's buffer, not a copy.
        let frame_range = shared.as_ptr_range();
        assert!(frame_range.contains(&from_bytes.blocks.as_ptr()));
        assert!(!f.as_ptr_range().contains(&c.blocks.as_ptr()));
    }

    #[test]
    fn commit_with_since_prev_data_and_too_big_decodes() {
        let mut body = commit_body();
        let prev = cid_for(DAG_CBOR, b"\xa0");
        body.insert("since".into(), text("3kabcdefghij1"));
        body.insert("prevData".into(), Ipld::Link(prev));
        body.insert("tooBig".into(), Ipld::Bool(true));
        let Frame::Commit(c) = Frame::decode(&commit_frame(body)).unwrap() else {
            panic!("not a commit")
        };
        assert_eq!(c.since.as_deref(), Some("3kabcdefghij1"));
        assert_eq!((c.prev_data, c.too_big), (Some(prev), true));
        // Absent optional fields are `None`/false, as null ones are.
        let mut body = commit_body();
        for key in ["since", "prevData", "tooBig"] {
            body.remove(key);
        }
        let Frame::Commit(c) = Frame::decode(&commit_frame(body)).unwrap() else {
            panic!("not a commit")
        };
        assert_eq!((c.since, c.prev_data, c.too_big), (None, None, false));
    }

    #[test]
    fn a_commit_missing_a_required_field_names_it() {
        for field in ["seq", "repo", "commit", "rev", "blocks", "ops", "time"] {
            let mut body = commit_body();
            body.remove(field);
            let err = Frame::decode(&commit_frame(body)).unwrap_err();
            assert!(
                matches!(&err, SyncError::Decode { context: "#commit body", reason } if reason.contains(field)),
                "{field}: {err}"
            );
        }
    }

    #[test]
    fn a_commit_field_of_the_wrong_type_is_a_typed_error() {
        for (field, value) in [
            ("seq", text("42")),
            ("repo", Ipld::Integer(1)),
            ("commit", text("bafy")),
            ("rev", Ipld::Null),
            ("since", Ipld::Integer(3)),
            ("blocks", text("car")),
            ("ops", Ipld::Map(BTreeMap::new())),
            ("ops", Ipld::List(vec![text("create")])),
            ("prevData", Ipld::Bytes(vec![0, 1])),
            ("time", Ipld::Bool(true)),
            ("tooBig", Ipld::Integer(1)),
            ("seq", Ipld::Integer(i128::from(u64::MAX))),
        ] {
            let mut body = commit_body();
            body.insert(field.into(), value.clone());
            let err = Frame::decode(&commit_frame(body)).unwrap_err();
            assert!(
                matches!(
                    err,
                    SyncError::Cbor {
                        context: "#commit body",
                        ..
                    }
                ),
                "{field} = {value:?}: {err}"
            );
        }
        let mut body = commit_body();
        let Some(Ipld::List(ops)) = body.get_mut("ops") else {
            unreachable!()
        };
        let Ipld::Map(op) = &mut ops[0] else {
            unreachable!()
        };
        op.insert("action".into(), text("upsert"));
        let err = Frame::decode(&commit_frame(body)).unwrap_err();
        assert!(
            matches!(err, SyncError::Cbor { reason, .. } if reason.contains("action")),
            "{err}"
        );
        let mut body = commit_body();
        let Some(Ipld::List(ops)) = body.get_mut("ops") else {
            unreachable!()
        };
        let Ipld::Map(op) = &mut ops[1] else {
            unreachable!()
        };
        op.remove("path");
        let err = Frame::decode(&commit_frame(body)).unwrap_err();
        assert!(
            matches!(&err, SyncError::Decode { context: "#commit op", reason } if reason.contains("path")),
            "{err}"
        );
    }

    #[test]
    fn a_repeated_key_is_an_error() {
        let body = serde_ipld_dagcbor::to_vec(&Ipld::Map(commit_body())).unwrap();
        // Append a second `seq` entry: bump the map's entry count and add the pair at the end.
        let mut twice = body.clone();
        assert_eq!(twice[0], 0xa0 | 12);
        twice[0] += 1;
        write_text(&mut twice, "seq");
        write_head(&mut twice, 0, 7);
        let err = Frame::decode(&frame(1, Some("#commit"), &twice)).unwrap_err();
        assert!(
            matches!(
                err,
                SyncError::Cbor {
                    reason: "duplicate key",
                    ..
                }
            ),
            "{err}"
        );
        let mut header_twice = frame(1, Some("#commit"), &[]);
        header_twice[0] += 1;
        write_text(&mut header_twice, "op");
        write_head(&mut header_twice, 0, 1);
        header_twice.extend_from_slice(&body);
        assert!(matches!(
            Frame::decode(&header_twice),
            Err(SyncError::Cbor {
                context: "frame header",
                ..
            })
        ));
    }

    #[test]
    fn commit_limits_are_enforced_before_anything_is_built() {
        let f = commit_frame(commit_body());
        let few_ops = Limits {
            max_ops: 1,
            ..Limits::default()
        };
        assert!(matches!(
            Frame::decode_with(&f, &few_ops),
            Err(SyncError::TooManyOps { count: 2, limit: 1 })
        ));
        let small_blocks = Limits {
            max_blocks_bytes: 10,
            ..Limits::default()
        };
        assert!(matches!(
            Frame::decode_with(&f, &small_blocks),
            Err(SyncError::TooLarge { what: "blocks", .. })
        ));
        // Body, ops and op maps nest three deep.
        let shallow = Limits {
            max_depth: 2,
            ..Limits::default()
        };
        assert!(matches!(
            Frame::decode_with(&f, &shallow),
            Err(SyncError::TooDeep { limit: 2, .. })
        ));
        let three = Limits {
            max_depth: 3,
            ..Limits::default()
        };
        assert!(Frame::decode_with(&f, &three).is_ok());
        // An unknown field nesting too deep is caught while it is skipped.
        let mut body = commit_body();
        let nested = |item| Ipld::List(vec![item]);
        body.insert("extra".into(), nested(nested(nested(Ipld::Null))));
        assert!(matches!(
            Frame::decode_with(&commit_frame(body), &three),
            Err(SyncError::TooDeep { limit: 3, .. })
        ));
        // A count no input of this size can hold is refused before allocating for it.
        let mut huge = frame(1, Some("#commit"), &[]);
        write_head(&mut huge, 5, 1);
        write_text(&mut huge, "ops");
        write_head(&mut huge, 4, u64::from(u32::MAX));
        assert!(matches!(Frame::decode(&huge), Err(SyncError::Cbor { .. })));
    }

    #[test]
    fn every_truncation_and_trailing_byte_of_a_commit_is_an_error() {
        let f = commit_frame(commit_body());
        for cut in 0..f.len() {
            assert!(Frame::decode(&f[..cut]).is_err(), "cut {cut}");
            assert!(
                Frame::decode(&Bytes::copy_from_slice(&f[..cut])).is_err(),
                "cut {cut}"
            );
        }
        let mut trailing = f.clone();
        trailing.push(0xf6);
        assert!(matches!(
            Frame::decode(&trailing),
            Err(SyncError::Cbor { reason, .. }) if reason.contains("trailing")
        ));
    }

    #[test]
    fn sync_decodes_from_bytes_sharing_the_buffer() {
        let commit = vec![0xa0];
        let cid = cid_for(DAG_CBOR, &commit);
        let body = Ipld::Map(BTreeMap::from([
            ("seq".to_string(), Ipld::Integer(7)),
            ("did".to_string(), text("did:plc:abc")),
            (
                "blocks".to_string(),
                Ipld::Bytes(write_car(cid, [(cid, commit)])),
            ),
            ("rev".to_string(), text("3kabcdefghij2")),
            ("time".to_string(), text("2026-12-07T12:00:00.000Z")),
        ]));
        let f = Bytes::from(frame(
            1,
            Some("#sync"),
            &serde_ipld_dagcbor::to_vec(&body).unwrap(),
        ));
        let Frame::Sync(s) = Frame::decode(&f).unwrap() else {
            panic!("not a sync")
        };
        assert_eq!(
            (s.seq, s.did.as_str(), s.rev.as_str()),
            (7, "did:plc:abc", "3kabcdefghij2")
        );
        assert!(f.as_ptr_range().contains(&s.blocks.as_ptr()));
        assert_eq!(crate::CarSlice::parse(&s.blocks).unwrap().roots(), &[cid]);
        assert_eq!(Frame::decode(&f[..]).unwrap(), Frame::Sync(s));
        for cut in 0..f.len() {
            assert!(Frame::decode(&f[..cut]).is_err(), "cut {cut}");
        }
        let Ipld::Map(mut missing) = body else {
            unreachable!()
        };
        missing.remove("did");
        let f = frame(
            1,
            Some("#sync"),
            &serde_ipld_dagcbor::to_vec(&missing).unwrap(),
        );
        assert!(matches!(
            Frame::decode(&f),
            Err(SyncError::Decode { context: "#sync body", reason }) if reason.contains("did")
        ));
    }

    #[test]
    fn a_header_without_op_is_a_typed_error() {
        let mut f = Vec::new();
        write_head(&mut f, 5, 1);
        write_text(&mut f, "t");
        write_text(&mut f, "#commit");
        f.extend_from_slice(&map(&[("x", "y")]));
        assert!(matches!(
            Frame::decode(&f),
            Err(SyncError::Decode {
                context: "frame header",
                ..
            })
        ));
        assert!(matches!(
            Frame::decode(&frame(1, None, &map(&[("x", "y")]))),
            Err(SyncError::Frame(_))
        ));
    }
}
