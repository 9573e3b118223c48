//! The construction: seal once, a content key per recipient, all bound to the context.

use std::borrow::Cow;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::keys::{Kem, PublicKey, rng};
use crate::{Error, OpenError, Sealed, SealedData, SealedKey, SealedKeyData, b64, unb64};

/// The one scheme this version seals with and opens.
pub const SCHEME: &str = "hpke-x25519-sha256-chacha20poly1305";

/// The `$type` of a sealed payload placed in a record's `unknown` field.
pub const SEALED_TYPE: &str = "agent.comms.defs#sealed";

const MAX_RECIPIENTS: usize = 100;

/// What is sealed: a record's payload (`#sealed`) or a file (`#sealedBlob`). Each kind has its
/// own HPKE `info` and associated-data label, so a ciphertext of one never opens as the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Payload,
    Blob,
}

impl Kind {
    /// HPKE's `info`: what the derived key is for, so it serves nothing else.
    fn info(self) -> &'static [u8] {
        match self {
            Kind::Payload => b"agent.comms.defs#sealed content key",
            Kind::Blob => b"agent.comms.defs#sealedBlob content key",
        }
    }

    /// The associated data's leading label (a version for the encoding below).
    fn label(self) -> &'static [u8] {
        match self {
            Kind::Payload => b"murmur-sealed-v1",
            Kind::Blob => b"murmur-sealed-blob-v1",
        }
    }
}

type HpkeAead = hpke::aead::ChaCha20Poly1305;
type HpkeKdf = hpke::kdf::HkdfSha256;

/// Where a sealed payload lives: the author's DID (the repo), the collection and the field.
/// Sealing and opening must name the same one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Context {
    author: String,
    collection: String,
    field: String,
}

impl Context {
    /// The payload of field `field` of a `collection` record in `author`'s repo.
    pub fn new(
        author: impl Into<String>,
        collection: impl Into<String>,
        field: impl Into<String>,
    ) -> Self {
        Context {
            author: author.into(),
            collection: collection.into(),
            field: field.into(),
        }
    }

    /// The author's DID.
    pub fn author(&self) -> &str {
        &self.author
    }

    /// Length-prefixed, so no two contexts encode alike.
    fn encode(&self, kind: Kind, out: &mut Vec<u8>) {
        put(out, kind.label());
        put(out, self.author.as_bytes());
        put(out, self.collection.as_bytes());
        put(out, self.field.as_bytes());
    }

    /// The public digest stored in the payload: unpadded base64url of SHA-256's first 16 bytes.
    pub(crate) fn digest(&self, kind: Kind) -> String {
        let mut bytes = Vec::new();
        self.encode(kind, &mut bytes);
        b64(&Sha256::digest(&bytes)[..16])
    }

    /// The associated data of both encryptions: context, scheme and recipient list.
    fn aad<'a>(&self, kind: Kind, recipients: impl Iterator<Item = (&'a str, &'a str)>) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(kind, &mut out);
        put(&mut out, SCHEME.as_bytes());
        for (did, key_id) in recipients {
            put(&mut out, did.as_bytes());
            put(&mut out, key_id.as_bytes());
        }
        out
    }
}

fn put(out: &mut Vec<u8>, part: &[u8]) {
    out.extend_from_slice(&(part.len() as u64).to_be_bytes());
    out.extend_from_slice(part);
}

/// One agent a payload is sealed for: its DID and one of its published encryption keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The agent's DID.
    pub did: String,
    /// Its public key (usually the newest of its profile).
    pub key: PublicKey,
}

impl Recipient {
    /// `did`, sealed to through `key`.
    pub fn new(did: impl Into<String>, key: PublicKey) -> Self {
        Recipient {
            did: did.into(),
            key,
        }
    }
}

/// Seals `plaintext` for `recipients` in `ctx`: one content key, sealed to each recipient.
///
/// Errors: no recipients or more than 100, a recipient key HPKE refuses, the system RNG
/// failing. A recipient listed twice (same DID and key id) is sealed to once.
pub fn seal(plaintext: &[u8], recipients: &[Recipient], ctx: &Context) -> Result<Sealed, Error> {
    let parts = seal_parts(Kind::Payload, plaintext, recipients, ctx)?;
    Ok(SealedData {
        scheme: SCHEME.to_string(),
        context: parts.context,
        recipients: parts.keys,
        ciphertext: b64(&parts.ciphertext),
    }
    .into())
}

/// A sealing's output, before it is put in its lexicon type.
pub(crate) struct Parts {
    /// The context digest.
    pub(crate) context: String,
    /// The content key, sealed to each recipient.
    pub(crate) keys: Vec<SealedKey>,
    /// The content with its 16-byte tag.
    pub(crate) ciphertext: Vec<u8>,
}

/// The construction, for either kind: one content key encrypts `plaintext`, HPKE seals
/// that key to each recipient, both under the same associated data.
pub(crate) fn seal_parts(
    kind: Kind,
    plaintext: &[u8],
    recipients: &[Recipient],
    ctx: &Context,
) -> Result<Parts, Error> {
    let mut unique: Vec<&Recipient> = Vec::with_capacity(recipients.len());
    for r in recipients {
        if !unique
            .iter()
            .any(|u| u.did == r.did && u.key.id() == r.key.id())
        {
            unique.push(r);
        }
    }
    if unique.is_empty() {
        return Err(Error::NoRecipients);
    }
    if unique.len() > MAX_RECIPIENTS {
        return Err(Error::TooManyRecipients(unique.len()));
    }
    let aad = ctx.aad(kind, unique.iter().map(|r| (r.did.as_str(), r.key.id())));

    let mut content_key = Zeroizing::new([0u8; 32]);
    rng::fill(content_key.as_mut())?;
    // The content key encrypts exactly one message, so a fixed nonce is safe.
    let cipher = ChaCha20Poly1305::new(Key::from_slice(content_key.as_ref()));
    let ciphertext = cipher
        .encrypt(
            Nonce::from_slice(&[0u8; 12]),
            Payload {
                msg: plaintext,
                aad: &aad,
            },
        )
        .map_err(|_| Error::Random("content encryption failed".into()))?;

    let mut keys = Vec::with_capacity(unique.len());
    for r in unique {
        let bad_key = || Error::BadPublicKey {
            did: r.did.clone(),
            key_id: r.key.id().to_string(),
        };
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(r.key.bytes()).map_err(|_| bad_key())?;
        let (enc, wrapped) = hpke::single_shot_seal::<HpkeAead, HpkeKdf, Kem, _>(
            &OpModeS::Base,
            &pk,
            kind.info(),
            content_key.as_ref(),
            &aad,
            &mut rng::os(),
        )
        .map_err(|_| bad_key())?;
        keys.push(SealedKey::from(SealedKeyData {
            did: r.did.clone(),
            key_id: r.key.id().to_string(),
            enc: b64(&enc.to_bytes()),
            key: b64(&wrapped),
        }));
    }
    Ok(Parts {
        context: ctx.digest(kind),
        keys,
        ciphertext,
    })
}

/// What opening reads of an envelope besides the ciphertext.
pub(crate) struct Envelope<'a> {
    pub(crate) scheme: &'a str,
    pub(crate) context: &'a str,
    pub(crate) recipients: &'a [SealedKey],
}

/// Opens `sealed` as agent `did`, whose secret keys `secret_for` finds by key id.
pub(crate) fn open(
    did: &str,
    secret_for: impl Fn(&str) -> Option<<Kem as hpke::Kem>::PrivateKey>,
    sealed: &SealedData,
    ctx: &Context,
) -> Result<Vec<u8>, OpenError> {
    let envelope = Envelope {
        scheme: &sealed.scheme,
        context: &sealed.context,
        recipients: &sealed.recipients,
    };
    open_parts(Kind::Payload, did, secret_for, &envelope, ctx, || {
        unb64(&sealed.ciphertext)
            .map(Cow::Owned)
            .ok_or(OpenError::Malformed("ciphertext is not base64url"))
    })
}

/// Opens an envelope of either kind as agent `did`. The checks that need no decryption come
/// first (scheme, recipient, key id, context), then the content key, then `ciphertext()`,
/// which is only asked for once the key opened.
pub(crate) fn open_parts<'c>(
    kind: Kind,
    did: &str,
    secret_for: impl Fn(&str) -> Option<<Kem as hpke::Kem>::PrivateKey>,
    sealed: &Envelope<'_>,
    ctx: &Context,
    ciphertext: impl FnOnce() -> Result<Cow<'c, [u8]>, OpenError>,
) -> Result<Vec<u8>, OpenError> {
    if sealed.scheme != SCHEME {
        return Err(OpenError::UnsupportedScheme(
            sealed.scheme.chars().take(128).collect(),
        ));
    }
    let mine: Vec<&SealedKey> = sealed.recipients.iter().filter(|k| k.did == did).collect();
    if mine.is_empty() {
        return Err(OpenError::NotForMe {
            did: did.to_string(),
        });
    }
    let (entry, sk) = mine
        .iter()
        .find_map(|k| secret_for(&k.key_id).map(|sk| (*k, sk)))
        .ok_or_else(|| OpenError::UnknownKey {
            key_id: mine[0].key_id.chars().take(64).collect(),
        })?;
    if sealed.context != ctx.digest(kind) {
        return Err(OpenError::WrongContext);
    }
    let aad = ctx.aad(
        kind,
        sealed
            .recipients
            .iter()
            .map(|k| (k.did.as_str(), k.key_id.as_str())),
    );
    let enc = unb64(&entry.enc).ok_or(OpenError::Malformed("enc is not base64url"))?;
    let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&enc)
        .map_err(|_| OpenError::Malformed("enc is not an X25519 encapsulated key"))?;
    let wrapped = unb64(&entry.key).ok_or(OpenError::Malformed("key is not base64url"))?;
    let content_key = Zeroizing::new(
        hpke::single_shot_open::<HpkeAead, HpkeKdf, Kem>(
            &OpModeR::Base,
            &sk,
            &enc,
            kind.info(),
            &wrapped,
            &aad,
        )
        .map_err(|_| OpenError::Tampered)?,
    );
    if content_key.len() != 32 {
        return Err(OpenError::Tampered);
    }
    let ciphertext = ciphertext()?;
    if ciphertext.len() < 16 {
        return Err(OpenError::Malformed("ciphertext is shorter than its tag"));
    }
    ChaCha20Poly1305::new(Key::from_slice(&content_key))
        .decrypt(
            Nonce::from_slice(&[0u8; 12]),
            Payload {
                msg: &ciphertext,
                aad: &aad,
            },
        )
        .map_err(|_| OpenError::Tampered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::KeyPair;

    fn ctx() -> Context {
        Context::new("did:plc:alice", "agent.comms.task", "payload")
    }

    fn two() -> (KeyPair, KeyPair, Sealed) {
        let bob = KeyPair::generate().unwrap();
        let carol = KeyPair::generate().unwrap();
        let sealed = seal(
            b"the secret",
            &[
                Recipient::new("did:plc:bob", bob.public_key()),
                Recipient::new("did:plc:carol", carol.public_key()),
            ],
            &ctx(),
        )
        .unwrap();
        (bob, carol, sealed)
    }

    #[test]
    fn every_recipient_opens_and_nobody_else() {
        let (bob, carol, sealed) = two();
        assert_eq!(
            bob.open("did:plc:bob", &sealed, &ctx()).unwrap(),
            b"the secret"
        );
        assert_eq!(
            carol.open("did:plc:carol", &sealed, &ctx()).unwrap(),
            b"the secret"
        );
        let dave = KeyPair::generate().unwrap();
        assert_eq!(
            dave.open("did:plc:dave", &sealed, &ctx()),
            Err(OpenError::NotForMe {
                did: "did:plc:dave".into()
            })
        );
        // Claiming to be bob without bob's key: the key id is not dave's.
        assert!(matches!(
            dave.open("did:plc:bob", &sealed, &ctx()),
            Err(OpenError::UnknownKey { .. })
        ));
        let json = serde_json::to_string(&sealed).unwrap();
        assert!(!json.contains("the secret"));
        assert!(sealed.validate_ok());
    }

    trait ValidateOk {
        fn validate_ok(&self) -> bool;
    }
    impl ValidateOk for Sealed {
        fn validate_ok(&self) -> bool {
            murmur_comms::Validate::validate(self).is_ok()
        }
    }

    #[test]
    fn another_context_is_wrong_context() {
        let (bob, _, sealed) = two();
        for other in [
            Context::new("did:plc:mallory", "agent.comms.task", "payload"),
            Context::new("did:plc:alice", "agent.comms.message", "payload"),
            Context::new("did:plc:alice", "agent.comms.task", "title"),
        ] {
            assert_eq!(
                bob.open("did:plc:bob", &sealed, &other),
                Err(OpenError::WrongContext)
            );
        }
        // A copier who also rewrites the context digest gets no further: the AEADs fail.
        let mut forged = sealed.data.clone();
        forged.context =
            Context::new("did:plc:mallory", "agent.comms.task", "payload").digest(Kind::Payload);
        assert_eq!(
            bob.open_data(
                "did:plc:bob",
                &forged,
                &Context::new("did:plc:mallory", "agent.comms.task", "payload"),
            ),
            Err(OpenError::Tampered)
        );
    }

    #[test]
    fn tampering_is_detected() {
        let (bob, _, sealed) = two();
        let flip = |s: &str| {
            let mut bytes = unb64(s).unwrap();
            bytes[0] ^= 1;
            b64(&bytes)
        };
        let mut ct = sealed.data.clone();
        ct.ciphertext = flip(&ct.ciphertext);
        let mut key = sealed.data.clone();
        key.recipients[0].data.key = flip(&key.recipients[0].key);
        let mut enc = sealed.data.clone();
        enc.recipients[0].data.enc = flip(&enc.recipients[0].enc);
        // Dropping carol from the list changes the associated data.
        let mut list = sealed.data.clone();
        list.recipients.truncate(1);
        for (name, data) in [
            ("ciphertext", ct),
            ("key", key),
            ("enc", enc),
            ("list", list),
        ] {
            assert_eq!(
                bob.open_data("did:plc:bob", &data, &ctx()),
                Err(OpenError::Tampered),
                "{name}"
            );
        }
    }

    #[test]
    fn malformed_and_foreign_input_is_an_error_not_a_panic() {
        let (bob, _, sealed) = two();
        let mut scheme = sealed.data.clone();
        scheme.scheme = "rot13".into();
        assert_eq!(
            bob.open_data("did:plc:bob", &scheme, &ctx()),
            Err(OpenError::UnsupportedScheme("rot13".into()))
        );
        let mut b = sealed.data.clone();
        b.ciphertext = "!!".into();
        assert!(matches!(
            bob.open_data("did:plc:bob", &b, &ctx()),
            Err(OpenError::Malformed(_))
        ));
        let mut short = sealed.data.clone();
        short.recipients[0].data.enc = b64(&[1, 2, 3]);
        assert!(matches!(
            bob.open_data("did:plc:bob", &short, &ctx()),
            Err(OpenError::Malformed(_))
        ));
        let mut none = sealed.data.clone();
        none.ciphertext = String::new();
        assert!(matches!(
            bob.open_data("did:plc:bob", &none, &ctx()),
            Err(OpenError::Malformed(_))
        ));
    }

    #[test]
    fn recipients_are_checked() {
        assert!(matches!(seal(b"x", &[], &ctx()), Err(Error::NoRecipients)));
        let k = KeyPair::generate().unwrap();
        let many: Vec<Recipient> = (0..101)
            .map(|i| Recipient::new(format!("did:plc:a{i}"), k.public_key()))
            .collect();
        assert!(matches!(
            seal(b"x", &many, &ctx()),
            Err(Error::TooManyRecipients(101))
        ));
        // A low-order point (all zeros) is refused by HPKE, as an error.
        let zero = PublicKey::from_parts("k0", SCHEME, &b64(&[0u8; 32])).unwrap();
        assert!(matches!(
            seal(b"x", &[Recipient::new("did:plc:z", zero)], &ctx()),
            Err(Error::BadPublicKey { .. })
        ));
        // Duplicates are sealed to once.
        let dup = seal(
            b"x",
            &[
                Recipient::new("did:plc:k", k.public_key()),
                Recipient::new("did:plc:k", k.public_key()),
            ],
            &ctx(),
        )
        .unwrap();
        assert_eq!(dup.recipients.len(), 1);
    }
}
