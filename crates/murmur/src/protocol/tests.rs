//! The task protocol's decisions, step by step, without a network.

use super::*;
use crate::StrongRef;
use murmur_comms::agent::comms::claim;

const TASK: &str = "at://did:plc:boss/agent.comms.task/3task";
const TASK_CID: &str = "bafyreie5737gdxlw5i64vzichcalba3z2v5n6icifvx5xytvske7mr3hpm";
const OTHER_CID: &str = "bafyreidfayvfuwqa7qlnopdjiqrxzs6blmoeu4rujcjtnci5beludirz2a";
const LEASE: Duration = Duration::from_secs(10);

fn task(max_attempts: u32, window: Duration) -> TaskState {
    let record = crate::TaskSpec::new("t")
        .lease(LEASE)
        .max_attempts(max_attempts)
        .into_record();
    TaskState::new(TASK.into(), Some(TASK_CID.into()), record, window)
}

fn task_ref(cid: &str) -> StrongRef {
    atrium_api::com::atproto::repo::strong_ref::MainData {
        uri: TASK.into(),
        cid: cid.parse().unwrap(),
    }
    .into()
}

/// Distinct CIDs for distinct records (only their identity matters here).
fn cid(n: u8) -> Cid {
    let digest = ipld_core::cid::multihash::Multihash::wrap(0x12, &[n; 32]).unwrap();
    Cid::new_v1(0x71, digest)
}

/// A claim by `worker` (claim record `key`) made at `made`.
fn claim_at(worker: &str, key: &str, made: DateTime<Utc>) -> ClaimOffer {
    ClaimOffer {
        worker: worker.into(),
        claim: atrium_api::com::atproto::repo::strong_ref::MainData {
            uri: format!("at://{worker}/agent.comms.claim/{key}"),
            cid: TASK_CID.parse().unwrap(),
        }
        .into(),
        record: claim::RecordData {
            task: task_ref(TASK_CID),
            lease_seconds: None,
            note: None,
            created_at: crate::datetime(made),
        }
        .into_record(),
    }
}

fn claim(worker: &str, key: &str) -> ClaimOffer {
    claim_at(worker, key, Utc::now())
}

/// The result `worker` wrote for the task, at its key `key`.
fn answer(worker: &str, key: &str) -> Answer {
    Answer {
        worker: worker.into(),
        uri: format!("at://{worker}/agent.comms.result/{key}"),
        cid: cid(key.len() as u8 + worker.len() as u8),
        record: result_rec::RecordData {
            task: task_ref(TASK_CID),
            outcome: "success".into(),
            output: None,
            artifacts: None,
            error: None,
            attempt: Some(1),
            created_at: crate::now(),
        }
        .into_record(),
    }
}

/// Claim, choose and assign `worker` at `now`; returns the assignment's CID.
fn assign(t: &mut TaskState, worker: &str, key: &str, now: Instant) -> Cid {
    let offer = claim(worker, key);
    let actions = t.step(Input::Claim(offer.clone()), now);
    let [
        Action::Choose {
            offers, attempt, ..
        },
    ] = actions.as_slice()
    else {
        panic!("expected the policy to be asked, got {actions:?}");
    };
    assert_eq!(*attempt, t.attempt + 1);
    assert_eq!(offers.len(), 1);
    let actions = t.step(Input::Chosen(Some(offer)), now);
    assert!(
        matches!(actions.as_slice(), [Action::WriteAssignment { offer, .. }] if offer.worker == worker),
        "{actions:?}"
    );
    let assignment_cid = cid(t.attempt as u8);
    let actions = t.step(
        Input::AssignmentWritten {
            worker: worker.into(),
            cid: assignment_cid,
        },
        now,
    );
    assert!(matches!(actions.as_slice(), [Action::Assigned { .. }]));
    assignment_cid
}

/// Lets the current lease lapse at `now`, through to the withdrawal; returns the actions
/// after the withdrawal and when the lapse was recorded.
fn lapse(t: &mut TaskState, now: Instant) -> (Vec<Action>, DateTime<Utc>) {
    let holder = match &t.phase {
        Phase::Assigned { worker, .. } => worker.clone(),
        other => panic!("not assigned: {other:?}"),
    };
    let actions = t.step(Input::Tick, now);
    assert!(
        matches!(actions.as_slice(), [Action::SearchResult { holders }] if holders.contains(&holder)),
        "{actions:?}"
    );
    let actions = t.step(Input::Searched(None), now);
    assert!(
        matches!(actions.as_slice(), [Action::RecordLapse { worker, attempt, .. }] if *worker == holder && *attempt == t.attempt),
        "{actions:?}"
    );
    // Recorded a second ago: claims made since are for the next attempt.
    let at = Utc::now() - chrono::TimeDelta::seconds(1);
    let actions = t.step(Input::LapseRecorded(Ok(at)), now);
    assert!(
        matches!(actions.as_slice(), [Action::LeaseExpired { worker, .. }, Action::Withdraw { .. }] if *worker == holder),
        "{actions:?}"
    );
    (t.step(Input::Withdrawn(Ok(())), now), at)
}

fn assigned_to(t: &TaskState) -> Option<&str> {
    match &t.phase {
        Phase::Assigned { worker, .. } => Some(worker),
        _ => None,
    }
}

#[test]
fn a_lapsed_lease_is_withdrawn_and_the_next_claim_gets_the_task() {
    let t0 = Instant::now();
    let mut t = task(3, Duration::ZERO);
    assign(&mut t, "did:plc:a", "c1", t0);
    assert!(
        t.step(Input::Tick, t0 + LEASE / 2).is_empty(),
        "not due yet"
    );
    // A status renews the lease from when it is seen.
    let renewed = Input::Renewed {
        worker: "did:plc:a".into(),
        until: None,
    };
    assert!(t.step(renewed, t0 + LEASE / 2).is_empty());
    assert!(t.step(Input::Tick, t0 + LEASE).is_empty(), "renewed");

    let at = t0 + LEASE * 2;
    let (after, _) = lapse(&mut t, at);
    assert!(after.is_empty(), "attempts are left: {after:?}");
    assert!(matches!(t.phase, Phase::Open));

    // A claim arriving while the lapse was handled lost; a new one wins attempt 2.
    let offer = claim_at(
        "did:plc:b",
        "c2",
        Utc::now() + chrono::TimeDelta::seconds(1),
    );
    let actions = t.step(Input::Claim(offer.clone()), at);
    let [
        Action::Choose {
            attempt, previous, ..
        },
    ] = actions.as_slice()
    else {
        panic!("{actions:?}");
    };
    assert_eq!(*attempt, 2);
    assert_eq!(previous, &["did:plc:a".to_string()]);
    let actions = t.step(Input::Chosen(Some(offer)), at);
    assert!(matches!(
        actions.as_slice(),
        [Action::WriteAssignment {
            attempt: 2,
            first_claim: false,
            ..
        }]
    ));
    t.step(
        Input::AssignmentWritten {
            worker: "did:plc:b".into(),
            cid: cid(9),
        },
        at,
    );
    assert_eq!(assigned_to(&t), Some("did:plc:b"));
}

#[test]
fn a_claim_made_after_the_lapse_while_it_is_withdrawn_is_weighed_when_the_task_opens() {
    let t0 = Instant::now();
    let mut t = task(3, Duration::ZERO);
    assign(&mut t, "did:plc:a", "c1", t0);
    let late = t0 + LEASE * 2;
    t.step(Input::Tick, late);
    t.step(Input::Searched(None), late);
    let at = Utc::now() - chrono::TimeDelta::seconds(1);
    t.step(Input::LapseRecorded(Ok(at)), late);
    assert!(matches!(t.phase, Phase::Lapsing { .. }));
    // Worker b saw the lapse ack and claimed before the withdrawal was written; a claim
    // made before the lapse (an earlier attempt's) is not kept.
    let fresh = claim_at("did:plc:b", "c2", at + chrono::TimeDelta::milliseconds(5));
    let old = claim_at("did:plc:c", "c0", at - chrono::TimeDelta::milliseconds(5));
    assert!(t.step(Input::Claim(fresh.clone()), late).is_empty());
    assert!(t.step(Input::Claim(old), late).is_empty());
    let actions = t.step(Input::Withdrawn(Ok(())), late);
    let [
        Action::Choose {
            offers, attempt, ..
        },
    ] = actions.as_slice()
    else {
        panic!("expected b's claim to be weighed, got {actions:?}");
    };
    assert_eq!(*attempt, 2);
    assert_eq!(offers.len(), 1);
    assert_eq!(offers[0].worker, "did:plc:b");
}

#[test]
fn a_lapse_that_cannot_be_recorded_or_withdrawn_is_tried_again_on_the_next_tick() {
    let t0 = Instant::now();
    let mut t = task(3, Duration::ZERO);
    assign(&mut t, "did:plc:a", "c1", t0);
    let late = t0 + LEASE * 2;
    assert_eq!(t.step(Input::Tick, late).len(), 1);
    assert_eq!(t.step(Input::Searched(None), late).len(), 1);
    assert!(
        t.step(Input::LapseRecorded(Err("down".into())), late)
            .is_empty()
    );
    assert_eq!(assigned_to(&t), Some("did:plc:a"));
    assert!(t.step(Input::Tick, late).len() == 1, "lapses again");
    t.step(Input::Searched(None), late);
    t.step(Input::LapseRecorded(Ok(Utc::now())), late);
    assert!(
        t.step(Input::Withdrawn(Err("down".into())), late)
            .is_empty()
    );
    assert_eq!(assigned_to(&t), Some("did:plc:a"));
    assert_eq!(t.attempt, 1, "a failed withdrawal uses no attempt");
}

#[test]
fn a_result_found_in_a_repo_at_lapse_time_is_accepted_instead() {
    let t0 = Instant::now();
    let mut t = task(3, Duration::ZERO);
    assign(&mut t, "did:plc:a", "c1", t0);
    let late = t0 + LEASE * 2;
    t.step(Input::Tick, late);
    let found = answer("did:plc:a", "3task");
    let actions = t.step(Input::Searched(Some(found)), late);
    assert!(matches!(actions.as_slice(), [Action::WriteAck { .. }]));
    // The ack cannot be written: the lease is lapsed as of now, so the next tick retries.
    let actions = t.step(Input::AckFailed("down".into()), late);
    assert!(matches!(actions.as_slice(), [Action::Retry(_)]));
    assert_eq!(assigned_to(&t), Some("did:plc:a"));
    assert_eq!(t.step(Input::Tick, late).len(), 1);
}

#[test]
fn max_attempts_lapses_give_the_task_up_once() {
    let t0 = Instant::now();
    let mut t = task(2, Duration::ZERO);
    assign(&mut t, "did:plc:a", "c1", t0);
    let (after, _) = lapse(&mut t, t0 + LEASE * 2);
    assert!(after.is_empty());
    let t1 = t0 + LEASE * 3;
    assign(&mut t, "did:plc:b", "c2", t1);
    let (after, _) = lapse(&mut t, t1 + LEASE * 2);
    assert!(
        matches!(after.as_slice(), [Action::WriteGiveUp { attempts: 2, .. }]),
        "{after:?}"
    );
    assert!(matches!(t.phase, Phase::GivingUp));
    // The write failed and nothing is at the key: try again later.
    let actions = t.step(Input::GiveUpFailed, t1);
    assert!(matches!(
        actions.as_slice(),
        [Action::GiveUpLater { retry: 0 }]
    ));
    assert!(matches!(t.phase, Phase::Exhausted));
    assert!(matches!(
        t.step(Input::GiveUp, t1).as_slice(),
        [Action::WriteGiveUp { .. }]
    ));
    // It failed again: the next try waits longer.
    let actions = t.step(Input::GiveUpFailed, t1);
    assert!(matches!(
        actions.as_slice(),
        [Action::GiveUpLater { retry: 1 }]
    ));
    assert!(matches!(
        t.step(Input::GiveUp, t1).as_slice(),
        [Action::WriteGiveUp { .. }]
    ));
    let actions = t.step(Input::GiveUpWritten, t1);
    assert!(matches!(actions.as_slice(), [Action::Fail { attempts: 2 }]));
    assert!(t.step(Input::GiveUpWritten, t1).is_empty(), "failed once");
    assert!(t.step(Input::GiveUp, t1).is_empty());
    // Closed: a late result from a worker that held it changes nothing.
    let late = t.step(Input::Result(answer("did:plc:a", "3task")), t1);
    assert!(late.is_empty(), "{late:?}");
    // No claim is offered for a given-up task.
    assert!(
        t.step(Input::Claim(claim("did:plc:c", "c3")), t1)
            .is_empty()
    );
}

/// Every order of "the last lease lapsed" and "a result arrives" ends with the task either
/// given up or accepted, never both.
#[test]
fn a_task_is_never_both_given_up_and_accepted() {
    fn outcome(actions: &[Action], completed: &mut u32, failed: &mut u32) {
        for a in actions {
            match a {
                Action::Complete { .. } => *completed += 1,
                Action::Fail { .. } => *failed += 1,
                _ => {}
            }
        }
    }
    let t0 = Instant::now();
    let result = || Input::Result(answer("did:plc:a", "3task"));
    let accepted = || Closing::Accepted {
        result_uri: answer("did:plc:a", "3task").uri,
        worker: "did:plc:a".into(),
    };
    // Each script starts when the give-up ack is about to be written.
    let scripts: Vec<(&str, Vec<Input>)> = vec![
        // The result arrives while giving up: it is told to retry, then finds it closed.
        (
            "result during give-up",
            vec![result(), Input::GiveUpWritten, result()],
        ),
        // The result's ack won the key: the give-up follows it and completes instead.
        (
            "result's ack won",
            vec![
                result(),
                Input::AckFound(accepted()),
                Input::AcceptedRead {
                    result_uri: answer("did:plc:a", "3task").uri,
                    worker: "did:plc:a".into(),
                    found: Some(answer("did:plc:a", "3task")),
                },
                result(),
            ],
        ),
        // Giving up failed, and before the retry the result came: it is accepted, and
        // the retried give-up does nothing.
        (
            "result before the retried give-up",
            vec![
                Input::GiveUpFailed,
                result(),
                Input::GiveUp,
                Input::AckWritten,
                Input::GiveUp,
                Input::GiveUpWritten,
            ],
        ),
        // The result's ack lost to the give-up ack: it follows the ack.
        (
            "give-up ack won",
            vec![
                Input::GiveUpFailed,
                result(),
                Input::AckFound(Closing::GivenUp),
                Input::AckWritten,
                result(),
            ],
        ),
    ];
    for (name, script) in scripts {
        let mut t = task(1, Duration::ZERO);
        assign(&mut t, "did:plc:a", "c1", t0);
        let (after, _) = lapse(&mut t, t0 + LEASE * 2);
        assert!(matches!(after.as_slice(), [Action::WriteGiveUp { .. }]));
        let (mut completed, mut failed) = (0, 0);
        for input in script {
            let actions = t.step(input, t0 + LEASE * 2);
            outcome(&actions, &mut completed, &mut failed);
        }
        assert_eq!(completed + failed, 1, "{name}: closed exactly once");
        let done = matches!(t.phase, Phase::Done { .. });
        let given_up = matches!(t.phase, Phase::GivenUp);
        assert!(
            (done && completed == 1) || (given_up && failed == 1),
            "{name}: {:?}",
            t.phase
        );
    }
}

#[test]
fn stale_claims_are_not_offered() {
    let t0 = Instant::now();
    let mut t = task(3, Duration::ZERO);
    let before_lapse = Utc::now() - chrono::TimeDelta::seconds(5);
    assign(&mut t, "did:plc:a", "c1", t0);
    let (_, lapsed_at) = lapse(&mut t, t0 + LEASE * 2);
    let now = t0 + LEASE * 2;
    // Made before the lapse: a claim on the attempt that lapsed, delivered late.
    let late = claim_at("did:plc:b", "c2", before_lapse);
    assert!(t.step(Input::Claim(late), now).is_empty());
    // The lapsed worker's own claim delivered again, even with a clock ahead of ours.
    let again = claim_at(
        "did:plc:a",
        "c1",
        lapsed_at + chrono::TimeDelta::seconds(60),
    );
    assert!(t.step(Input::Claim(again), now).is_empty());
    // A claim on another version of the task.
    let mut other = claim("did:plc:b", "c3");
    other.record.task = task_ref(OTHER_CID);
    assert!(t.step(Input::Claim(other), now).is_empty());
    assert!(t.offers.is_empty(), "{:?}", t.offers);
    // A fresh claim made after the lapse is offered, even from the lapsed worker (the
    // policy sees it among the previous workers).
    let fresh = claim_at("did:plc:a", "c4", lapsed_at + chrono::TimeDelta::seconds(1));
    let actions = t.step(Input::Claim(fresh), now);
    assert!(
        matches!(actions.as_slice(), [Action::Choose { offers, .. }] if offers.len() == 1),
        "{actions:?}"
    );
}

#[test]
fn claims_during_the_window_are_chosen_among_together() {
    let t0 = Instant::now();
    let mut t = task(3, Duration::from_millis(200));
    let actions = t.step(Input::Claim(claim("did:plc:a", "c1")), t0);
    assert!(matches!(actions.as_slice(), [Action::ArmWindow]));
    assert!(
        t.step(Input::Claim(claim("did:plc:b", "c2")), t0)
            .is_empty()
    );
    assert!(
        t.step(Input::Claim(claim("did:plc:b", "c2")), t0)
            .is_empty(),
        "same claim twice"
    );
    let actions = t.step(Input::Decide, t0);
    assert!(
        matches!(actions.as_slice(), [Action::Choose { offers, attempt: 1, .. }] if offers.len() == 2),
        "{actions:?}"
    );
    // The policy declines: the task waits for more claims.
    assert!(t.step(Input::Chosen(None), t0).is_empty());
    assert!(matches!(t.phase, Phase::Open));
}

#[test]
fn a_failed_assignment_gives_the_attempt_back() {
    let t0 = Instant::now();
    let mut t = task(3, Duration::ZERO);
    let offer = claim("did:plc:a", "c1");
    t.step(Input::Claim(offer.clone()), t0);
    t.step(Input::Chosen(Some(offer.clone())), t0);
    assert_eq!(t.attempt, 1);
    let actions = t.step(Input::AssignmentFailed("down".into()), t0);
    assert!(matches!(actions.as_slice(), [Action::Retry(_)]));
    assert_eq!(t.attempt, 0);
    assert!(matches!(t.phase, Phase::Open));
    // The claim is still on offer for the retry (an assignment that was never written
    // does not use it up).
    let actions = t.step(Input::Claim(offer), t0);
    assert!(
        matches!(actions.as_slice(), [Action::Choose { offers, .. }] if offers.len() == 1),
        "{actions:?}"
    );
    // Another writer's assignment at the key stands: its worker holds the task.
    t.step(Input::Decide, t0);
    t.step(Input::Chosen(Some(claim("did:plc:a", "c9"))), t0);
    t.step(
        Input::AssignmentWritten {
            worker: "did:plc:z".into(),
            cid: cid(1),
        },
        t0,
    );
    assert_eq!(assigned_to(&t), Some("did:plc:z"));
    assert!(t.holders.contains(&"did:plc:z".to_string()));
}

#[test]
fn a_handoff_chain_leaves_the_task_with_its_last_receiver() {
    let t0 = Instant::now();
    let mut t = task(3, Duration::ZERO);
    assign(&mut t, "did:plc:a", "c1", t0);
    let t1 = t0 + LEASE / 2;
    let hand = |from: &str, to: &str| Input::Handoff {
        from: from.into(),
        to: to.into(),
    };
    assert!(t.step(hand("did:plc:a", "did:plc:b"), t1).is_empty());
    assert_eq!(assigned_to(&t), Some("did:plc:b"));
    // A no longer holds the lease: its handoffs and statuses do nothing.
    t.step(hand("did:plc:a", "did:plc:x"), t1);
    assert_eq!(assigned_to(&t), Some("did:plc:b"));
    let t2 = t1 + LEASE / 2;
    t.step(hand("did:plc:b", "did:plc:c"), t2);
    assert_eq!(assigned_to(&t), Some("did:plc:c"));
    assert_eq!(t.holders, ["did:plc:a", "did:plc:b", "did:plc:c"]);
    // Each handoff starts a full lease for the receiver.
    assert!(t.step(Input::Tick, t2 + LEASE / 2).is_empty());
    let stale = Input::Renewed {
        worker: "did:plc:b".into(),
        until: Some(t2 + LEASE * 10),
    };
    t.step(stale, t2);
    let lapses = t.step(Input::Tick, t2 + LEASE);
    assert!(matches!(lapses.as_slice(), [Action::SearchResult { .. }]));
    t.step(Input::Searched(None), t2 + LEASE);
    // It is C's lease that lapsed, and C's result that is accepted.
    assert!(matches!(&t.phase, Phase::Lapsing { worker, .. } if worker == "did:plc:c"));
    let actions = t.step(Input::Result(answer("did:plc:c", "3task")), t2 + LEASE);
    assert!(matches!(actions.as_slice(), [Action::WriteAck { .. }]));
    let actions = t.step(Input::AckWritten, t2 + LEASE);
    assert!(
        matches!(actions.as_slice(), [Action::Complete { answer, latency: Some(_) }] if answer.worker == "did:plc:c")
    );
}

#[test]
fn results_after_acceptance_are_counted_as_duplicates_not_accepted() {
    let t0 = Instant::now();
    let mut t = task(3, Duration::ZERO);
    assign(&mut t, "did:plc:a", "c1", t0);
    // From an agent that never held the task: ignored.
    let stranger = t.step(Input::Result(answer("did:plc:z", "3task")), t0);
    assert!(stranger.is_empty());
    t.step(Input::Result(answer("did:plc:a", "3task")), t0);
    // The same result again while its ack is written: nothing new.
    assert!(
        t.step(Input::Result(answer("did:plc:a", "3task")), t0)
            .is_empty()
    );
    let actions = t.step(Input::AckWritten, t0);
    assert!(matches!(actions.as_slice(), [Action::Complete { .. }]));
    assert!(t.step(Input::AckWritten, t0).is_empty(), "completed once");
    assert!(
        t.step(Input::Result(answer("did:plc:a", "3task")), t0)
            .is_empty()
    );
    let dup = t.step(Input::Result(answer("did:plc:a", "other")), t0);
    assert!(
        matches!(dup.as_slice(), [Action::Duplicate { worker }] if worker == "did:plc:a"),
        "{dup:?}"
    );
    assert!(matches!(&t.phase, Phase::Done { result_uri, .. } if result_uri.ends_with("/3task")));
}

#[test]
fn an_ack_left_by_an_earlier_run_decides_which_result_is_accepted() {
    let t0 = Instant::now();
    let mut t = task(3, Duration::ZERO);
    assign(&mut t, "did:plc:a", "c1", t0);
    let handoff = hand_to(&t, "did:plc:b");
    t.step(handoff, t0);
    t.step(Input::Result(answer("did:plc:b", "3task")), t0);
    let earlier = Closing::Accepted {
        result_uri: answer("did:plc:a", "3task").uri,
        worker: "did:plc:a".into(),
    };
    let actions = t.step(Input::AckFound(earlier), t0);
    assert!(
        matches!(actions.as_slice(), [Action::Duplicate { worker }, Action::ReadAccepted { worker: w, .. }] if worker == "did:plc:b" && w == "did:plc:a"),
        "{actions:?}"
    );
    let read = Input::AcceptedRead {
        result_uri: answer("did:plc:a", "3task").uri,
        worker: "did:plc:a".into(),
        found: Some(answer("did:plc:a", "3task")),
    };
    let actions = t.step(read, t0);
    assert!(
        matches!(actions.as_slice(), [Action::Complete { answer, .. }] if answer.worker == "did:plc:a")
    );
}

/// A handoff from the current holder to `to`.
fn hand_to(t: &TaskState, to: &str) -> Input {
    Input::Handoff {
        from: assigned_to(t).unwrap().to_string(),
        to: to.into(),
    }
}
