//! The low-water mark of one source: the seq of the last event that, with every event read
//! before it, is done.

use std::collections::VecDeque;

/// Identifies one event in a [`Progress`]: its place in arrival order.
pub(crate) type EventToken = u64;

/// Tracks the events of one source in arrival order until all their ops are handled.
///
/// Arrival order, not seq order, decides: after a seq regression (a relay reset, or a new
/// relay behind the same URL) the new seq space starts behind the old one, and the stored
/// cursor moves into it only once every event read before the regression is done.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// (token, seq, ops still running), oldest first; tokens increase by one.
    pending: VecDeque<(EventToken, i64, usize)>,
    /// The token the next event gets.
    next: EventToken,
    /// Everything read up to and including the event with this seq is done.
    low_water: Option<i64>,
}

impl Progress {
    /// Starts tracking: everything before `cursor` is considered done.
    pub(crate) fn resume_from(cursor: Option<i64>) -> Self {
        Progress {
            low_water: cursor,
            ..Progress::default()
        }
    }

    /// An event with `seq` arrived with `ops` ops to run (0 when nothing matched).
    pub(crate) fn begin(&mut self, seq: i64, ops: usize) -> EventToken {
        let token = self.next;
        self.next += 1;
        self.pending.push_back((token, seq, ops));
        self.advance();
        token
    }

    /// The event `token`, begun with one unit of work for reading it, turned out to have
    /// `ops` ops to run: the reading unit is done and the ops are now what it waits for.
    pub(crate) fn resolve(&mut self, token: EventToken, ops: usize) {
        if let Ok(i) = self.pending.binary_search_by_key(&token, |&(t, _, _)| t) {
            let left = &mut self.pending[i].2;
            *left = left.saturating_sub(1) + ops;
        }
        self.advance();
    }

    /// One op of the event `token` finished (handled, dead-lettered or rejected).
    pub(crate) fn finish(&mut self, token: EventToken) {
        if let Ok(i) = self.pending.binary_search_by_key(&token, |&(t, _, _)| t) {
            let left = &mut self.pending[i].2;
            *left = left.saturating_sub(1);
        }
        self.advance();
    }

    /// The seq to store as the cursor.
    pub(crate) fn low_water(&self) -> Option<i64> {
        self.low_water
    }

    fn advance(&mut self) {
        while let Some(&(_, seq, 0)) = self.pending.front() {
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
        let e11 = p.begin(11, 1);
        p.begin(12, 0);
        let e14 = p.begin(14, 2);
        assert_eq!(p.low_water(), Some(10));
        p.finish(e14);
        p.finish(e14);
        assert_eq!(p.low_water(), Some(10), "11 still runs");
        p.finish(e11);
        assert_eq!(p.low_water(), Some(14));
        p.begin(15, 0);
        assert_eq!(p.low_water(), Some(15));
    }

    #[test]
    fn a_seq_regression_moves_the_cursor_into_the_new_space_after_the_old_events() {
        let mut p = Progress::resume_from(Some(900));
        let old = p.begin(1000, 1);
        // The relay restarted: its seqs begin again at 3.
        let new3 = p.begin(3, 1);
        p.begin(4, 0);
        p.finish(new3);
        assert_eq!(
            p.low_water(),
            Some(900),
            "event 1000 of the old space still runs"
        );
        p.finish(old);
        assert_eq!(p.low_water(), Some(4), "now in the new seq space");
        p.begin(5, 0);
        assert_eq!(p.low_water(), Some(5));
    }

    #[test]
    fn a_repeated_seq_is_tracked_as_its_own_event() {
        let mut p = Progress::resume_from(None);
        let a = p.begin(7, 1);
        let b = p.begin(7, 1);
        p.finish(b);
        assert_eq!(p.low_water(), None);
        p.finish(a);
        assert_eq!(p.low_water(), Some(7));
    }

    #[test]
    fn events_resolved_out_of_arrival_order_keep_the_cursor_behind_the_first() {
        let mut p = Progress::resume_from(Some(10));
        // Read in this order, each with one unit for its reading (verification).
        let a = p.begin(11, 1);
        let b = p.begin(12, 1);
        let c = p.begin(13, 1);
        // Another repo's lane is faster: 13 and 12 are resolved first.
        p.resolve(c, 0);
        p.resolve(b, 2);
        assert_eq!(p.low_water(), Some(10), "11 is still being verified");
        p.resolve(a, 0);
        assert_eq!(p.low_water(), Some(11), "12's ops still run");
        p.finish(b);
        p.finish(b);
        assert_eq!(p.low_water(), Some(13));
    }

    #[test]
    fn finishing_an_unknown_token_changes_nothing() {
        let mut p = Progress::resume_from(Some(1));
        p.begin(2, 1);
        p.finish(99);
        assert_eq!(p.low_water(), Some(1));
    }
}
