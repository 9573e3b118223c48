//! Child processes that die with this process, even when it is killed with SIGKILL.
//!
//! nats-server does not watch its stdin (the Node services do), so on Linux it is started
//! through util-linux's `setpriv --pdeathsig KILL`, which asks the kernel to SIGKILL it when
//! its parent goes away, then execs it (same pid, so the [`Child`] is the server itself). The
//! kernel ties that signal to the parent *thread*, not the process: a server started from a
//! test's thread would die when that test returns. So every tied child is spawned by one
//! thread that lives as long as the process. Where `setpriv` is missing, children are spawned
//! directly and only [`Drop`] stops them.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;

/// Sets up a tied child's stdio, environment and working directory before it is spawned.
type Configure = Box<dyn FnOnce(&mut Command) + Send>;

/// What the spawner thread runs.
struct Request {
    program: PathBuf,
    args: Vec<OsString>,
    configure: Configure,
    reply: mpsc::Sender<io::Result<Child>>,
}

/// Spawns `program args...` with stdin closed and stdout and stderr appended to `log`,
/// tied to this process's life (see the module docs).
pub(crate) fn spawn(program: &Path, args: Vec<OsString>, log: File) -> io::Result<Child> {
    let stdout = log.try_clone()?;
    spawn_tied(program, args, move |command| {
        command.stdin(Stdio::null()).stdout(stdout).stderr(log);
    })
}

/// Spawns `program args...` as a child that dies with this process, even when this process
/// is killed with `SIGKILL`: on Linux it is started through util-linux's
/// `setpriv --pdeathsig KILL`, which then execs it (same pid, so the [`Child`] is the
/// program itself), from one spawner thread that lives as long as the process (the kernel
/// ties the signal to the parent *thread*). Where `setpriv` is missing the program is
/// spawned directly and only its own means (e.g. watching a stdin pipe) end it.
///
/// `configure` sets up the command before it is spawned: stdio, environment, working
/// directory (not the program or its arguments). It runs on the spawner thread.
pub fn spawn_tied(
    program: &Path,
    args: Vec<OsString>,
    configure: impl FnOnce(&mut Command) + Send + 'static,
) -> io::Result<Child> {
    static SPAWNER: OnceLock<Option<mpsc::Sender<Request>>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("murmur-devnet-spawner".into())
            .spawn(move || {
                // Lives until the process ends: `SPAWNER` holds the sender forever.
                for request in rx {
                    let child = run(&request.program, &request.args, request.configure);
                    let _ = request.reply.send(child);
                }
            })
            .ok()
            .map(|_| tx)
    });
    let (reply, answer) = mpsc::channel();
    let request = Request {
        program: program.to_path_buf(),
        args,
        configure: Box::new(configure),
        reply,
    };
    match spawner {
        Some(tx) => {
            tx.send(request).map_err(|_| spawner_gone())?;
            answer.recv().map_err(|_| spawner_gone())?
        }
        // No thread could be started: spawn here (the child is still stopped on Drop).
        None => run(&request.program, &request.args, request.configure),
    }
}

fn spawner_gone() -> io::Error {
    io::Error::other("the process spawner thread of murmur-devnet is gone")
}

fn run(program: &Path, args: &[OsString], configure: Configure) -> io::Result<Child> {
    let mut command = match setpriv() {
        Some(setpriv) => {
            let mut c = Command::new(setpriv);
            c.args(["--pdeathsig", "KILL", "--"]).arg(program);
            c
        }
        None => Command::new(program),
    };
    command.args(args);
    configure(&mut command);
    command.spawn()
}

/// `setpriv` (util-linux) if it is installed and knows `--pdeathsig`; Linux only.
fn setpriv() -> Option<&'static Path> {
    static SETPRIV: OnceLock<Option<PathBuf>> = OnceLock::new();
    SETPRIV
        .get_or_init(|| {
            if !cfg!(target_os = "linux") {
                return None;
            }
            ["/usr/bin/setpriv", "/bin/setpriv", "/usr/sbin/setpriv"]
                .into_iter()
                .map(PathBuf::from)
                .find(|p| {
                    Command::new(p)
                        .args(["--pdeathsig", "KILL", "--", "true"])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .status()
                        .is_ok_and(|s| s.success())
                })
        })
        .as_deref()
}
