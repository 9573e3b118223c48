//! Interop with the official TypeScript client: records the writer creates are read by
//! `@atproto/api`, and records `@atproto/api` creates are read by the writer.

mod support;

use murmur_devnet::Devnet;
use murmur_pds::Writer;
use support::{Note, Notes};

const SCRIPT: &str = r#"
import { AtpAgent } from '@atproto/api';
const agent = new AtpAgent({ service: process.env.PDS_URL });
await agent.login({ identifier: process.env.HANDLE, password: process.env.PASSWORD });
const got = await agent.com.atproto.repo.getRecord({
  repo: agent.session.did, collection: 'test.murmur.note', rkey: process.env.RUST_RKEY,
});
const made = await agent.com.atproto.repo.createRecord({
  repo: agent.session.did, collection: 'test.murmur.note', rkey: process.env.TS_RKEY,
  record: { $type: 'test.murmur.note', text: 'from @atproto/api', tags: ['ts'], priority: 2 },
});
console.log(JSON.stringify({ read: got.data, wrote: made.data }));
"#;

#[tokio::test]
async fn records_cross_between_the_writer_and_atproto_api() {
    let net = Devnet::shared().unwrap_or_else(|e| panic!("{e}"));
    let acct = net
        .create_account(0, &net.unique_handle("interop"), "interop-pw")
        .await
        .unwrap();
    let w = Writer::login(&acct.pds_url, &acct.handle, &acct.password)
        .await
        .unwrap();
    let ours = Note {
        text: "from murmur".into(),
        tags: vec!["rust".into()],
        priority: 4,
        attachment: None,
    };
    let written = w.create::<Notes>(&ours).await.unwrap();
    let ts_rkey = w.next_rkey();

    let node = net.node();
    let script = node.dir.join(format!("interop-{}.mjs", std::process::id()));
    std::fs::write(&script, SCRIPT).unwrap();
    let out = tokio::process::Command::new(&node.node)
        .arg(&script)
        .current_dir(&node.dir)
        .env("PDS_URL", &acct.pds_url)
        .env("HANDLE", &acct.handle)
        .env("PASSWORD", &acct.password)
        .env("RUST_RKEY", &written.rkey)
        .env("TS_RKEY", &ts_rkey)
        .output()
        .await
        .unwrap();
    let _ = std::fs::remove_file(&script);
    assert!(
        out.status.success(),
        "node failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // @atproto/api read our record: same URI, same CID, same fields.
    assert_eq!(report["read"]["uri"], written.uri.as_str());
    assert_eq!(report["read"]["cid"], written.cid.to_string().as_str());
    let value = &report["read"]["value"];
    assert_eq!(value["$type"], "test.murmur.note");
    assert_eq!(value["text"], "from murmur");
    assert_eq!(value["tags"], serde_json::json!(["rust"]));
    assert_eq!(value["priority"], 4);

    // We read @atproto/api's record, typed.
    let theirs = w.get::<Notes>(&ts_rkey).await.unwrap().expect("TS record");
    assert_eq!(report["wrote"]["uri"], theirs.uri.as_str());
    assert_eq!(report["wrote"]["cid"], theirs.cid.to_string().as_str());
    assert_eq!(
        theirs.value,
        Note {
            text: "from @atproto/api".into(),
            tags: vec!["ts".into()],
            priority: 2,
            attachment: None,
        }
    );
}
