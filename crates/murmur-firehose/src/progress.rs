//! The low-water mark of one source: the highest seq whose events, and all before it, are done.

use std::collections::VecDeque;

/// Tracks events of one source in arrival (= seq) order until all their ops are handled.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// (seq, ops still running), oldest first.
    pending: VecDeque<(i64, usize)>,
    /// Everything up to and including this seq is done.
    low_water: Option<i64>,
}

impl Progress {
    /// Starts tracking: everything before `cursor` is considered done.
    pub(crate) fn resume_from(cursor: Option<i64>) -> Self {
        Progress {
            pending: VecDeque::new(),
            low_water: cursor,
        }
    }

    /// An event arrived with `ops` ops to run (0 when nothing matched).
    pub(crate) fn begin(&mut self, seq: i64, ops: usize) {
        if self.pending.back().is_some_and(|&(last, _)| seq <= last) {
            // Out-of-order seq from a source: never move backwards; the caller reports the gap.
            return;
        }
        self.pending.push_back((seq, ops));
        self.advance();
    }

    /// One op of event `seq` finished (handled, dead-lettered or rejected).
    pub(crate) fn finish(&mut self, seq: i64) {
        if let Ok(i) = self.pending.binary_search_by_key(&seq, |&(s, _)| s) {
            let left = &mut self.pending[i].1;
            *left = left.saturating_sub(1);
        }
        self.advance();
    }

    /// The seq to store as the cursor.
    pub(crate) fn low_water(&self) -> Option<i64> {
        self.low_water
    }

    fn advance(&mut self) {
        while let Some(&(seq, 0)) = self.pending.front() {
            self.low_water = Some(seq);
            self.pending.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn low_water_never_passes_an_unfinished_event() {
        let mut p = Progress::resume_from(Some(10));
        p.begin(11, 1);
        p.begin(12, 0);
        p.begin(14, 2);
        assert_eq!(p.low_water(), Some(10));
        p.finish(14);
        p.finish(14);
        assert_eq!(p.low_water(), Some(10), "11 still runs");
        p.finish(11);
        assert_eq!(p.low_water(), Some(14));
        p.begin(15, 0);
        assert_eq!(p.low_water(), Some(15));
    }

    #[test]
    fn regressing_seq_is_ignored() {
        let mut p = Progress::resume_from(None);
        p.begin(5, 1);
        p.begin(3, 1);
        p.finish(5);
        assert_eq!(p.low_water(), Some(5));
    }
}
