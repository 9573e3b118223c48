//! Every agent.comms record type, written by the writer to the real local PDS and read back
//! equal (field for field, after a trip through the PDS's storage).

use atrium_api::types::Collection;
use murmur_comms::{
    Ack, Assignment, Broadcast, Claim, Handoff, Message, Presence, Profile, Result as TaskResult,
    Status, Task,
};
use murmur_devnet::Devnet;
use murmur_lexicon::Validate;
use murmur_pds::Writer;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Writes `value` as a `C` record (at `rkey`, or a fresh TID), reads it back, compares.
async fn write_and_read_back<C>(writer: &Writer, rkey: Option<&str>, value: Value) -> Value
where
    C: Collection,
    C::Record: Validate + Serialize + DeserializeOwned,
{
    let record: C::Record = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{} sample does not decode: {e}", C::NSID));
    record
        .validate()
        .unwrap_or_else(|e| panic!("{} sample is invalid: {e}", C::NSID));
    let written = match rkey {
        Some(rkey) => writer.create_with_rkey::<C>(rkey, &record).await,
        None => writer.create::<C>(&record).await,
    }
    .unwrap_or_else(|e| panic!("{} not written: {e}", C::NSID));
    let stored = writer
        .get::<C>(&written.rkey)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{} not found after writing", C::NSID));
    assert_eq!(
        stored.cid,
        written.cid,
        "{}: the PDS stored other bytes",
        C::NSID
    );
    let back = serde_json::to_value(&stored.value).unwrap();
    assert_eq!(back, serde_json::to_value(&record).unwrap(), "{}", C::NSID);
    assert_eq!(back["$type"], C::NSID);
    json!({ "uri": written.uri, "cid": written.cid.to_string() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_agent_comms_type_is_written_and_read_back_equal() {
    let net = tokio::task::spawn_blocking(|| Devnet::shared().map_err(|e| e.to_string()))
        .await
        .unwrap()
        .unwrap();
    let account = net
        .create_account(1, &net.unique_handle("comms"), "pw-comms")
        .await
        .unwrap();
    let w = Writer::login(&account.pds_url, &account.did, "pw-comms")
        .await
        .unwrap();
    let now = "2026-11-23T22:00:00.000Z";
    let peer = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";

    write_and_read_back::<Profile>(&w, Some("self"), json!({"$type": Profile::NSID, "name": "translator", "capabilities": ["translate"], "acceptedNsids": ["agent.comms.task"], "operator": peer, "maxConcurrentTasks": 4, "createdAt": now})).await;
    write_and_read_back::<Presence>(&w, Some("self"), json!({"$type": Presence::NSID, "state": "online", "load": 10, "ttlSeconds": 60, "createdAt": now})).await;
    let task = write_and_read_back::<Task>(&w, None, json!({"$type": Task::NSID, "taskType": "translate", "title": "README to French", "payload": {"text": "hello", "nested": {"list": [1, 2, 3]}}, "assignee": peer, "deadline": "2026-11-24T00:00:00.000Z", "leaseSeconds": 300, "maxAttempts": 3, "priority": 70, "createdAt": now})).await;
    let task_rkey = task["uri"]
        .as_str()
        .unwrap()
        .rsplit('/')
        .next()
        .unwrap()
        .to_string();
    let message = write_and_read_back::<Message>(&w, None, json!({"$type": Message::NSID, "to": [peer], "thread": task, "text": "hello", "payload": {"$type": "com.example.greeting", "n": 1}, "createdAt": now})).await;
    let claim = write_and_read_back::<Claim>(&w, None, json!({"$type": Claim::NSID, "task": task, "leaseSeconds": 120, "note": "idle", "createdAt": now})).await;
    let assignment = write_and_read_back::<Assignment>(&w, Some(&task_rkey), json!({"$type": Assignment::NSID, "task": task, "claim": claim, "worker": peer, "attempt": 1, "leaseExpiresAt": "2026-11-23T22:05:00.000Z", "createdAt": now})).await;
    write_and_read_back::<Status>(&w, Some(&task_rkey), json!({"$type": Status::NSID, "task": task, "state": "working", "progress": 40, "attempt": 1, "leaseExpiresAt": "2026-11-23T22:10:00.000Z", "createdAt": now})).await;
    let blob = w
        .upload_blob(b"# Bonjour\n".to_vec(), "text/markdown")
        .await
        .unwrap();
    write_and_read_back::<TaskResult>(&w, Some(&task_rkey), json!({"$type": TaskResult::NSID, "task": task, "outcome": "partial", "output": {"text": "bonjour"}, "artifacts": [{"name": "fr.md", "blob": serde_json::to_value(&blob).unwrap()}], "error": {"code": "timeout", "message": "second half not done", "retryable": true}, "attempt": 2, "createdAt": now})).await;
    write_and_read_back::<Ack>(
        &w,
        None,
        json!({"$type": Ack::NSID, "subject": message, "state": "accepted", "createdAt": now}),
    )
    .await;
    write_and_read_back::<Handoff>(&w, None, json!({"$type": Handoff::NSID, "task": task, "assignment": assignment, "to": peer, "reason": "shift over", "context": {"done": 3}, "createdAt": now})).await;
    write_and_read_back::<Broadcast>(&w, None, json!({"$type": Broadcast::NSID, "topic": "maintenance", "text": "PDS restarts at noon", "expiresAt": "2026-11-24T12:00:00.000Z", "createdAt": now})).await;
}
