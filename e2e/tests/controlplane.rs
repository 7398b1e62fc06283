//! The harness itself: it starts a real control plane and never leaves a
//! process or a directory behind, however the test ends.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use carve_e2e::ControlPlane;

/// Processes whose command line mentions `dir` (etcd's data dir, the API server's cert dir).
fn processes_using(dir: &Path) -> Vec<String> {
    let out = Command::new("pgrep").arg("-af").arg(dir.as_os_str()).output().expect("run pgrep");
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

fn wait_until_no_process_uses(dir: &Path) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = processes_using(dir);
        if left.is_empty() {
            return;
        }
        assert!(Instant::now() < deadline, "processes left behind: {left:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn run_dir_from(line: &str) -> Option<PathBuf> {
    // libtest prints "test NAME ... " on the same line first.
    line.split_once("RUN_DIR=").map(|(_, d)| PathBuf::from(d.trim()))
}

#[tokio::test]
async fn control_plane_serves_the_pinned_version_and_cleans_up() {
    let cp = ControlPlane::start().await.expect("control plane starts");
    eprintln!("control plane ready after {:?}", cp.ready_after());
    let version: serde_json::Value = serde_json::from_str(&cp.kubectl_ok(&["version", "-o", "json"]).unwrap()).unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.35.4", "{version}");
    assert_eq!(version["clientVersion"]["gitVersion"], "v1.35.4", "{version}");

    // RBAC is on: an unknown user is forbidden from listing nodes.
    let out = cp.kubectl().args(["get", "nodes", "--as=nobody"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("forbidden"), "{}", String::from_utf8_lossy(&out.stderr));

    let dir = cp.dir().to_path_buf();
    assert!(!processes_using(&dir).is_empty(), "etcd and kube-apiserver should be running");
    drop(cp);
    wait_until_no_process_uses(&dir);
    assert!(!dir.exists(), "{} should be removed", dir.display());
}

/// Run by the tests below in a child test process; does nothing when run alone.
#[tokio::test]
#[ignore = "helper for the cleanup tests; needs CARVE_E2E_HELPER"]
async fn helper_start_then_fail() {
    let Ok(how) = std::env::var("CARVE_E2E_HELPER") else { return };
    let cp = ControlPlane::start().await.unwrap();
    println!("RUN_DIR={}", cp.dir().display());
    match how.as_str() {
        "panic" => panic!("deliberate panic with a control plane running"),
        _ => loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
        },
    }
}

fn helper(how: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "helper_start_then_fail", "--ignored", "--nocapture", "--test-threads=1"])
        .env("CARVE_E2E_HELPER", how)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    cmd
}

#[test]
fn a_panicking_test_leaves_no_process_and_no_directory() {
    let out = helper("panic").output().unwrap();
    assert!(!out.status.success(), "the helper test should fail");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().find_map(run_dir_from).unwrap_or_else(|| panic!("no RUN_DIR in {stdout}"));
    wait_until_no_process_uses(&dir);
    assert!(!dir.exists(), "{} should be removed after a panic", dir.display());
}

#[test]
fn a_killed_test_process_leaves_no_process_and_its_directory_is_swept() {
    let mut child = helper("hang").spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let dir = lines.find_map(|l| run_dir_from(&l.ok()?)).expect("helper prints RUN_DIR");
    assert!(!processes_using(&dir).is_empty());
    child.kill().unwrap(); // SIGKILL: no destructor runs
    child.wait().unwrap();
    wait_until_no_process_uses(&dir);
    // The directory outlives a SIGKILL; the next harness start sweeps it.
    assert!(dir.exists());
    carve_e2e::scratch::sweep_stale_dirs();
    assert!(!dir.exists(), "{} should be swept", dir.display());
}

#[test]
fn cluster_cli_stops_everything_on_ctrl_c() {
    let tmp = std::env::temp_dir().join(format!("carve-cluster-cli-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let kubeconfig = tmp.join("kubeconfig");
    let mut child = Command::new(env!("CARGO_BIN_EXE_carve-cluster"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("run")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let dir = lines
        .find_map(|l| l.ok()?.strip_prefix("data in ").map(PathBuf::from))
        .expect("carve-cluster prints its data dir");
    assert!(kubeconfig.exists(), "kubeconfig written once ready");
    let out = Command::new(carve_e2e::control_plane_bins().unwrap().join("kubectl"))
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["get", "--raw", "/readyz"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGINT).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "carve-cluster run exits cleanly on SIGINT: {status}");
    wait_until_no_process_uses(&dir);
    assert!(!dir.exists());
    assert!(!kubeconfig.exists(), "a stale kubeconfig is removed");
    let _ = std::fs::remove_dir_all(&tmp);
}
