//! The shell side of carve: every script passes shellcheck, the kind e2e
//! skips cleanly where there is no container engine, `make dist` produces the
//! CNI plugin tarball, and `scripts/install-cni-plugin.sh` installs it from a
//! release laid out on disk (`file://`, no network). Runs as root; needs
//! shellcheck (CI installs it), make, tar, curl and sha256sum.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use carve_e2e::repo_root;
use carve_e2e::testkit::{temp_dir, without_test_env};

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// True when the file is a shell script: a `.sh` name or a sh/bash shebang.
fn is_shell_script(path: &Path) -> bool {
    if path.extension().is_some_and(|e| e == "sh") {
        return true;
    }
    let Ok(bytes) = std::fs::read(path) else { return false };
    let first = bytes.split(|&b| b == b'\n').next().unwrap_or_default();
    let Some(line) = std::str::from_utf8(first).ok().and_then(|l| l.strip_prefix("#!")) else { return false };
    let mut words = line.split_whitespace();
    let mut interpreter = words.next().unwrap_or_default();
    if interpreter.ends_with("/env") {
        interpreter = words.next().unwrap_or_default();
    }
    matches!(interpreter.rsplit('/').next(), Some("sh" | "bash" | "dash"))
}

/// Every shell script under `dir`, skipping build output and git's folder.
fn shell_scripts(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        match entry.file_type() {
            Ok(t) if t.is_dir() => shell_scripts(&path, found),
            Ok(t) if t.is_file() && is_shell_script(&path) => found.push(path),
            _ => {}
        }
    }
}

#[test]
fn every_shell_script_passes_shellcheck() {
    let root = repo_root();
    let mut scripts = Vec::new();
    shell_scripts(&root, &mut scripts);
    scripts.sort();
    let rel: BTreeSet<String> =
        scripts.iter().map(|p| p.strip_prefix(&root).unwrap().to_string_lossy().into_owned()).collect();
    for expected in [
        ".ci/run",
        "e2e/scripts/control-plane-bins.sh",
        "e2e/scripts/prereqs.sh",
        "e2e/kind/run.sh",
        "scripts/install-cni-plugin.sh",
    ] {
        assert!(rel.contains(expected), "{expected} is not among the shell scripts found: {rel:?}");
    }
    for script in &scripts {
        let mode = std::fs::metadata(script).unwrap().permissions().mode();
        assert!(mode & 0o111 == 0o111, "{} is not executable (mode {mode:o}): chmod 0755 it", script.display());
    }

    let out = match Command::new("shellcheck").args(["--version"]).output() {
        Ok(o) if o.status.success() => o,
        _ => panic!("shellcheck is not installed: apt-get install -y shellcheck (.ci/run installs it on CI)"),
    };
    let (version, _) = text(&out);
    let out = run(Command::new("shellcheck").args(&rel).current_dir(&root));
    let (stdout, stderr) = text(&out);
    assert!(
        out.status.success(),
        "shellcheck found problems in {rel:?}\n{stdout}{stderr}\n({})",
        version.lines().nth(1).unwrap_or_default()
    );
}

/// `e2e/kind/run.sh` with `PATH` set to `path` and nothing else in the environment.
fn kind_script(path: &Path) -> Output {
    run(Command::new("/bin/bash")
        .arg(repo_root().join("e2e/kind/run.sh"))
        .env_clear()
        .env("PATH", path)
        .current_dir(repo_root()))
}

fn one_line(out: &Output) -> String {
    let (stdout, stderr) = text(out);
    let all = format!("{stdout}{stderr}");
    assert!(out.status.success(), "the kind e2e should skip with exit 0, got {:?}: {all}", out.status);
    assert_eq!(all.lines().count(), 1, "the kind e2e should say why it skips in one line: {all:?}");
    assert!(stderr.is_empty(), "the skip line goes to stdout: {all:?}");
    all.trim().to_string()
}

#[test]
fn kind_e2e_skips_in_one_line_without_docker_or_kind() {
    let empty = temp_dir("scripts-empty-path");
    let line = one_line(&kind_script(empty.path()));
    for word in ["docker", "kind", "skipped"] {
        assert!(line.contains(word), "the skip line should name {word:?}: {line}");
    }

    // docker, kind and kubectl are there but no daemon answers.
    let fake = temp_dir("scripts-fake-docker");
    for tool in ["docker", "kind", "kubectl"] {
        let path = fake.path().join(tool);
        std::fs::write(&path, "#!/bin/sh\necho \"$0: cannot connect to the daemon\" >&2\nexit 1\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let line = one_line(&kind_script(fake.path()));
    assert!(line.contains("docker daemon") && line.contains("skipped"), "{line}");
}

#[test]
fn kind_e2e_cidr_check_matches_blocks() {
    let cases = [
        ("10.244.1.5", "10.244.1.0/24", true),
        ("10.244.1.255", "10.244.1.0/24", true),
        ("10.244.2.5", "10.244.1.0/24", false),
        ("10.244.7.9", "10.244.0.0/16", true),
        ("10.245.0.1", "10.244.0.0/16", false),
        ("10.244.1.0", "10.244.1.0/32", true),
        ("10.244.1.1", "10.244.1.0/32", false),
        ("192.0.2.7", "0.0.0.0/0", true),
        ("255.255.255.255", "255.255.255.0/24", true),
        ("256.1.1.1", "10.0.0.0/8", false),
        ("fd00::1", "10.0.0.0/8", false),
        ("10.1.1.1", "10.0.0.0/33", false),
        ("", "10.0.0.0/8", false),
    ];
    let mut script = format!("source {}\n", repo_root().join("e2e/kind/run.sh").display());
    for (ip, cidr, _) in cases {
        script.push_str(&format!("if ipv4_in_cidr '{ip}' '{cidr}'; then echo in; else echo out; fi\n"));
    }
    let out = run(Command::new("bash").args(["-c", &script]));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    let got: Vec<&str> = stdout.lines().collect();
    assert_eq!(got.len(), cases.len(), "{stdout}{stderr}");
    for ((ip, cidr, inside), g) in cases.iter().zip(got) {
        assert_eq!(g == "in", *inside, "ipv4_in_cidr {ip:?} {cidr:?} said {g}");
    }
}

/// The tarball `make dist` writes, built once per test run.
struct Dist {
    tarball: PathBuf,
    sha256: PathBuf,
}

fn dist() -> &'static Dist {
    static DIST: OnceLock<Result<Dist, String>> = OnceLock::new();
    let made = DIST.get_or_init(|| {
        let out = run(without_test_env(
            Command::new("make").args(["-s", "--no-print-directory", "dist"]).current_dir(repo_root()),
        ));
        let (stdout, stderr) = text(&out);
        if !out.status.success() {
            return Err(format!("make dist failed: {stdout}{stderr}"));
        }
        let last = stdout.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().trim();
        let tarball = repo_root().join(last);
        Ok(Dist { sha256: PathBuf::from(format!("{}.sha256", tarball.display())), tarball })
    });
    made.as_ref().unwrap_or_else(|e| panic!("{e}"))
}

fn dist_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("make dist does not build for {other}"),
    }
}

fn tarball_name() -> String {
    format!("carve-cni-plugins-linux-{}-v{}.tgz", dist_arch(), env!("CARGO_PKG_VERSION"))
}

fn version_of(bin: &Path) -> String {
    let out = run(Command::new(bin).arg("--version"));
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{} --version failed: {stdout}{stderr}", bin.display());
    stdout
}

#[test]
fn make_dist_writes_the_plugin_tarball_and_checksum() {
    let d = dist();
    assert_eq!(d.tarball, repo_root().join("target/dist").join(tarball_name()), "make dist printed another path");
    assert!(d.tarball.is_file() && d.sha256.is_file(), "{} or its .sha256 is missing", d.tarball.display());

    // sha256sum format, checkable where it lies.
    let sums = std::fs::read_to_string(&d.sha256).unwrap();
    assert_eq!(sums.lines().count(), 1, "{sums}");
    assert!(sums.ends_with(&format!("  {}\n", tarball_name())), "not sha256sum output: {sums:?}");
    let out = run(Command::new("sha256sum").arg("-c").arg(&d.sha256).current_dir(d.tarball.parent().unwrap()));
    assert!(out.status.success(), "sha256sum -c: {:?}", text(&out));

    let out = run(Command::new("tar").arg("-tzf").arg(&d.tarball));
    let (listing, _) = text(&out);
    assert!(out.status.success(), "tar -tzf {}: {:?}", d.tarball.display(), text(&out));
    let mut entries: Vec<&str> = listing.lines().collect();
    entries.sort();
    assert_eq!(entries, ["carve-cni", "carve-ipam"], "the tarball holds exactly the two plugins at its root");

    let x = temp_dir("extract");
    let out = run(Command::new("tar").arg("-xzf").arg(&d.tarball).arg("-C").arg(x.path()));
    assert!(out.status.success(), "{:?}", text(&out));
    for name in ["carve-cni", "carve-ipam"] {
        let bin = x.path().join(name);
        assert_eq!(std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755, "{name}");
        let v = version_of(&bin);
        assert!(v.starts_with(&format!("{name} {} (CNI spec 1.1.0", env!("CARGO_PKG_VERSION"))), "{v}");
    }
}

/// A release laid out as on the download server: `<dir>/v<version>/<tarball>{,.sha256}`.
fn release_dir(tag: &str) -> tempfile::TempDir {
    let d = dist();
    let rel = temp_dir(tag);
    let version_dir = rel.path().join(format!("v{}", env!("CARGO_PKG_VERSION")));
    std::fs::create_dir_all(&version_dir).unwrap();
    std::fs::copy(&d.tarball, version_dir.join(tarball_name())).unwrap();
    std::fs::copy(&d.sha256, version_dir.join(format!("{}.sha256", tarball_name()))).unwrap();
    rel
}

fn install(release: &Path, bin_dir: &Path, args: &[&str]) -> Output {
    run(Command::new(repo_root().join("scripts/install-cni-plugin.sh"))
        .args(args)
        .env("CARVE_RELEASE_URL", format!("file://{}", release.display()))
        .env("CNI_BIN_DIR", bin_dir))
}

#[test]
fn install_script_installs_from_a_release_and_refuses_bad_input() {
    let rel = release_dir("release");
    let dest = temp_dir("dest");
    let bin_dir = dest.path().join("opt/cni/bin");

    let out = install(rel.path(), &bin_dir, &[]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "install failed: {stdout}{stderr}");
    let mut installed = Vec::new();
    for name in ["carve-cni", "carve-ipam"] {
        let bin = bin_dir.join(name);
        assert_eq!(std::fs::metadata(&bin).unwrap().permissions().mode() & 0o777, 0o755, "{name}");
        let v = version_of(&bin);
        assert!(v.starts_with(&format!("{name} {}", env!("CARGO_PKG_VERSION"))), "{v}");
        assert!(stdout.contains(v.trim()), "the script prints the installed versions: {stdout}");
        installed.push(std::fs::read(&bin).unwrap());
    }
    let leftovers: Vec<_> = std::fs::read_dir(&bin_dir).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(leftovers.len(), 2, "only the two plugins in {}: {leftovers:?}", bin_dir.display());

    // Again, with the version spelled without its `v`: nothing changes.
    let out = install(rel.path(), &bin_dir, &[env!("CARGO_PKG_VERSION")]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "second install failed: {stdout}{stderr}");
    assert!(stdout.contains("already"), "{stdout}");
    for (name, before) in ["carve-cni", "carve-ipam"].iter().zip(&installed) {
        assert_eq!(&std::fs::read(bin_dir.join(name)).unwrap(), before, "{name} changed on the second run");
    }

    // A checksum that does not match the tarball: refused, nothing installed.
    let tampered = release_dir("tampered");
    let sums = tampered.path().join(format!("v{}/{}.sha256", env!("CARGO_PKG_VERSION"), tarball_name()));
    let text_sums = std::fs::read_to_string(&sums).unwrap();
    let flipped = if text_sums.starts_with('0') { "1" } else { "0" };
    std::fs::write(&sums, format!("{flipped}{}", &text_sums[1..])).unwrap();
    let fresh = dest.path().join("fresh");
    let out = install(tampered.path(), &fresh, &[]);
    let (stdout, stderr) = text(&out);
    assert!(!out.status.success(), "a tampered checksum was accepted: {stdout}{stderr}");
    assert!(stderr.contains("checksum mismatch"), "{stderr}");
    assert!(!fresh.join("carve-cni").exists(), "installed despite the checksum mismatch");

    // Bad version strings and a release that does not exist.
    for bad in ["latest", "1.2", "v0.1.0; rm -rf /"] {
        let out = install(rel.path(), &fresh, &[bad]);
        let (stdout, stderr) = text(&out);
        assert!(!out.status.success(), "version {bad:?} was accepted: {stdout}{stderr}");
        assert!(stderr.contains("is not a release version") && stderr.lines().count() == 1, "{bad}: {stderr}");
    }
    let out = install(rel.path(), &fresh, &["v9.9.9"]);
    let (_, stderr) = text(&out);
    assert!(!out.status.success() && stderr.contains("download failed"), "{stderr}");
    assert!(!fresh.join("carve-cni").exists());

    let out = run(Command::new(repo_root().join("scripts/install-cni-plugin.sh")).arg("--help"));
    let (stdout, _) = text(&out);
    assert!(out.status.success() && stdout.contains("CARVE_RELEASE_URL") && stdout.contains("CNI_BIN_DIR"), "{stdout}");
}

/// e2e/scripts/prereqs.sh with `env` set; its exit code and stderr.
fn prereqs(env: &[(&str, &str)], as_nobody: bool) -> (Option<i32>, String) {
    let script = repo_root().join("e2e/scripts/prereqs.sh");
    let mut cmd = if as_nobody {
        // On stdin: the clone may sit where nobody cannot read.
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "bash", "-s"]);
        c.stdin(std::fs::File::open(&script).unwrap());
        c
    } else {
        Command::new(&script)
    };
    cmd.envs(env.iter().copied());
    let out = run(&mut cmd);
    (out.status.code(), text(&out).1)
}

/// One line on stderr, exit 1, naming the cause and the fix.
fn refused(got: (Option<i32>, String), cause: &str, fix: &str) {
    let (code, stderr) = got;
    assert_eq!(code, Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(last.starts_with("prereqs: ") && last.contains(cause) && last.contains(fix), "{stderr}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn the_prerequisite_check_passes_here_and_names_cause_and_fix_for_what_it_cannot_mend() {
    let (code, stderr) = prereqs(&[], false);
    assert_eq!(code, Some(0), "this machine passes the check make test ran first: {stderr}");
    // A package no source has: found before any build, not installed, named.
    refused(
        prereqs(&[("CARVE_PREREQS_EXTRA", "carve-no-such-package")], false),
        "carve-no-such-package not in this machine's package sources",
        "add a source",
    );
    // A host without the v1 cgroup hierarchies the nodes need.
    let empty = temp_dir("no-cgroups");
    refused(
        prereqs(&[("CARVE_PREREQS_CGROUP_ROOT", empty.path().to_str().unwrap())], false),
        "no cgroup v1 hierarchy for cpu memory pids devices freezer",
        "systemd.unified_cgroup_hierarchy=0",
    );
    // Not root.
    refused(prereqs(&[], true), "not root", "run as root");
}

#[tokio::test]
async fn make_dist_ships_kubectl_carve_which_kubectl_finds_on_path() {
    let d = dist();
    let name = format!("kubectl-carve-linux-{}-v{}.tgz", dist_arch(), env!("CARGO_PKG_VERSION"));
    let plugin = d.tarball.with_file_name(&name);
    let out = run(Command::new("tar").arg("-tzf").arg(&plugin));
    assert!(out.status.success(), "{name} from make dist: {:?}", text(&out));
    assert_eq!(text(&out).0.lines().collect::<Vec<_>>(), ["kubectl-carve"]);
    let dir = temp_dir("kubectl-plugin");
    let out = run(Command::new("tar").arg("-xzf").arg(&plugin).arg("-C").arg(dir.path()));
    assert!(out.status.success(), "{:?}", text(&out));

    // A user's shell: the plugin's folder on PATH, KUBECONFIG set, kubectl finds it.
    let cp = carve_e2e::ControlPlane::start().await.expect("control plane");
    cp.install_crds().unwrap();
    let kubectl = carve_e2e::control_plane_bins().unwrap().join("kubectl");
    let path = format!("{}:{}", dir.path().display(), std::env::var("PATH").unwrap_or_default());
    let kubectl =
        |args: &[&str]| run(Command::new(&kubectl).args(args).env("PATH", &path).env("KUBECONFIG", cp.kubeconfig()));
    let out = kubectl(&["plugin", "list"]);
    let (listed, _) = text(&out);
    assert!(listed.contains(&dir.path().join("kubectl-carve").display().to_string()), "{listed}");
    let out = kubectl(&["carve", "status"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "kubectl carve status: {stdout}{stderr}");
    assert!(stdout.contains("No PodCIDR pools.") && stdout.contains("No Nodes."), "{stdout}");
    let out = kubectl(&["carve", "connectivity", "--help"]);
    assert!(text(&out).0.contains("--egress"), "{:?}", text(&out));
}
