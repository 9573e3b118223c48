//! Sealed blobs: a file too large for a record, encrypted once and uploaded as ciphertext,
//! its content key sealed to each recipient as for a `#sealed` payload.

use std::borrow::Cow;

use atrium_api::types::BlobRef;

use crate::scheme::{Envelope, Kind, open_parts, seal_parts};
use crate::{Context, Error, OpenError, Recipient, SCHEME, SealedBlob, SealedBlobData, SealedKey};

/// The `$type` of a sealed blob's envelope placed in a record's `unknown` field.
pub const SEALED_BLOB_TYPE: &str = "agent.comms.defs#sealedBlob";

/// The media type a sealed blob is uploaded with: the blob holds only ciphertext.
pub const SEALED_BLOB_MIME_TYPE: &str = "application/octet-stream";

/// A file's content key sealed to each recipient, waiting for the blob ref of the uploaded
/// ciphertext ([`BlobKeys::envelope`]). Made by [`seal_blob`].
#[derive(Debug, Clone)]
pub struct BlobKeys {
    context: String,
    recipients: Vec<SealedKey>,
}

impl BlobKeys {
    /// The recipients' DIDs, as the envelope will list them.
    pub fn recipients(&self) -> impl Iterator<Item = &str> {
        self.recipients.iter().map(|k| k.did.as_str())
    }

    /// The `agent.comms.defs#sealedBlob` envelope for the ciphertext uploaded as `blob`.
    pub fn envelope(self, blob: BlobRef) -> SealedBlob {
        SealedBlobData {
            scheme: SCHEME.to_string(),
            context: self.context,
            recipients: self.recipients,
            blob,
        }
        .into()
    }
}

/// Seals the file `plaintext` for `recipients` in `ctx`: the ciphertext to upload as a blob
/// (with [`SEALED_BLOB_MIME_TYPE`]; it is 16 bytes longer than the file), and the sealed
/// content keys that, with the uploaded blob's ref, make the envelope.
///
/// The same construction as [`seal`](crate::seal), under its own HPKE info and associated
/// data label: a file's ciphertext never opens as a record payload, nor the reverse.
/// Errors as for [`seal`](crate::seal).
pub fn seal_blob(
    plaintext: &[u8],
    recipients: &[Recipient],
    ctx: &Context,
) -> Result<(Vec<u8>, BlobKeys), Error> {
    let parts = seal_parts(Kind::Blob, plaintext, recipients, ctx)?;
    Ok((
        parts.ciphertext,
        BlobKeys {
            context: parts.context,
            recipients: parts.keys,
        },
    ))
}

/// Opens the file of `sealed`, whose blob's bytes are `ciphertext`, as agent `did`.
pub(crate) fn open(
    did: &str,
    secret_for: impl Fn(&str) -> Option<<crate::keys::Kem as hpke::Kem>::PrivateKey>,
    sealed: &SealedBlobData,
    ciphertext: &[u8],
    ctx: &Context,
) -> Result<Vec<u8>, OpenError> {
    let envelope = Envelope {
        scheme: &sealed.scheme,
        context: &sealed.context,
        recipients: &sealed.recipients,
    };
    open_parts(Kind::Blob, did, secret_for, &envelope, ctx, || {
        Ok(Cow::Borrowed(ciphertext))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyPair;
    use atrium_api::types::{BlobRef, TypedBlobRef};

    fn ctx() -> Context {
        Context::new("did:plc:alice", "agent.comms.result", "output")
    }

    /// A blob ref; opening does not look at it (the bytes are checked against the CID when
    /// they are fetched).
    fn blob_ref(size: usize) -> BlobRef {
        serde_json::from_value(serde_json::json!({
            "$type": "blob",
            "ref": {"$link": "bafkreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"},
            "mimeType": SEALED_BLOB_MIME_TYPE,
            "size": size,
        }))
        .unwrap()
    }

    fn file() -> Vec<u8> {
        (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect()
    }

    fn sealed_for_bob() -> (KeyPair, Vec<u8>, SealedBlob) {
        let bob = KeyPair::generate().unwrap();
        let (ciphertext, keys) = seal_blob(
            &file(),
            &[Recipient::new("did:plc:bob", bob.public_key())],
            &ctx(),
        )
        .unwrap();
        let envelope = keys.envelope(blob_ref(ciphertext.len()));
        (bob, ciphertext, envelope)
    }

    #[test]
    fn a_recipient_opens_the_file_and_the_ciphertext_shows_nothing_of_it() {
        let (bob, ciphertext, envelope) = sealed_for_bob();
        let file = file();
        assert_eq!(ciphertext.len(), file.len() + 16);
        assert!(!ciphertext.windows(64).any(|w| w == &file[..64]));
        assert_eq!(
            bob.open_blob("did:plc:bob", &envelope, &ciphertext, &ctx())
                .unwrap(),
            file
        );
        assert!(murmur_comms::Validate::validate(&envelope).is_ok());
        assert!(matches!(
            envelope.blob,
            BlobRef::Typed(TypedBlobRef::Blob(_))
        ));
    }

    #[test]
    fn another_agent_is_not_a_recipient() {
        let (_, ciphertext, envelope) = sealed_for_bob();
        let carol = KeyPair::generate().unwrap();
        assert_eq!(
            carol.open_blob("did:plc:carol", &envelope, &ciphertext, &ctx()),
            Err(OpenError::NotForMe {
                did: "did:plc:carol".into()
            })
        );
        // Claiming to be bob without bob's key.
        assert!(matches!(
            carol.open_blob("did:plc:bob", &envelope, &ciphertext, &ctx()),
            Err(OpenError::UnknownKey { .. })
        ));
    }

    #[test]
    fn tampered_or_truncated_ciphertext_does_not_open() {
        let (bob, ciphertext, envelope) = sealed_for_bob();
        for at in [0, ciphertext.len() / 2, ciphertext.len() - 1] {
            let mut flipped = ciphertext.clone();
            flipped[at] ^= 0x80;
            assert_eq!(
                bob.open_blob("did:plc:bob", &envelope, &flipped, &ctx()),
                Err(OpenError::Tampered),
                "byte {at}"
            );
        }
        for keep in [ciphertext.len() - 1, ciphertext.len() - 16, 16] {
            assert_eq!(
                bob.open_blob("did:plc:bob", &envelope, &ciphertext[..keep], &ctx()),
                Err(OpenError::Tampered),
                "truncated to {keep}"
            );
        }
        let mut longer = ciphertext.clone();
        longer.push(0);
        assert_eq!(
            bob.open_blob("did:plc:bob", &envelope, &longer, &ctx()),
            Err(OpenError::Tampered)
        );
        assert_eq!(
            bob.open_blob("did:plc:bob", &envelope, &ciphertext[..15], &ctx()),
            Err(OpenError::Malformed("ciphertext is shorter than its tag"))
        );
        // Dropping a recipient from the list changes the associated data.
        let carol = KeyPair::generate().unwrap();
        let (ct2, keys) = seal_blob(
            b"two",
            &[
                Recipient::new("did:plc:bob", bob.public_key()),
                Recipient::new("did:plc:carol", carol.public_key()),
            ],
            &ctx(),
        )
        .unwrap();
        let mut listed = keys.envelope(blob_ref(ct2.len())).data;
        listed.recipients.truncate(1);
        assert_eq!(
            bob.open_blob("did:plc:bob", &listed.into(), &ct2, &ctx()),
            Err(OpenError::Tampered)
        );
    }

    #[test]
    fn a_copy_in_another_context_does_not_open() {
        let (bob, ciphertext, envelope) = sealed_for_bob();
        for other in [
            Context::new("did:plc:mallory", "agent.comms.result", "output"),
            Context::new("did:plc:alice", "agent.comms.message", "output"),
            Context::new("did:plc:alice", "agent.comms.result", "payload"),
        ] {
            assert_eq!(
                bob.open_blob("did:plc:bob", &envelope, &ciphertext, &other),
                Err(OpenError::WrongContext)
            );
            // Rewriting the public context digest gets a copier no further.
            let mut forged = envelope.data.clone();
            forged.context = other.digest(Kind::Blob);
            assert_eq!(
                bob.open_blob("did:plc:bob", &forged.into(), &ciphertext, &other),
                Err(OpenError::Tampered)
            );
        }
    }

    #[test]
    fn a_file_and_a_record_payload_never_open_as_each_other() {
        let bob = KeyPair::generate().unwrap();
        let to_bob = [Recipient::new("did:plc:bob", bob.public_key())];
        // A #sealed payload's parts, presented as a sealed blob in the same context.
        let payload = crate::seal(b"{}", &to_bob, &ctx()).unwrap();
        let as_blob: SealedBlob = SealedBlobData {
            scheme: payload.scheme.clone(),
            context: payload.context.clone(),
            recipients: payload.recipients.clone(),
            blob: blob_ref(18),
        }
        .into();
        let ciphertext = crate::unb64(&payload.ciphertext).unwrap();
        assert_eq!(
            bob.open_blob("did:plc:bob", &as_blob, &ciphertext, &ctx()),
            Err(OpenError::WrongContext)
        );
        // And the other way round, with the context digest rewritten: the AEADs refuse.
        let (ciphertext, keys) = seal_blob(b"{}", &to_bob, &ctx()).unwrap();
        let blob = keys.envelope(blob_ref(ciphertext.len()));
        let as_payload: crate::Sealed = crate::SealedData {
            scheme: blob.scheme.clone(),
            context: ctx().digest(Kind::Payload),
            recipients: blob.recipients.clone(),
            ciphertext: crate::b64(&ciphertext),
        }
        .into();
        assert_eq!(
            bob.open("did:plc:bob", &as_payload, &ctx()),
            Err(OpenError::Tampered)
        );
    }

    #[test]
    fn an_unknown_scheme_is_refused() {
        let (bob, ciphertext, envelope) = sealed_for_bob();
        let mut other = envelope.data.clone();
        other.scheme = "rot13".into();
        assert_eq!(
            bob.open_blob("did:plc:bob", &other.into(), &ciphertext, &ctx()),
            Err(OpenError::UnsupportedScheme("rot13".into()))
        );
    }
}
