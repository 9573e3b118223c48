//! Round trips (JSON, DAG-CBOR byte for byte), unknown-field preservation, and agreement
//! between the generated `validate()` and the lexicon-driven validator.

use atrium_api::types::Collection;
use serde_json::json;

use crate::agent::comms::{result, task};
use crate::*;

const CID: &str = "bafyreiclp443lavogvhj3d2ob2cxbfuscni2k5jk7bebjzg7khl3esabwq";
const TASK_URI: &str = "at://did:plc:requester123/agent.comms.task/3kznmn7xqxl22";

fn strong_ref() -> serde_json::Value {
    json!({ "uri": TASK_URI, "cid": CID })
}

/// One valid sample per record type, as atproto JSON.
fn samples() -> Vec<(&'static str, serde_json::Value)> {
    let now = "2026-11-23T22:00:00.000Z";
    vec![
        (
            Profile::NSID,
            json!({"$type": Profile::NSID, "name": "translator", "capabilities": ["translate"], "acceptedNsids": ["agent.comms.task"], "operator": "did:plc:operator1", "maxConcurrentTasks": 4, "createdAt": now}),
        ),
        (
            Presence::NSID,
            json!({"$type": Presence::NSID, "state": "online", "load": 10, "ttlSeconds": 60, "createdAt": now}),
        ),
        (
            Message::NSID,
            json!({"$type": Message::NSID, "to": ["did:plc:bob1"], "thread": strong_ref(), "replyTo": strong_ref(), "text": "hello", "payload": {"$type": "com.example.greeting", "n": 1}, "createdAt": now}),
        ),
        (
            Task::NSID,
            json!({"$type": Task::NSID, "taskType": "translate", "title": "README to French", "payload": {"text": "hello", "nested": {"list": [1, 2, 3]}}, "assignee": "did:plc:worker1", "deadline": "2026-11-24T00:00:00Z", "leaseSeconds": 300, "maxAttempts": 3, "priority": 70, "createdAt": now}),
        ),
        (
            Claim::NSID,
            json!({"$type": Claim::NSID, "task": strong_ref(), "leaseSeconds": 120, "note": "idle", "createdAt": now}),
        ),
        (
            Assignment::NSID,
            json!({"$type": Assignment::NSID, "task": strong_ref(), "claim": strong_ref(), "worker": "did:plc:worker1", "attempt": 1, "leaseExpiresAt": "2026-11-23T22:05:00Z", "createdAt": now}),
        ),
        (
            Status::NSID,
            json!({"$type": Status::NSID, "task": strong_ref(), "state": "working", "progress": 40, "attempt": 1, "leaseExpiresAt": "2026-11-23T22:10:00Z", "createdAt": now}),
        ),
        (
            Result::NSID,
            json!({"$type": Result::NSID, "task": strong_ref(), "outcome": "partial", "output": {"text": "bonjour"},
            "artifacts": [{"name": "fr.md", "blob": {"$type": "blob", "ref": {"$link": CID}, "mimeType": "text/markdown", "size": 1234}}],
            "error": {"code": "timeout", "message": "second half not done", "retryable": true}, "attempt": 2, "createdAt": now}),
        ),
        (
            Ack::NSID,
            json!({"$type": Ack::NSID, "subject": strong_ref(), "state": "accepted", "createdAt": now}),
        ),
        (
            Handoff::NSID,
            json!({"$type": Handoff::NSID, "task": strong_ref(), "assignment": strong_ref(), "to": "did:plc:worker2", "reason": "shift over", "context": {"done": 3}, "createdAt": now}),
        ),
        (
            Broadcast::NSID,
            json!({"$type": Broadcast::NSID, "topic": "maintenance", "text": "PDS restarts at noon", "expiresAt": "2026-11-24T12:00:00Z", "createdAt": now}),
        ),
        (
            Proposal::NSID,
            json!({"$type": Proposal::NSID, "text": "Move the nightly batch to host B?", "options": ["yes", "no"], "voters": ["did:plc:voter1", "did:plc:voter2"], "quorum": 2, "closesAt": "2026-11-24T00:00:00Z", "createdAt": now}),
        ),
        (
            Vote::NSID,
            json!({"$type": Vote::NSID, "proposal": strong_ref(), "choice": "yes", "reason": "B is idle at night", "createdAt": now}),
        ),
        (
            Tally::NSID,
            json!({"$type": Tally::NSID, "proposal": strong_ref(), "votes": [strong_ref(), strong_ref()], "counts": [{"option": "yes", "votes": 2}, {"option": "no", "votes": 0}], "outcome": "decided", "winner": "yes", "closedBy": "quorum", "createdAt": now}),
        ),
    ]
}

/// Decodes `json` as collection `C`'s record, validates it, and checks both round trips.
fn round_trip<C: Collection>(value: &serde_json::Value)
where
    C::Record: Validate + PartialEq,
{
    // JSON: typed -> JSON gives the same value, and re-encoding is stable.
    let record: C::Record = serde_json::from_value(value.clone()).unwrap();
    record.validate().unwrap();
    let back = serde_json::to_value(&record).unwrap();
    assert_eq!(&back, value, "{}", C::NSID);
    let text = serde_json::to_string(&record).unwrap();
    let again: C::Record = serde_json::from_str(&text).unwrap();
    assert_eq!(serde_json::to_string(&again).unwrap(), text);

    // DAG-CBOR: canonical bytes -> typed -> bytes, byte for byte.
    let data = murmur_lexicon::data::json_to_data(value).unwrap();
    let bytes = serde_ipld_dagcbor::to_vec(&data).unwrap();
    let record: C::Record = serde_ipld_dagcbor::from_slice(&bytes).unwrap();
    assert_eq!(
        serde_ipld_dagcbor::to_vec(&record).unwrap(),
        bytes,
        "{}",
        C::NSID
    );
}

#[test]
fn every_sample_round_trips_json_and_dag_cbor() {
    let samples = samples();
    assert_eq!(samples.len(), 14);
    for (nsid, value) in &samples {
        match *nsid {
            "agent.comms.profile" => round_trip::<Profile>(value),
            "agent.comms.presence" => round_trip::<Presence>(value),
            "agent.comms.message" => round_trip::<Message>(value),
            "agent.comms.task" => round_trip::<Task>(value),
            "agent.comms.claim" => round_trip::<Claim>(value),
            "agent.comms.assignment" => round_trip::<Assignment>(value),
            "agent.comms.status" => round_trip::<Status>(value),
            "agent.comms.result" => round_trip::<Result>(value),
            "agent.comms.ack" => round_trip::<Ack>(value),
            "agent.comms.handoff" => round_trip::<Handoff>(value),
            "agent.comms.broadcast" => round_trip::<Broadcast>(value),
            "agent.comms.proposal" => round_trip::<Proposal>(value),
            "agent.comms.vote" => round_trip::<Vote>(value),
            "agent.comms.tally" => round_trip::<Tally>(value),
            other => panic!("no collection for {other}"),
        }
    }
}

#[test]
fn every_sample_is_valid_for_the_lexicon_validator_too() {
    let set = lexicons();
    assert_eq!(set.len(), 15);
    assert!(set.lint().is_empty());
    for (nsid, value) in samples() {
        assert_eq!(set.validate_record_json(nsid, &value), Ok(()), "{nsid}");
    }
}

#[test]
fn unknown_fields_survive_a_round_trip() {
    let mut value = samples().remove(3).1;
    value["addedInV2"] = json!({"deep": [1, {"x": "y"}]});
    let record: task::Record = serde_json::from_value(value.clone()).unwrap();
    assert_eq!(record.task_type, "translate");
    assert_eq!(serde_json::to_value(&record).unwrap(), value);
    let data = murmur_lexicon::data::json_to_data(&value).unwrap();
    let bytes = serde_ipld_dagcbor::to_vec(&data).unwrap();
    let record: task::Record = serde_ipld_dagcbor::from_slice(&bytes).unwrap();
    assert_eq!(serde_ipld_dagcbor::to_vec(&record).unwrap(), bytes);
}

/// Broken records: generated `validate()` and the lexicon validator agree on the JSON path.
#[test]
fn invalid_records_fail_with_the_same_path_in_both_validators() {
    let set = lexicons();
    let all = samples();
    let get = |nsid: &str| all.iter().find(|(n, _)| *n == nsid).unwrap().1.clone();
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            Task::NSID,
            {
                let mut v = get(Task::NSID);
                v["priority"] = json!(101);
                v
            },
            "$.priority",
        ),
        (
            Task::NSID,
            {
                let mut v = get(Task::NSID);
                v["assignee"] = json!("bob");
                v
            },
            "$.assignee",
        ),
        (
            Task::NSID,
            {
                let mut v = get(Task::NSID);
                v["deadline"] = json!("tomorrow");
                v
            },
            "$.deadline",
        ),
        (
            Task::NSID,
            {
                let mut v = get(Task::NSID);
                v["taskType"] = json!("x".repeat(300));
                v
            },
            "$.taskType",
        ),
        (
            Claim::NSID,
            {
                let mut v = get(Claim::NSID);
                v["task"]["uri"] = json!("https://example.com");
                v
            },
            "$.task.uri",
        ),
        (
            Message::NSID,
            {
                let mut v = get(Message::NSID);
                v["to"] = json!(["did:plc:ok", "nope"]);
                v
            },
            "$.to[1]",
        ),
        (
            Result::NSID,
            {
                let mut v = get(Result::NSID);
                v["artifacts"][0]["name"] = json!("n".repeat(600));
                v
            },
            "$.artifacts[0].name",
        ),
        (
            Result::NSID,
            {
                let mut v = get(Result::NSID);
                v["error"]["message"] = json!("m".repeat(4001));
                v
            },
            "$.error.message",
        ),
        (
            Presence::NSID,
            {
                let mut v = get(Presence::NSID);
                v["ttlSeconds"] = json!(0);
                v
            },
            "$.ttlSeconds",
        ),
        (
            Profile::NSID,
            {
                let mut v = get(Profile::NSID);
                v["acceptedNsids"] = json!(["not an nsid"]);
                v
            },
            "$.acceptedNsids[0]",
        ),
        (
            Proposal::NSID,
            {
                let mut v = get(Proposal::NSID);
                v["options"] = json!(["only one"]);
                v
            },
            "$.options",
        ),
        (
            Proposal::NSID,
            {
                let mut v = get(Proposal::NSID);
                v["voters"] = json!(["did:plc:ok", "nope"]);
                v
            },
            "$.voters[1]",
        ),
        (
            Vote::NSID,
            {
                let mut v = get(Vote::NSID);
                v["choice"] = json!("c".repeat(257));
                v
            },
            "$.choice",
        ),
        (
            Tally::NSID,
            {
                let mut v = get(Tally::NSID);
                v["counts"][1]["votes"] = json!(-1);
                v
            },
            "$.counts[1].votes",
        ),
    ];
    for (nsid, value, path) in cases {
        let runtime = set.validate_record_json(nsid, &value).expect_err(path);
        assert_eq!(runtime[0].path, path, "{nsid}: {runtime:?}");
        let generated = match nsid {
            "agent.comms.task" => serde_json::from_value::<task::Record>(value)
                .unwrap()
                .validate(),
            "agent.comms.claim" => serde_json::from_value::<<Claim as Collection>::Record>(value)
                .unwrap()
                .validate(),
            "agent.comms.message" => {
                serde_json::from_value::<<Message as Collection>::Record>(value)
                    .unwrap()
                    .validate()
            }
            "agent.comms.result" => serde_json::from_value::<result::Record>(value)
                .unwrap()
                .validate(),
            "agent.comms.presence" => {
                serde_json::from_value::<<Presence as Collection>::Record>(value)
                    .unwrap()
                    .validate()
            }
            "agent.comms.profile" => {
                serde_json::from_value::<<Profile as Collection>::Record>(value)
                    .unwrap()
                    .validate()
            }
            "agent.comms.proposal" => {
                serde_json::from_value::<<Proposal as Collection>::Record>(value)
                    .unwrap()
                    .validate()
            }
            "agent.comms.vote" => serde_json::from_value::<<Vote as Collection>::Record>(value)
                .unwrap()
                .validate(),
            "agent.comms.tally" => serde_json::from_value::<<Tally as Collection>::Record>(value)
                .unwrap()
                .validate(),
            other => panic!("{other}"),
        };
        assert_eq!(generated.unwrap_err().path, path, "{nsid}");
    }
}

#[test]
fn into_record_sets_the_type() {
    let data = serde_json::from_value::<task::Record>(samples().remove(3).1)
        .unwrap()
        .data;
    let record = data.into_record();
    let value = serde_json::to_value(&record).unwrap();
    assert_eq!(value["$type"], "agent.comms.task");
    assert_eq!(lexicons().validate_record_json(Task::NSID, &value), Ok(()));
}

#[test]
fn markers_name_their_collections() {
    assert_eq!(Task::NSID, "agent.comms.task");
    assert_eq!(Result::NSID, "agent.comms.result");
    assert_eq!(
        Task::repo_path(&"3kznmn7xqxl22".parse().unwrap()),
        "agent.comms.task/3kznmn7xqxl22"
    );
}
