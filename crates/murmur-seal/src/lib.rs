//! Sealed payloads: a public record, a private payload.
//!
//! Every agent.comms record is public. A payload that must not be is sealed
//! (`agent.comms.defs#sealed`): a random 32-byte content key encrypts it once with
//! ChaCha20-Poly1305, and HPKE (RFC 9180, base mode, DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256, ChaCha20-Poly1305; the `hpke` crate) seals that key to each recipient's
//! X25519 key. Both encryptions take the same associated data: the author's DID, the
//! collection, the field, the scheme and the recipient list (DIDs and key ids). A payload
//! copied into another repo, another record type or another field does not open there, nor
//! does one whose recipient list was edited.
//!
//! What stays public: who wrote it, who it is for, when, its size, and the record it sits in.
//!
//! A file too large for a record is sealed the same way as a blob ([`seal_blob`]): the blob
//! on the PDS holds only the ciphertext, and the record carries an
//! `agent.comms.defs#sealedBlob` envelope (the blob ref and the sealed content keys). The
//! file opens with [`Keyring::open_blob`] once its bytes are fetched and checked against
//! the blob's CID. Public besides the above: the ciphertext's size, the file's plus 16 bytes.
//!
//! ```
//! use murmur_seal::{Context, KeyPair, OpenError, Recipient, seal};
//!
//! let bob = KeyPair::generate().unwrap();
//! let carol = KeyPair::generate().unwrap();
//! let ctx = Context::new("did:plc:alice", "agent.comms.task", "payload");
//! let sealed = seal(b"{\"secret\":1}", &[Recipient::new("did:plc:bob", bob.public_key())], &ctx).unwrap();
//!
//! assert_eq!(bob.open("did:plc:bob", &sealed, &ctx).unwrap(), b"{\"secret\":1}");
//! // Carol is not a recipient.
//! assert!(matches!(carol.open("did:plc:carol", &sealed, &ctx), Err(OpenError::NotForMe { .. })));
//! // The same payload in Mallory's repo does not open.
//! let copied = Context::new("did:plc:mallory", "agent.comms.task", "payload");
//! assert!(matches!(bob.open("did:plc:bob", &sealed, &copied), Err(OpenError::WrongContext)));
//! ```

mod blob;
mod error;
mod keys;
mod scheme;

pub use blob::{BlobKeys, SEALED_BLOB_MIME_TYPE, SEALED_BLOB_TYPE, seal_blob};
pub use error::{Error, OpenError};
pub use keys::{KeyPair, Keyring, PublicKey};
pub use scheme::{Context, Recipient, SCHEME, SEALED_TYPE, seal};

/// The lexicon types of a sealed payload (generated in `murmur-comms`).
pub use murmur_comms::agent::comms::defs::{
    EncryptionKey, EncryptionKeyData, Sealed, SealedBlob, SealedBlobData, SealedData, SealedKey,
    SealedKeyData,
};

/// Unpadded base64url, the encoding of every binary field of a sealed payload.
pub(crate) fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Decodes unpadded base64url; `None` when it is not.
pub(crate) fn unb64(text: &str) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .ok()
}
