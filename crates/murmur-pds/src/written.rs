//! What the writer's and reader's calls return: written records, their commits, records read back.

use atrium_api::com::atproto::repo;
use ipld_core::cid::Cid;

/// A commit of the writer's repo: what an agent matches against `#commit` events on the
/// stream (`commit` CID and `rev`) to recognise its own writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitRef {
    /// CID of the commit object.
    pub cid: Cid,
    /// Revision (a TID) of the commit.
    pub rev: String,
}

/// A record the writer created or updated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// `at://did/collection/rkey`.
    pub uri: String,
    /// CID of the record as stored.
    pub cid: Cid,
    /// Record key.
    pub rkey: String,
    /// The commit that carried the write. `None` only when a retried create found its
    /// record already stored by an attempt whose answer was lost.
    pub commit: Option<CommitRef>,
}

impl Written {
    /// The `com.atproto.repo.strongRef` to cite this record from another one.
    pub fn strong_ref(&self) -> repo::strong_ref::Main {
        repo::strong_ref::MainData {
            uri: self.uri.clone(),
            cid: atrium_api::types::string::Cid::new(self.cid),
        }
        .into()
    }
}

/// A record read back from a repo.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<R> {
    /// `at://did/collection/rkey`.
    pub uri: String,
    /// CID of the record.
    pub cid: Cid,
    /// Record key.
    pub rkey: String,
    /// The decoded record.
    pub value: R,
}

/// One page of [`Writer::list`](crate::Writer::list).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<R> {
    /// Records on this page.
    pub records: Vec<Stored<R>>,
    /// Pass to the next call to continue; `None` at the end.
    pub cursor: Option<String>,
}

/// What the PDS says about itself that the writer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerLimits {
    /// Largest blob `uploadBlob` accepts, when the server advertises it.
    pub blob_upload_limit: Option<usize>,
}

/// The [`CommitRef`] of a commit the PDS reported.
pub(crate) fn commit_ref(c: repo::defs::CommitMeta) -> CommitRef {
    CommitRef {
        cid: *c.cid.as_ref(),
        rev: c.data.rev.as_str().to_string(),
    }
}
