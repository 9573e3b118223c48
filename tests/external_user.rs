//! A crate depending on `murmur` alone (tests/external-user, not a workspace member) compiles
//! `#[handler]` fns, the same fn without the attribute, closures with extractors and a
//! renamed `Record` import: the macro's expansion names only paths such a crate can see.

use std::path::Path;
use std::process::Command;

#[test]
fn a_crate_depending_only_on_murmur_compiles_the_readme_handlers() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let crate_dir = root.join("tests/external-user");
    // The workspace's lockfile, so the crate resolves offline to the versions already built.
    let work = tempfile::tempdir().unwrap();
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml"))
        .unwrap()
        .replace(
            "path = \"../../crates/murmur\"",
            &format!("path = {:?}", root.join("crates/murmur")),
        );
    std::fs::write(work.path().join("Cargo.toml"), manifest).unwrap();
    std::fs::create_dir(work.path().join("src")).unwrap();
    std::fs::copy(
        crate_dir.join("src/main.rs"),
        work.path().join("src/main.rs"),
    )
    .unwrap();
    std::fs::copy(root.join("Cargo.lock"), work.path().join("Cargo.lock")).unwrap();

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let out = Command::new(env!("CARGO"))
        .args(["check", "--offline", "--quiet", "--message-format=short"])
        .current_dir(work.path())
        .env("CARGO_TARGET_DIR", target)
        .env_remove("RUSTFLAGS")
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "the external crate does not compile:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
