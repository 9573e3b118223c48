//! The registry of agents seen on the stream: their profiles and presence.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use murmur_comms::agent::comms::{presence, profile};

/// What the registry knows about one agent.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct AgentInfo {
    /// The agent's DID.
    pub did: String,
    /// Its latest `agent.comms.profile`, if seen.
    pub profile: Option<profile::Record>,
    /// Its latest `agent.comms.presence`, if seen.
    pub presence: Option<presence::Record>,
    /// When the presence stops being valid (createdAt + ttlSeconds).
    pub presence_until: Option<SystemTime>,
    /// Why its account is not active (`takendown`, `suspended`, `deactivated`, `deleted`,
    /// ...), from the last `#account` event; `None` while it is active.
    pub inactive: Option<String>,
}

impl AgentInfo {
    /// Whether the agent counts as live at `now`: an active account with a presence within
    /// its TTL whose state is not `offline`.
    pub fn is_live_at(&self, now: SystemTime) -> bool {
        if self.inactive.is_some() {
            return false;
        }
        match (&self.presence, self.presence_until) {
            (Some(p), Some(until)) => p.state != "offline" && now < until,
            _ => false,
        }
    }

    /// Whether the agent offers `capability` (from its profile).
    pub fn has_capability(&self, capability: &str) -> bool {
        self.profile.as_ref().is_some_and(|p| {
            p.capabilities
                .as_ref()
                .is_some_and(|c| c.iter().any(|x| x == capability))
        })
    }
}

/// Agents seen on the stream, from their `profile` and `presence` records. Cheap to clone;
/// clones share the same table, which the agent's watcher keeps current.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    agents: Arc<RwLock<HashMap<String, AgentInfo>>>,
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry::default()
    }

    /// Records a profile seen on the stream.
    pub(crate) fn observe_profile(&self, did: &str, record: profile::Record) {
        let mut agents = self.agents.write().unwrap_or_else(|e| e.into_inner());
        let info = agents.entry(did.to_string()).or_insert_with(|| AgentInfo {
            did: did.to_string(),
            ..AgentInfo::default()
        });
        info.profile = Some(record);
    }

    /// Records a presence seen on the stream.
    pub(crate) fn observe_presence(&self, did: &str, record: presence::Record) {
        let since = chrono::DateTime::parse_from_rfc3339(&record.created_at)
            .map(SystemTime::from)
            .unwrap_or_else(|_| SystemTime::now());
        let ttl = Duration::from_secs(u64::try_from(record.ttl_seconds).unwrap_or(0));
        let mut agents = self.agents.write().unwrap_or_else(|e| e.into_inner());
        let info = agents.entry(did.to_string()).or_insert_with(|| AgentInfo {
            did: did.to_string(),
            ..AgentInfo::default()
        });
        info.presence_until = Some(since + ttl);
        info.presence = Some(record);
    }

    /// Forgets an agent whose presence was deleted.
    /// Records an `#account` event: an inactive account's agent is offline until it is
    /// active again.
    pub(crate) fn observe_account(&self, did: &str, active: bool, status: Option<&str>) {
        let mut agents = self.agents.write().unwrap_or_else(|e| e.into_inner());
        let info = agents.entry(did.to_string()).or_insert_with(|| AgentInfo {
            did: did.to_string(),
            ..AgentInfo::default()
        });
        info.inactive = (!active).then(|| status.unwrap_or("inactive").to_string());
    }

    pub(crate) fn forget_presence(&self, did: &str) {
        let mut agents = self.agents.write().unwrap_or_else(|e| e.into_inner());
        if let Some(info) = agents.get_mut(did) {
            info.presence = None;
            info.presence_until = None;
        }
    }

    /// One agent, if seen.
    pub fn get(&self, did: &str) -> Option<AgentInfo> {
        self.agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(did)
            .cloned()
    }

    /// Every agent seen, live or not, sorted by DID.
    pub fn all(&self) -> Vec<AgentInfo> {
        let mut all: Vec<AgentInfo> = self
            .agents
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.did.cmp(&b.did));
        all
    }

    /// The agents live now (presence within its TTL, not `offline`), sorted by DID.
    pub fn live(&self) -> Vec<AgentInfo> {
        let now = SystemTime::now();
        self.all()
            .into_iter()
            .filter(|a| a.is_live_at(now))
            .collect()
    }

    /// Live agents offering `capability`.
    pub fn live_with(&self, capability: &str) -> Vec<AgentInfo> {
        self.live()
            .into_iter()
            .filter(|a| a.has_capability(capability))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_inactive_account_is_offline_until_it_is_active_again() {
        let registry = Registry::new();
        let did = "did:plc:example";
        let presence = presence::RecordData {
            state: "idle".into(),
            load: None,
            ttl_seconds: 600,
            active_tasks: None,
            status_text: None,
            created_at: chrono::Utc::now().to_rfc3339(),
        }
        .into_record();
        registry.observe_presence(did, presence);
        assert_eq!(registry.live().len(), 1);
        registry.observe_account(did, false, Some("takendown"));
        assert!(registry.live().is_empty(), "taken down: offline");
        assert_eq!(
            registry.get(did).unwrap().inactive.as_deref(),
            Some("takendown")
        );
        registry.observe_account(did, true, None);
        assert_eq!(
            registry.live().len(),
            1,
            "active again: its presence counts"
        );
    }
}
