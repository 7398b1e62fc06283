//! The CNI protocol (spec 1.1) shared by carve-cni and carve-ipam: the
//! environment, the network configuration, versioned results and error JSON.
//!
//! ```text
//!  runtime ──env + stdin config──▶ run(plugin) ──▶ Plugin::add/del/check/status/gc
//!                                      │
//!       stdout ◀── result or error JSON (the requested cniVersion's format), nothing else
//! ```
//!
//! Pure: nothing here touches the network or the disk except [`run`], which
//! reads stdin, writes stdout and reports the call to carve-agent ([`report`]).

pub mod attachment;
pub mod carve_cni;
pub mod delegate;
pub mod report;
pub mod result;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::Value;

pub use result::{CniResult, Dns, Interface, IpConfig, Route};

/// The newest spec version spoken; answers default to it.
pub const SPEC_VERSION: &str = "1.1.0";
/// Every cniVersion accepted in a configuration, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The spec's error codes (SPEC.md "Error"); 100+ would be plugin-specific.
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const CONTAINER_UNKNOWN: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// libcni's ErrInternal: anything the spec has no code for.
    pub const INTERNAL: u32 = 999;
}

/// A CNI error: printed on stdout as `{"cniVersion","code","msg","details"}`, exit status 1.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn internal(msg: impl Into<String>) -> Self {
        CniError::new(code::INTERNAL, msg)
    }

    pub fn to_json(&self, version: &str) -> Value {
        let mut v = serde_json::json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = Value::String(self.details.clone());
        }
        v
    }

    /// Parses the error JSON a delegated plugin printed.
    pub fn from_json(body: &[u8]) -> Option<Self> {
        #[derive(Deserialize)]
        struct Wire {
            code: u32,
            #[serde(default)]
            msg: String,
            #[serde(default)]
            details: String,
        }
        let w: Wire = serde_json::from_slice(body).ok()?;
        Some(CniError { code: w.code, msg: w.msg, details: w.details })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Status,
    Gc,
    Version,
}

impl Command {
    pub const ALL: [Command; 6] =
        [Command::Add, Command::Del, Command::Check, Command::Status, Command::Gc, Command::Version];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            "VERSION" => Command::Version,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Status => "STATUS",
            Command::Gc => "GC",
            Command::Version => "VERSION",
        }
    }
}

/// The CNI_* environment of one invocation.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CniEnv {
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: String,
    pub path: Vec<PathBuf>,
}

impl CniEnv {
    /// Reads and validates the variables `command` needs, from `get` (the
    /// process environment in the binaries, a map in tests). Code 4 names
    /// every missing or invalid variable.
    pub fn from_vars(command: Command, get: impl Fn(&str) -> Option<String>) -> Result<Self, CniError> {
        let nonempty = |k: &str| get(k).filter(|v| !v.is_empty());
        let (needs_id, needs_netns, needs_path) = match command {
            Command::Add | Command::Check => (true, true, true),
            Command::Del => (true, false, true),
            Command::Status | Command::Gc => (false, false, true),
            Command::Version => (false, false, false),
        };
        let mut missing = Vec::new();
        let container_id = nonempty("CNI_CONTAINERID").unwrap_or_default();
        if needs_id && container_id.is_empty() {
            missing.push("CNI_CONTAINERID");
        }
        let ifname = nonempty("CNI_IFNAME").unwrap_or_default();
        if needs_id && ifname.is_empty() {
            missing.push("CNI_IFNAME");
        }
        let netns = nonempty("CNI_NETNS").map(PathBuf::from);
        if needs_netns && netns.is_none() {
            missing.push("CNI_NETNS");
        }
        let path: Vec<PathBuf> = nonempty("CNI_PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        if needs_path && path.is_empty() {
            missing.push("CNI_PATH");
        }
        if !missing.is_empty() {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("required environment variables missing: {}", missing.join(", ")),
            ));
        }
        if !ifname.is_empty() && !valid_ifname(&ifname) {
            return Err(CniError::new(
                code::INVALID_ENV,
                format!("CNI_IFNAME {ifname:?} is not a valid interface name (1-15 chars, no '/', ':' or space)"),
            ));
        }
        Ok(CniEnv { container_id, netns, ifname, args: get("CNI_ARGS").unwrap_or_default(), path })
    }
}

pub fn valid_ifname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace())
}

/// One entry of `cni.dev/valid-attachments` in a GC request.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The fields of a network configuration every carve plugin reads; the raw
/// JSON is kept for plugin-specific fields and for delegation.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    pub cni_version: String,
    #[serde(default)]
    pub name: String,
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub log_file: Option<PathBuf>,
    #[serde(default)]
    pub ipam: Option<Value>,
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// GC: attachments still in use (spec 1.1); `cni.dev/attachments` is the older spelling.
    #[serde(rename = "cni.dev/valid-attachments", alias = "cni.dev/attachments", default)]
    pub valid_attachments: Option<Vec<Attachment>>,
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

/// Position of `v` in [`SUPPORTED_VERSIONS`], if supported.
pub fn version_index(v: &str) -> Option<usize> {
    SUPPORTED_VERSIONS.iter().position(|s| *s == v)
}

/// True when `v` is at least `min` (both supported versions).
pub fn version_at_least(v: &str, min: &str) -> bool {
    matches!((version_index(v), version_index(min)), (Some(a), Some(b)) if a >= b)
}

impl NetConf {
    /// Parses stdin, checks the version is spoken and the version allows `command`.
    pub fn parse(command: Command, body: &[u8]) -> Result<Self, CniError> {
        let conf: NetConf = serde_json::from_slice(body)
            .map_err(|e| CniError::new(code::DECODE_FAILURE, format!("network configuration on stdin: {e}")))?;
        if version_index(&conf.cni_version).is_none() {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "cniVersion {:?} is not supported (supported: {})",
                    conf.cni_version,
                    SUPPORTED_VERSIONS.join(", ")
                ),
            ));
        }
        let min = match command {
            Command::Check => "0.4.0",
            Command::Status | Command::Gc => "1.1.0",
            _ => "0.3.0",
        };
        if !version_at_least(&conf.cni_version, min) {
            return Err(CniError::new(
                code::INCOMPATIBLE_VERSION,
                format!(
                    "config version {} does not allow {} (needs {min} or later)",
                    conf.cni_version,
                    command.as_str()
                ),
            ));
        }
        if command != Command::Status && command != Command::Gc && conf.name.is_empty() {
            return Err(CniError::new(code::INVALID_CONFIG, "network configuration has no \"name\""));
        }
        Ok(conf)
    }

    /// The `ipam` object's field `key`, when present.
    pub fn ipam_field(&self, key: &str) -> Option<&Value> {
        self.ipam.as_ref().and_then(|i| i.get(key))
    }

    /// The node state file: `CARVE_STATE_FILE`, else `stateFile`, else
    /// `ipam.stateFile`, else [`crate::state::DEFAULT_STATE_FILE`].
    pub fn state_file(&self) -> PathBuf {
        let configured = self.other.get("stateFile").or_else(|| self.ipam_field("stateFile"));
        crate::ipam::state_file_path(configured.and_then(Value::as_str).map(PathBuf::from))
    }
}

/// What one invocation hands a plugin.
#[derive(Clone, Debug)]
pub struct Request {
    pub command: Command,
    pub env: CniEnv,
    pub conf: NetConf,
    /// stdin as received, passed on unchanged to delegated plugins.
    pub raw: Vec<u8>,
}

/// A CNI plugin: carve-cni or carve-ipam.
pub trait Plugin {
    /// Executable name, for `--version` and logs.
    const NAME: &'static str;
    fn add(&self, req: &Request) -> Result<CniResult, CniError>;
    fn del(&self, req: &Request) -> Result<(), CniError>;
    fn check(&self, req: &Request) -> Result<(), CniError>;
    fn status(&self, req: &Request) -> Result<(), CniError>;
    fn gc(&self, req: &Request) -> Result<(), CniError>;
}

/// The VERSION answer.
pub fn version_info(requested: &str) -> Value {
    let v = if version_index(requested).is_some() { requested } else { SPEC_VERSION };
    serde_json::json!({ "cniVersion": v, "supportedVersions": SUPPORTED_VERSIONS })
}

/// The outcome of one invocation, before it is printed.
pub struct Outcome {
    pub stdout: Option<Value>,
    pub exit_code: i32,
}

/// Runs one invocation from explicit inputs (testable without a process).
pub fn dispatch<P: Plugin>(
    plugin: &P,
    command: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Outcome {
    let fail = |version: &str, e: CniError| {
        tracing::error!(code = e.code, "{}", e);
        Outcome { stdout: Some(e.to_json(version)), exit_code: 1 }
    };
    // The version to answer errors in: the config's when it parses that far.
    let version = serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cniVersion").and_then(Value::as_str).map(str::to_owned))
        .filter(|v| version_index(v).is_some())
        .unwrap_or_else(|| SPEC_VERSION.to_owned());
    let Some(command) = command.and_then(Command::parse) else {
        return fail(
            &version,
            CniError::new(
                code::INVALID_ENV,
                format!("CNI_COMMAND {:?} is missing or not one of ADD, DEL, CHECK, STATUS, GC, VERSION", command),
            ),
        );
    };
    if command == Command::Version {
        return Outcome { stdout: Some(version_info(&version)), exit_code: 0 };
    }
    let env = match CniEnv::from_vars(command, &env) {
        Ok(env) => env,
        Err(e) => return fail(&version, e),
    };
    let conf = match NetConf::parse(command, stdin) {
        Ok(c) => c,
        Err(e) => return fail(&version, e),
    };
    let req = Request { command, env, conf, raw: stdin.to_vec() };
    tracing::debug!(command = command.as_str(), container = %req.env.container_id, ifname = %req.env.ifname, "{}", P::NAME);
    let res = match command {
        Command::Add => plugin.add(&req).map(|r| Some(r.render(&req.conf.cni_version))),
        Command::Del => plugin.del(&req).map(|()| None),
        Command::Check => plugin.check(&req).map(|()| None),
        Command::Status => plugin.status(&req).map(|()| None),
        Command::Gc => plugin.gc(&req).map(|()| None),
        Command::Version => unreachable!("answered above"),
    };
    match res {
        Ok(stdout) => {
            tracing::info!(command = command.as_str(), container = %req.env.container_id, ifname = %req.env.ifname, "done");
            Outcome { stdout, exit_code: 0 }
        }
        Err(e) => fail(&req.conf.cni_version, e),
    }
}

/// Sets up logging from the config's `logLevel` / `logFile` (stderr when no file);
/// never stdout.
fn init_logging(stdin: &[u8]) {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct LogConf {
        log_level: Option<String>,
        log_file: Option<PathBuf>,
    }
    let conf: LogConf = serde_json::from_slice(stdin).unwrap_or_default();
    let level = match conf.log_level.as_deref() {
        Some("debug") => tracing::Level::DEBUG,
        Some("error") => tracing::Level::ERROR,
        Some("warn") => tracing::Level::WARN,
        _ => tracing::Level::INFO,
    };
    let builder = tracing_subscriber::fmt().with_max_level(level).with_ansi(false).with_target(false);
    let file = conf.log_file.and_then(|p| {
        if let Some(dir) = p.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        std::fs::OpenOptions::new().create(true).append(true).open(p).ok()
    });
    let _ = match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).try_init(),
        None => builder.with_writer(std::io::stderr).try_init(),
    };
}

/// The whole life of a plugin process: `--version`, then one CNI invocation,
/// reported to carve-agent once its answer is out. Returns the exit code.
pub fn run<P: Plugin>(plugin: &P) -> i32 {
    let started = std::time::Instant::now();
    if std::env::args().nth(1).is_some_and(|a| a == "--version" || a == "version") {
        println!(
            "{} {} (CNI spec {SPEC_VERSION}; supported versions: {})",
            P::NAME,
            env!("CARGO_PKG_VERSION"),
            SUPPORTED_VERSIONS.join(", ")
        );
        return 0;
    }
    let command = std::env::var("CNI_COMMAND").ok();
    let mut stdin = Vec::new();
    // VERSION may come with {"cniVersion": ..} on stdin, or with nothing readable.
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin)
        && command.as_deref() != Some("VERSION")
    {
        let e = CniError::new(code::IO_FAILURE, format!("reading the network configuration from stdin: {e}"));
        return print(&Outcome { stdout: Some(e.to_json(SPEC_VERSION)), exit_code: 1 });
    }
    init_logging(&stdin);
    let out = dispatch(plugin, command.as_deref(), |k| std::env::var(k).ok(), &stdin);
    let duration = started.elapsed();
    let exit_code = print(&out);
    // Only calls with a known command and plugin: label values stay bounded.
    if let (Some(plugin), Some(command)) =
        (report::PluginName::parse(P::NAME), command.as_deref().and_then(Command::parse))
    {
        // A config that does not parse still reports, beside the default state file.
        let state_file = serde_json::from_slice::<NetConf>(&stdin)
            .map_or_else(|_| crate::ipam::state_file_path(None), |c| c.state_file());
        let r = report::Report { plugin, command, success: exit_code == 0, duration };
        report::send(&report::socket_path(&state_file), &r);
    }
    exit_code
}

fn print(out: &Outcome) -> i32 {
    if let Some(v) = &out.stdout {
        let mut stdout = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut stdout, v);
        let _ = stdout.write_all(b"\n");
        let _ = stdout.flush();
    }
    out.exit_code
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fails;
    impl Plugin for Fails {
        const NAME: &'static str = "fails";
        fn add(&self, _: &Request) -> Result<CniResult, CniError> {
            Err(CniError::new(code::TRY_AGAIN_LATER, "node state file missing"))
        }
        fn del(&self, _: &Request) -> Result<(), CniError> {
            Ok(())
        }
        fn check(&self, _: &Request) -> Result<(), CniError> {
            Ok(())
        }
        fn status(&self, _: &Request) -> Result<(), CniError> {
            Err(CniError::new(code::NOT_AVAILABLE, "no state"))
        }
        fn gc(&self, _: &Request) -> Result<(), CniError> {
            Ok(())
        }
    }

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    const FULL: &[(&str, &str)] = &[
        ("CNI_CONTAINERID", "c1"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_NETNS", "/var/run/netns/x"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    #[test]
    fn missing_env_is_code_4_naming_the_variables() {
        let out =
            dispatch(&Fails, Some("ADD"), env(&[("CNI_IFNAME", "eth0")]), br#"{"cniVersion":"1.0.0","name":"n"}"#);
        let v = out.stdout.unwrap();
        assert_eq!(out.exit_code, 1);
        assert_eq!(v["code"], 4);
        assert_eq!(v["cniVersion"], "1.0.0");
        let msg = v["msg"].as_str().unwrap();
        assert!(msg.contains("CNI_CONTAINERID") && msg.contains("CNI_NETNS") && msg.contains("CNI_PATH"), "{msg}");
    }

    #[test]
    fn bad_command_bad_json_bad_version() {
        assert_eq!(dispatch(&Fails, Some("FOO"), env(FULL), b"{}").stdout.unwrap()["code"], 4);
        assert_eq!(dispatch(&Fails, Some("ADD"), env(FULL), b"not json").stdout.unwrap()["code"], 6);
        let v = dispatch(&Fails, Some("ADD"), env(FULL), br#"{"cniVersion":"0.2.0","name":"n"}"#).stdout.unwrap();
        assert_eq!(v["code"], 1);
        let v = dispatch(&Fails, Some("CHECK"), env(FULL), br#"{"cniVersion":"0.3.1","name":"n"}"#).stdout.unwrap();
        assert_eq!(v["code"], 1);
        let v = dispatch(&Fails, Some("ADD"), env(FULL), br#"{"cniVersion":"1.1.0"}"#).stdout.unwrap();
        assert_eq!(v["code"], 7);
    }

    #[test]
    fn version_answers_the_requested_version_and_lists_all() {
        let out = dispatch(&Fails, Some("VERSION"), env(&[]), br#"{"cniVersion":"0.4.0"}"#);
        let v = out.stdout.unwrap();
        assert_eq!(out.exit_code, 0);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), SUPPORTED_VERSIONS.len());
        assert_eq!(dispatch(&Fails, Some("VERSION"), env(&[]), b"").stdout.unwrap()["cniVersion"], SPEC_VERSION);
    }

    #[test]
    fn plugin_errors_and_empty_success_outputs() {
        let v = dispatch(&Fails, Some("ADD"), env(FULL), br#"{"cniVersion":"1.1.0","name":"n"}"#).stdout.unwrap();
        assert_eq!(v["code"], 11);
        let out = dispatch(&Fails, Some("DEL"), env(FULL), br#"{"cniVersion":"1.1.0","name":"n"}"#);
        assert!(out.stdout.is_none());
        assert_eq!(out.exit_code, 0);
        let out = dispatch(&Fails, Some("STATUS"), env(&[("CNI_PATH", "/x")]), br#"{"cniVersion":"1.1.0"}"#);
        assert_eq!(out.stdout.unwrap()["code"], 50);
    }

    #[test]
    fn gc_attachments_both_spellings() {
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let body =
                format!(r#"{{"cniVersion":"1.1.0","name":"n","{key}":[{{"containerID":"a","ifname":"eth0"}}]}}"#);
            let conf = NetConf::parse(Command::Gc, body.as_bytes()).unwrap();
            assert_eq!(
                conf.valid_attachments.unwrap(),
                vec![Attachment { container_id: "a".into(), ifname: "eth0".into() }]
            );
        }
    }

    #[test]
    fn ifname_rules() {
        assert!(valid_ifname("eth0"));
        assert!(!valid_ifname("a/b"));
        assert!(!valid_ifname("sixteen-chars-xx"));
        let e = CniEnv::from_vars(
            Command::Add,
            env(&[("CNI_CONTAINERID", "c"), ("CNI_IFNAME", "bad/name"), ("CNI_NETNS", "/n"), ("CNI_PATH", "/p")]),
        );
        assert_eq!(e.unwrap_err().code, 4);
    }
}
