//! Timestamp identifiers (TIDs), the record keys the writer generates locally. The [`Tid`]
//! type itself (parse, print, parts) is murmur-lexicon's: one TID parser for the workspace.

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::{BuildHasher, Hasher};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub use murmur_lexicon::syntax::Tid;

/// Generates strictly increasing TIDs, even when the system clock steps back.
///
/// Each generator picks a random clock id; the timestamp part is the current time in
/// microseconds, or one more than the last TID's if the clock has not advanced (or went
/// backwards), so keys never repeat and always sort in generation order.
pub struct TidGenerator {
    clock_id: u16,
    last: Mutex<u64>,
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
}

impl fmt::Debug for TidGenerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TidGenerator")
            .field("clock_id", &self.clock_id)
            .finish_non_exhaustive()
    }
}

impl Default for TidGenerator {
    fn default() -> Self {
        TidGenerator::new()
    }
}

impl TidGenerator {
    /// A generator on the system clock with a random clock id.
    pub fn new() -> TidGenerator {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(system_micros());
        TidGenerator::with_clock((h.finish() & 0x3ff) as u16, system_micros)
    }

    /// A generator with a fixed clock id and a custom clock (microseconds since the epoch);
    /// used to test behaviour when the clock steps back.
    pub fn with_clock(
        clock_id: u16,
        clock: impl Fn() -> u64 + Send + Sync + 'static,
    ) -> TidGenerator {
        TidGenerator {
            clock_id: clock_id & 0x3ff,
            last: Mutex::new(0),
            clock: Box::new(clock),
        }
    }

    /// The next TID: strictly greater than every TID this generator returned before.
    pub fn next_tid(&self) -> Tid {
        let now = (self.clock)() & ((1 << 53) - 1);
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let micros = if now > *last { now } else { *last + 1 };
        *last = micros;
        Tid::from_parts(micros, self.clock_id)
    }
}

fn system_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn vectors(name: &str) -> Vec<String> {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/interop")
            .join(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn parses_every_valid_interop_tid_and_round_trips() {
        let valid = vectors("tid_syntax_valid.txt");
        assert!(!valid.is_empty());
        for s in valid {
            let tid: Tid = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(tid.to_string(), s);
        }
    }

    #[test]
    fn rejects_every_invalid_interop_tid() {
        let invalid = vectors("tid_syntax_invalid.txt");
        assert!(!invalid.is_empty());
        for s in invalid {
            assert!(s.parse::<Tid>().is_err(), "{s:?} accepted");
        }
    }

    #[test]
    fn generated_tids_are_valid_syntax_and_strictly_increasing() {
        let tid_gen = TidGenerator::new();
        let mut prev = tid_gen.next_tid();
        for _ in 0..10_000 {
            let next = tid_gen.next_tid();
            assert!(next > prev);
            assert!(
                next.to_string() > prev.to_string(),
                "string order follows value"
            );
            let s = next.to_string();
            assert_eq!(s.parse::<Tid>().unwrap(), next);
            prev = next;
        }
    }

    #[test]
    fn stays_monotonic_when_the_clock_steps_back() {
        let now = Arc::new(AtomicU64::new(1_700_000_000_000_000));
        let clock = now.clone();
        let tid_gen = TidGenerator::with_clock(7, move || clock.load(Ordering::SeqCst));
        let a = tid_gen.next_tid();
        now.store(1_600_000_000_000_000, Ordering::SeqCst); // NTP stepped the clock back
        let b = tid_gen.next_tid();
        let c = tid_gen.next_tid();
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(b.micros(), a.micros() + 1);
        assert_eq!(c.clock_id(), 7);
        now.store(1_800_000_000_000_000, Ordering::SeqCst);
        let d = tid_gen.next_tid();
        assert_eq!(d.micros(), 1_800_000_000_000_000);
    }

    #[test]
    fn generated_tids_carry_the_current_time() {
        let before = system_micros();
        let tid = TidGenerator::new().next_tid();
        let after = system_micros();
        assert!(tid.micros() >= before && tid.micros() <= after + 1);
    }
}
