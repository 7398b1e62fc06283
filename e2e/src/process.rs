//! Child processes that cannot outlive the harness.
//!
//! Every child is spawned by one keeper thread with `PR_SET_PDEATHSIG`, so the
//! kernel kills it when that thread dies: a panic, `kill -9` or Ctrl-C of the
//! test binary leaves no etcd or kube-apiserver behind. Stopping one child
//! sends SIGTERM, waits, then SIGKILLs; stopping all (teardown of throwaway
//! state) SIGKILLs at once, since a graceful API server shutdown takes seconds.
//!
//! The death signal fires when the *spawning thread* exits, not the process,
//! which is why spawning happens on a thread that lives exactly as long as the
//! keeper, never on a test or tokio worker thread.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const STOP_GRACE: Duration = Duration::from_secs(10);

enum Request {
    Spawn { name: String, cmd: Box<Command>, log: PathBuf, reply: mpsc::Sender<Result<u32>> },
    Stop { name: String, reply: mpsc::Sender<Option<ExitStatus>> },
    Exited { name: String, reply: mpsc::Sender<Option<ExitStatus>> },
    StopAll { reply: mpsc::Sender<()> },
}

/// Owns a set of named child processes; see the module docs.
pub struct ProcessKeeper {
    tx: mpsc::Sender<Request>,
    thread: Option<thread::JoinHandle<()>>,
}

impl ProcessKeeper {
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel();
        let thread = thread::Builder::new()
            .name("carve-process-keeper".into())
            .spawn(move || keep(rx))
            .expect("spawn process keeper thread");
        ProcessKeeper { tx, thread: Some(thread) }
    }

    /// Starts `cmd` with stdout and stderr appended to `log`; returns its pid.
    pub fn spawn(&self, name: &str, cmd: Command, log: PathBuf) -> Result<u32> {
        let (reply, rx) = mpsc::channel();
        self.tx
            .send(Request::Spawn { name: name.into(), cmd: Box::new(cmd), log, reply })
            .map_err(|_| anyhow!("process keeper is gone"))?;
        rx.recv().map_err(|_| anyhow!("process keeper is gone"))?
    }

    /// Stops one child (SIGTERM, then SIGKILL after a grace period).
    pub fn stop(&self, name: &str) -> Option<ExitStatus> {
        let (reply, rx) = mpsc::channel();
        self.tx.send(Request::Stop { name: name.into(), reply }).ok()?;
        rx.recv().ok().flatten()
    }

    /// The exit status of a child that has already exited, without waiting.
    pub fn exited(&self, name: &str) -> Option<ExitStatus> {
        let (reply, rx) = mpsc::channel();
        self.tx.send(Request::Exited { name: name.into(), reply }).ok()?;
        rx.recv().ok().flatten()
    }

    pub fn stop_all(&mut self) {
        let (reply, rx) = mpsc::channel();
        if self.tx.send(Request::StopAll { reply }).is_ok() {
            let _ = rx.recv();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Default for ProcessKeeper {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for ProcessKeeper {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn keep(rx: mpsc::Receiver<Request>) {
    let mut children: BTreeMap<String, Child> = BTreeMap::new();
    // A closed channel (keeper dropped without stop_all) also stops everything.
    while let Ok(req) = rx.recv() {
        match req {
            Request::Spawn { name, cmd, log, reply } => {
                let result = spawn_tied(*cmd, &log).map(|child| {
                    let pid = child.id();
                    if let Some(mut old) = children.insert(name, child) {
                        terminate(&mut old);
                    }
                    pid
                });
                let _ = reply.send(result);
            }
            Request::Stop { name, reply } => {
                let status = children.remove(&name).map(|mut c| terminate(&mut c));
                let _ = reply.send(status);
            }
            Request::Exited { name, reply } => {
                let status = children.get_mut(&name).and_then(|c| c.try_wait().ok().flatten());
                let _ = reply.send(status);
            }
            Request::StopAll { reply } => {
                stop_children(&mut children);
                let _ = reply.send(());
                return;
            }
        }
    }
    stop_children(&mut children);
}

fn stop_children(children: &mut BTreeMap<String, Child>) {
    for (_, mut child) in std::mem::take(children) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn spawn_tied(mut cmd: Command, log: &PathBuf) -> Result<Child> {
    let out =
        File::options().create(true).append(true).open(log).with_context(|| format!("open log {}", log.display()))?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("start {:?}", cmd.get_program()))?;
    Ok(child)
}

fn terminate(child: &mut Child) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return status;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().expect("wait for killed child")
}
