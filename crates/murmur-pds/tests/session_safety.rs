//! A stored session stands only for its own account on its own PDS, and its tokens (and a
//! login's password) go to no other host: not through a session file used with another
//! account or `--pds`, not through `resume`/`with_session`, not through a redirect.

mod support;

use std::sync::Arc;

use murmur_devnet::Devnet;
use murmur_pds::{Error, Reader, Secret, Session, Writer};
use support::recorder;
use support::{Note, Notes};

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
        tags: vec![],
        priority: 2,
        attachment: None,
    }
}

fn fake_session(pds: &str) -> Session {
    Session {
        did: "did:plc:aaaaaaaaaaaaaaaaaaaaaaaa".into(),
        handle: "alice.test".into(),
        pds: pds.into(),
        access_jwt: Secret::new("ACCESS-SECRET-of-alice"),
        refresh_jwt: Secret::new("REFRESH-SECRET-of-alice"),
    }
}

/// If the writer was (wrongly) built, use it, so a token it would leak reaches the recorder.
async fn try_to_use(result: &Result<Writer, Error>) {
    if let Ok(w) = result {
        let _ = w.create::<Notes>(&note("should not be sent")).await;
    }
}

#[tokio::test]
async fn resume_or_login_with_another_account_logs_in_and_writes_to_that_repo() {
    let net = shared();
    let alice = account(net, "sessa").await;
    let bob = account(net, "sessb").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("session.json");
    let as_alice = Writer::builder(&alice.pds_url)
        .session_file(&file)
        .login(&alice.handle, &alice.password)
        .await
        .unwrap();
    assert_eq!(Session::load(&file).unwrap().did, alice.did);

    // Alice's session file, Bob's handle: Bob logs in, the file becomes Bob's.
    let as_bob = Writer::builder(&alice.pds_url)
        .session_file(&file)
        .resume_or_login(&bob.handle, &bob.password)
        .await
        .unwrap();
    assert_eq!(as_bob.did(), bob.did, "the writer is Bob's, not the file's");
    let written = as_bob.create::<Notes>(&note("for bob")).await.unwrap();
    assert!(
        written.uri.starts_with(&format!("at://{}/", bob.did)),
        "{}",
        written.uri
    );
    let reader = Reader::new(&alice.pds_url).unwrap();
    let in_bob = reader.get::<Notes>(&bob.did, &written.rkey).await.unwrap();
    assert_eq!(in_bob.map(|s| s.value), Some(note("for bob")));
    assert!(
        reader
            .get::<Notes>(&alice.did, &written.rkey)
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        as_alice
            .list::<Notes>(100, None, false)
            .await
            .unwrap()
            .records
            .is_empty(),
        "nothing landed in Alice's repo"
    );
    let saved = Session::load(&file).unwrap();
    assert_eq!(saved.did, bob.did, "the session file was overwritten");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // By DID works the same way.
    let back = Writer::builder(&alice.pds_url)
        .session_file(&file)
        .resume_or_login(&alice.did, &alice.password)
        .await
        .unwrap();
    assert_eq!(back.did(), alice.did);
    assert_eq!(Session::load(&file).unwrap().did, alice.did);

    // The same account (handle in another case, trailing slash on the URL) resumes without
    // a login: a wrong password is never even sent.
    let resumed = Writer::builder(format!("{}/", alice.pds_url))
        .session_file(&file)
        .resume_or_login(&alice.handle.to_uppercase(), "not-the-password")
        .await
        .unwrap();
    assert_eq!(resumed.did(), alice.did);
    assert_eq!(resumed.http_requests(), 0);
    resumed.create::<Notes>(&note("resumed")).await.unwrap();
}

#[tokio::test]
async fn resume_or_login_on_another_pds_logs_in_there_and_never_sends_the_stored_token() {
    let net = shared();
    let alice = account(net, "sessc").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("session.json");
    let stored = Writer::builder(&alice.pds_url)
        .session_file(&file)
        .login(&alice.handle, &alice.password)
        .await
        .unwrap()
        .session();

    let other = recorder::start(recorder::refuse_all()).await;
    let result = Writer::builder(&other.url)
        .session_file(&file)
        .resume_or_login(&alice.handle, &alice.password)
        .await;
    try_to_use(&result).await;

    other.assert_never_saw(stored.access_jwt.expose());
    other.assert_never_saw(stored.refresh_jwt.expose());
    let requests = other.requests();
    assert!(
        requests
            .iter()
            .all(|r| r.path == "/xrpc/com.atproto.server.createSession"
                && r.header("authorization").is_none()),
        "only a fresh login reached the other host: {requests:?}"
    );
    let err = result.unwrap_err();
    assert!(matches!(err, Error::LoginRefused { .. }), "{err:?}");
    assert_eq!(
        Session::load(&file).unwrap(),
        stored,
        "a failed login leaves the stored session alone"
    );
}

#[tokio::test]
async fn resume_and_with_session_refuse_a_session_of_another_pds_and_send_nothing() {
    let other = recorder::start(recorder::refuse_all()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("session.json");
    let session = fake_session("http://localhost:2583");
    session.save(&file).unwrap();

    let resumed = Writer::builder(&other.url).session_file(&file).resume();
    try_to_use(&resumed).await;
    let given = Writer::builder(&other.url).with_session(session.clone());
    try_to_use(&given).await;

    other.assert_never_saw("ACCESS-SECRET");
    other.assert_never_saw("REFRESH-SECRET");
    assert!(other.requests().is_empty(), "{:?}", other.requests());
    for result in [resumed, given] {
        let err = result.unwrap_err();
        match &err {
            Error::SessionPdsMismatch { session_pds, pds } => {
                assert_eq!(session_pds, "http://localhost:2583");
                assert_eq!(pds, &other.url);
            }
            other => panic!("{other:?}"),
        }
        let text = format!("{err} {err:?}");
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("log in to"), "{text}");
    }

    // The same host spelled differently is the same PDS: the session is used there (and the
    // recorder does see the token, so the checks above could have caught a leak).
    let same = Writer::builder(&other.url)
        .with_session(fake_session(&format!("{}/", other.url.to_uppercase())))
        .unwrap();
    let _ = same.create::<Notes>(&note("x")).await;
    assert!(
        other
            .requests()
            .iter()
            .any(|r| r.header("authorization") == Some("Bearer ACCESS-SECRET-of-alice"))
    );
}

/// The "PDS" answers every request with a 307 to `target`, same path.
fn redirect_to(target: &str) -> recorder::Responder {
    let target = target.to_string();
    Arc::new(move |r| {
        (
            307,
            vec![("location".into(), format!("{target}{}", r.path))],
            "{}".into(),
        )
    })
}

#[tokio::test]
async fn cross_host_redirects_are_not_followed_with_tokens_passwords_or_refreshes() {
    let elsewhere = recorder::start(recorder::refuse_all()).await;
    let pds = recorder::start(redirect_to(&elsewhere.url)).await;

    // A write with the session's access token.
    let w = Writer::builder(&pds.url)
        .with_session(fake_session(&pds.url))
        .unwrap();
    let err = w.create::<Notes>(&note("x")).await.unwrap_err();
    assert!(matches!(err, Error::RedirectRefused { .. }), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("SECRET"));

    // A login with a password in its body.
    let err = Writer::builder(&pds.url)
        .login("alice.test", "PASSWORD-SECRET")
        .await
        .unwrap_err();
    assert!(matches!(err, Error::RedirectRefused { .. }), "{err:?}");

    assert!(!pds.requests().is_empty(), "the PDS was asked");
    elsewhere.assert_never_saw("SECRET");
    assert!(
        elsewhere.requests().is_empty(),
        "nothing followed the redirect: {:?}",
        elsewhere.requests()
    );

    // A refresh: the access token is expired and refreshSession is redirected.
    let elsewhere = recorder::start(recorder::refuse_all()).await;
    let target = elsewhere.url.clone();
    let pds = recorder::start(Arc::new(move |r| {
        if r.path.contains("refreshSession") {
            (
                307,
                vec![("location".into(), format!("{target}{}", r.path))],
                "{}".into(),
            )
        } else {
            (
                400,
                vec![],
                r#"{"error":"ExpiredToken","message":"Token has expired"}"#.into(),
            )
        }
    }))
    .await;
    let w = Writer::builder(&pds.url)
        .with_session(fake_session(&pds.url))
        .unwrap();
    let err = w.create::<Notes>(&note("x")).await.unwrap_err();
    assert!(matches!(err, Error::RedirectRefused { .. }), "{err:?}");
    assert!(
        pds.requests()
            .iter()
            .any(|r| r.header("authorization") == Some("Bearer REFRESH-SECRET-of-alice")),
        "the refresh went to the PDS itself"
    );
    elsewhere.assert_never_saw("SECRET");
    assert!(elsewhere.requests().is_empty());

    // A caller's own client with reqwest's default policy follows the redirect, but reqwest
    // drops the Authorization header when the host changes.
    let elsewhere = recorder::start(recorder::refuse_all()).await;
    let pds = recorder::start(redirect_to(&elsewhere.url)).await;
    let w = Writer::builder(&pds.url)
        .http_client(reqwest::Client::new())
        .with_session(fake_session(&pds.url))
        .unwrap();
    let _ = w.get::<Notes>("k").await;
    assert!(
        !elsewhere.requests().is_empty(),
        "the redirect was followed"
    );
    elsewhere.assert_never_saw("ACCESS-SECRET");
}
