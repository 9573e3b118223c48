use super::*;

/// The event shapes Jetstream's README shows, byte for byte.
const README_COMMIT: &str = r#"{"did":"did:plc:eygmaihciaxprqvxpfvl6flk","time_us":1725911162329308,"kind":"commit","commit":{"rev":"3l3qo2vutsw2b","operation":"create","collection":"app.bsky.feed.like","rkey":"3l3qo2vuowo2b","record":{"$type":"app.bsky.feed.like","createdAt":"2024-09-09T19:46:02.102Z","subject":{"cid":"bafyreidc6sydkkbchcyg62v77wbhzvb2mvytlmsychqgwf2xojjtirmzj4","uri":"at://did:plc:wa7b35aakoll7hugkrjtf3xf/app.bsky.feed.post/3l3pte3p2e325"}},"cid":"bafyreidwaivazkwu67xztlmuobx35hs2lnfh3kolmgfmucldvhd3sgzcqi"}}"#;
const README_DELETE: &str = r#"{"did":"did:plc:rfov6bpyztcnedeyyzgfq42k","time_us":1725516666833633,"kind":"commit","commit":{"rev":"3l3f6nzl3cv2s","operation":"delete","collection":"app.bsky.graph.follow","rkey":"3l3dn7tku762u"}}"#;
const README_IDENTITY: &str = r#"{"did":"did:plc:ufbl4k27gp6kzas5glhz7fim","time_us":1725516665234703,"kind":"identity","identity":{"did":"did:plc:ufbl4k27gp6kzas5glhz7fim","handle":"yohenrique.bsky.social","seq":1409752997,"time":"2024-09-05T06:11:04.870Z"}}"#;
const README_ACCOUNT: &str = r#"{"did":"did:plc:ufbl4k27gp6kzas5glhz7fim","time_us":1725516665333808,"kind":"account","account":{"active":true,"did":"did:plc:ufbl4k27gp6kzas5glhz7fim","seq":1409753013,"time":"2024-09-05T06:11:04.870Z"}}"#;

#[test]
fn the_readme_events_read_and_write_back_alike() {
    for line in [
        README_COMMIT,
        README_DELETE,
        README_IDENTITY,
        README_ACCOUNT,
    ] {
        let event = Event::from_json(line.as_bytes()).unwrap();
        let again: serde_json::Value = serde_json::from_slice(&event.to_json()).unwrap();
        let original: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(again, original, "{line}");
    }
    let delete = Event::from_json(README_DELETE.as_bytes()).unwrap();
    let EventBody::Commit(commit) = &delete.body else {
        panic!("a commit")
    };
    assert_eq!(commit.operation, Operation::Delete);
    assert_eq!((commit.record.as_ref(), commit.cid.as_ref()), (None, None));
    let account = Event::from_json(README_ACCOUNT.as_bytes()).unwrap();
    assert!(matches!(
        account.body,
        EventBody::Account(Account { active: true, .. })
    ));
    assert_eq!(account.time_us, 1725516665333808);
}

#[test]
fn malformed_events_are_errors_that_say_why() {
    let cases = [
        ("", "EOF"),
        ("{}", "missing field"),
        (
            r#"{"did":"did:plc:x","time_us":1,"kind":"commit"}"#,
            "no `commit`",
        ),
        (
            r#"{"did":"did:plc:x","time_us":1,"kind":"commit","commit":{"rev":"r","operation":"create","collection":"a.b.c","rkey":"k"}}"#,
            "no record",
        ),
        (
            r#"{"did":"did:plc:x","time_us":1,"kind":"commit","commit":{"rev":"r","operation":"delete","collection":"a.b.c","rkey":"k","cid":"bafy"}}"#,
            "carries a record",
        ),
        (
            r#"{"did":"did:plc:x","time_us":1,"kind":"commit","commit":{"rev":"r","operation":"upsert","collection":"a.b.c","rkey":"k"}}"#,
            "upsert",
        ),
        (
            r#"{"did":"did:plc:x","time_us":"1","kind":"account"}"#,
            "invalid type",
        ),
        (
            r#"{"did":"did:plc:x","time_us":1,"kind":"identity"}"#,
            "no `identity`",
        ),
    ];
    for (json, why) in cases {
        let error = Event::from_json(json.as_bytes()).unwrap_err().to_string();
        assert!(error.contains(why), "{json}: {error}");
    }
    // A kind this crate does not know is not an error: a reader skips it.
    let other =
        Event::from_json(br#"{"did":"did:plc:x","time_us":5,"kind":"sync","sync":{}}"#).unwrap();
    assert_eq!(
        other.body,
        EventBody::Other {
            kind: "sync".into()
        }
    );
}

#[test]
fn filters_as_jetstream_defines_them() {
    let filter = Filter::new(&["app.bsky.feed.post".into(), "agent.comms.*".into()], &[]).unwrap();
    let commit = |collection: &str| Event {
        did: "did:plc:a".into(),
        time_us: 1,
        body: EventBody::Commit(Commit {
            rev: "r".into(),
            operation: Operation::Delete,
            collection: collection.into(),
            rkey: "k".into(),
            record: None,
            cid: None,
        }),
    };
    assert!(filter.matches(&commit("app.bsky.feed.post")));
    assert!(!filter.matches(&commit("app.bsky.feed.postgate")));
    assert!(filter.matches(&commit("agent.comms.task")));
    assert!(filter.matches(&commit("agent.comms.x.y")));
    assert!(!filter.matches(&commit("agent.commsx.task")));
    assert!(!filter.matches(&commit("agent.comm.task")));
    // Identity and account events pass any collection filter.
    let identity = Event::from_json(README_IDENTITY.as_bytes()).unwrap();
    assert!(filter.matches(&identity));

    let by_did = Filter::new(&[], &["did:plc:a".into()]).unwrap();
    assert!(by_did.matches(&commit("x.y.z")));
    assert!(!by_did.matches(&identity));
    assert!(Filter::new(&[], &[]).unwrap().is_everything());
}

#[test]
fn options_out_of_bounds_are_refused_with_the_option_named() {
    let refused = |collections: Vec<String>, dids: Vec<String>| {
        Filter::new(&collections, &dids).unwrap_err().to_string()
    };
    for bad in [
        "app.bsky.feed.po*",
        "app.*",
        "app",
        "app..x",
        "*",
        "a.b.c.",
        "a.b.-c",
    ] {
        let error = refused(vec![bad.into()], vec![]);
        assert!(error.contains("wantedCollections"), "{bad}: {error}");
    }
    let many: Vec<String> = (0..101).map(|i| format!("a.b.c{i}")).collect();
    assert!(refused(many, vec![]).contains("101 given, at most 100"));
    let dids: Vec<String> = (0..10_001).map(|i| format!("did:plc:{i}")).collect();
    assert!(refused(vec![], dids).contains("at most 10000"));
    for bad in [
        "plc:abc",
        "did:PLC:abc",
        "did:plc:",
        "did:plc:a:",
        "did:plc:a b",
    ] {
        assert!(
            refused(vec![], vec![bad.into()]).contains("wantedDids"),
            "{bad}"
        );
    }
    // At the limits exactly: accepted.
    let hundred: Vec<String> = (0..100).map(|i| format!("a.b.c{i}")).collect();
    assert!(Filter::new(&hundred, &[]).is_ok());
}

#[test]
fn queries_round_trip() {
    let options = Options {
        wanted_collections: vec!["agent.comms.*".into(), "app.bsky.feed.post".into()],
        wanted_dids: vec!["did:plc:abc".into(), "did:web:example.com%3A8080".into()],
        cursor: Some(1725911162329308),
        compress: true,
        require_hello: true,
        max_message_size_bytes: 4096,
    };
    let query = options.query();
    assert_eq!(Options::from_query(&query).unwrap(), options);
    assert!(query.contains("did:web:example.com%253A8080"));
    // As other clients write them: percent-encoded, other parameters ignored.
    let theirs = Options::from_query(
        "wantedCollections=agent.comms.%2A&wantedDids=did%3Aplc%3Aabc&compress=false&x=1&maxMessageSizeBytes=-5",
    )
    .unwrap();
    assert_eq!(theirs.wanted_collections, ["agent.comms.*"]);
    assert_eq!(theirs.wanted_dids, ["did:plc:abc"]);
    assert!(!theirs.compress);
    assert_eq!(theirs.max_message_size_bytes, 0);
    // Flags are on only when they say `true`, as Jetstream reads them.
    for off in [
        "compress=1",
        "compress=yes",
        "compress=",
        "requireHello=TRUE",
    ] {
        let options = Options::from_query(off).unwrap();
        assert!(!options.compress && !options.require_hello, "{off}");
    }
    for bad in ["cursor=soon", "wantedDids=nope", "wantedCollections=%zz"] {
        assert!(Options::from_query(bad).is_err(), "{bad}");
    }
}

#[test]
fn options_update_replaces_the_filter_or_changes_nothing() {
    let mut options = Options {
        wanted_collections: vec!["a.b.c".into()],
        cursor: Some(7),
        compress: true,
        ..Options::default()
    };
    let update = Options {
        wanted_dids: vec!["did:plc:x".into()],
        max_message_size_bytes: 100,
        ..Options::default()
    };
    options
        .apply_subscriber_message(update.options_update().as_bytes())
        .unwrap();
    assert!(options.wanted_collections.is_empty());
    assert_eq!(options.wanted_dids, ["did:plc:x"]);
    assert_eq!(options.max_message_size_bytes, 100);
    assert_eq!((options.cursor, options.compress), (Some(7), true));

    let before = options.clone();
    for bad in [
        r#"{"type":"options_update","payload":{"wantedCollections":["nope"]}}"#,
        r#"{"type":"options_update"}"#,
        r#"{"type":"subscribe","payload":{}}"#,
        "not json",
    ] {
        assert!(
            options.apply_subscriber_message(bad.as_bytes()).is_err(),
            "{bad}"
        );
        assert_eq!(options, before);
    }
}

#[test]
fn the_dictionary_is_jetstreams() {
    use sha2::{Digest, Sha256};
    assert_eq!(ZSTD_DICTIONARY.len(), 112_640);
    let digest: String = Sha256::digest(ZSTD_DICTIONARY)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(
        digest,
        "b8d77b46933aceecbdd5275a01241efc985c970c78162b8150cf67a26522f70c"
    );
    // A zstd dictionary: magic 0xEC30A437, little-endian.
    assert_eq!(&ZSTD_DICTIONARY[..4], &[0x37, 0xA4, 0x30, 0xEC]);
}

#[test]
fn compression_round_trips_and_uses_the_dictionary() {
    let mut compressor = Compressor::new();
    let decompressor = Decompressor::new();
    for line in [
        README_COMMIT,
        README_DELETE,
        README_IDENTITY,
        README_ACCOUNT,
    ] {
        let packed = compressor.compress(line.as_bytes());
        assert!(
            packed.len() < line.len(),
            "{} -> {}",
            line.len(),
            packed.len()
        );
        assert_eq!(decompressor.decompress(&packed).unwrap(), line.as_bytes());
        // Without the dictionary it does not decompress: the frame names it.
        assert!(zstd::stream::decode_all(&packed[..]).is_err());
    }
}

#[test]
fn hostile_compressed_messages_are_errors() {
    let decompressor = Decompressor::new();
    let packed = Compressor::new().compress(README_COMMIT.as_bytes());
    for cut in 0..packed.len() {
        // Every truncation is an error or (never) a wrong answer; never a panic.
        if let Ok(out) = decompressor.decompress(&packed[..cut]) {
            assert_ne!(out, README_COMMIT.as_bytes(), "cut at {cut}");
        }
    }
    assert!(decompressor.decompress(b"not zstd at all").is_err());
    // A bomb: 64 MB of zeros compresses to a few KB and is refused past MAX_EVENT_BYTES.
    let bomb = zstd::bulk::compress(&vec![0u8; 64 * 1024 * 1024], 3).unwrap();
    assert!(bomb.len() < 64 * 1024);
    let error = decompressor.decompress(&bomb).unwrap_err().to_string();
    assert!(error.contains("more than"), "{error}");
    // The decompressor keeps one zstd context: after each failure it reads a message whole.
    for bad in [&packed[..packed.len() / 2], b"not zstd at all", &bomb[..]] {
        assert!(decompressor.decompress(bad).is_err());
        assert_eq!(
            decompressor.decompress(&packed).unwrap(),
            README_COMMIT.as_bytes()
        );
    }
    // Every truncation is an error (the frame names its content size).
    for cut in 0..packed.len() {
        assert!(
            decompressor.decompress(&packed[..cut]).is_err(),
            "cut at {cut}"
        );
    }
}
