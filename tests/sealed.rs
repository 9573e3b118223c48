//! Sealed payloads against the real local network (2 PDS hosts): a sealed task and its
//! result readable by the requester and the worker only, while a third agent sees the
//! records and not the payloads; tampered and copied payloads rejected with their reasons;
//! a key rotation; a sealed blob opened by its recipient only, tampered and copied ones
//! refused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use murmur::comms::agent::comms::message;
use murmur::comms::{Claim, Message, Result as ResultC, Task};
use murmur::firehose::{Rejected, Rejection};
use murmur::pds::Writer;
use murmur::seal::{Keyring, OpenError};
use murmur::{
    Agent, AgentError, Author, HandlerError, Job, Record, SealedBlobs, State, TaskSpec, Unsealed,
    Worker,
};
use murmur_devnet::Devnet;
use murmur_e2e::{hosts, list_all, shared, wait_for, writer};

/// An agent on the shared network with its own keys that hears only `peers`, replaying
/// from the start so nothing written before its stream connected is missed.
fn agent(net: &Devnet, writer: Writer, peers: &[String]) -> murmur::AgentBuilder {
    let ring = Keyring::from_keys(
        writer.did(),
        vec![murmur::seal::KeyPair::generate().unwrap()],
    )
    .unwrap();
    Agent::builder(writer)
        .watch_all(hosts(net))
        .plc_url(net.plc_url())
        .start_cursor(0)
        .peers(peers.to_vec())
        .keyring(ring)
}

/// Waits until `agent` has seen `did`'s profile (its encryption keys): sealing to `did`
/// needs them.
async fn profile_seen(agent: &Agent, did: &str) {
    wait_for(&format!("{did}'s profile"), Duration::from_secs(20), || {
        agent
            .registry()
            .get(did)
            .is_some_and(|a| a.profile.is_some())
    })
    .await;
}

type Rejections = Arc<Mutex<Vec<(String, Rejection)>>>;

fn collect(into: &Rejections) -> impl Fn(&Rejected, &Rejection) + Send + Sync + 'static {
    let into = Arc::clone(into);
    move |what, why| into.lock().unwrap().push((what.uri(), why.clone()))
}

fn json_of<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_task_is_read_by_its_worker_and_requester_only() {
    let net = shared().await;
    let w_alice = writer(net, 0, "salice").await;
    let w_bob = writer(net, 1, "sbob").await;
    let w_carol = writer(net, 0, "scarol").await;
    let dids: Vec<String> = [&w_alice, &w_bob, &w_carol]
        .iter()
        .map(|w| w.did().to_string())
        .collect();
    let secret = "the launch code is 0000";

    // Bob and Carol both take `decode` tasks; only Bob can read this one.
    let seen_by_bob = Arc::new(Mutex::new(Vec::new()));
    let bob_work = {
        let seen = Arc::clone(&seen_by_bob);
        Worker::new(move |job: Job| {
            let seen = Arc::clone(&seen);
            async move {
                seen.lock().unwrap().push((job.sealed, job.payload_json()));
                let text = job.payload_json()["text"]
                    .as_str()
                    .unwrap_or("")
                    .to_uppercase();
                Ok(serde_json::json!({ "upper": text }))
            }
        })
        .capabilities(["decode"])
    };
    let bob = agent(net, w_bob.clone(), &dids)
        .requester(false)
        .worker(bob_work)
        .start()
        .await
        .unwrap();
    // Carol is a worker for the same task type and watches every task record as it is.
    let carol_rejects: Rejections = Arc::default();
    let carol_saw: Arc<Mutex<Vec<String>>> = Arc::default();
    let carol = {
        let saw = Arc::clone(&carol_saw);
        agent(net, w_carol.clone(), &dids)
            .worker(
                Worker::new(|_job: Job| async move { Ok(serde_json::json!({"carol": true})) })
                    .capabilities(["decode"]),
            )
            .handler(move |task: Record<Task>| {
                saw.lock().unwrap().push(json_of(&task.value));
                async { Ok(()) }
            })
            .on_rejected(collect(&carol_rejects))
            .start()
            .await
            .unwrap()
    };
    let alice = agent(net, w_alice.clone(), &dids).start().await.unwrap();
    // Alice seals to Bob's key from his profile: wait until it is published.
    let bob_did = bob.did().to_string();
    profile_seen(&alice, &bob_did).await;

    let handle = alice
        .request(
            TaskSpec::new("decode")
                .title("public title")
                .payload(serde_json::json!({ "text": secret }))
                .sealed_for([bob.did()]),
        )
        .await
        .unwrap();
    let task_uri = handle.uri.clone();
    let result = handle.await_result(Duration::from_secs(30)).await.unwrap();
    assert_eq!(result.worker, bob.did());
    assert_eq!(result.output_json()["upper"], secret.to_uppercase());
    assert_eq!(
        *seen_by_bob.lock().unwrap(),
        vec![(true, serde_json::json!({ "text": secret }))]
    );

    // Carol saw the task exist, sealed, and never claimed it; the task and Bob's result
    // were not for her.
    let task_rkey = task_uri.rsplit('/').next().unwrap().to_string();
    wait_for("carol's rejections", Duration::from_secs(20), || {
        let r = carol_rejects.lock().unwrap();
        let not_for_me = |path: &str| {
            r.iter()
                .any(|(uri, why)| uri.ends_with(path) && matches!(why, Rejection::NotForMe { .. }))
        };
        not_for_me(&format!("agent.comms.task/{task_rkey}"))
            && not_for_me(&format!("agent.comms.result/{task_rkey}"))
    })
    .await;
    {
        let saw = carol_saw.lock().unwrap();
        let task = saw
            .iter()
            .find(|t| t.contains("public title"))
            .expect("carol sees the task record");
        assert!(task.contains("agent.comms.defs#sealed"), "{task}");
        assert!(!task.contains("launch code"), "{task}");
    }
    assert!(list_all::<Claim>(&w_carol).await.is_empty());
    assert!(
        carol_rejects
            .lock()
            .unwrap()
            .iter()
            .all(|(_, why)| matches!(why, Rejection::NotForMe { .. })),
        "only not-for-me outcomes: {:?}",
        carol_rejects.lock().unwrap()
    );

    // Nothing readable in the repos: the task and the result hold sealed payloads.
    let tasks = list_all::<Task>(&w_alice).await;
    let results = list_all::<ResultC>(&w_bob).await;
    assert_eq!((tasks.len(), results.len()), (1, 1));
    for text in [json_of(&tasks[0].value), json_of(&results[0].value)] {
        assert!(text.contains("agent.comms.defs#sealed"), "{text}");
        assert!(!text.to_lowercase().contains("launch code"), "{text}");
    }
    for a in [alice, bob, carol] {
        a.shutdown().await;
    }
}

/// Alice's sealed message payload for `to` (the object for `message.payload`).
async fn sealed_payload(alice: &Agent, to: &str, value: serde_json::Value) -> serde_json::Value {
    let sealed = alice
        .seal_for::<Message>(&[to], "payload", &value)
        .await
        .unwrap();
    serde_json::to_value(sealed).unwrap()
}

fn message_with(to: &str, payload: serde_json::Value) -> message::Record {
    message::RecordData {
        to: Some(vec![to.to_string()]),
        thread: None,
        reply_to: None,
        text: None,
        payload_type: None,
        payload: Some(serde_json::from_value(payload).unwrap()),
        created_at: murmur::now(),
    }
    .into_record()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_copied_payloads_are_rejected_with_their_reasons() {
    let net = shared().await;
    let w_alice = writer(net, 0, "talice").await;
    let w_bob = writer(net, 1, "tbob").await;
    let w_mallory = writer(net, 1, "tmallory").await;
    let dids: Vec<String> = [&w_alice, &w_bob, &w_mallory]
        .iter()
        .map(|w| w.did().to_string())
        .collect();

    let opened: Arc<Mutex<Vec<(String, serde_json::Value)>>> = Arc::default();
    let rejects: Rejections = Arc::default();
    let bob = {
        let opened = Arc::clone(&opened);
        agent(net, w_bob.clone(), &dids)
            .requester(false)
            .handler(move |m: Unsealed<Message>| {
                opened.lock().unwrap().push((
                    m.record.uri.clone(),
                    serde_json::to_value(&m.record.value.payload).unwrap(),
                ));
                async { Ok(()) }
            })
            .on_rejected(collect(&rejects))
            .start()
            .await
            .unwrap()
    };
    let alice = agent(net, w_alice.clone(), &dids)
        .requester(false)
        .start()
        .await
        .unwrap();
    let bob_did = bob.did().to_string();
    profile_seen(&alice, &bob_did).await;

    // The genuine one opens.
    let good = alice
        .send_sealed(&[&bob_did], serde_json::json!({ "n": 1 }))
        .await
        .unwrap();
    // The same construction with one ciphertext byte flipped.
    let mut tampered = sealed_payload(&alice, &bob_did, serde_json::json!({ "n": 2 })).await;
    let ct = tampered["ciphertext"].as_str().unwrap().to_string();
    let flipped = if ct.starts_with('A') { "B" } else { "A" };
    tampered["ciphertext"] = format!("{flipped}{}", &ct[1..]).into();
    let bad = w_alice
        .create::<Message>(&message_with(&bob_did, tampered))
        .await
        .unwrap();
    // Alice's genuine payload, copied by Mallory into a message of her own repo.
    let stolen = sealed_payload(&alice, &bob_did, serde_json::json!({ "n": 3 })).await;
    let copied = w_mallory
        .create::<Message>(&message_with(&bob_did, stolen))
        .await
        .unwrap();

    wait_for("bob's outcomes", Duration::from_secs(30), || {
        opened.lock().unwrap().len() == 1 && rejects.lock().unwrap().len() == 2
    })
    .await;
    assert_eq!(
        *opened.lock().unwrap(),
        vec![(good.uri.clone(), serde_json::json!({ "n": 1 }))]
    );
    let reason_of = |uri: &str| {
        rejects
            .lock()
            .unwrap()
            .iter()
            .find(|(u, _)| u == uri)
            .map(|(_, why)| why.clone())
            .unwrap_or_else(|| panic!("no rejection for {uri}"))
    };
    assert!(
        matches!(
            reason_of(&bad.uri),
            Rejection::Sealed { reason: OpenError::Tampered, ref field, .. } if field == "payload"
        ),
        "{:?}",
        reason_of(&bad.uri)
    );
    assert!(
        matches!(
            reason_of(&copied.uri),
            Rejection::Sealed {
                reason: OpenError::WrongContext,
                ..
            }
        ),
        "{:?}",
        reason_of(&copied.uri)
    );
    // The reasons name no plaintext and no key.
    for (_, why) in rejects.lock().unwrap().iter() {
        assert!(!why.to_string().contains("\"n\""), "{why}");
    }
    alice.shutdown().await;
    bob.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rotation_new_payloads_use_the_new_key_and_old_ones_still_open() {
    let net = shared().await;
    let w_alice = writer(net, 0, "ralice").await;
    let w_bob = writer(net, 1, "rbob").await;
    let dids: Vec<String> = [&w_alice, &w_bob]
        .iter()
        .map(|w| w.did().to_string())
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("bob.keys.json");

    let opened: Arc<Mutex<Vec<serde_json::Value>>> = Arc::default();
    let bob = {
        let opened = Arc::clone(&opened);
        Agent::builder(w_bob.clone())
            .watch_all(hosts(net))
            .plc_url(net.plc_url())
            .start_cursor(0)
            .peers(dids.clone())
            .requester(false)
            .key_file(&key_file)
            .handler(move |m: Unsealed<Message>| {
                opened
                    .lock()
                    .unwrap()
                    .push(serde_json::to_value(&m.record.value.payload).unwrap());
                async { Ok(()) }
            })
            .start()
            .await
            .unwrap()
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let alice = agent(net, w_alice.clone(), &dids)
        .requester(false)
        .start()
        .await
        .unwrap();
    let bob_did = bob.did().to_string();
    let first = bob.keyring().unwrap().current();
    let listed = |id: String| {
        let alice = alice.clone();
        let bob_did = bob_did.clone();
        move || {
            alice
                .registry()
                .get(&bob_did)
                .and_then(|a| a.profile)
                .and_then(|p| p.data.encryption_keys)
                .and_then(|k| k.first().map(|k| k.id.clone()))
                .is_some_and(|newest| newest == id)
        }
    };
    wait_for(
        "bob's first key",
        Duration::from_secs(20),
        listed(first.id().to_string()),
    )
    .await;
    let old = alice
        .send_sealed(&[&bob_did], serde_json::json!({ "before": true }))
        .await
        .unwrap();

    let second = bob.rotate_keys().await.unwrap();
    assert_ne!(first.id(), second.id());
    wait_for(
        "bob's new key",
        Duration::from_secs(20),
        listed(second.id().to_string()),
    )
    .await;
    let new = alice
        .send_sealed(&[&bob_did], serde_json::json!({ "after": true }))
        .await
        .unwrap();

    wait_for("both messages opened", Duration::from_secs(30), || {
        opened.lock().unwrap().len() == 2
    })
    .await;
    let messages = list_all::<Message>(&w_alice).await;
    let key_id_for_bob = |uri: &str| {
        let m = messages.iter().find(|m| m.uri == uri).unwrap();
        let payload = serde_json::to_value(&m.value.payload).unwrap();
        payload["recipients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["did"] == bob_did.as_str())
            .map(|r| r["keyId"].as_str().unwrap().to_string())
            .unwrap()
    };
    assert_eq!(key_id_for_bob(&old.uri), first.id());
    assert_eq!(key_id_for_bob(&new.uri), second.id());

    // The old payload still opens for Bob after the rotation, with the keyring as stored.
    let ring = Keyring::load_or_create(&key_file, &bob_did).unwrap();
    assert_eq!(ring.public_keys(), vec![second, first]);
    let m = messages.iter().find(|m| m.uri == old.uri).unwrap();
    let (plain, fields) = murmur::firehose::unseal::<Message>(
        m.value.clone(),
        alice.did(),
        Some(&ring),
        &format!("agent.comms.message/{}", m.rkey),
    )
    .unwrap();
    assert_eq!(fields, vec!["payload".to_string()]);
    assert_eq!(
        serde_json::to_value(&plain.payload).unwrap(),
        serde_json::json!({ "before": true })
    );
    alice.shutdown().await;
    bob.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_task_is_not_handed_off_in_the_clear() {
    let net = shared().await;
    let w_alice = writer(net, 0, "halice").await;
    let w_bob = writer(net, 1, "hbob").await;
    let dids: Vec<String> = [&w_alice, &w_bob]
        .iter()
        .map(|w| w.did().to_string())
        .collect();
    let bob = agent(net, w_bob.clone(), &dids)
        .requester(false)
        .worker(
            Worker::new(|job: Job| async move {
                let refused = job
                    .hand_off(
                        "did:plc:someoneelse",
                        "busy",
                        serde_json::json!({"state": 1}),
                    )
                    .await
                    .unwrap_err();
                Ok(serde_json::json!({ "refused": refused.to_string() }))
            })
            .capabilities(["pass"]),
        )
        .start()
        .await
        .unwrap();
    let alice = agent(net, w_alice.clone(), &dids).start().await.unwrap();
    let bob_did = bob.did().to_string();
    profile_seen(&alice, &bob_did).await;
    let result = alice
        .request(
            TaskSpec::new("pass")
                .payload(serde_json::json!({ "secret": 1 }))
                .sealed_for([bob_did.as_str()]),
        )
        .await
        .unwrap()
        .await_result(Duration::from_secs(30))
        .await
        .unwrap();
    let refused = result.output_json()["refused"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(refused.contains("cannot be handed off"), "{refused}");
    assert!(list_all::<murmur::comms::Handoff>(&w_bob).await.is_empty());
    alice.shutdown().await;
    bob.shutdown().await;
}

/// Marks the plaintext of a sealed file, so that any copy of it in the clear shows.
const MARKER: &[u8] = b"PLAINTEXT-MARKER";

/// `len` random bytes with [`MARKER`] every 4 KiB.
fn secret_file(len: usize) -> Vec<u8> {
    let mut file: Vec<u8> = (0..len).map(|_| fastrand::u8(..)).collect();
    for at in (0..len - MARKER.len()).step_by(4096) {
        file[at..at + MARKER.len()].copy_from_slice(MARKER);
    }
    file
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// What a handler got opening the sealed blob of each message: (message uri, outcome).
type Opened = Arc<Mutex<Vec<(String, Result<Vec<u8>, AgentError>)>>>;

/// A handler: opens the sealed blob in a message's payload, as the agent it runs in.
async fn open_into(
    into: Opened,
    m: Record<Message>,
    from: Author,
    blobs: State<SealedBlobs>,
) -> Result<(), HandlerError> {
    if let Some(payload) = &m.value.payload {
        let outcome = blobs.open::<Message>(&from.0, "payload", payload).await;
        into.lock().unwrap().push((m.uri.clone(), outcome));
    }
    Ok(())
}

fn outcome_of<'a>(
    opened: &'a [(String, Result<Vec<u8>, AgentError>)],
    uri: &str,
) -> &'a Result<Vec<u8>, AgentError> {
    &opened
        .iter()
        .find(|(u, _)| u == uri)
        .unwrap_or_else(|| panic!("nothing opened for {uri}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_blob_opens_for_its_recipient_only_and_not_once_tampered_or_copied() {
    let net = shared().await;
    let w_alice = writer(net, 0, "balice").await;
    let w_bob = writer(net, 1, "bbob").await;
    let w_carol = writer(net, 0, "bcarol").await;
    let dids: Vec<String> = [&w_alice, &w_bob, &w_carol]
        .iter()
        .map(|w| w.did().to_string())
        .collect();
    let file = secret_file(300 * 1024);

    let bob_opened: Opened = Arc::default();
    let bob = {
        let into = Arc::clone(&bob_opened);
        agent(net, w_bob.clone(), &dids)
            .requester(false)
            .handler(
                move |m: Record<Message>, from: Author, blobs: State<SealedBlobs>| {
                    open_into(Arc::clone(&into), m, from, blobs)
                },
            )
            .start()
            .await
            .unwrap()
    };
    let carol_opened: Opened = Arc::default();
    let carol = {
        let into = Arc::clone(&carol_opened);
        agent(net, w_carol.clone(), &dids)
            .requester(false)
            .handler(
                move |m: Record<Message>, from: Author, blobs: State<SealedBlobs>| {
                    open_into(Arc::clone(&into), m, from, blobs)
                },
            )
            .start()
            .await
            .unwrap()
    };
    let alice = agent(net, w_alice.clone(), &dids)
        .requester(false)
        .start()
        .await
        .unwrap();
    let bob_did = bob.did().to_string();
    profile_seen(&alice, &bob_did).await;

    // Alice seals the file for Bob into a message; Carol hears the message too.
    let envelope = alice
        .sealed_blobs()
        .seal::<Message>(&[&bob_did], "payload", &file)
        .await
        .unwrap();
    let envelope = serde_json::to_value(&envelope).unwrap();
    assert_eq!(envelope["$type"], "agent.comms.defs#sealedBlob");
    let good = w_alice
        .create::<Message>(&message_with(&bob_did, envelope.clone()))
        .await
        .unwrap();

    // What the PDS holds and serves to anyone: ciphertext only, 16 bytes longer.
    let blob = &envelope["blob"];
    assert_eq!(blob["mimeType"], "application/octet-stream");
    let size = blob["size"].as_u64().unwrap() as usize;
    assert_eq!(size, file.len() + 16);
    let cid: murmur::pds::Cid = blob["ref"]["$link"].as_str().unwrap().parse().unwrap();
    let raw = murmur::pds::Reader::new(w_alice.pds_url())
        .unwrap()
        .get_blob(alice.did(), &cid, size)
        .await
        .unwrap();
    assert_eq!(raw.len(), size);
    assert!(contains(&file, MARKER));
    assert!(!contains(&raw, MARKER), "the blob holds plaintext");
    assert!(
        !contains(&raw, &file[1000..1064]),
        "the blob holds plaintext"
    );

    // The same envelope pointing to the ciphertext with one byte changed, uploaded anew.
    let mut changed = raw.clone();
    changed[size / 2] ^= 1;
    let changed = w_alice
        .upload_blob(changed, "application/octet-stream")
        .await
        .unwrap();
    let mut tampered = envelope.clone();
    tampered["blob"] = serde_json::to_value(&changed).unwrap();
    let bad = w_alice
        .create::<Message>(&message_with(&bob_did, tampered))
        .await
        .unwrap();

    // Carol copies the ciphertext and the envelope into a message of her own repo.
    let copy = w_carol
        .upload_blob(raw.clone(), "application/octet-stream")
        .await
        .unwrap();
    assert_eq!(
        serde_json::to_value(&copy).unwrap(),
        *blob,
        "same bytes, same CID"
    );
    let copied = w_carol
        .create::<Message>(&message_with(&bob_did, envelope.clone()))
        .await
        .unwrap();

    wait_for(
        "bob's and carol's outcomes",
        Duration::from_secs(60),
        || {
            let seen = |opened: &Opened, uris: &[&str]| {
                let o = opened.lock().unwrap();
                uris.iter().all(|uri| o.iter().any(|(u, _)| u == uri))
            };
            seen(&bob_opened, &[&good.uri, &bad.uri, &copied.uri])
                && seen(&carol_opened, &[&good.uri])
        },
    )
    .await;
    {
        let bob_got = bob_opened.lock().unwrap();
        match outcome_of(&bob_got, &good.uri) {
            Ok(bytes) => assert!(bytes == &file, "bob opened other bytes"),
            Err(e) => panic!("bob could not open his file: {e}"),
        }
        let tampered = outcome_of(&bob_got, &bad.uri);
        assert!(
            matches!(
                tampered,
                Err(AgentError::BlobOpen {
                    reason: OpenError::Tampered,
                    ..
                })
            ),
            "{tampered:?}"
        );
        let copied = outcome_of(&bob_got, &copied.uri);
        assert!(
            matches!(
                copied,
                Err(AgentError::BlobOpen {
                    reason: OpenError::WrongContext,
                    ..
                })
            ),
            "{copied:?}"
        );
        for (_, outcome) in bob_got.iter() {
            if let Err(e) = outcome {
                assert!(!e.to_string().contains("PLAINTEXT"), "{e}");
            }
        }
    }
    {
        let carol_got = carol_opened.lock().unwrap();
        let not_hers = outcome_of(&carol_got, &good.uri);
        assert!(
            matches!(
                not_hers,
                Err(AgentError::BlobOpen {
                    reason: OpenError::NotForMe { .. },
                    ..
                })
            ),
            "{not_hers:?}"
        );
    }
    for a in [alice, bob, carol] {
        a.shutdown().await;
    }
}
