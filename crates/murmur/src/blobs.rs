//! Sealed blobs in the Agent: a file sealed for some agents and uploaded as ciphertext, and
//! opening one a record points to (fetched from its author's PDS, checked against its CID).

use std::sync::Arc;

use atrium_api::types::{BlobRef, TypedBlobRef, Unknown};
use murmur_pds::{Cid, Collection, Validate, Writer};
use murmur_seal::{
    Context, Keyring, OpenError, SEALED_BLOB_MIME_TYPE, SEALED_BLOB_TYPE, SealedBlob,
};

use crate::AgentError;
use crate::repos::{RepoError, Repos};
use crate::sealing::KeyDirectory;

/// The largest sealed blob read back: the lexicon's 50 MiB of plaintext and the 16-byte tag.
const MAX_SEALED_BLOB: usize = 50 * 1024 * 1024 + 16;

/// Seals files for other agents and opens the ones sealed for this one
/// (`agent.comms.defs#sealedBlob`). Get it from [`Agent::sealed_blobs`](crate::Agent::sealed_blobs),
/// or in a handler as a `State<SealedBlobs>` argument (every agent puts it in its watcher's
/// state). Cheap to clone.
///
/// The blob on the PDS holds only ciphertext; the record holds the envelope: the blob ref
/// and the file's content key sealed to each recipient. Public: the ciphertext's size (the
/// file's plus 16 bytes), the recipients, when it was written, and the record it sits in.
///
/// ```no_run
/// # async fn demo(alice: murmur::Agent, bob: &str) -> Result<(), murmur::AgentError> {
/// use murmur::comms::Message;
///
/// let report = std::fs::read("report.pdf").unwrap_or_default();
/// let envelope = alice
///     .sealed_blobs()
///     .seal::<Message>(&[bob], "payload", &report)
///     .await?;
/// // Put `envelope` in the `payload` of a message (or the output of a result, ...); Bob
/// // opens it with `blobs.open::<Message>(alice_did, "payload", &envelope)`.
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SealedBlobs {
    did: String,
    writer: Writer,
    keys: Option<Keyring>,
    directory: Arc<KeyDirectory>,
    repos: Arc<Repos>,
}

impl std::fmt::Debug for SealedBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedBlobs")
            .field("did", &self.did)
            .finish_non_exhaustive()
    }
}

impl SealedBlobs {
    pub(crate) fn new(
        writer: Writer,
        keys: Option<Keyring>,
        directory: Arc<KeyDirectory>,
        repos: Arc<Repos>,
    ) -> Self {
        SealedBlobs {
            did: writer.did().to_string(),
            writer,
            keys,
            directory,
            repos,
        }
    }

    /// Seals `file` for `to` (and this agent) as the file of field `field` of a `C` record
    /// of this agent, uploads the ciphertext as a blob (`application/octet-stream`), and
    /// returns the `agent.comms.defs#sealedBlob` envelope to put in that field (an `unknown`
    /// one: a message's payload, a result's output). The envelope opens only there, in this
    /// agent's repo. Keep it in the clear, not inside a `#sealed` payload (such as the output
    /// of a sealed task's result): a PDS keeps only the blobs its records visibly point to.
    ///
    /// Recipients' keys are found as for [`Agent::seal_for`](crate::Agent::seal_for). The
    /// ciphertext must fit the PDS's upload limit ([`murmur_pds::Error::BlobTooLarge`],
    /// through [`AgentError::Write`]); a file over the lexicon's 50 MiB is refused with
    /// [`AgentError::InvalidArgument`] before anything is sealed or uploaded.
    pub async fn seal<C: Collection>(
        &self,
        to: &[&str],
        field: &str,
        file: &[u8],
    ) -> Result<Unknown, AgentError> {
        self.keys.as_ref().ok_or(AgentError::NoKeyring)?;
        check_size(file.len())?;
        let dids: Vec<String> = to.iter().map(|d| d.to_string()).collect();
        let recipients = self.directory.recipients(&dids).await?;
        let ctx = Context::new(&self.did, C::NSID, field);
        let (ciphertext, keys) = murmur_seal::seal_blob(file, &recipients, &ctx)?;
        let blob = self
            .writer
            .upload_blob(ciphertext, SEALED_BLOB_MIME_TYPE)
            .await?;
        crate::sealing::to_typed_unknown(&keys.envelope(blob), SEALED_BLOB_TYPE)
    }

    /// Opens the sealed file `envelope`, found in field `field` of a `C` record of
    /// `author`'s repo: fetches the blob from the author's PDS (`getBlob`, at most the size
    /// its ref declares), checks the bytes against the blob's CID, and opens them with this
    /// agent's keys.
    ///
    /// Errors, none carrying the file: [`AgentError::BlobOpen`] with
    /// [`OpenError::NotForMe`] (said before anything is fetched), [`OpenError::Tampered`]
    /// (the ciphertext, keys or recipient list were changed), [`OpenError::WrongContext`]
    /// (the envelope was copied from another record or repo); [`AgentError::BlobRead`] when
    /// the blob cannot be had intact ([`murmur_pds::Error::BlobMismatch`]: bytes not
    /// matching the CID; [`murmur_pds::Error::BlobNotFound`];
    /// [`murmur_pds::Error::ResponseTooLarge`]); [`AgentError::InvalidArgument`] when
    /// `envelope` is not a `#sealedBlob`.
    pub async fn open<C: Collection>(
        &self,
        author: &str,
        field: &str,
        envelope: &Unknown,
    ) -> Result<Vec<u8>, AgentError> {
        let keys = self.keys.as_ref().ok_or(AgentError::NoKeyring)?;
        let not_sealed_blob = |why: &str| AgentError::InvalidArgument {
            what: "sealed blob envelope",
            message: format!("{why}; expected an {SEALED_BLOB_TYPE} object"),
        };
        let json = serde_json::to_value(envelope).map_err(|_| not_sealed_blob("not JSON"))?;
        if json
            .get("$type")
            .is_some_and(|t| t.as_str() != Some(SEALED_BLOB_TYPE))
        {
            return Err(not_sealed_blob("another $type"));
        }
        let sealed: SealedBlob =
            serde_json::from_value(json).map_err(|_| not_sealed_blob("missing or bad fields"))?;
        if let Err(e) = sealed.validate() {
            return Err(not_sealed_blob(&format!(
                "it breaks the lexicon at {}",
                e.path
            )));
        }
        let (cid, max) = match &sealed.blob {
            BlobRef::Typed(TypedBlobRef::Blob(b)) => (b.r#ref.0, b.size.min(MAX_SEALED_BLOB)),
            BlobRef::Untyped(b) => (
                b.cid
                    .parse::<Cid>()
                    .map_err(|_| not_sealed_blob("its blob's CID does not parse"))?,
                MAX_SEALED_BLOB,
            ),
        };
        let opened = |reason: OpenError| AgentError::BlobOpen {
            did: author.to_string(),
            cid: cid.to_string(),
            reason,
        };
        // Someone else's file is not fetched at all.
        if !sealed.recipients.iter().any(|k| k.did == self.did) {
            return Err(opened(OpenError::NotForMe {
                did: self.did.clone(),
            }));
        }
        let read = |source: murmur_pds::Error| AgentError::BlobRead {
            cid: cid.to_string(),
            source,
        };
        let reader = self.repos.reader_for(author).await.map_err(|e| match e {
            RepoError::Read(source) => read(source),
            other => AgentError::Resolve {
                did: author.to_string(),
                message: other.to_string(),
            },
        })?;
        let ciphertext = reader.get_blob(author, &cid, max).await.map_err(read)?;
        let ctx = Context::new(author, C::NSID, field);
        keys.open_blob(&sealed, &ciphertext, &ctx).map_err(opened)
    }
}

/// Refuses a file whose ciphertext (16 bytes longer) the lexicon's `#sealedBlob` cannot
/// hold, before anything is sealed or uploaded: it could never be opened.
fn check_size(len: usize) -> Result<(), AgentError> {
    if len.saturating_add(16) > MAX_SEALED_BLOB {
        return Err(AgentError::InvalidArgument {
            what: "sealed blob",
            message: format!(
                "the file is {len} bytes; a sealed blob holds at most {} bytes",
                MAX_SEALED_BLOB - 16
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_over_the_lexicons_limit_are_refused_before_sealing() {
        assert!(check_size(0).is_ok());
        assert!(check_size(MAX_SEALED_BLOB - 16).is_ok());
        let error = check_size(MAX_SEALED_BLOB - 15).unwrap_err().to_string();
        assert!(error.contains("at most 52428800 bytes"), "{error}");
    }
}
