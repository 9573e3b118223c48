//! Encryption keys: a key pair, the keyring of one agent (current key first, older ones kept
//! for payloads sealed before a rotation) in a 0600 file, and the public halves as the
//! profile publishes them.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use hpke::{Deserializable, Serializable};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::scheme::{Context, SCHEME};
use crate::{
    EncryptionKey, EncryptionKeyData, Error, OpenError, Sealed, SealedBlob, SealedData, b64, unb64,
};

pub(crate) type Kem = hpke::kem::X25519HkdfSha256;

/// Most keys a keyring keeps (the profile lists at most 8).
const MAX_KEYS: usize = 8;

/// The operating system's random number generator.
pub(crate) mod rng {
    use rand_core::TryRngCore as _;

    /// Fills `out`, or says the OS generator failed.
    pub(crate) fn fill(out: &mut [u8]) -> Result<(), crate::Error> {
        rand_core::OsRng
            .try_fill_bytes(out)
            .map_err(|e| crate::Error::Random(e.to_string()))
    }

    /// The OS generator as HPKE's RNG. `single_shot_seal` draws its ephemeral key from it
    /// and cannot take a fallible one; the content key drawn through [`fill`] just before
    /// has shown the generator works.
    pub(crate) fn os() -> rand_core::UnwrapErr<rand_core::OsRng> {
        rand_core::UnwrapErr(rand_core::OsRng)
    }
}

/// A public encryption key with its id, as an agent's profile lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    id: String,
    bytes: [u8; 32],
}

impl PublicKey {
    /// The key id, named by payloads sealed to this key.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The 32 bytes of the X25519 public key.
    pub fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }

    /// A key from a profile's fields: its id, scheme and unpadded base64url key.
    ///
    /// Errors with [`OpenError::UnsupportedScheme`] or [`OpenError::Malformed`].
    pub fn from_parts(id: &str, scheme: &str, public_key: &str) -> Result<Self, OpenError> {
        if scheme != SCHEME {
            return Err(OpenError::UnsupportedScheme(
                scheme.chars().take(128).collect(),
            ));
        }
        let bytes: [u8; 32] =
            unb64(public_key)
                .and_then(|b| b.try_into().ok())
                .ok_or(OpenError::Malformed(
                    "publicKey is not 32 bytes of base64url",
                ))?;
        if id.is_empty() || id.len() > 64 {
            return Err(OpenError::Malformed("key id is empty or too long"));
        }
        Ok(PublicKey {
            id: id.to_string(),
            bytes,
        })
    }

    /// A key from an `agent.comms.defs#encryptionKey`.
    pub fn from_lexicon(key: &EncryptionKey) -> Result<Self, OpenError> {
        Self::from_parts(&key.id, &key.scheme, &key.public_key)
    }

    /// The `agent.comms.defs#encryptionKey` to publish in a profile.
    pub fn to_lexicon(&self) -> EncryptionKey {
        EncryptionKeyData {
            id: self.id.clone(),
            scheme: SCHEME.to_string(),
            public_key: b64(&self.bytes),
        }
        .into()
    }

    fn of(bytes: [u8; 32]) -> Self {
        PublicKey {
            id: b64(&Sha256::digest(bytes)[..9]),
            bytes,
        }
    }
}

/// An X25519 key pair. Its `Debug` shows the key id only; the secret half is never printed.
#[derive(Clone)]
pub struct KeyPair {
    secret: <Kem as hpke::Kem>::PrivateKey,
    public: PublicKey,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPair")
            .field("id", &self.public.id)
            .field("secret", &"<redacted>")
            .finish()
    }
}

impl KeyPair {
    /// A new key pair from the operating system's random number generator.
    pub fn generate() -> Result<Self, Error> {
        let mut ikm = Zeroizing::new([0u8; 32]);
        rng::fill(ikm.as_mut())?;
        let (secret, public) = <Kem as hpke::Kem>::derive_keypair(ikm.as_ref());
        Ok(KeyPair::from_halves(secret, &public))
    }

    fn from_halves(
        secret: <Kem as hpke::Kem>::PrivateKey,
        public: &<Kem as hpke::Kem>::PublicKey,
    ) -> Self {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&public.to_bytes());
        KeyPair {
            secret,
            public: PublicKey::of(bytes),
        }
    }

    /// A key pair from its 32 secret bytes (e.g. from the application's own secret store).
    pub fn from_secret_bytes(secret: &[u8]) -> Result<Self, Error> {
        let secret =
            <Kem as hpke::Kem>::PrivateKey::from_bytes(secret).map_err(|_| Error::BadSecretKey)?;
        let public = <Kem as hpke::Kem>::sk_to_pk(&secret);
        Ok(KeyPair::from_halves(secret, &public))
    }

    /// The public half, to publish and to seal to.
    pub fn public_key(&self) -> PublicKey {
        self.public.clone()
    }

    /// The key id.
    pub fn id(&self) -> &str {
        &self.public.id
    }

    /// Opens `sealed` as agent `did` with this key alone (see [`Keyring::open`]).
    pub fn open(&self, did: &str, sealed: &Sealed, ctx: &Context) -> Result<Vec<u8>, OpenError> {
        self.open_data(did, &sealed.data, ctx)
    }

    pub(crate) fn open_data(
        &self,
        did: &str,
        sealed: &SealedData,
        ctx: &Context,
    ) -> Result<Vec<u8>, OpenError> {
        crate::scheme::open(
            did,
            |id| (id == self.public.id).then(|| self.secret.clone()),
            sealed,
            ctx,
        )
    }

    /// Opens the file of `sealed`, whose blob holds `ciphertext`, as agent `did` with this
    /// key alone (see [`Keyring::open_blob`]).
    pub fn open_blob(
        &self,
        did: &str,
        sealed: &SealedBlob,
        ciphertext: &[u8],
        ctx: &Context,
    ) -> Result<Vec<u8>, OpenError> {
        crate::blob::open(
            did,
            |id| (id == self.public.id).then(|| self.secret.clone()),
            &sealed.data,
            ciphertext,
            ctx,
        )
    }
}

/// One agent's encryption keys: the current one (sealed to from now on) first, then the
/// ones it replaced, kept so payloads sealed before a rotation still open.
///
/// Stored as a 0600 JSON file beside the session ([`Keyring::load_or_create`]), or built
/// from keys the application keeps itself ([`Keyring::from_keys`]). Clones share the keys,
/// so a [`rotate`](Keyring::rotate) is seen by every clone. `Debug` shows the DID and key
/// ids only.
#[derive(Clone)]
pub struct Keyring {
    inner: Arc<RwLock<Ring>>,
}

struct Ring {
    did: String,
    keys: Vec<KeyPair>,
    path: Option<PathBuf>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ring = self.read();
        f.debug_struct("Keyring")
            .field("did", &ring.did)
            .field(
                "keys",
                &ring.keys.iter().map(KeyPair::id).collect::<Vec<_>>(),
            )
            .field("path", &ring.path)
            .finish()
    }
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    did: String,
    /// Secret keys, unpadded base64url, newest first.
    keys: Vec<Zeroizing<String>>,
}

impl Keyring {
    fn new(ring: Ring) -> Self {
        Keyring {
            inner: Arc::new(RwLock::new(ring)),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Ring> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The keyring of `did` from keys the application keeps (newest first).
    ///
    /// Errors with [`Error::NoKeys`] when `keys` is empty.
    pub fn from_keys(did: impl Into<String>, keys: Vec<KeyPair>) -> Result<Self, Error> {
        if keys.is_empty() {
            return Err(Error::NoKeys);
        }
        Ok(Keyring::new(Ring {
            did: did.into(),
            keys,
            path: None,
        }))
    }

    /// Reads `did`'s keyring from `path`, or makes a new key and writes it there (mode 0600,
    /// atomically) when there is no file.
    ///
    /// Errors: the file is unreadable, not a keyring, readable by others than its owner, or
    /// belongs to another DID.
    pub fn load_or_create(path: impl Into<PathBuf>, did: &str) -> Result<Self, Error> {
        let path = path.into();
        let file_err = |message: String| Error::KeyFile {
            path: path.clone(),
            message,
        };
        match std::fs::read(&path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = std::fs::metadata(&path)
                        .map_err(|e| file_err(format!("cannot stat it: {e}")))?
                        .permissions()
                        .mode();
                    if mode & 0o077 != 0 {
                        return Err(file_err(format!(
                            "others can read it (mode {:o}); run chmod 600 on it",
                            mode & 0o777
                        )));
                    }
                }
                // serde_json's messages can quote a value (`invalid type: string "…"`), which
                // here may be a key: only where the file broke is said.
                let file: KeyFile = serde_json::from_slice(&bytes).map_err(|e| {
                    file_err(format!(
                        "not a murmur keyring (line {}, column {})",
                        e.line(),
                        e.column()
                    ))
                })?;
                if file.did != did {
                    return Err(file_err(format!(
                        "it holds the keys of {}, not of {did}",
                        file.did
                    )));
                }
                let mut keys = Vec::new();
                for text in &file.keys {
                    let secret = Zeroizing::new(
                        unb64(text).ok_or_else(|| file_err("a key is not base64url".into()))?,
                    );
                    keys.push(
                        KeyPair::from_secret_bytes(&secret)
                            .map_err(|_| file_err("a key is not 32 bytes".into()))?,
                    );
                }
                if keys.is_empty() {
                    return Err(file_err(
                        "it holds no key; delete it to make a new one".into(),
                    ));
                }
                Ok(Keyring::new(Ring {
                    did: did.to_string(),
                    keys,
                    path: Some(path),
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let ring = Ring {
                    did: did.to_string(),
                    keys: vec![KeyPair::generate()?],
                    path: Some(path.clone()),
                };
                if ring.write(false)? {
                    Ok(Keyring::new(ring))
                } else {
                    Self::load_or_create(path, did)
                }
            }
            Err(e) => Err(file_err(format!("cannot read it: {e}"))),
        }
    }

    /// Makes a new current key; the old ones stay (up to 8 keys in all, the oldest dropped)
    /// so payloads sealed to them still open. Saved at once when the keyring has a file.
    /// Publish the profile again so others seal to the new key.
    pub fn rotate(&self) -> Result<PublicKey, Error> {
        let key = KeyPair::generate()?;
        let public = key.public_key();
        let mut ring = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let before = ring.keys.clone();
        ring.keys.insert(0, key);
        ring.keys.truncate(MAX_KEYS);
        if let Err(e) = ring.save() {
            ring.keys = before;
            return Err(e);
        }
        Ok(public)
    }

    /// The DID the keys belong to.
    pub fn did(&self) -> String {
        self.read().did.clone()
    }

    /// The key new payloads are sealed to.
    pub fn current(&self) -> PublicKey {
        self.read().keys[0].public_key()
    }

    /// Every public key, newest first, as the profile lists them.
    pub fn public_keys(&self) -> Vec<PublicKey> {
        self.read().keys.iter().map(KeyPair::public_key).collect()
    }

    /// The `encryptionKeys` of the agent's profile.
    pub fn profile_keys(&self) -> Vec<EncryptionKey> {
        self.read()
            .keys
            .iter()
            .map(|k| k.public.to_lexicon())
            .collect()
    }

    /// Opens `sealed` (found in `ctx`) as this keyring's agent.
    pub fn open(&self, sealed: &Sealed, ctx: &Context) -> Result<Vec<u8>, OpenError> {
        let ring = self.read();
        crate::scheme::open(
            &ring.did,
            |id| {
                ring.keys
                    .iter()
                    .find(|k| k.id() == id)
                    .map(|k| k.secret.clone())
            },
            &sealed.data,
            ctx,
        )
    }

    /// Opens the file of `sealed` (found in `ctx`) as this keyring's agent. `ciphertext` is
    /// the blob's bytes, fetched from the author's PDS and checked against the blob's CID
    /// (`murmur_pds::Reader::get_blob` does both). A blob whose bytes were changed, or an
    /// envelope copied from another record or repo, does not open.
    pub fn open_blob(
        &self,
        sealed: &SealedBlob,
        ciphertext: &[u8],
        ctx: &Context,
    ) -> Result<Vec<u8>, OpenError> {
        let ring = self.read();
        crate::blob::open(
            &ring.did,
            |id| {
                ring.keys
                    .iter()
                    .find(|k| k.id() == id)
                    .map(|k| k.secret.clone())
            },
            &sealed.data,
            ciphertext,
            ctx,
        )
    }
}

impl Ring {
    /// Writes the file (mode 0600, atomically), replacing what is there.
    fn save(&self) -> Result<(), Error> {
        self.write(true).map(|_| ())
    }

    /// Writes the file (mode 0600, atomically). With `replace` false, a file already there
    /// (another process made it meanwhile) is kept: `Ok(false)`.
    fn write(&self, replace: bool) -> Result<bool, Error> {
        let Some(path) = &self.path else {
            return Ok(true);
        };
        let file_err = |message: String| Error::KeyFile {
            path: path.clone(),
            message,
        };
        let file = KeyFile {
            did: self.did.clone(),
            keys: self
                .keys
                .iter()
                .map(|k| Zeroizing::new(b64(&k.secret.to_bytes())))
                .collect(),
        };
        let json = Zeroizing::new(
            serde_json::to_vec_pretty(&file)
                .map_err(|e| file_err(format!("cannot encode it: {e}")))?,
        );
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&dir)
            .map_err(|e| file_err(format!("cannot create its directory: {e}")))?;
        let tmp = temp_path(&dir, path);
        let write = || -> std::io::Result<bool> {
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                options.mode(0o600);
            }
            let mut f = options.open(&tmp)?;
            f.write_all(&json)?;
            f.sync_all()?;
            if replace {
                return std::fs::rename(&tmp, path).map(|()| true);
            }
            // A link fails where a file already is, so two processes making the first key
            // at once end with one file, and the slower one reads it.
            let linked = match std::fs::hard_link(&tmp, path) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => false,
                Err(e) => return Err(e),
            };
            std::fs::remove_file(&tmp)?;
            Ok(linked)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            file_err(format!("cannot write it: {e}"))
        })
    }
}

fn temp_path(dir: &Path, path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "keys".into());
    let mut nonce = [0u8; 6];
    let _ = rng::fill(&mut nonce);
    dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        b64(&nonce)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Recipient, seal};

    #[test]
    fn keyring_file_is_0600_reloads_and_rotation_keeps_old_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/keys.json");
        let ring = Keyring::load_or_create(&path, "did:plc:bob").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let ctx = Context::new("did:plc:alice", "agent.comms.task", "payload");
        let old = seal(
            b"old",
            &[Recipient::new("did:plc:bob", ring.current())],
            &ctx,
        )
        .unwrap();
        let first = ring.current();
        let second = ring.rotate().unwrap();
        assert_ne!(first.id(), second.id());
        assert_eq!(ring.current(), second);
        let again = Keyring::load_or_create(&path, "did:plc:bob").unwrap();
        assert_eq!(again.public_keys(), vec![second.clone(), first]);
        assert_eq!(again.open(&old, &ctx).unwrap(), b"old");
        let new = seal(b"new", &[Recipient::new("did:plc:bob", second)], &ctx).unwrap();
        assert_eq!(again.open(&new, &ctx).unwrap(), b"new");

        // Another DID's file, a world-readable file: clear errors, no key in them.
        let err = Keyring::load_or_create(&path, "did:plc:carol").unwrap_err();
        assert!(err.to_string().contains("did:plc:bob"), "{err}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
            let err = Keyring::load_or_create(&path, "did:plc:bob").unwrap_err();
            assert!(err.to_string().contains("chmod 600"), "{err}");
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let file: serde_json::Value = serde_json::from_str(&text).unwrap();
        let secret = file["keys"][0].as_str().unwrap().to_string();
        assert!(!format!("{again:?}").contains(&secret));
        assert!(!format!("{:?}", again.read().keys[0]).contains(&secret));
        assert!(format!("{again:?}").contains(again.current().id()));
    }

    #[test]
    fn processes_making_the_first_key_at_once_share_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        let ids: Vec<String> = std::thread::scope(|s| {
            let makers: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        Keyring::load_or_create(&path, "did:plc:bob")
                            .unwrap()
                            .current()
                            .id()
                            .to_string()
                    })
                })
                .collect();
            makers.into_iter().map(|m| m.join().unwrap()).collect()
        });
        assert!(ids.iter().all(|id| *id == ids[0]), "{ids:?}");
        let on_disk = Keyring::load_or_create(&path, "did:plc:bob").unwrap();
        assert_eq!(on_disk.current().id(), ids[0]);
        // No temporary file is left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn garbage_key_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.json");
        std::fs::write(&path, b"{\"did\":\"did:plc:bob\",\"keys\":[\"AAAA\"]}").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        assert!(matches!(
            Keyring::load_or_create(&path, "did:plc:bob"),
            Err(Error::KeyFile { .. })
        ));
        // A key where a list belongs: serde would quote it; the error does not.
        std::fs::write(
            &path,
            b"{\"did\":\"did:plc:bob\",\"keys\":\"SECRETKEYTEXT\"}",
        )
        .unwrap();
        let err = Keyring::load_or_create(&path, "did:plc:bob").unwrap_err();
        assert!(matches!(err, Error::KeyFile { .. }), "{err}");
        assert!(!err.to_string().contains("SECRETKEYTEXT"), "{err}");
        assert!(!format!("{err:?}").contains("SECRETKEYTEXT"), "{err:?}");
    }

    #[test]
    fn public_keys_round_trip_through_the_lexicon() {
        let k = KeyPair::generate().unwrap();
        let lex = k.public_key().to_lexicon();
        assert!(murmur_comms::Validate::validate(&lex).is_ok());
        assert_eq!(PublicKey::from_lexicon(&lex).unwrap(), k.public_key());
        assert!(PublicKey::from_parts("x", SCHEME, "AAAA").is_err());
        assert!(PublicKey::from_parts("x", "other", &b64(&[9; 32])).is_err());
    }
}
