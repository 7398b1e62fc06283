//! Calling CNI plugins as a container runtime does, for the tests of every
//! tier: a plugin run directly ([`PluginCall`]: the `CNI_*` variables and the
//! network config on stdin) or through libcni's `cnitool` ([`Cnitool`]).
//! `CARVE_STATE_FILE` is always removed, so the config's `stateFile` is the
//! one that counts, never the test process's environment.

use std::ffi::OsStr;
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

/// One plugin invocation; see the module docs.
pub struct PluginCall {
    cmd: Command,
}

impl PluginCall {
    /// `plugin` with `CNI_COMMAND=command` and `CNI_PATH` = the plugin's folder.
    pub fn new(plugin: &Path, command: &str) -> Self {
        Self::with(Command::new(plugin), plugin, command)
    }

    /// [`PluginCall::new`] run inside the named network namespace (`ip netns exec`).
    pub fn in_netns(ns: &str, plugin: &Path, command: &str) -> Self {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(plugin);
        Self::with(cmd, plugin, command)
    }

    fn with(mut cmd: Command, plugin: &Path, command: &str) -> Self {
        cmd.env("CNI_COMMAND", command).env_remove("CARVE_STATE_FILE");
        if let Some(dir) = plugin.parent() {
            cmd.env("CNI_PATH", dir);
        }
        PluginCall { cmd }
    }

    /// The attachment: `CNI_CONTAINERID`, `CNI_IFNAME` and `CNI_NETNS`.
    pub fn attachment(self, container: &str, ifname: &str, netns: &str) -> Self {
        self.env("CNI_CONTAINERID", container).env("CNI_IFNAME", ifname).env("CNI_NETNS", netns)
    }

    /// Any other variable (a `CNI_PATH` of its own, `CNI_ARGS`).
    pub fn env(mut self, key: &str, value: impl AsRef<OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    /// Starts the plugin with `conf` written to its stdin (then closed).
    pub fn spawn(mut self, conf: &Value) -> Child {
        let mut child = self
            .cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the CNI plugin");
        let mut stdin = child.stdin.take().expect("piped stdin");
        // A plugin that exits before reading its config is the test's finding, not a panic here.
        let _ = stdin.write_all(conf.to_string().as_bytes());
        child
    }

    /// Runs the plugin to the end.
    pub fn output(self, conf: &Value) -> Output {
        self.spawn(conf).wait_with_output().expect("wait for the CNI plugin")
    }
}

/// libcni's `cnitool` inside the named network namespace `ns`, with the
/// network configs in `conf_dir` (`NETCONFPATH`) and plugins from `cni_path`.
pub struct Cnitool<'a> {
    pub ns: &'a str,
    pub tool: &'a Path,
    pub conf_dir: &'a Path,
    pub cni_path: &'a OsStr,
}

impl Cnitool<'_> {
    /// `cnitool <verb> <net> <netns>`; `ifname` sets `CNI_IFNAME` when given.
    pub fn run(&self, verb: &str, net: &str, netns: &Path, ifname: Option<&str>) -> std::io::Result<Output> {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", self.ns])
            .arg(self.tool)
            .args([verb, net])
            .arg(netns)
            .env("NETCONFPATH", self.conf_dir)
            .env("CNI_PATH", self.cni_path)
            .env_remove("CARVE_STATE_FILE");
        if let Some(ifname) = ifname {
            cmd.env("CNI_IFNAME", ifname);
        }
        cmd.output()
    }
}
