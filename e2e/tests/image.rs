//! The local nodes' images (`carve_e2e::image`, `carve-image`, `make image`):
//! what the manifests and the Dockerfile expect is in carve's archive, every
//! binary runs from the unpacked layer (its shared libraries are there), the
//! pause reaps and stops, busybox has its applets, a real containerd 1.6
//! imports all three under their names, and the same inputs give the same
//! digests.
//!
//! carve's binaries come from target/release when all five are there, else
//! from this profile's folder (built when stale). Needs root (chroot, unshare,
//! nsenter, containerd), gcc with a static libc, busybox-static, nftables,
//! containerd + ctr, and the portmap of `e2e/scripts/control-plane-bins.sh`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use carve_e2e::image::{
    self, BUSYBOX_APPLETS, BuiltImage, CARVE_BINARIES, Compression, DEFAULT_PATH, Images, Inputs, LayerEntry, NFT_PATH,
    OciArchive, PORTMAP_PATH,
};
use carve_e2e::netns::{Netns, run};
use carve_e2e::process::ProcessKeeper;
use carve_e2e::scratch::scratch_root;
use carve_e2e::testkit::workspace_bin;
use carve_e2e::{control_plane_bins, repo_root};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, PodSpec};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Deserialize;
use serde_json::{Value, json};

/// What carve's image is built from, found (or built) once per test process.
fn inputs() -> &'static Inputs {
    static INPUTS: OnceLock<Inputs> = OnceLock::new();
    INPUTS.get_or_init(|| Inputs {
        bin_dir: carve_bin_dir(),
        portmap: control_plane_bins().expect("control plane bins").join("cni-plugins/portmap"),
        tag: image::default_tag(),
        compression: Compression::None,
    })
}

/// carve's binaries: target/release when complete, else this profile's.
fn carve_bin_dir() -> PathBuf {
    let release = repo_root().join("target/release");
    if CARVE_BINARIES.iter().all(|b| release.join(b).is_file()) {
        return release;
    }
    let mut dir = PathBuf::new();
    for bin in CARVE_BINARIES {
        let package =
            if ["carve-controller", "carvectl"].contains(&bin) { "carve-controller" } else { "carve-node-plugin" };
        let path = workspace_bin(package, bin).unwrap_or_else(|e| panic!("building {bin}: {e:#}"));
        dir = path.parent().unwrap().to_path_buf();
    }
    dir
}

/// The three archives, built once per test process into target/tmp (each
/// written atomically, so parallel runs only ever see whole archives).
fn built() -> &'static Images {
    static BUILT: OnceLock<Images> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("carve-image-tests");
        image::build_all(&out, inputs()).unwrap_or_else(|e| panic!("building the images: {e:#}"))
    })
}

/// An image's layer unpacked into a temp dir, removed when dropped.
fn unpacked(image: &BuiltImage) -> (OciArchive, tempfile::TempDir) {
    let archive = OciArchive::open(&image.archive).unwrap();
    let root = tempfile::Builder::new().prefix("carve-image-root-").tempdir().unwrap();
    archive.unpack(root.path()).unwrap();
    (archive, root)
}

/// `env` arguments that run `argv` chrooted into `root`, with only `vars`
/// and the images' PATH set.
fn chroot_args<'a>(root: &'a Path, vars: &[&'a str], argv: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["-i", DEFAULT_PATH];
    all.extend_from_slice(vars);
    all.extend(["chroot", root.to_str().unwrap()]);
    all.extend_from_slice(argv);
    all
}

fn chroot(root: &Path, vars: &[&str], argv: &[&str]) -> anyhow::Result<String> {
    run("env", &chroot_args(root, vars, argv))
}

fn is_executable_file(files: &BTreeMap<String, LayerEntry>, path: &str) -> bool {
    files.get(path).is_some_and(|e| e.kind == tar::EntryType::Regular && e.mode & 0o111 == 0o111)
}

fn assert_executable(files: &BTreeMap<String, LayerEntry>, path: &str, why: &str) {
    assert!(
        is_executable_file(files, path),
        "{why}: {path} is not an executable file in the image ({:?})",
        files.get(path)
    );
}

// --- what the manifests use ----------------------------------------------

/// Every pod template of manifests/ (Deployments, DaemonSets), by object.
fn pod_specs() -> Vec<(String, PodSpec)> {
    let files: BTreeSet<PathBuf> = std::fs::read_dir(repo_root().join("manifests"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension() == Some("yaml".as_ref()))
        .collect();
    let docs = files.iter().flat_map(|f| {
        let text = std::fs::read_to_string(f).unwrap();
        serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect::<Vec<_>>()
    });
    docs.filter_map(|doc| {
        let name = format!("{} {}", doc["kind"].as_str()?, doc["metadata"]["name"].as_str()?);
        let template = match doc["kind"].as_str()? {
            "Deployment" => serde_yaml::from_value::<Deployment>(doc).unwrap().spec?.template,
            "DaemonSet" => serde_yaml::from_value::<DaemonSet>(doc).unwrap().spec?.template,
            _ => return None,
        };
        Some((name, template.spec?))
    })
    .collect()
}

/// A flag's `[env: X=]` and `[default: Y]` from clap's `--help` text.
fn flag_help(help: &str, flag: &str) -> (Option<String>, Option<String>) {
    let lines: Vec<&str> = help.lines().map(str::trim_start).collect();
    let start = lines
        .iter()
        .position(|l| l.split([' ', ',']).next() == Some(flag))
        .unwrap_or_else(|| panic!("{flag} is not in the help:\n{help}"));
    let end = lines[start + 1..].iter().position(|l| l.starts_with('-')).map_or(lines.len(), |i| start + 1 + i);
    let text = lines[start..end].join(" ");
    let bracket = |key: &str| {
        let from = text.find(&format!("[{key}: "))? + key.len() + 3;
        let value = &text[from..from + text[from..].find(']')?];
        Some(if key == "env" { value.split('=').next().unwrap_or_default() } else { value }.to_string())
    };
    (bracket("env"), bracket("default"))
}

/// `--flag=value` or `--flag value` in `words`.
fn flag_value(words: &[String], flag: &str) -> Option<String> {
    words.iter().enumerate().find_map(|(i, w)| {
        w.strip_prefix(&format!("{flag}="))
            .map(String::from)
            .or_else(|| (w == flag).then(|| words.get(i + 1).cloned()).flatten())
    })
}

/// Absolute paths among a container's words (flag values included) and env values.
fn paths_in(words: &[String], c: &Container) -> Vec<String> {
    let env = c.env.iter().flatten().filter_map(|e| e.value.clone());
    words
        .iter()
        .map(|w| w.split_once('=').filter(|_| w.starts_with("--")).map(|(_, v)| v.to_string()).unwrap_or(w.clone()))
        .chain(env)
        .filter(|p| p.starts_with('/'))
        .collect()
}

/// A path the pod provides, not the image: under a volume mount, or a
/// parent of one (the runtime makes it).
fn provided_by_mount(path: &str, c: &Container) -> bool {
    c.volume_mounts.iter().flatten().any(|m| {
        let (p, m) = (Path::new(path), Path::new(&m.mount_path));
        p.starts_with(m) || m.starts_with(p)
    })
}

#[test]
fn every_path_the_manifests_run_is_in_the_carve_image() {
    let archive = OciArchive::open(&built().carve.archive).unwrap();
    let files = archive.entries().unwrap();
    let name = image::carve_image_name(&image::default_tag());
    assert_eq!(archive.name, name);

    let mut checked = 0;
    for (object, spec) in pod_specs() {
        for c in spec.init_containers.iter().flatten().chain(&spec.containers) {
            let image_ref = c.image.clone().unwrap_or_default();
            if !image_ref.starts_with(image::CARVE_REPOSITORY) {
                continue;
            }
            let why = format!("{object}, container {}", c.name);
            assert_eq!(image_ref, name, "{why}: the manifests' image is not the one carve-image builds by default");
            let command = c.command.clone().unwrap_or_default();
            assert!(!command.is_empty(), "{why}: no command (the image has no entrypoint)");
            assert_executable(&files, &command[0], &why);
            let words: Vec<String> = command[1..].iter().chain(c.args.iter().flatten()).cloned().collect();
            for path in paths_in(&words, c) {
                if !provided_by_mount(&path, c) {
                    assert!(files.contains_key(&path), "{why}: {path} is neither mounted nor in the image");
                }
            }
            // install-cni copies from paths in the image, given or by default.
            if command[0].ends_with("/carve-agent") && words.iter().any(|w| w == "install-cni") {
                let out = Command::new(inputs().bin_dir.join("carve-agent"))
                    .args(["install-cni", "--help"])
                    .env_clear()
                    .output()
                    .unwrap();
                let help = String::from_utf8_lossy(&out.stdout);
                let env = |var: Option<String>| {
                    c.env.iter().flatten().find(|e| Some(&e.name) == var.as_ref()).and_then(|e| e.value.clone())
                };
                let (source_env, _) = flag_help(&help, "--cni-source-dir");
                let source_dir = flag_value(&words, "--cni-source-dir")
                    .or_else(|| env(source_env))
                    .unwrap_or_else(|| Path::new(&command[0]).parent().unwrap().display().to_string());
                for plugin in ["carve-cni", "carve-ipam"] {
                    assert_executable(&files, &format!("{source_dir}/{plugin}"), &format!("{why} (--cni-source-dir)"));
                }
                let (portmap_env, portmap_default) = flag_help(&help, "--portmap-source");
                let portmap = flag_value(&words, "--portmap-source")
                    .or_else(|| env(portmap_env))
                    .or(portmap_default)
                    .expect("--portmap-source has a default");
                assert_executable(&files, &portmap, &format!("{why} (--portmap-source)"));
                assert_eq!(portmap, PORTMAP_PATH);
            }
            checked += 1;
        }
    }
    assert!(checked >= 3, "only {checked} containers of manifests/ run carve's image");
}

// --- the Dockerfile builds the same layout --------------------------------

/// The Dockerfile's instructions as (stage, INSTRUCTION, arguments), with
/// continuation lines joined and comments dropped.
fn dockerfile() -> Vec<(String, String, String)> {
    let text = std::fs::read_to_string(repo_root().join("Dockerfile")).unwrap();
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    joined.push(std::mem::take(&mut current));
                }
                current.clear();
            }
        }
    }
    let mut stage = String::from("(before FROM)");
    let mut out = Vec::new();
    for (i, line) in joined.iter().enumerate() {
        let (instr, args) = line.trim().split_once(char::is_whitespace).unwrap_or((line.trim(), ""));
        let instr = instr.to_uppercase();
        if instr == "FROM" {
            let words: Vec<&str> = args.split_whitespace().collect();
            stage = match words.as_slice() {
                [_, as_, name] if as_.eq_ignore_ascii_case("as") => name.to_string(),
                _ => format!("stage-{i}"),
            };
        }
        out.push((stage.clone(), instr, args.trim().to_string()));
    }
    out
}

/// `k="v" k2=v2` pairs of a LABEL instruction.
fn label_pairs(args: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut rest = args.trim();
    while let Some((key, tail)) = rest.split_once('=') {
        let (value, tail) = match tail.strip_prefix('"') {
            Some(quoted) => quoted.split_once('"').expect("closing quote"),
            None => tail.split_once(char::is_whitespace).unwrap_or((tail, "")),
        };
        pairs.push((key.trim().to_string(), value.to_string()));
        rest = tail.trim();
    }
    pairs
}

#[test]
fn the_dockerfile_and_the_carve_image_have_the_same_layout() {
    let archive = OciArchive::open(&built().carve.archive).unwrap();
    let files = archive.entries().unwrap();
    let instructions = dockerfile();
    let last_stage = instructions.last().unwrap().0.clone();
    let final_stage: Vec<&(String, String, String)> = instructions.iter().filter(|i| i.0 == last_stage).collect();

    // COPY destinations: a directory source gets what its stage `cp`s into it.
    let mut expected = Vec::new();
    for (_, _, args) in final_stage.iter().filter(|i| i.1 == "COPY") {
        let words: Vec<&str> = args.split_whitespace().collect();
        let from = words.iter().find_map(|w| w.strip_prefix("--from=")).expect("COPY --from=<stage>");
        let plain: Vec<&str> = words.iter().copied().filter(|w| !w.starts_with("--")).collect();
        let (dest, sources) = plain.split_last().unwrap();
        for source in sources {
            if source.ends_with('/') {
                let copied: Vec<String> = instructions
                    .iter()
                    .filter(|i| i.0 == from && i.1 == "RUN")
                    .flat_map(|i| i.2.split("&&").map(str::trim).map(String::from).collect::<Vec<_>>())
                    .filter_map(|cmd| {
                        let words: Vec<&str> = cmd.split_whitespace().filter(|w| !w.starts_with('-')).collect();
                        (words.first() == Some(&"cp") && words.last() == Some(source))
                            .then(|| words[1..words.len() - 1].iter().map(|w| w.to_string()).collect::<Vec<_>>())
                    })
                    .flatten()
                    .collect();
                assert!(!copied.is_empty(), "stage {from} puts nothing into {source} with cp");
                expected.extend(copied.iter().map(|f| format!("{}/{f}", dest.trim_end_matches('/'))));
            } else if dest.ends_with('/') {
                expected.push(format!("{dest}{}", Path::new(source).file_name().unwrap().to_string_lossy()));
            } else {
                expected.push(dest.to_string());
            }
        }
    }
    expected.sort();
    let in_image: Vec<String> = files
        .iter()
        .filter(|(p, e)| p.starts_with("/usr/local/") && e.kind == tar::EntryType::Regular)
        .map(|(p, _)| p.clone())
        .collect();
    assert_eq!(in_image, expected, "files under /usr/local: the image (left) and the Dockerfile's COPY (right)");
    for path in &expected {
        assert_executable(&files, path, "the Dockerfile copies it");
    }

    // nft from Debian's nftables, as the Dockerfile installs it.
    let runs: String = final_stage.iter().filter(|i| i.1 == "RUN").map(|i| i.2.as_str()).collect();
    assert!(runs.contains("nftables"), "the Dockerfile no longer installs nftables");
    assert_executable(&files, NFT_PATH, "the Dockerfile installs nftables");

    // Users: the Dockerfile's useradd/groupadd ids are in /etc/passwd and /etc/group.
    let passwd = String::from_utf8(archive.file("/etc/passwd").unwrap()).unwrap();
    let group = String::from_utf8(archive.file("/etc/group").unwrap()).unwrap();
    for cmd in runs.split("&&").map(str::trim) {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let opt = |name: &str| words.iter().position(|w| *w == name).map(|i| words[i + 1]);
        match words.first() {
            Some(&"useradd") => {
                let (uid, gid, user) = (opt("--uid").unwrap(), opt("--gid").unwrap(), words.last().unwrap());
                assert!(
                    passwd.lines().any(|l| l.starts_with(&format!("{user}:x:{uid}:{gid}:"))),
                    "no {user} {uid}:{gid} in /etc/passwd:\n{passwd}"
                );
            }
            Some(&"groupadd") => {
                let (gid, name) = (opt("--gid").unwrap(), words.last().unwrap());
                assert!(
                    group.lines().any(|l| l.starts_with(&format!("{name}:x:{gid}:"))),
                    "no {name} {gid} in /etc/group"
                );
            }
            _ => {}
        }
    }

    // Config: USER, ENTRYPOINT and CMD as the final stage says (none: root, none).
    let config = archive.config.config().clone().unwrap_or_default();
    let last = |instr: &str| final_stage.iter().rev().find(|i| i.1 == instr).map(|i| i.2.clone());
    assert_eq!(config.user().clone().filter(|u| !u.is_empty()), last("USER"), "USER");
    let json_list = |s: Option<String>| s.map(|s| serde_json::from_str::<Vec<String>>(&s).expect("exec form"));
    assert_eq!(config.entrypoint().clone(), json_list(last("ENTRYPOINT")), "ENTRYPOINT");
    assert_eq!(config.cmd().clone(), json_list(last("CMD")), "CMD");

    // LABELs, with the final stage's ARG defaults substituted.
    let args: BTreeMap<String, String> = final_stage
        .iter()
        .filter(|i| i.1 == "ARG")
        .filter_map(|i| i.2.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    let labels: BTreeMap<String, String> = final_stage
        .iter()
        .filter(|i| i.1 == "LABEL")
        .flat_map(|i| label_pairs(&i.2))
        .map(|(k, v)| (k, args.iter().fold(v, |v, (a, d)| v.replace(&format!("${{{a}}}"), d))))
        .collect();
    let image_labels: BTreeMap<String, String> = config.labels().clone().unwrap_or_default().into_iter().collect();
    assert_eq!(image_labels, labels, "labels: the image (left) and the Dockerfile (right)");
}

// --- the binaries run from the unpacked layer ----------------------------

#[test]
fn carve_binaries_portmap_and_nft_run_from_the_unpacked_image() {
    let (archive, root) = unpacked(&built().carve);
    let root = root.path();
    let version = env!("CARGO_PKG_VERSION");
    for bin in ["carve-controller", "carvectl", "carve-agent"] {
        let out = chroot(root, &[], &[&format!("/usr/local/bin/{bin}"), "--version"]).unwrap();
        assert_eq!(out.trim(), format!("{bin} {version}"));
    }
    for plugin in ["/usr/local/bin/carve-cni", "/usr/local/bin/carve-ipam", PORTMAP_PATH] {
        let out = chroot(root, &["CNI_COMMAND=VERSION"], &[plugin]).unwrap_or_else(|e| panic!("{plugin}: {e:#}"));
        let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{plugin} VERSION: {e}: {out}"));
        assert!(v["supportedVersions"].as_array().unwrap().contains(&json!("1.1.0")), "{plugin}: {out}");
    }
    let out = chroot(root, &[], &[NFT_PATH, "--version"]).unwrap();
    assert!(out.starts_with("nftables v"), "{out}");

    // nft programs a NAT table like carve-agent's, in a network namespace of its own.
    let batch = json!({"nftables": [
        {"add": {"table": {"family": "ip", "name": "carve-image-test"}}},
        {"add": {"chain": {"family": "ip", "table": "carve-image-test", "name": "postrouting", "type": "nat",
            "hook": "postrouting", "prio": 100, "policy": "accept"}}},
        {"add": {"set": {"family": "ip", "table": "carve-image-test", "name": "no-masquerade",
            "type": "ipv4_addr", "flags": ["interval"], "elem": [{"prefix": {"addr": "10.244.0.0", "len": 16}}]}}},
        {"add": {"rule": {"family": "ip", "table": "carve-image-test", "chain": "postrouting", "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                "right": {"prefix": {"addr": "10.244.1.0", "len": 24}}}},
            {"match": {"op": "!=", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@no-masquerade"}},
            {"masquerade": null}]}}},
    ]});
    std::fs::write(root.join("tmp/batch.json"), batch.to_string()).unwrap();
    let ns = Netns::new(&format!("img-nft-{}", std::process::id())).unwrap();
    ns.exec("env", &chroot_args(root, &[], &[NFT_PATH, "-j", "-f", "/tmp/batch.json"])).unwrap();
    let listed =
        ns.exec("env", &chroot_args(root, &[], &[NFT_PATH, "-j", "list", "table", "ip", "carve-image-test"])).unwrap();
    assert!(listed.contains("\"masquerade\"") && listed.contains("no-masquerade"), "nft listed: {listed}");

    // Every dynamic ELF's libraries, by the loader's paths.
    let files = archive.entries().unwrap();
    for (path, entry) in &files {
        if entry.kind != tar::EntryType::Regular || entry.mode & 0o111 == 0 || path.contains(".so") {
            continue;
        }
        for lib in image::shared_libraries(&root.join(path.trim_start_matches('/'))).unwrap() {
            assert!(
                files.contains_key(&lib.image_path),
                "{path} needs {} ({})",
                lib.image_path,
                lib.host_file.display()
            );
        }
    }
}

// --- pause ------------------------------------------------------------------

/// Pids whose parent is `pid`, from /proc.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/status"))
                .ok()
                .and_then(|s| s.lines().find_map(|l| l.strip_prefix("PPid:").map(|p| p.trim() == pid.to_string())))
                .unwrap_or(false)
        })
        .collect()
}

fn wait_until<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn pause_reaps_orphans_and_exits_on_sigterm() {
    let (archive, root) = unpacked(&built().pause);
    let config = archive.config.config().clone().unwrap();
    assert_eq!(config.entrypoint().clone(), Some(vec!["/pause".to_string()]));
    assert!(image::shared_libraries(&root.path().join("pause")).unwrap().is_empty(), "pause is not static");
    assert_eq!(chroot(root.path(), &[], &["/pause", "-v"]).unwrap().trim(), "carve pause v1");

    // PID 1 of a PID namespace, as in a pod.
    let keeper = ProcessKeeper::new();
    let mut cmd = Command::new("unshare");
    cmd.args(["--pid", "--fork", "--kill-child", "chroot"]).arg(root.path()).arg("/pause");
    let unshare = keeper.spawn("pause", cmd, root.path().join("pause.log")).unwrap();
    let pause = wait_until("pause to start", Duration::from_secs(10), || {
        children_of(unshare).into_iter().find(|p| {
            std::fs::read_link(format!("/proc/{p}/exe")).is_ok_and(|e| e.file_name().is_some_and(|n| n == "pause"))
        })
    });
    // A shell in the namespace leaves a sleep behind: the orphan goes to PID 1.
    let out = run(
        "nsenter",
        &["--target", &pause.to_string(), "--pid", "--", "/bin/sh", "-c", "sleep 2 >/dev/null 2>&1 & echo $!"],
    )
    .unwrap();
    assert!(!out.trim().is_empty());
    wait_until("the orphan to be reparented to pause", Duration::from_secs(5), || {
        (!children_of(pause).is_empty()).then_some(())
    });
    // It exits after two seconds; pause must reap it (a zombie stays its child).
    wait_until("pause to reap its orphan", Duration::from_secs(10), || children_of(pause).is_empty().then_some(()));

    kill(Pid::from_raw(pause as i32), Signal::SIGTERM).unwrap();
    let status = wait_until("pause to exit", Duration::from_secs(10), || keeper.exited("pause"));
    assert!(status.success(), "pause exited with {status} after SIGTERM");
}

// --- busybox ----------------------------------------------------------------

#[test]
fn busybox_image_has_a_shell_and_every_applet() {
    let (archive, root) = unpacked(&built().busybox);
    let files = archive.entries().unwrap();
    let config = archive.config.config().clone().unwrap();
    assert_eq!(config.entrypoint().clone(), Some(vec!["/bin/sh".to_string()]));
    assert_executable(&files, "/bin/busybox", "busybox");
    let listed = run(image::HOST_BUSYBOX, &["--list"]).unwrap();
    let linked: Vec<&str> = files
        .iter()
        .filter(|(_, e)| e.link.as_deref() == Some("busybox"))
        .map(|(p, _)| p.trim_start_matches("/bin/"))
        .collect();
    let mut applets: Vec<&str> = listed.lines().filter(|a| *a != "busybox").collect();
    applets.sort();
    assert_eq!(linked, applets, "symlinks in /bin vs busybox --list");
    for applet in BUSYBOX_APPLETS {
        assert!(linked.contains(&applet), "{applet} is not linked");
    }
    let out = chroot(
        root.path(),
        &[],
        &["/bin/sh", "-c", "echo hello && mkdir -p /tmp/made && ls /tmp && true && grep -c '^root:' /etc/passwd && echo abc | sed s/b/B/ && wget --help 2>&1 | head -1"],
    )
    .unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(&lines[..4], ["hello", "made", "1", "aBc"], "{out}");
    assert!(out.contains("BusyBox"), "{out}");
}

// --- containerd -------------------------------------------------------------

/// Debian's containerd on a socket, root and state of its own; on drop it is
/// stopped, whatever it left mounted below its dir unmounted, the dir removed.
struct Containerd {
    keeper: ProcessKeeper,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        std::fs::create_dir_all(scratch_root()).unwrap();
        let dir = tempfile::Builder::new().prefix("image-containerd-").tempdir_in(scratch_root()).unwrap();
        // The harness's sweep keeps directories whose owner lives.
        std::fs::write(dir.path().join("owner.pid"), std::process::id().to_string()).unwrap();
        let d = dir.path().display();
        let config = format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\", \"io.containerd.internal.v1.opt\", \
             \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
             \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\"]\n\
             [grpc]\n  address = \"{d}/sock\"\n[ttrpc]\n  address = \"{d}/sock.ttrpc\"\n"
        );
        std::fs::write(dir.path().join("config.toml"), config).unwrap();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let mut cmd = Command::new("containerd");
        // Temporary mounts of the layer unpacking go below the dir too.
        cmd.arg("--config").arg(dir.path().join("config.toml")).env("TMPDIR", dir.path().join("tmp"));
        let keeper = ProcessKeeper::new();
        keeper.spawn("containerd", cmd, dir.path().join("containerd.log")).unwrap();
        let ctrd = Containerd { keeper, dir };
        wait_until("containerd to serve", Duration::from_secs(30), || {
            if let Some(status) = ctrd.keeper.exited("containerd") {
                let log = std::fs::read_to_string(ctrd.dir.path().join("containerd.log")).unwrap_or_default();
                panic!("containerd exited ({status}):\n{log}");
            }
            ctrd.ctr(&["version"]).ok()
        });
        ctrd
    }

    fn ctr(&self, args: &[&str]) -> anyhow::Result<String> {
        let sock = self.dir.path().join("sock");
        let mut all = vec!["--address", sock.to_str().unwrap(), "-n", "k8s.io"];
        all.extend_from_slice(args);
        run("ctr", &all)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        self.keeper.stop("containerd");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut below: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(4))
            .filter(|m| Path::new(m).starts_with(self.dir.path()))
            .collect();
        below.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in below {
            let _ = run("umount", &["-l", m]);
        }
    }
}

#[test]
fn archives_import_into_containerd_under_their_names() {
    let images = built();
    let ctrd = Containerd::start();
    for image in images.all() {
        ctrd.ctr(&["images", "import", image.archive.to_str().unwrap()])
            .unwrap_or_else(|e| panic!("importing {}: {e:#}", image.name));
    }
    let listing = ctrd.ctr(&["images", "ls"]).unwrap();
    let refs: BTreeMap<&str, &str> = listing
        .lines()
        .skip(1)
        .filter_map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            Some((*cols.first()?, *cols.get(2)?))
        })
        .collect();
    for image in images.all() {
        assert_eq!(refs.get(image.name.as_str()), Some(&image.digest.as_str()), "{} in:\n{listing}", image.name);
    }
    // Unpacked: a one-layer image's snapshot is named by its diff ID.
    let snapshots = ctrd.ctr(&["snapshots", "ls"]).unwrap();
    for image in images.all() {
        assert!(snapshots.contains(&image.diff_id), "no snapshot {} for {}:\n{snapshots}", image.diff_id, image.name);
    }
}

// --- determinism -----------------------------------------------------------

/// `inputs` as hard links in `dir` (copies where linking fails), so that a
/// rebuild of the originals while the test runs changes nothing.
fn snapshot(inputs: &Inputs, dir: &Path) -> Inputs {
    let link = |from: &Path, to: &Path| {
        let from = std::fs::canonicalize(from).unwrap();
        if std::fs::hard_link(&from, to).is_err() {
            std::fs::copy(&from, to).unwrap();
        }
    };
    let bin_dir = dir.join("bin");
    std::fs::create_dir_all(&bin_dir).unwrap();
    for bin in CARVE_BINARIES {
        link(&inputs.bin_dir.join(bin), &bin_dir.join(bin));
    }
    let portmap = dir.join("portmap");
    link(&inputs.portmap, &portmap);
    Inputs { bin_dir, portmap, ..inputs.clone() }
}

#[test]
fn the_same_inputs_give_the_same_digests() {
    let dir = tempfile::Builder::new().prefix("carve-image-again-").tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let inputs = snapshot(inputs(), &dir.path().join("inputs"));
    let once = image::build_all(&dir.path().join("once"), &inputs).unwrap();
    let twice = image::build_all(&dir.path().join("twice"), &inputs).unwrap();
    for (first, second) in once.all().into_iter().zip(twice.all()) {
        assert_eq!(first.name, second.name);
        assert_eq!(first.digest, second.digest, "{}", first.name);
        assert_eq!(first.size, second.size, "{}", first.name);
        let bytes = |b: &BuiltImage| image::sha256_file(&b.archive).unwrap();
        assert_eq!(bytes(first), bytes(second), "{} archive bytes", first.name);
        let read = OciArchive::open(&first.archive).unwrap();
        assert_eq!((read.name.as_str(), read.digest.as_str()), (first.name.as_str(), first.digest.as_str()));
        assert_eq!(read.ref_name, first.name.rsplit(':').next().unwrap());
    }

    // gzip layers too; the diff ID is the plain layer's.
    let mut spec = image::pause_image().unwrap();
    spec.compression = Compression::Gzip;
    let a = image::write_archive(&spec, &dir.path().join("a.tar")).unwrap();
    let b = image::write_archive(&spec, &dir.path().join("b.tar")).unwrap();
    assert_eq!(a.digest, b.digest);
    assert_ne!(a.digest, once.pause.digest);
    assert_eq!(a.diff_id, once.pause.diff_id);
    let read = OciArchive::open(&a.archive).unwrap();
    assert_eq!(read.config.rootfs().diff_ids(), &vec![once.pause.diff_id.clone()]);
}
