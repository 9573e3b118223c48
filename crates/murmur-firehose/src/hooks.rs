//! The application's hooks: what the watcher calls besides handlers.

use std::sync::Arc;

use crate::{Gap, Rejected, Rejection, WatchError};

/// Called with every gap: events the application may have missed.
pub type GapHook = Arc<dyn Fn(&Gap) + Send + Sync>;

/// Called with every [`WatchError`]: trouble handled without losing data.
pub type ErrorHook = Arc<dyn Fn(&WatchError) + Send + Sync>;

/// Called with every op (or `#sync`) that failed verification or lexicon checks.
pub type RejectedHook = Arc<dyn Fn(&Rejected, &Rejection) + Send + Sync>;

/// Called after a [`GapKind::ChainBreak`](crate::GapKind) with the repo of that DID as it is
/// now (fetched with `getRepo` and verified), or with why it could not be fetched.
pub type ResyncHook =
    Arc<dyn Fn(&str, Result<murmur_sync::VerifiedRepo, murmur_sync::SyncError>) + Send + Sync>;
