//! Each DID's rev chain: the last commit seen, and whether the next one follows it.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cid::Cid;

use crate::SyncError;
use crate::frame::CommitEvent;

/// The last commit seen for a DID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// Its rev.
    pub rev: String,
    /// Its MST root, when it was parsed.
    pub data: Option<Cid>,
}

/// Decodes a 13-character TID into microseconds since the Unix epoch (murmur-lexicon's
/// [`Tid`](murmur_lexicon::syntax::Tid) parser).
pub fn tid_micros(tid: &str) -> Option<u64> {
    tid.parse::<murmur_lexicon::syntax::Tid>()
        .ok()
        .map(|t| t.micros())
}

/// The chain heads of every DID seen, behind one lock.
#[derive(Debug, Default)]
pub(crate) struct Chains(Mutex<HashMap<String, ChainHead>>);

impl Chains {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, ChainHead>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn head(&self, did: &str) -> Option<ChainHead> {
        self.lock().get(did).cloned()
    }

    pub(crate) fn set(&self, did: &str, rev: &str, data: Option<Cid>) {
        let mut chains = self.lock();
        // The usual case, a DID seen before, moves its head in place: no new strings.
        if let Some(head) = chains.get_mut(did) {
            head.rev.replace_range(.., rev);
            head.data = data;
            return;
        }
        chains.insert(
            did.to_string(),
            ChainHead {
                rev: rev.to_string(),
                data,
            },
        );
    }

    pub(crate) fn remove(&self, did: &str) {
        self.lock().remove(did);
    }

    /// Checks rev syntax, future revs and rev order; returns why the chain broke, if it did.
    pub(crate) fn check(
        &self,
        ev: &CommitEvent,
        max_clock_skew: Duration,
    ) -> Result<Option<String>, SyncError> {
        let micros = tid_micros(&ev.rev).ok_or_else(|| SyncError::InvalidRev(ev.rev.clone()))?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as u64;
        let allowed = max_clock_skew.as_micros() as u64;
        if micros > now + allowed {
            return Err(SyncError::FutureRev {
                did: ev.repo.clone(),
                rev: ev.rev.clone(),
                ahead_secs: (micros - now) / 1_000_000,
                allowed_secs: max_clock_skew.as_secs(),
            });
        }
        let chains = self.lock();
        let Some(head) = chains.get(&ev.repo) else {
            return Ok(None);
        };
        if ev.rev <= head.rev {
            return Err(SyncError::RevNotNewer {
                did: ev.repo.clone(),
                rev: ev.rev.clone(),
                last: head.rev.clone(),
            });
        }
        if ev.since.as_deref() != Some(head.rev.as_str()) {
            return Ok(Some(format!(
                "since is {:?} but the last rev seen is {:?}",
                ev.since, head.rev
            )));
        }
        if let (Some(last), Some(prev)) = (head.data, ev.prev_data)
            && last != prev
        {
            return Ok(Some(format!(
                "prevData is {prev} but the last commit's data is {last}"
            )));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tids_decode() {
        assert_eq!(tid_micros("2222222222222"), Some(0));
        assert!(tid_micros("3jzfcijpj2z2a").is_some());
        assert_eq!(tid_micros("zzzzzzzzzzzzz"), None);
        assert_eq!(tid_micros("short"), None);
        assert_eq!(tid_micros("3jzfcijpj2z2!"), None);
    }
}
