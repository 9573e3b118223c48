//! The writer against the real local PDS (official TypeScript implementation).

mod support;

use std::time::Duration;

use murmur_devnet::Devnet;
use murmur_pds::{BatchOutcome, Error, RetryPolicy, Secret, Session, Swap, Writer, record_cid};
use support::{Note, Notes, expired_jwt};

fn shared() -> &'static Devnet {
    Devnet::shared().unwrap_or_else(|e| panic!("{e}"))
}

async fn account(net: &Devnet, prefix: &str) -> murmur_devnet::Account {
    net.create_account(0, &net.unique_handle(prefix), "pw-not-logged")
        .await
        .unwrap()
}

fn note(text: &str) -> Note {
    Note {
        text: text.into(),
        tags: vec!["a".into()],
        priority: 3,
        attachment: None,
    }
}

#[tokio::test]
async fn login_by_handle_and_did_then_create_get_list_put_delete() {
    let net = shared();
    let acct = account(net, "writer").await;
    let by_handle = Writer::login(&acct.pds_url, &acct.handle, &acct.password)
        .await
        .unwrap();
    assert_eq!(by_handle.did(), acct.did);
    let w = Writer::login(&acct.pds_url, &acct.did, &acct.password)
        .await
        .unwrap();

    let first = w.create::<Notes>(&note("first")).await.unwrap();
    assert!(
        first
            .uri
            .starts_with(&format!("at://{}/{}/", acct.did, "test.murmur.note"))
    );
    assert_eq!(
        first.cid,
        record_cid::<Notes>(&note("first")).unwrap(),
        "local CID = PDS CID"
    );
    let commit = first.commit.clone().expect("commit rev returned");
    assert_eq!(commit.rev.len(), 13);

    let got = w
        .get::<Notes>(&first.rkey)
        .await
        .unwrap()
        .expect("record exists");
    assert_eq!(got.value, note("first"));
    assert_eq!(got.cid, first.cid);
    assert_eq!(got.uri, first.uri);

    let second = w.create::<Notes>(&note("second")).await.unwrap();
    assert!(second.rkey > first.rkey, "TID keys sort in creation order");
    assert!(second.commit.as_ref().unwrap().rev > commit.rev);

    let page = w.list::<Notes>(1, None, true).await.unwrap();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.records[0].value, note("first"));
    let page2 = w
        .list::<Notes>(10, page.cursor.as_deref(), true)
        .await
        .unwrap();
    assert_eq!(page2.records.len(), 1);
    assert_eq!(page2.records[0].value, note("second"));

    let updated = w
        .put::<Notes>(&first.rkey, &note("first, edited"), Some(first.cid))
        .await
        .unwrap();
    assert_ne!(updated.cid, first.cid);
    let got = w.get::<Notes>(&first.rkey).await.unwrap().unwrap();
    assert_eq!(got.value.text, "first, edited");

    let deleted = w.delete::<Notes>(&first.rkey, None).await.unwrap();
    assert!(deleted.is_some());
    assert!(w.get::<Notes>(&first.rkey).await.unwrap().is_none());
    // Deleting what is gone succeeds.
    w.delete::<Notes>(&first.rkey, None).await.unwrap();
}

#[tokio::test]
async fn wrong_password_is_login_refused_without_the_password_in_the_error() {
    let net = shared();
    let acct = account(net, "badpw").await;
    let err = Writer::login(&acct.pds_url, &acct.handle, "hunter2-wrong")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::LoginRefused { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("hunter2"));
}

#[tokio::test]
async fn swap_record_conflict_is_a_typed_error() {
    let net = shared();
    let acct = account(net, "swap").await;
    let w = Writer::login(&acct.pds_url, &acct.handle, &acct.password)
        .await
        .unwrap();
    let v1 = w.put::<Notes>("fixed", &note("v1"), None).await.unwrap();
    let v2 = w
        .put::<Notes>("fixed", &note("v2"), Some(v1.cid))
        .await
        .unwrap();
    // A second writer still holding v1's CID loses the race.
    let err = w
        .put::<Notes>("fixed", &note("v3"), Some(v1.cid))
        .await
        .unwrap_err();
    match &err {
        Error::Conflict { swap, .. } => assert_eq!(*swap, Swap::Record),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(err.is_conflict());
    let err = w.delete::<Notes>("fixed", Some(v1.cid)).await.unwrap_err();
    assert!(err.is_conflict(), "{err:?}");
    assert_eq!(w.get::<Notes>("fixed").await.unwrap().unwrap().cid, v2.cid);
}

#[tokio::test]
async fn invalid_record_is_refused_before_any_http_call() {
    let net = shared();
    let acct = account(net, "invalid").await;
    let w = Writer::login(&acct.pds_url, &acct.handle, &acct.password)
        .await
        .unwrap();
    let before = w.http_requests();
    let mut bad = note("x");
    bad.priority = 99; // the fixture's lexicon allows 1..=5
    let err = w.create::<Notes>(&bad).await.unwrap_err();
    match &err {
        Error::InvalidRecord { path, nsid, .. } => {
            assert_eq!(path, "$.priority");
            assert_eq!(nsid, "test.murmur.note");
        }
        other => panic!("{other:?}"),
    }
    assert!(w.put::<Notes>("k", &bad, None).await.is_err());
    let mut batch = w.batch();
    assert!(batch.create::<Notes>(&bad).is_err());
    let huge = note(&"x".repeat(1_100_000));
    let err = w.create::<Notes>(&huge).await.unwrap_err();
    assert!(matches!(err, Error::RecordTooLarge { .. }), "{err:?}");
    assert_eq!(w.http_requests(), before, "no request was sent");

    // The same with nothing listening: the error is the validation, not the connection.
    // (A session names its PDS, and a writer refuses a session of another host.)
    let closed = Writer::builder("http://127.0.0.1:9")
        .with_session(Session {
            pds: "http://127.0.0.1:9".into(),
            ..w.session()
        })
        .unwrap();
    let err = closed.create::<Notes>(&bad).await.unwrap_err();
    assert!(matches!(err, Error::InvalidRecord { .. }), "{err:?}");
    assert_eq!(closed.http_requests(), 0);
}

#[tokio::test]
async fn expired_access_token_is_refreshed_once_during_concurrent_writes() {
    let net = shared();
    let acct = account(net, "refresh").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("session.json");
    // A genuinely expired access token (signed with the local PDS's dev secret, exp in the
    // past) and a valid refresh token, as a session file left by an earlier run.
    Session {
        did: acct.did.clone(),
        handle: acct.handle.clone(),
        pds: acct.pds_url.clone(),
        access_jwt: Secret::new(expired_jwt(&acct.access_jwt)),
        refresh_jwt: Secret::new(acct.refresh_jwt.clone()),
    }
    .save(&file)
    .unwrap();
    let w = Writer::builder(&acct.pds_url)
        .session_file(&file)
        .resume()
        .unwrap();
    assert_eq!(w.http_requests(), 0, "resume makes no call");

    let mut tasks = Vec::new();
    for i in 0..16 {
        let w = w.clone();
        tasks.push(tokio::spawn(async move {
            w.create::<Notes>(&note(&format!("concurrent {i}"))).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(w.session_refreshes(), 1, "single-flight refresh");
    let saved = Session::load(&file).unwrap();
    assert_ne!(saved.access_jwt.expose(), expired_jwt(&acct.access_jwt));
    assert_ne!(
        saved.refresh_jwt.expose(),
        acct.refresh_jwt,
        "refresh token rotated"
    );
    let page = w.list::<Notes>(100, None, false).await.unwrap();
    assert_eq!(page.records.len(), 16);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }
}

#[tokio::test]
async fn invalid_refresh_token_is_session_expired_and_does_not_wedge() {
    let net = shared();
    let acct = account(net, "revoked").await;
    let w = Writer::builder(&acct.pds_url)
        .with_session(Session {
            did: acct.did.clone(),
            handle: acct.handle.clone(),
            pds: acct.pds_url.clone(),
            access_jwt: Secret::new("not-a-jwt"),
            refresh_jwt: Secret::new("not-a-jwt-either"),
        })
        .unwrap();
    let err = w.create::<Notes>(&note("x")).await.unwrap_err();
    assert!(matches!(err, Error::SessionExpired { .. }), "{err:?}");
    // Not wedged: the next call tries again (and fails the same way, without hanging).
    let err = w.create::<Notes>(&note("y")).await.unwrap_err();
    assert!(matches!(err, Error::SessionExpired { .. }), "{err:?}");
    assert_eq!(w.session_refreshes(), 2);
}

#[tokio::test]
async fn apply_writes_100_records_in_one_commit_and_swap_commit_conflict() {
    let net = shared();
    let acct = account(net, "batch").await;
    let w = Writer::login(&acct.pds_url, &acct.handle, &acct.password)
        .await
        .unwrap();
    let mut batch = w.batch();
    let mut rkeys = Vec::new();
    for i in 0..100 {
        rkeys.push(batch.create::<Notes>(&note(&format!("batch {i}"))).unwrap());
    }
    assert_eq!(batch.len(), 100);
    let done = batch.commit().await.unwrap();
    let commit = done.commit.clone().expect("one commit");
    assert_eq!(done.outcomes.len(), 100);
    for (i, outcome) in done.outcomes.iter().enumerate() {
        let BatchOutcome::Created(written) = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(written.rkey, rkeys[i]);
        assert_eq!(written.commit.as_ref(), Some(&commit));
        assert_eq!(
            written.cid,
            record_cid::<Notes>(&note(&format!("batch {i}"))).unwrap()
        );
    }
    let mut all = Vec::new();
    let mut cursor = None;
    loop {
        let page = w.list::<Notes>(100, cursor.as_deref(), true).await.unwrap();
        all.extend(page.records);
        cursor = page.cursor;
        if cursor.is_none() || all.len() >= 100 {
            break;
        }
    }
    assert_eq!(all.len(), 100);
    assert_eq!(all[42].value, note("batch 42"));

    // swapCommit: current commit succeeds, a stale one conflicts.
    let mut ok = w.batch();
    ok.update::<Notes>(&rkeys[0], &note("edited")).unwrap();
    ok.delete::<Notes>(&rkeys[1]).unwrap();
    ok.swap_commit(commit.cid);
    let done2 = ok.commit().await.unwrap();
    assert!(matches!(done2.outcomes[0], BatchOutcome::Updated(_)));
    assert!(matches!(done2.outcomes[1], BatchOutcome::Deleted { .. }));
    let mut stale = w.batch();
    stale.delete::<Notes>(&rkeys[2]).unwrap();
    stale.swap_commit(commit.cid);
    let err = stale.commit().await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Conflict {
                swap: Swap::Commit,
                ..
            }
        ),
        "{err:?}"
    );

    // Limits are checked before sending.
    let before = w.http_requests();
    let mut big = w.batch();
    for i in 0..201 {
        big.create::<Notes>(&note(&i.to_string())).unwrap();
    }
    assert!(matches!(
        big.commit().await,
        Err(Error::BatchSize { count: 201, .. })
    ));
    assert!(matches!(
        w.batch().commit().await,
        Err(Error::BatchSize { count: 0, .. })
    ));
    assert_eq!(w.http_requests(), before);
}

#[tokio::test]
async fn blob_upload_referenced_from_a_record_and_limit_checked_first() {
    let net = shared();
    let acct = account(net, "blob").await;
    let w = Writer::login(&acct.pds_url, &acct.handle, &acct.password)
        .await
        .unwrap();
    let limit = w.server_limits().await.unwrap().blob_upload_limit;
    assert_eq!(limit, Some(5 * 1024 * 1024), "the PDS advertises its limit");

    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let blob = w
        .upload_blob(payload.clone(), "application/octet-stream")
        .await
        .unwrap();
    let mut n = note("with attachment");
    n.attachment = Some(blob.clone());
    let written = w.create::<Notes>(&n).await.unwrap();
    let got = w.get::<Notes>(&written.rkey).await.unwrap().unwrap();
    assert_eq!(got.value.attachment, Some(blob));

    let before = w.http_requests();
    let err = w
        .upload_blob(vec![0; 5 * 1024 * 1024 + 1], "application/octet-stream")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::BlobTooLarge { .. }), "{err:?}");
    assert_eq!(w.http_requests(), before, "refused before upload");
}

#[tokio::test]
async fn a_referenced_blob_reads_back_from_the_pds_checked_against_its_cid() {
    let net = shared();
    let acct = account(net, "blobread").await;
    let w = Writer::login(&acct.pds_url, &acct.handle, &acct.password)
        .await
        .unwrap();
    let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let blob = w
        .upload_blob(payload.clone(), "application/octet-stream")
        .await
        .unwrap();
    let (cid, size) = match &blob {
        murmur_pds::BlobRef::Typed(atrium_api::types::TypedBlobRef::Blob(b)) => (b.r#ref.0, b.size),
        other => panic!("an untyped blob ref: {other:?}"),
    };
    assert_eq!(cid, murmur_pds::blob_cid(&payload), "local CID = PDS CID");
    let mut n = note("with attachment");
    n.attachment = Some(blob);
    w.create::<Notes>(&n).await.unwrap();

    let reader = murmur_pds::Reader::new(&acct.pds_url).unwrap();
    assert_eq!(
        reader.get_blob(&acct.did, &cid, size).await.unwrap(),
        payload
    );
    let err = reader
        .get_blob(&acct.did, &cid, size - 1)
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::ResponseTooLarge { limit, .. } if limit == size - 1),
        "{err:?}"
    );
    let absent = murmur_pds::blob_cid(b"never uploaded");
    let err = reader.get_blob(&acct.did, &absent, 1024).await.unwrap_err();
    assert!(matches!(err, Error::BlobNotFound { .. }), "{err:?}");
}

#[tokio::test]
async fn tokens_never_appear_in_debug_output() {
    let net = shared();
    let acct = account(net, "debug").await;
    let dir = tempfile::tempdir().unwrap();
    let w = Writer::builder(&acct.pds_url)
        .session_file(dir.path().join("s.json"))
        .login(&acct.handle, &acct.password)
        .await
        .unwrap();
    let s = w.session();
    let shown = format!("{w:?} {s:?} {}", s.access_jwt);
    assert!(!shown.contains(s.access_jwt.expose()));
    assert!(!shown.contains(s.refresh_jwt.expose()));
    assert!(!shown.contains(&acct.password));
}

#[tokio::test]
async fn unreachable_pds_is_retried_then_reported_with_attempts() {
    let w = Writer::builder("http://127.0.0.1:9")
        .retry_policy(RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(10),
            ..RetryPolicy::default()
        })
        .with_session(Session {
            did: "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".into(),
            handle: "nobody.test".into(),
            pds: "http://127.0.0.1:9".into(),
            access_jwt: Secret::new("a"),
            refresh_jwt: Secret::new("r"),
        })
        .unwrap();
    let err = w.create::<Notes>(&note("x")).await.unwrap_err();
    match err {
        Error::Unreachable { attempts, sent, .. } => {
            assert_eq!(attempts, 3);
            assert!(!sent, "connection refused never reached a server");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.http_requests(), 3);
}
