//! Takes Jetstream's zstd dictionary from the package of the `jacquard-common` crate (a
//! build-dependency, pinned exactly) and checks it is byte for byte the dictionary Jetstream
//! compresses with, by its SHA-256.
//!
//! Cargo unpacks a registry package's source before any build script that depends on it
//! runs, into `$CARGO_HOME/registry/src/<registry>/<name>-<version>/`; a vendored build has it
//! beside this crate (`<vendor>/<name>-<version>/` or `<vendor>/<name>/`). Anywhere else, set
//! `MURMUR_JETSTREAM_ZSTD_DICTIONARY` to the file's path.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The package that ships the dictionary, as pinned in Cargo.toml.
const PACKAGE: &str = "jacquard-common";
const VERSION: &str = "0.12.2";
/// The file in that package.
const FILE: &str = "zstd_dictionary";
/// SHA-256 of Jetstream's dictionary (`pkg/models/zstd_dictionary` in bluesky-social/jetstream).
const SHA256: &str = "b8d77b46933aceecbdd5275a01241efc985c970c78162b8150cf67a26522f70c";
const OVERRIDE: &str = "MURMUR_JETSTREAM_ZSTD_DICTIONARY";

fn main() {
    println!("cargo::rerun-if-env-changed={OVERRIDE}");
    println!("cargo::rerun-if-changed=build.rs");
    let candidates = candidates();
    let Some(path) = candidates.iter().find(|p| p.is_file()) else {
        let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
        panic!(
            "Jetstream's zstd dictionary was not found in the {PACKAGE} {VERSION} package \
             (looked in: {}); set {OVERRIDE} to its path",
            looked.join(", ")
        );
    };
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("cannot read Jetstream's dictionary {}: {e}", path.display()));
    let digest: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if digest != SHA256 {
        panic!(
            "{} is not Jetstream's zstd dictionary: SHA-256 {digest}, expected {SHA256}",
            path.display()
        );
    }
    println!("cargo::rerun-if-changed={}", path.display());
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    std::fs::write(out.join("jetstream_zstd_dictionary"), &bytes).expect("OUT_DIR is writable");
}

/// Where the dictionary may be, most specific first.
fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(path) = std::env::var_os(OVERRIDE) {
        out.push(PathBuf::from(path));
    }
    let package = format!("{PACKAGE}-{VERSION}");
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")));
    if let Some(home) = cargo_home
        && let Ok(registries) = std::fs::read_dir(home.join("registry").join("src"))
    {
        let mut registries: Vec<PathBuf> = registries.flatten().map(|e| e.path()).collect();
        registries.sort();
        out.extend(registries.into_iter().map(|r| r.join(&package).join(FILE)));
    }
    if let Some(dir) = std::env::var_os("CARGO_MANIFEST_DIR") {
        let vendor = Path::new(&dir).join("..");
        out.push(vendor.join(&package).join(FILE));
        out.push(vendor.join(PACKAGE).join(FILE));
    }
    out
}
