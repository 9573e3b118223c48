//! The one backoff policy of murmur: jittered exponential delays, capped, for reconnects and
//! retries.
//!
//! [`Backoff`] computes delays; the caller owns the loop, the sleep and what counts as worth
//! retrying, or hands a uniform retry to [`Backoff::retry`]. The watcher reconnects and
//! retries handlers with it (re-exported as `murmur_firehose::Backoff`), the writer retries
//! XRPC calls with it (built from `murmur_pds::RetryPolicy`), the agent runtime retries its
//! task-protocol writes with it, and the bus its publishes and acknowledgements.
//!
//! ```
//! use std::time::Duration;
//! use murmur_backoff::Backoff;
//!
//! let backoff = Backoff {
//!     initial: Duration::from_millis(1),
//!     max: Duration::from_millis(4),
//!     factor: 2.0,
//!     max_attempts: Some(5),
//! };
//! let mut failures_left = 2;
//! let mut flaky = || {
//!     if failures_left > 0 {
//!         failures_left -= 1;
//!         Err("busy")
//!     } else {
//!         Ok("done")
//!     }
//! };
//!
//! let mut retries = 0;
//! let outcome = loop {
//!     match flaky() {
//!         Ok(v) => break Ok(v),
//!         Err(e) => match backoff.delay(retries) {
//!             Some(wait) => {
//!                 std::thread::sleep(wait);
//!                 retries += 1;
//!             }
//!             None => break Err(e), // retries used up
//!         },
//!     }
//! };
//! assert_eq!(outcome, Ok("done"));
//! assert_eq!(retries, 2);
//! ```

use std::time::Duration;

/// Jittered exponential backoff ("equal jitter" under an exponentially growing ceiling).
///
/// Retry `n` (0-based) waits a random duration in `[ceiling/2, ceiling]` where
/// `ceiling = min(initial * factor^n, max)`. The half-floor keeps a burst of reconnecting
/// clients spread out without ever retrying immediately.
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    /// Ceiling of the first delay.
    pub initial: Duration,
    /// Largest delay ever returned.
    pub max: Duration,
    /// Growth per attempt (>= 1.0).
    pub factor: f64,
    /// Give up after this many retries (the first try is not one); `None` never gives up.
    pub max_attempts: Option<u32>,
}

impl Default for Backoff {
    /// 200 ms doubling up to 30 s, never giving up: the watcher's reconnect policy.
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(200),
            max: Duration::from_secs(30),
            factor: 2.0,
            max_attempts: None,
        }
    }
}

impl Backoff {
    /// A policy for handler retries: quick, bounded.
    pub fn retries(max_attempts: u32) -> Self {
        Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_secs(5),
            factor: 2.0,
            max_attempts: Some(max_attempts),
        }
    }

    /// Runs `op` until it succeeds or the policy gives up, sleeping the policy's delay between
    /// tries; `on_retry(error, retry, delay)` sees each failure that will be retried (to log
    /// or count it). Returns the last error when the retries are used up. For loops that
    /// retry everything the same way; a caller that tells transient errors from final ones
    /// owns its loop with [`delay`](Self::delay).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")] async fn main() {
    /// use std::time::Duration;
    /// use murmur_backoff::Backoff;
    ///
    /// let backoff = Backoff { initial: Duration::from_millis(1), ..Backoff::retries(3) };
    /// let mut calls = 0;
    /// let outcome: Result<u32, &str> = backoff
    ///     .retry(|| { calls += 1; let n = calls; async move { if n < 3 { Err("busy") } else { Ok(n) } } },
    ///            |_e, _retry, _delay| {})
    ///     .await;
    /// assert_eq!(outcome, Ok(3));
    /// let gave_up: Result<(), &str> = backoff.retry(|| async { Err("down") }, |_, _, _| {}).await;
    /// assert_eq!(gave_up, Err("down"));
    /// # }
    /// ```
    pub async fn retry<T, E, Fut>(
        &self,
        mut op: impl FnMut() -> Fut,
        mut on_retry: impl FnMut(&E, u32, Duration),
    ) -> Result<T, E>
    where
        Fut: std::future::Future<Output = Result<T, E>>,
    {
        let mut retry = 0;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => match self.delay(retry) {
                    Some(delay) => {
                        on_retry(&e, retry, delay);
                        retry += 1;
                        tokio::time::sleep(delay).await;
                    }
                    None => return Err(e),
                },
            }
        }
    }

    /// The delay before retry number `attempt` (0-based), or `None` once attempts are exhausted.
    pub fn delay(&self, attempt: u32) -> Option<Duration> {
        if self.max_attempts.is_some_and(|max| attempt >= max) {
            return None;
        }
        let factor = self.factor.max(1.0).powi(attempt.min(64) as i32);
        let ceiling = (self.initial.as_secs_f64() * factor).min(self.max.as_secs_f64());
        let jittered = ceiling * (0.5 + fastrand::f64() * 0.5);
        Some(Duration::from_secs_f64(jittered))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_jittered_and_capped() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
            factor: 2.0,
            max_attempts: None,
        };
        for attempt in 0..100 {
            let d = b.delay(attempt).unwrap();
            let ceiling = (0.1 * 2f64.powi(attempt.min(64) as i32)).min(1.0);
            assert!(
                d.as_secs_f64() <= ceiling + 1e-9,
                "attempt {attempt}: {d:?}"
            );
            assert!(
                d.as_secs_f64() >= ceiling / 2.0 - 1e-9,
                "attempt {attempt}: {d:?}"
            );
        }
    }

    #[test]
    fn bounded_policy_gives_up() {
        let b = Backoff::retries(3);
        assert!(b.delay(2).is_some());
        assert_eq!(b.delay(3), None);
    }
}
