//! `murmur lex lint` / `murmur lex gen` as a user runs them, on lexicons whose definitions
//! refer to each other in cycles.

use std::path::PathBuf;
use std::process::{Command, Output};

fn cycles(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../murmur-lexicon/tests/fixtures/cycles")
        .join(name)
}

fn murmur(args: &[&str], dir: PathBuf) -> Output {
    Command::new(env!("CARGO_BIN_EXE_murmur"))
        .arg("lex")
        .args(args)
        .arg(dir)
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const ARRAY_CYCLE: &str =
    "com.example.cycles.arrays#b -> com.example.cycles.arrays#c -> com.example.cycles.arrays#b";

#[test]
fn lint_names_an_unrepresentable_cycle() {
    let out = murmur(&["lint"], cycles("arrays"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert!(
        text.contains("arrays.json: $.defs.b: [ref-cycle]"),
        "{text}"
    );
    assert!(text.contains(ARRAY_CYCLE), "{text}");

    let out = murmur(&["lint"], cycles("required"));
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(
            "com.example.cycles.required#a -> com.example.cycles.required#b -> com.example.cycles.required#a"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn gen_refuses_an_unrepresentable_cycle_instead_of_overflowing() {
    // This crashed with a stack overflow (SIGABRT, no exit code).
    let out = murmur(&["gen"], cycles("arrays"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains(ARRAY_CYCLE), "{}", stderr(&out));
    assert!(out.stdout.is_empty());
}

#[test]
fn lint_and_gen_accept_a_representable_cycle() {
    let out = murmur(&["lint"], cycles("tree"));
    assert!(out.status.success(), "{}", stderr(&out));
    let out = murmur(&["gen"], cycles("tree"));
    assert!(out.status.success(), "{}", stderr(&out));
    let code = String::from_utf8(out.stdout).unwrap();
    assert!(
        code.contains("pub parent: ::core::option::Option<::std::boxed::Box<Node>>"),
        "{code}"
    );
    assert!(
        code.contains("pub children: ::core::option::Option<::std::vec::Vec<Node>>"),
        "{code}"
    );
}
