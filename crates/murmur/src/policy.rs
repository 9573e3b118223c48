//! Claim selection: which of the claims on a task wins its next attempt.

use murmur_comms::agent::comms::{claim, task};

use crate::StrongRef;
use crate::registry::Registry;

/// One worker's claim on one of the requester's tasks.
#[derive(Debug, Clone)]
pub struct ClaimOffer {
    /// DID of the claiming worker.
    pub worker: String,
    /// The claim record's at-uri and CID.
    pub claim: StrongRef,
    /// The claim record (its `leaseSeconds` and `note`).
    pub record: claim::Record,
}

/// What a [`ClaimPolicy`] knows about the task whose claims it chooses among.
#[derive(Debug)]
#[non_exhaustive]
pub struct ClaimContext<'a> {
    /// at-uri of the task.
    pub task_uri: &'a str,
    /// The task record.
    pub task: &'a task::Record,
    /// The attempt the winner will run (1 for the first assignment).
    pub attempt: u32,
    /// Workers that held the task in earlier attempts (their leases lapsed).
    pub previous_workers: &'a [String],
    /// The agents seen on the stream: profiles (capabilities) and presence (load).
    pub registry: &'a Registry,
}

/// Chooses the claim that wins an attempt of a task.
///
/// The requester gathers the claims of an open task for the claim window
/// ([`AgentBuilder::claim_window`](crate::AgentBuilder::claim_window), default zero: each
/// claim is offered as it arrives), then asks the policy. `offers` are in arrival order,
/// claims read back from the repos after a restart in `createdAt` order. Returning `None`
/// keeps the task open: the offers are kept and asked about again with the next claim.
///
/// Any `Fn(&ClaimContext, &[ClaimOffer]) -> Option<usize>` is a policy:
///
/// ```
/// use murmur::{ClaimContext, ClaimOffer};
/// // Prefer a worker that has not let this task's lease lapse before.
/// let fresh_first = |ctx: &ClaimContext<'_>, offers: &[ClaimOffer]| {
///     offers
///         .iter()
///         .position(|o| !ctx.previous_workers.contains(&o.worker))
///         .or((!offers.is_empty()).then_some(0))
/// };
/// # fn takes(_: impl murmur::ClaimPolicy) {}
/// takes(fresh_first);
/// ```
pub trait ClaimPolicy: Send + Sync + 'static {
    /// The index in `offers` of the winning claim, or `None` to wait for more claims.
    fn choose(&self, ctx: &ClaimContext<'_>, offers: &[ClaimOffer]) -> Option<usize>;
}

impl<F> ClaimPolicy for F
where
    F: Fn(&ClaimContext<'_>, &[ClaimOffer]) -> Option<usize> + Send + Sync + 'static,
{
    fn choose(&self, ctx: &ClaimContext<'_>, offers: &[ClaimOffer]) -> Option<usize> {
        self(ctx, offers)
    }
}

/// The default policy: the first claim wins.
#[derive(Debug, Clone, Copy, Default)]
pub struct FirstCome;

impl ClaimPolicy for FirstCome {
    fn choose(&self, _ctx: &ClaimContext<'_>, offers: &[ClaimOffer]) -> Option<usize> {
        (!offers.is_empty()).then_some(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(worker: &str) -> ClaimOffer {
        let task_ref: StrongRef = atrium_api::com::atproto::repo::strong_ref::MainData {
            uri: "at://did:plc:boss/agent.comms.task/3l".into(),
            cid: "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm"
                .parse()
                .unwrap(),
        }
        .into();
        ClaimOffer {
            worker: worker.into(),
            claim: task_ref.clone(),
            record: claim::RecordData {
                task: task_ref,
                lease_seconds: None,
                note: None,
                created_at: crate::now(),
            }
            .into_record(),
        }
    }

    fn choose(
        policy: &dyn ClaimPolicy,
        offers: &[ClaimOffer],
        previous: &[String],
    ) -> Option<usize> {
        let record = crate::TaskSpec::new("t").into_record();
        let registry = Registry::new();
        let ctx = ClaimContext {
            task_uri: "at://did:plc:boss/agent.comms.task/3l",
            task: &record,
            attempt: 2,
            previous_workers: previous,
            registry: &registry,
        };
        policy.choose(&ctx, offers)
    }

    #[test]
    fn first_come_takes_the_first_offer_and_waits_on_none() {
        assert_eq!(choose(&FirstCome, &[], &[]), None);
        assert_eq!(choose(&FirstCome, &[offer("a"), offer("b")], &[]), Some(0));
    }

    #[test]
    fn a_closure_is_a_policy() {
        let avoid_lapsed = |ctx: &ClaimContext<'_>, offers: &[ClaimOffer]| {
            offers
                .iter()
                .position(|o| !ctx.previous_workers.contains(&o.worker))
        };
        let offers = [offer("a"), offer("b")];
        assert_eq!(choose(&avoid_lapsed, &offers, &["a".into()]), Some(1));
        assert_eq!(
            choose(&avoid_lapsed, &offers, &["a".into(), "b".into()]),
            None
        );
    }
}
