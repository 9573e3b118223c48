//! The one backoff policy (from murmur-backoff): jittered, capped exponential delays, used for
//! reconnects and retries.

pub use murmur_backoff::Backoff;
