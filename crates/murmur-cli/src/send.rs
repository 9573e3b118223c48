//! `murmur send`: validate a JSON record against its lexicon, write it, print its at-uri and cid.

use std::path::PathBuf;
use std::process::ExitCode;

use murmur_lexicon::LexiconSet;
use murmur_pds::Writer;

/// Arguments of `murmur send`.
#[derive(clap::Args)]
pub struct SendArgs {
    /// Base URL of the PDS hosting the account, e.g. http://localhost:2583.
    #[arg(long)]
    pds: String,
    /// Handle or DID of the account.
    #[arg(long)]
    handle: String,
    /// Name of the environment variable holding the (app) password; the password itself is
    /// never taken on the command line.
    #[arg(long = "password-env", value_name = "VAR")]
    password_env: String,
    /// Directory of Lexicon JSON files to validate against.
    #[arg(long, default_value = "lexicons")]
    lexicons: PathBuf,
    /// Reuse (or create) a session file instead of logging in every time (mode 0600).
    #[arg(long)]
    session_file: Option<PathBuf>,
    /// Print {"uri","cid","rev"} as JSON.
    #[arg(long)]
    json: bool,
    /// Collection NSID of the record, e.g. agent.comms.task.
    collection: String,
    /// The record as atproto JSON ("$type" may be omitted).
    file: PathBuf,
}

/// Validates, then writes, the record.
pub fn run(args: SendArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let password = std::env::var(&args.password_env).map_err(|_| {
        format!(
            "environment variable {} is not set; put the account's (app) password in it",
            args.password_env
        )
    })?;
    send(&args, &password)
}

fn send(args: &SendArgs, password: &str) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let text =
        std::fs::read_to_string(&args.file).map_err(|e| format!("{}: {e}", args.file.display()))?;
    let mut json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not JSON: {e}", args.file.display()))?;
    if let Some(obj) = json.as_object_mut() {
        obj.entry("$type")
            .or_insert_with(|| serde_json::Value::String(args.collection.clone()));
    }
    let lexicons = LexiconSet::load_dir(&args.lexicons)?;
    let value = murmur_lexicon::data::json_to_data(&json)
        .map_err(|e| format!("{}: {e}", args.file.display()))?;
    if let Err(errors) = lexicons.validate_record(&args.collection, &value) {
        for e in &errors {
            eprintln!("invalid: {e}");
        }
        return Err(format!(
            "{} is not a valid {} record ({} problem(s)); nothing was sent",
            args.file.display(),
            args.collection,
            errors.len()
        )
        .into());
    }
    // The writer's own checks ($type, data model, DAG-CBOR and request size), before any
    // HTTP call: an oversized record must not cost a login.
    murmur_pds::record_cid_untyped(&args.collection, &value)
        .map_err(|e| format!("{}: {e}; nothing was sent", args.file.display()))?;

    let runtime = tokio::runtime::Runtime::new()?;
    let written = runtime.block_on(async {
        let mut builder = Writer::builder(&args.pds);
        if let Some(path) = &args.session_file {
            builder = builder.session_file(path);
        }
        let writer = builder.resume_or_login(&args.handle, password).await?;
        // Validated and size-checked above; the writer checks again before sending.
        writer
            .create_untyped(&args.collection, value, |_| Ok(()))
            .await
    })?;
    let rev = written.commit.as_ref().map(|c| c.rev.clone());
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "uri": written.uri, "cid": written.cid.to_string(), "rev": rev })
        );
    } else {
        println!("{}", written.uri);
        println!("{}", written.cid);
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEXICON: &str = r#"{
      "lexicon": 1,
      "id": "test.murmur.note",
      "defs": {
        "main": {
          "type": "record",
          "key": "tid",
          "record": {
            "type": "object",
            "required": ["text"],
            "properties": { "text": { "type": "string", "maxLength": 20 } }
          }
        }
      }
    }"#;

    fn args(pds: &str, dir: &std::path::Path, file: &str) -> SendArgs {
        SendArgs {
            pds: pds.into(),
            handle: "unused.test".into(),
            password_env: "MURMUR_PASSWORD".into(),
            lexicons: dir.join("lexicons"),
            session_file: None,
            json: false,
            collection: "test.murmur.note".into(),
            file: dir.join(file),
        }
    }

    #[test]
    fn sends_a_valid_record_and_refuses_an_invalid_one_before_any_call() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lexicons/test/murmur")).unwrap();
        std::fs::write(dir.path().join("lexicons/test/murmur/note.json"), LEXICON).unwrap();
        std::fs::write(dir.path().join("ok.json"), r#"{"text":"hello"}"#).unwrap();
        std::fs::write(
            dir.path().join("bad.json"),
            r#"{"text":"far too long for the lexicon"}"#,
        )
        .unwrap();

        // Invalid: refused with the field named, though nothing listens at that URL.
        let err = send(&args("http://127.0.0.1:9", dir.path(), "bad.json"), "pw").unwrap_err();
        assert!(err.to_string().contains("nothing was sent"), "{err}");

        let net = murmur_devnet::Devnet::shared().unwrap_or_else(|e| panic!("{e}"));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let acct = rt
            .block_on(net.create_account(0, &net.unique_handle("send"), "send-pw"))
            .unwrap();
        let mut a = args(&acct.pds_url, dir.path(), "ok.json");
        a.handle = acct.handle.clone();
        assert_eq!(send(&a, &acct.password).unwrap(), ExitCode::SUCCESS);
    }

    #[derive(Debug)]
    struct Notes;
    impl murmur_pds::Collection for Notes {
        const NSID: &'static str = "test.murmur.note";
        type Record = serde_json::Value;
    }

    #[test]
    fn a_session_file_of_another_account_is_not_used_for_the_handle_given() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("lexicons/test/murmur")).unwrap();
        std::fs::write(dir.path().join("lexicons/test/murmur/note.json"), LEXICON).unwrap();
        std::fs::write(dir.path().join("ok.json"), r#"{"text":"hello"}"#).unwrap();
        let net = murmur_devnet::Devnet::shared().unwrap_or_else(|e| panic!("{e}"));
        let rt = tokio::runtime::Runtime::new().unwrap();
        let alice = rt
            .block_on(net.create_account(0, &net.unique_handle("senda"), "send-pw-a"))
            .unwrap();
        let bob = rt
            .block_on(net.create_account(0, &net.unique_handle("sendb"), "send-pw-b"))
            .unwrap();
        let session_file = dir.path().join("session.json");

        let mut a = args(&alice.pds_url, dir.path(), "ok.json");
        a.handle = alice.handle.clone();
        a.session_file = Some(session_file.clone());
        assert_eq!(send(&a, &alice.password).unwrap(), ExitCode::SUCCESS);
        // Bob with Alice's session file: Bob logs in, the record lands in Bob's repo.
        a.handle = bob.handle.clone();
        assert_eq!(send(&a, &bob.password).unwrap(), ExitCode::SUCCESS);

        let session = murmur_pds::Session::load(&session_file).unwrap();
        assert_eq!(session.did, bob.did);
        let reader = murmur_pds::Reader::new(&alice.pds_url).unwrap();
        let count = |did: String| {
            rt.block_on(reader.list::<Notes>(&did, 100, None, false))
                .unwrap()
                .records
                .len()
        };
        assert_eq!(count(alice.did.clone()), 1, "Alice's own send only");
        assert_eq!(count(bob.did.clone()), 1, "Bob's send is in Bob's repo");
    }
}
