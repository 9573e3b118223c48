//! One bus message: an op, its record and its proof, or a repo event, or a gap; DAG-CBOR.

use std::sync::Arc;

use murmur_firehose::{Action, Gap, GapKind, OpData, RepoEvent};
use murmur_sync::Cid;
use serde::{Deserialize, Serialize};

use crate::BusError;

/// The wire format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// What a message says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageKind {
    /// A record op (create, update, delete) with its proof.
    Op,
    /// An `#identity` event.
    Identity,
    /// An `#account` event.
    Account,
    /// A gap the hub saw on one of its sources.
    Gap,
}

/// One message on the bus, as published by the hub (DAG-CBOR map).
///
/// A record op is self-contained: `proof` is a CAR shaped like
/// `com.atproto.sync.getRecord`'s answer (the signed commit at its root, the MST nodes on the
/// path to the record, the record block), so a consumer verifies it with the author's key
/// alone, trusting neither the hub nor NATS. When a message would not fit the server's
/// `max_payload` (a record near 1 MiB) or the hub could not cut a proof from the commit (a
/// `tooBig` commit), `record` and `proof` are absent and a verifying consumer fetches the
/// proof from the author's PDS instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct BusMessage {
    /// [`FORMAT_VERSION`].
    pub v: u32,
    /// What it is.
    pub kind: MessageKind,
    /// The source (PDS or relay URL) the hub read it from.
    pub source: String,
    /// Its seq on that source.
    pub seq: i64,
    /// The repo DID (empty for a gap).
    pub did: String,
    /// The commit rev (for repo events, the event time).
    pub rev: String,
    /// The commit (or event) time, RFC 3339.
    pub time: String,
    /// `create`, `update` or `delete` (ops).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// `collection/rkey` (ops), `#identity/{seq}` or `#account/{seq}` (repo events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The record's CID after the op (creates and updates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cid: Option<Cid>,
    /// The record's CID before the op, as the commit said (not covered by the proof).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev: Option<Cid>,
    /// The record, DAG-CBOR.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_bytes")]
    pub record: Option<Vec<u8>>,
    /// The op's proof (a CAR), see above.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "opt_bytes")]
    pub proof: Option<Vec<u8>>,
    /// `#identity`: the handle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle: Option<String>,
    /// `#account`: whether the account is active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active: Option<bool>,
    /// `#account`: its status when not active.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// A gap: its kind (`outdated-cursor`, `future-cursor`, `seq-regression`, `chain-break`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gap: Option<String>,
    /// A gap: details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

mod opt_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(bytes) => s.serialize_bytes(bytes),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Ok(Option::<serde_bytes::ByteBuf>::deserialize(d)?.map(|b| b.into_vec()))
    }
}

impl BusMessage {
    fn empty(kind: MessageKind, source: &str, seq: i64, did: &str, rev: &str, time: &str) -> Self {
        BusMessage {
            v: FORMAT_VERSION,
            kind,
            source: source.to_string(),
            seq,
            did: did.to_string(),
            rev: rev.to_string(),
            time: time.to_string(),
            action: None,
            path: None,
            cid: None,
            prev: None,
            record: None,
            proof: None,
            handle: None,
            active: None,
            status: None,
            gap: None,
            detail: None,
        }
    }

    /// The message for an op or repo event the hub's watcher delivered, with the op's proof.
    pub fn from_op(op: &OpData, proof: Option<Vec<u8>>) -> Self {
        match &op.repo_event {
            Some(RepoEvent::Identity { handle }) => BusMessage {
                path: Some(op.path.clone()),
                handle: handle.clone(),
                ..Self::empty(
                    MessageKind::Identity,
                    &op.source,
                    op.seq,
                    &op.did,
                    &op.rev,
                    &op.time,
                )
            },
            Some(RepoEvent::Account { active, status }) => BusMessage {
                path: Some(op.path.clone()),
                active: Some(*active),
                status: status.clone(),
                ..Self::empty(
                    MessageKind::Account,
                    &op.source,
                    op.seq,
                    &op.did,
                    &op.rev,
                    &op.time,
                )
            },
            // A variant added later is published as what it is not: never. Treat it as an op
            // without proof so consumers fetch it.
            _ => BusMessage {
                action: Some(op.action.as_str().to_string()),
                path: Some(op.path.clone()),
                cid: op.cid,
                prev: op.prev,
                record: proof.as_ref().and(op.record.clone()),
                proof,
                ..Self::empty(
                    MessageKind::Op,
                    &op.source,
                    op.seq,
                    &op.did,
                    &op.rev,
                    &op.time,
                )
            },
        }
    }

    /// The message for a gap.
    pub fn from_gap(gap: &Gap) -> Self {
        let kind = match &gap.kind {
            GapKind::OutdatedCursor => "outdated-cursor",
            GapKind::FutureCursor => "future-cursor",
            GapKind::SeqRegression { .. } => "seq-regression",
            GapKind::ChainBreak { .. } => "chain-break",
            GapKind::Upstream { kind } => kind.as_str(),
            _ => "other",
        };
        let did = match &gap.kind {
            GapKind::ChainBreak { did } => did.as_str(),
            _ => "",
        };
        let (seq, detail) = match &gap.kind {
            GapKind::SeqRegression { last, now } => {
                (*now, format!("seq {last} -> {now}: {}", gap.detail))
            }
            _ => (0, gap.detail.clone()),
        };
        BusMessage {
            gap: Some(kind.to_string()),
            detail: Some(detail),
            ..Self::empty(MessageKind::Gap, &gap.source, seq, did, "", "")
        }
    }

    /// The JetStream message id (`Nats-Msg-Id`): the op's idempotency key (did, rev, path),
    /// so the same op published twice (a hub restarted, two hubs) is stored once.
    pub fn msg_id(&self) -> String {
        match self.kind {
            MessageKind::Gap => format!(
                "gap {} {} {}",
                self.source,
                self.gap.as_deref().unwrap_or(""),
                self.detail.as_deref().unwrap_or("")
            ),
            _ => format!(
                "{} {} {}",
                self.did,
                self.rev,
                self.path.as_deref().unwrap_or("")
            ),
        }
    }

    /// DAG-CBOR bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_ipld_dagcbor::to_vec(self).expect("a bus message always encodes")
    }

    /// Reads a message; a typed error says what is wrong with it.
    pub fn decode(bytes: &[u8]) -> Result<BusMessage, BusError> {
        let message: BusMessage =
            serde_ipld_dagcbor::from_slice(bytes).map_err(|e| BusError::Message {
                reason: format!("not a bus message (DAG-CBOR): {e}"),
            })?;
        if message.v != FORMAT_VERSION {
            return Err(BusError::Message {
                reason: format!(
                    "format version {} (this build reads {FORMAT_VERSION})",
                    message.v
                ),
            });
        }
        Ok(message)
    }

    /// The op or repo event as the watcher's [`OpData`] (record and proof included as they
    /// are: not verified here). `Err` for a gap or a malformed op.
    pub fn to_op_data(&self, source: &str) -> Result<OpData, BusError> {
        let bad = |reason: &str| BusError::Message {
            reason: format!("{} of {}: {reason}", self.kind_name(), self.did),
        };
        if self.did.is_empty() {
            return Err(bad("no DID"));
        }
        let data = match self.kind {
            MessageKind::Op => {
                let action = match self.action.as_deref() {
                    Some("create") => Action::Create,
                    Some("update") => Action::Update,
                    Some("delete") => Action::Delete,
                    other => return Err(bad(&format!("action {other:?}"))),
                };
                let path = self.path.clone().ok_or_else(|| bad("no path"))?;
                if !path.contains('/') || path.starts_with('#') {
                    return Err(bad(&format!("path {path:?} is not collection/rkey")));
                }
                let mut data = OpData::new(
                    source, &self.did, &self.rev, self.seq, &self.time, action, path,
                )
                .with_prev(self.prev);
                match (action, self.cid) {
                    (Action::Delete, _) => {}
                    (_, Some(cid)) => data = data.with_record(cid, self.record.clone()),
                    (_, None) => return Err(bad("a create or update without a cid")),
                }
                data.proof = self.proof.as_deref().map(Arc::from);
                data
            }
            MessageKind::Identity => OpData::repo_event(
                source,
                &self.did,
                self.seq,
                &self.time,
                RepoEvent::Identity {
                    handle: self.handle.clone(),
                },
            ),
            MessageKind::Account => OpData::repo_event(
                source,
                &self.did,
                self.seq,
                &self.time,
                RepoEvent::Account {
                    active: self.active.ok_or_else(|| bad("no active flag"))?,
                    status: self.status.clone(),
                },
            ),
            MessageKind::Gap => return Err(bad("a gap is not an op")),
        };
        Ok(data)
    }

    /// The gap a gap message reports.
    pub fn to_gap(&self) -> Option<Gap> {
        if self.kind != MessageKind::Gap {
            return None;
        }
        let detail = self.detail.clone().unwrap_or_default();
        let kind = match self.gap.as_deref() {
            Some("outdated-cursor") => GapKind::OutdatedCursor,
            Some("future-cursor") => GapKind::FutureCursor,
            Some("chain-break") if !self.did.is_empty() => GapKind::ChainBreak {
                did: self.did.clone(),
            },
            _ => GapKind::Upstream {
                kind: self.gap.clone().unwrap_or_default(),
            },
        };
        Some(Gap {
            source: self.source.clone(),
            kind,
            detail,
        })
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            MessageKind::Op => "op",
            MessageKind::Identity => "#identity",
            MessageKind::Account => "#account",
            MessageKind::Gap => "gap",
        }
    }
}
