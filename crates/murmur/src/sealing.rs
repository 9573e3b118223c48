//! Sealed payloads in the Agent: other agents' encryption keys (from their profiles, the
//! stream's copy first, else read from their repo and cached), and sealing a JSON value for
//! a set of DIDs in a field of this agent's records.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use murmur_comms::Profile;
use murmur_seal::{Context, Keyring, PublicKey, Recipient};

use crate::AgentError;
use crate::lock;
use crate::registry::Registry;
use crate::repos::Repos;

/// How long a profile read from a repo (not seen on the stream) is trusted for its keys.
const FETCHED_TTL: Duration = Duration::from_secs(60);

/// Finds the encryption keys of agents and seals payloads to them.
pub(crate) struct KeyDirectory {
    did: String,
    own: Option<Keyring>,
    registry: Registry,
    repos: Arc<Repos>,
    fetched: Mutex<HashMap<String, (Instant, PublicKey)>>,
}

impl KeyDirectory {
    pub(crate) fn new(
        did: &str,
        own: Option<Keyring>,
        registry: Registry,
        repos: Arc<Repos>,
    ) -> Arc<Self> {
        Arc::new(KeyDirectory {
            did: did.to_string(),
            own,
            registry,
            repos,
            fetched: Mutex::new(HashMap::new()),
        })
    }

    /// The key to seal to for `did`: this agent's current key; else the newest key of the
    /// profile seen on the stream (so a rotation is followed as soon as its profile arrives);
    /// else the newest key of the profile read from `did`'s repo, cached for a minute.
    pub(crate) async fn key_of(&self, did: &str) -> Result<PublicKey, AgentError> {
        if did == self.did {
            return self
                .own
                .as_ref()
                .map(Keyring::current)
                .ok_or(AgentError::NoKeyring);
        }
        let no_key = |reason: String| AgentError::NoEncryptionKey {
            did: did.to_string(),
            reason,
        };
        if let Some(profile) = self.registry.get(did).and_then(|a| a.profile)
            && let Some(key) = profile.encryption_keys.as_ref().and_then(|k| k.first())
        {
            return PublicKey::from_lexicon(key).map_err(|e| no_key(e.to_string()));
        }
        if let Some((at, key)) = lock(&self.fetched).get(did)
            && at.elapsed() < FETCHED_TTL
        {
            return Ok(key.clone());
        }
        let stored = self
            .repos
            .get::<Profile>(did, "self")
            .await
            .map_err(|e| no_key(format!("its profile could not be read: {e}")))?
            .ok_or_else(|| no_key("it has no agent.comms.profile".into()))?;
        let key = stored
            .value
            .encryption_keys
            .as_ref()
            .and_then(|k| k.first())
            .ok_or_else(|| no_key("its profile lists no encryptionKeys".into()))?;
        let key = PublicKey::from_lexicon(key).map_err(|e| no_key(e.to_string()))?;
        lock(&self.fetched).insert(did.to_string(), (Instant::now(), key.clone()));
        Ok(key)
    }

    /// This agent and `dids`, each once, with the keys to seal to.
    pub(crate) async fn recipients(&self, dids: &[String]) -> Result<Vec<Recipient>, AgentError> {
        let mut recipients = vec![Recipient::new(&self.did, self.key_of(&self.did).await?)];
        for did in dids {
            if recipients.iter().all(|r| &r.did != did) {
                recipients.push(Recipient::new(did, self.key_of(did).await?));
            }
        }
        Ok(recipients)
    }

    /// Seals `value` for `dids` and this agent, as field `field` of a `collection` record
    /// of this agent's repo: the `agent.comms.defs#sealed` object to put in that field.
    pub(crate) async fn seal_json(
        &self,
        value: &serde_json::Value,
        dids: &[String],
        collection: &str,
        field: &str,
    ) -> Result<atrium_api::types::Unknown, AgentError> {
        let recipients = self.recipients(dids).await?;
        let plaintext = serde_json::to_vec(value).map_err(|e| AgentError::InvalidArgument {
            what: "sealed payload",
            message: e.to_string(),
        })?;
        let ctx = Context::new(&self.did, collection, field);
        let sealed = murmur_seal::seal(&plaintext, &recipients, &ctx)?;
        to_typed_unknown(&sealed, murmur_seal::SEALED_TYPE)
    }
}

/// A sealed envelope as the `unknown` field value it goes in: its JSON with `$type` set.
pub(crate) fn to_typed_unknown(
    envelope: &impl serde::Serialize,
    type_name: &str,
) -> Result<atrium_api::types::Unknown, AgentError> {
    let invalid = |e: serde_json::Error| AgentError::InvalidArgument {
        what: "sealed payload",
        message: e.to_string(),
    };
    let mut json = serde_json::to_value(envelope).map_err(invalid)?;
    if let Some(obj) = json.as_object_mut() {
        obj.insert("$type".into(), type_name.into());
    }
    serde_json::from_value(json).map_err(invalid)
}
