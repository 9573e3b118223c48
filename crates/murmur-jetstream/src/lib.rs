//! Jetstream's wire, for both ends: the JSON events, the subscriber's options and the filter
//! they make, the `options_update` message, and zstd with Jetstream's own dictionary.
//!
//! [Jetstream](https://github.com/bluesky-social/jetstream) turns the repo event stream into
//! JSON: one event per record operation, with the record as JSON (the atproto data model's
//! JSON form: `{"$link": cid}`, `{"$bytes": base64}`), filtered in the server by collection
//! and DID, with a cursor in unix microseconds. It carries no proofs: the signed commit and
//! the MST path are left behind, so a consumer that needs to know the record is the author's
//! must fetch its proof (`com.atproto.sync.getRecord`) itself.
//!
//! ```
//! use murmur_jetstream::{Event, EventBody, Operation, Options};
//!
//! let line = r#"{"did":"did:plc:eygmaihciaxprqvxpfvl6flk","time_us":1725911162329308,
//!   "kind":"commit","commit":{"rev":"3l3qo2vutsw2b","operation":"create",
//!   "collection":"app.bsky.feed.like","rkey":"3l3qo2vuowo2b",
//!   "record":{"$type":"app.bsky.feed.like","createdAt":"2024-09-09T19:46:02.102Z"},
//!   "cid":"bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcqi"}}"#;
//! let event = Event::from_json(line.as_bytes())?;
//! let EventBody::Commit(commit) = &event.body else { unreachable!() };
//! assert_eq!(commit.operation, Operation::Create);
//! assert_eq!(commit.collection, "app.bsky.feed.like");
//!
//! let mut options = Options::default();
//! options.wanted_collections = vec!["app.bsky.feed.*".into()];
//! options.compress = true;
//! assert!(options.filter()?.matches(&event));
//! assert_eq!(
//!     options.query(),
//!     "wantedCollections=app.bsky.feed.*&compress=true"
//! );
//! # Ok::<(), murmur_jetstream::JetstreamError>(())
//! ```

use std::collections::HashSet;
use std::fmt;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

/// The subscription path of Jetstream's v1 API.
pub const SUBSCRIBE_PATH: &str = "/subscribe";

/// Most collections (or `prefix.*` patterns) one subscriber may ask for, as Jetstream allows.
pub const MAX_WANTED_COLLECTIONS: usize = 100;

/// Most DIDs one subscriber may ask for, as Jetstream allows.
pub const MAX_WANTED_DIDS: usize = 10_000;

/// Most bytes one decompressed event may have when read by [`Decompressor`]: far above any
/// event Jetstream sends (records are at most 1 MB of CBOR), low enough that a hostile peer
/// cannot make us allocate without bound.
pub const MAX_EVENT_BYTES: usize = 8 * 1024 * 1024;

/// Jetstream's zstd dictionary (112,640 bytes; SHA-256 `b8d77b46…f70c`), taken at build time
/// from a published package and checked (see `build.rs`).
pub static ZSTD_DICTIONARY: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/jetstream_zstd_dictionary"));

/// What went wrong reading or building Jetstream's wire.
#[derive(Debug, thiserror::Error)]
pub enum JetstreamError {
    /// An event is not Jetstream's JSON.
    #[error("jetstream event is not valid: {reason}")]
    Event {
        /// What was wrong.
        reason: String,
    },
    /// A subscriber option is not valid.
    #[error("jetstream option {option}: {reason}")]
    Option {
        /// The option's name as in the query (`wantedCollections`, `cursor`, …).
        option: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// A subscriber-sourced message is not one Jetstream knows.
    #[error("jetstream subscriber message is not valid: {reason}")]
    SubscriberMessage {
        /// What was wrong.
        reason: String,
    },
    /// A compressed message does not decompress with Jetstream's dictionary.
    #[error("jetstream message does not decompress: {reason}")]
    Compression {
        /// What was wrong.
        reason: String,
    },
}

fn event_error(reason: impl fmt::Display) -> JetstreamError {
    JetstreamError::Event {
        reason: reason.to_string(),
    }
}

/// One Jetstream event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The repo's DID.
    pub did: String,
    /// When the server took the event in, in unix microseconds: the cursor to resume from.
    pub time_us: i64,
    /// What happened.
    pub body: EventBody,
}

/// What an [`Event`] carries, by its `kind`.
#[derive(Debug, Clone, PartialEq)]
pub enum EventBody {
    /// `kind: "commit"`: one record operation of a commit.
    Commit(Commit),
    /// `kind: "identity"`: the repo's identity (handle, DID document) changed.
    Identity(Identity),
    /// `kind: "account"`: the account's hosting status changed.
    Account(Account),
    /// A kind this crate does not know (Jetstream may add kinds); kept so a reader can skip it.
    Other {
        /// The event's `kind`.
        kind: String,
    },
}

/// A record operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Operation {
    /// The record was created.
    Create,
    /// The record was replaced.
    Update,
    /// The record was deleted.
    Delete,
}

impl Operation {
    /// `create`, `update` or `delete`.
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Update => "update",
            Operation::Delete => "delete",
        }
    }
}

/// A commit event's operation (`commit` in the JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Commit {
    /// The commit's revision (a TID).
    pub rev: String,
    /// What was done to the record.
    pub operation: Operation,
    /// The record's collection (an NSID).
    pub collection: String,
    /// The record's key.
    pub rkey: String,
    /// The record, in the data model's JSON form; absent for deletes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record: Option<serde_json::Value>,
    /// The record's CID; absent for deletes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<String>,
}

/// An identity event (`identity` in the JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// The repo's DID.
    pub did: String,
    /// The handle, when the event names one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    /// The event's sequence number on its upstream.
    pub seq: i64,
    /// When the upstream emitted it (RFC 3339).
    pub time: String,
}

/// An account event (`account` in the JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Account {
    /// Whether the account's repo is served.
    pub active: bool,
    /// The repo's DID.
    pub did: String,
    /// The event's sequence number on its upstream.
    pub seq: i64,
    /// When the upstream emitted it (RFC 3339).
    pub time: String,
    /// Why it is not active (`takendown`, `suspended`, `deleted`, `deactivated`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
}

/// The JSON object, as read; every body optional so an unknown kind is not an error.
#[derive(Deserialize)]
struct WireIn {
    did: String,
    time_us: i64,
    kind: String,
    #[serde(default)]
    commit: Option<Commit>,
    #[serde(default)]
    identity: Option<Identity>,
    #[serde(default)]
    account: Option<Account>,
}

#[derive(Serialize)]
struct WireOut<'a> {
    did: &'a str,
    time_us: i64,
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    commit: Option<&'a Commit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    identity: Option<&'a Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    account: Option<&'a Account>,
}

impl Event {
    /// The event's `kind`.
    pub fn kind(&self) -> &str {
        match &self.body {
            EventBody::Commit(_) => "commit",
            EventBody::Identity(_) => "identity",
            EventBody::Account(_) => "account",
            EventBody::Other { kind } => kind,
        }
    }

    /// The collection of a commit event.
    pub fn collection(&self) -> Option<&str> {
        match &self.body {
            EventBody::Commit(commit) => Some(&commit.collection),
            _ => None,
        }
    }

    /// Reads one event from its JSON. A known kind without its body (`kind: "commit"` and no
    /// `commit`), a create or update without its record or CID, or a delete with one, is an
    /// error.
    pub fn from_json(json: &[u8]) -> Result<Event, JetstreamError> {
        let wire: WireIn = serde_json::from_slice(json).map_err(event_error)?;
        let missing = |field: &str| event_error(format!("a {} event has no `{field}`", wire.kind));
        let body = match wire.kind.as_str() {
            "commit" => {
                let commit = wire.commit.ok_or_else(|| missing("commit"))?;
                let writes = commit.operation != Operation::Delete;
                if writes && (commit.record.is_none() || commit.cid.is_none()) {
                    return Err(event_error(format!(
                        "a {} of {}/{} has no record or no cid",
                        commit.operation.as_str(),
                        commit.collection,
                        commit.rkey
                    )));
                }
                if !writes && (commit.record.is_some() || commit.cid.is_some()) {
                    return Err(event_error(format!(
                        "the delete of {}/{} carries a record",
                        commit.collection, commit.rkey
                    )));
                }
                EventBody::Commit(commit)
            }
            "identity" => EventBody::Identity(wire.identity.ok_or_else(|| missing("identity"))?),
            "account" => EventBody::Account(wire.account.ok_or_else(|| missing("account"))?),
            _ => EventBody::Other { kind: wire.kind },
        };
        Ok(Event {
            did: wire.did,
            time_us: wire.time_us,
            body,
        })
    }

    /// The event's JSON, as Jetstream writes it.
    pub fn to_json(&self) -> Vec<u8> {
        let (commit, identity, account) = match &self.body {
            EventBody::Commit(c) => (Some(c), None, None),
            EventBody::Identity(i) => (None, Some(i), None),
            EventBody::Account(a) => (None, None, Some(a)),
            EventBody::Other { .. } => (None, None, None),
        };
        serde_json::to_vec(&WireOut {
            did: &self.did,
            time_us: self.time_us,
            kind: self.kind(),
            commit,
            identity,
            account,
        })
        .expect("an event's JSON values serialize")
    }
}

/// What a subscriber asks for: the query of `/subscribe`, and (all but `cursor`, `compress`
/// and `requireHello`) the payload of an `options_update`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Options {
    /// Collections wanted, exact NSIDs or prefixes ending in `.*` (`app.bsky.graph.*`); empty
    /// for every collection. Identity and account events are sent whatever this says.
    pub wanted_collections: Vec<String>,
    /// DIDs wanted; empty for every repo.
    pub wanted_dids: Vec<String>,
    /// Start from this time (unix microseconds); `None` for live.
    pub cursor: Option<i64>,
    /// zstd-compress every message with Jetstream's dictionary.
    pub compress: bool,
    /// Send nothing until the subscriber's first `options_update`.
    pub require_hello: bool,
    /// Leave out events larger than this many bytes (0: no limit).
    pub max_message_size_bytes: u64,
}

impl Options {
    /// The query string for `/subscribe` (without the `?`), in Jetstream's parameter names.
    pub fn query(&self) -> String {
        let mut pairs: Vec<String> = Vec::new();
        for c in &self.wanted_collections {
            pairs.push(format!("wantedCollections={}", encode_query_value(c)));
        }
        for d in &self.wanted_dids {
            pairs.push(format!("wantedDids={}", encode_query_value(d)));
        }
        if let Some(cursor) = self.cursor {
            pairs.push(format!("cursor={cursor}"));
        }
        if self.compress {
            pairs.push("compress=true".into());
        }
        if self.require_hello {
            pairs.push("requireHello=true".into());
        }
        if self.max_message_size_bytes > 0 {
            pairs.push(format!(
                "maxMessageSizeBytes={}",
                self.max_message_size_bytes
            ));
        }
        pairs.join("&")
    }

    /// Reads a `/subscribe` query string (percent-encoded, `+` for space; unknown parameters
    /// are ignored, as Jetstream does). The options are checked as [`Options::filter`] does.
    pub fn from_query(query: &str) -> Result<Options, JetstreamError> {
        let mut options = Options::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = decode_query_value(value).ok_or_else(|| JetstreamError::Option {
                option: "query",
                reason: format!("{key}: bad percent-encoding"),
            })?;
            match key {
                "wantedCollections" => options.wanted_collections.push(value),
                "wantedDids" => options.wanted_dids.push(value),
                "cursor" => {
                    options.cursor =
                        Some(value.parse::<i64>().map_err(|_| JetstreamError::Option {
                            option: "cursor",
                            reason: format!("{value:?} is not a unix time in microseconds"),
                        })?)
                }
                "compress" => options.compress = flag(&value),
                "requireHello" => options.require_hello = flag(&value),
                "maxMessageSizeBytes" => {
                    // Negative values mean no limit, as in Jetstream.
                    let size = value.parse::<i64>().map_err(|_| JetstreamError::Option {
                        option: "maxMessageSizeBytes",
                        reason: format!("{value:?} is not an integer"),
                    })?;
                    options.max_message_size_bytes = u64::try_from(size).unwrap_or(0);
                }
                _ => {}
            }
        }
        options.filter()?;
        Ok(options)
    }

    /// The filter these options make. Refused: more than [`MAX_WANTED_COLLECTIONS`]
    /// collections or [`MAX_WANTED_DIDS`] DIDs, a collection that is not an NSID or an NSID
    /// prefix followed by `.*` (`app.bsky.feed.po*` is not one), a DID that is not a DID.
    pub fn filter(&self) -> Result<Filter, JetstreamError> {
        Filter::new(&self.wanted_collections, &self.wanted_dids)
    }

    /// The `options_update` message that sets these options on a live connection (its
    /// collections, DIDs and size limit; the cursor, compression and hello are fixed when the
    /// connection opens).
    pub fn options_update(&self) -> String {
        serde_json::to_string(&SubscriberMessage {
            kind: "options_update".into(),
            payload: Some(UpdatePayload {
                wanted_collections: self.wanted_collections.clone(),
                wanted_dids: self.wanted_dids.clone(),
                max_message_size_bytes: i64::try_from(self.max_message_size_bytes)
                    .unwrap_or(i64::MAX),
            }),
        })
        .expect("strings and integers serialize")
    }

    /// Applies a subscriber-sourced message: an `options_update` replaces the collections,
    /// DIDs and size limit. Anything else, or an update whose options are not valid, is an
    /// error (and leaves these options as they were).
    pub fn apply_subscriber_message(&mut self, text: &[u8]) -> Result<(), JetstreamError> {
        let bad = |reason: String| JetstreamError::SubscriberMessage { reason };
        let message: SubscriberMessage =
            serde_json::from_slice(text).map_err(|e| bad(e.to_string()))?;
        if message.kind != "options_update" {
            return Err(bad(format!("unknown message type {:?}", message.kind)));
        }
        let payload = message
            .payload
            .ok_or_else(|| bad("options_update without a payload".into()))?;
        let mut updated = self.clone();
        updated.wanted_collections = payload.wanted_collections;
        updated.wanted_dids = payload.wanted_dids;
        updated.max_message_size_bytes = u64::try_from(payload.max_message_size_bytes).unwrap_or(0);
        updated.filter()?;
        *self = updated;
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct SubscriberMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    payload: Option<UpdatePayload>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdatePayload {
    #[serde(default)]
    wanted_collections: Vec<String>,
    #[serde(default)]
    wanted_dids: Vec<String>,
    #[serde(default)]
    max_message_size_bytes: i64,
}

/// A flag as Jetstream reads one: on only when it says `true`.
fn flag(value: &str) -> bool {
    value == "true"
}

/// Percent-encodes what a query value may not carry as is (NSIDs, DIDs and `*` pass as they
/// are).
fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:*".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_query_value(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = value.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Which events a subscriber gets: its collections (exact or by prefix) and DIDs. Identity
/// and account events pass the collection filter (they have no collection) and are held to
/// the DID filter.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    collections: HashSet<String>,
    /// Prefixes with their trailing dot (`app.bsky.graph.`).
    prefixes: Vec<String>,
    dids: HashSet<String>,
}

impl Filter {
    /// Builds a filter; see [`Options::filter`] for what is refused.
    pub fn new(collections: &[String], dids: &[String]) -> Result<Filter, JetstreamError> {
        if collections.len() > MAX_WANTED_COLLECTIONS {
            return Err(JetstreamError::Option {
                option: "wantedCollections",
                reason: format!(
                    "{} given, at most {MAX_WANTED_COLLECTIONS}",
                    collections.len()
                ),
            });
        }
        if dids.len() > MAX_WANTED_DIDS {
            return Err(JetstreamError::Option {
                option: "wantedDids",
                reason: format!("{} given, at most {MAX_WANTED_DIDS}", dids.len()),
            });
        }
        let mut filter = Filter::default();
        for c in collections {
            let bad = |why: &str| JetstreamError::Option {
                option: "wantedCollections",
                reason: format!("{c:?} {why}"),
            };
            if let Some(prefix) = c.strip_suffix(".*") {
                if !is_nsid_prefix(prefix) {
                    return Err(bad("is not an NSID prefix followed by .*"));
                }
                filter.prefixes.push(format!("{prefix}."));
            } else if is_nsid(c) {
                filter.collections.insert(c.clone());
            } else {
                return Err(bad("is not an NSID (or an NSID prefix followed by .*)"));
            }
        }
        for d in dids {
            if !is_did(d) {
                return Err(JetstreamError::Option {
                    option: "wantedDids",
                    reason: format!("{d:?} is not a DID"),
                });
            }
            filter.dids.insert(d.clone());
        }
        Ok(filter)
    }

    /// Whether the filter lets every event through.
    pub fn is_everything(&self) -> bool {
        self.collections.is_empty() && self.prefixes.is_empty() && self.dids.is_empty()
    }

    /// Whether events of `did` pass the DID filter.
    pub fn wants_did(&self, did: &str) -> bool {
        self.dids.is_empty() || self.dids.contains(did)
    }

    /// Whether records of `collection` pass the collection filter.
    pub fn wants_collection(&self, collection: &str) -> bool {
        (self.collections.is_empty() && self.prefixes.is_empty())
            || self.collections.contains(collection)
            || self.prefixes.iter().any(|p| collection.starts_with(p))
    }

    /// Whether `event` passes.
    pub fn matches(&self, event: &Event) -> bool {
        self.wants_did(&event.did)
            && event
                .collection()
                .is_none_or(|collection| self.wants_collection(collection))
    }
}

/// An NSID: at least three dot-separated segments, ASCII letters, digits and hyphens, the last
/// segment letters and digits only.
fn is_nsid(s: &str) -> bool {
    let segments: Vec<&str> = s.split('.').collect();
    s.len() <= 317
        && segments.len() >= 3
        && segments[..segments.len() - 1]
            .iter()
            .all(|seg| is_segment(seg, true))
        && segments.last().is_some_and(|seg| {
            is_segment(seg, false) && !seg.starts_with(|c: char| c.is_ascii_digit())
        })
}

/// The part of an NSID before `.*`: at least two segments (`app.bsky`), each valid.
fn is_nsid_prefix(s: &str) -> bool {
    let segments: Vec<&str> = s.split('.').collect();
    s.len() <= 317 && segments.len() >= 2 && segments.iter().all(|seg| is_segment(seg, true))
}

fn is_segment(seg: &str, hyphens: bool) -> bool {
    !seg.is_empty()
        && seg.len() <= 63
        && seg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || (hyphens && b == b'-'))
        && !seg.starts_with('-')
        && !seg.ends_with('-')
}

/// `did:method:identifier`, as the atproto DID syntax allows.
fn is_did(s: &str) -> bool {
    let mut parts = s.splitn(3, ':');
    let (Some("did"), Some(method), Some(rest)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    s.len() <= 2048
        && !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_lowercase())
        && !rest.is_empty()
        && !rest.ends_with(':')
        && !rest.ends_with('%')
        && rest
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:%-".contains(&b))
}

/// The dictionary, digested once for compression and shared by every [`Compressor`].
fn encoder_dictionary() -> &'static zstd::dict::EncoderDictionary<'static> {
    static DICTIONARY: OnceLock<zstd::dict::EncoderDictionary<'static>> = OnceLock::new();
    DICTIONARY.get_or_init(|| {
        zstd::dict::EncoderDictionary::copy(ZSTD_DICTIONARY, zstd::DEFAULT_COMPRESSION_LEVEL)
    })
}

/// The dictionary, digested once for decompression and shared by every [`Decompressor`].
fn decoder_dictionary() -> &'static zstd::dict::DecoderDictionary<'static> {
    static DICTIONARY: OnceLock<zstd::dict::DecoderDictionary<'static>> = OnceLock::new();
    DICTIONARY.get_or_init(|| zstd::dict::DecoderDictionary::copy(ZSTD_DICTIONARY))
}

/// Compresses events as Jetstream does: one zstd frame per message, with Jetstream's
/// dictionary, so any Jetstream client that decompresses with it reads them. The dictionary
/// is digested once per process; a compressor holds only its zstd context.
pub struct Compressor {
    inner: zstd::bulk::Compressor<'static>,
}

impl Compressor {
    /// A compressor at zstd's default level.
    pub fn new() -> Compressor {
        let inner = zstd::bulk::Compressor::with_prepared_dictionary(encoder_dictionary())
            .expect("Jetstream's dictionary (checked at build time) loads");
        Compressor { inner }
    }

    /// One message, compressed.
    pub fn compress(&mut self, message: &[u8]) -> Vec<u8> {
        self.inner
            .compress(message)
            .expect("zstd compresses any input into a buffer it sizes")
    }
}

impl Default for Compressor {
    fn default() -> Self {
        Compressor::new()
    }
}

impl fmt::Debug for Compressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Compressor(zstd, Jetstream's dictionary)")
    }
}

/// Decompresses Jetstream's compressed messages (see [`Compressor`]). It keeps one zstd
/// context, reused for every message (a context per message costs more than the message).
pub struct Decompressor {
    context: std::sync::Mutex<zstd::zstd_safe::DCtx<'static>>,
}

impl Decompressor {
    /// A decompressor with Jetstream's dictionary (digested once per process).
    pub fn new() -> Decompressor {
        let mut context = zstd::zstd_safe::DCtx::create();
        context
            .ref_ddict(decoder_dictionary().as_ddict())
            .expect("a fresh context takes Jetstream's dictionary (checked at build time)");
        // A frame may not ask for a window larger than the largest event (8 MiB = 2^23): a
        // hostile one declaring 128 MB would have the context keep that much.
        context
            .set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(23))
            .expect("23 is within zstd's window bounds");
        Decompressor {
            context: std::sync::Mutex::new(context),
        }
    }

    /// One message, decompressed; more than [`MAX_EVENT_BYTES`] is an error, so a hostile
    /// peer cannot make it allocate without bound.
    pub fn decompress(&self, message: &[u8]) -> Result<Vec<u8>, JetstreamError> {
        use zstd::zstd_safe::{InBuffer, OutBuffer, ResetDirective, get_error_name};
        let error = |reason: String| JetstreamError::Compression { reason };
        let zstd_error = |code| error(get_error_name(code).to_string());
        let mut context = self.context.lock().unwrap_or_else(|e| e.into_inner());
        // A message that failed halfway left the context inside its frame.
        context
            .reset(ResetDirective::SessionOnly)
            .map_err(zstd_error)?;
        let limit = MAX_EVENT_BYTES + 1;
        let mut out: Vec<u8> =
            Vec::with_capacity(message.len().saturating_mul(4).clamp(256, limit));
        let mut input = InBuffer::around(message);
        loop {
            let pos = out.len();
            let hint = context
                .decompress_stream(&mut OutBuffer::around_pos(&mut out, pos), &mut input)
                .map_err(zstd_error)?;
            if out.len() > MAX_EVENT_BYTES {
                return Err(error(format!(
                    "it decompresses to more than {MAX_EVENT_BYTES} bytes"
                )));
            }
            let consumed = input.pos() == message.len();
            if hint == 0 && consumed {
                return Ok(out);
            }
            if out.len() < out.capacity() {
                if consumed {
                    return Err(error("the message ends inside a zstd frame".into()));
                }
            } else {
                let room = limit.saturating_sub(out.capacity()).max(1);
                out.reserve_exact(out.capacity().min(room));
            }
        }
    }
}

impl Clone for Decompressor {
    fn clone(&self) -> Self {
        Decompressor::new()
    }
}

impl Default for Decompressor {
    fn default() -> Self {
        Decompressor::new()
    }
}

impl fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Decompressor(zstd, Jetstream's dictionary)")
    }
}

#[cfg(test)]
mod tests;
