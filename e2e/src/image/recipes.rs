//! The images carve's nodes and the upstream e2e suites run: carve's own,
//! pause, busybox, and agnhost, jessie-dnsutils and CoreDNS for conformance;
//! Azure NPM for the policy engine tests; Cilium's agent and operator.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

use super::*;

/// What goes into [`carve_image`].
#[derive(Clone, Debug)]
pub struct Inputs {
    /// Where carve's binaries ([`CARVE_BINARIES`]) are: `target/release` for
    /// the real image, any profile's folder for tests.
    pub bin_dir: PathBuf,
    /// The reference portmap plugin (v1.9.1, speaks CNI 1.1.0).
    pub portmap: PathBuf,
    /// carve's tag; [`default_tag`] matches the manifests.
    pub tag: String,
    pub compression: Compression,
}

impl Inputs {
    /// The release binaries in `target/release`, the portmap that
    /// `e2e/scripts/control-plane-bins.sh` builds (waiting for it on a cold
    /// cache), and `tag`.
    pub fn release(tag: &str) -> Result<Self> {
        Ok(Inputs {
            bin_dir: crate::repo_root().join("target/release"),
            portmap: crate::control_plane_bins()?.join("cni-plugins/portmap"),
            tag: tag.into(),
            compression: Compression::None,
        })
    }
}

/// /etc/passwd and /etc/group with `users` as (name, id, home, shell), each
/// its own group.
fn add_users(layer: &mut Layer, users: &[(&str, u32, &str, &str)]) -> Result<()> {
    let passwd: String =
        users.iter().map(|(name, id, home, shell)| format!("{name}:x:{id}:{id}:{name}:{home}:{shell}\n")).collect();
    let group: String = users.iter().map(|(name, id, _, _)| format!("{name}:x:{id}:\n")).collect();
    layer.bytes("/etc/passwd", passwd, 0o644)?;
    layer.bytes("/etc/group", group, 0o644)?;
    layer.bytes("/etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n", 0o644)?;
    Ok(())
}

/// The directories every image has: the runtime's mount points and /tmp.
fn base_layer() -> Result<Layer> {
    let mut layer = Layer::new();
    for d in ["/dev", "/proc", "/sys", "/etc"] {
        layer.dir(d, 0o755)?;
    }
    layer.dir("/tmp", 0o1777)?;
    Ok(layer)
}

/// carve's image, the same layout as the Dockerfile's: [`CARVE_BINARIES`] in
/// /usr/local/bin, portmap at [`PORTMAP_PATH`], nft at [`NFT_PATH`] (with the
/// shared libraries of all of them), users root and nonroot (65532). No
/// entrypoint and user root, as the Dockerfile: the manifests give each
/// container its command and user.
pub fn carve_image(inputs: &Inputs) -> Result<ImageSpec> {
    let missing: Vec<&str> = CARVE_BINARIES.iter().copied().filter(|b| !inputs.bin_dir.join(b).is_file()).collect();
    if !missing.is_empty() {
        bail!(
            "{} missing in {}: build the release binaries first with `make release` \
             (cargo build --release --workspace)",
            missing.join(", "),
            inputs.bin_dir.display()
        );
    }
    ensure!(
        inputs.portmap.is_file(),
        "no portmap plugin at {}: e2e/scripts/control-plane-bins.sh builds it (`make bins`)",
        inputs.portmap.display()
    );
    ensure!(Path::new(NFT_PATH).is_file(), "{NFT_PATH} is missing: install Debian's nftables");
    let mut layer = base_layer()?;
    for bin in CARVE_BINARIES {
        layer.executable(&inputs.bin_dir.join(bin), &format!("{CARVE_BIN_DIR}/{bin}"))?;
    }
    layer.executable(&inputs.portmap, PORTMAP_PATH)?;
    layer.executable(Path::new(NFT_PATH), NFT_PATH)?;
    add_users(
        &mut layer,
        &[("root", 0, "/root", "/usr/sbin/nologin"), ("nonroot", NONROOT_ID, "/nonexistent", "/usr/sbin/nologin")],
    )?;
    let mut spec = ImageSpec::new(&carve_image_name(&inputs.tag), layer);
    spec.compression = inputs.compression;
    spec.labels = BTreeMap::from(
        [
            ("org.opencontainers.image.title", "carve"),
            ("org.opencontainers.image.description", "Kubernetes IPAM and overlay networking operator"),
            ("org.opencontainers.image.source", "https://github.com/carve-dev/carve"),
            ("org.opencontainers.image.version", inputs.tag.as_str()),
            ("org.opencontainers.image.licenses", "Apache-2.0"),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string())),
    );
    Ok(spec)
}

/// [`PAUSE_IMAGE`]: `e2e/images/pause.c` built with `gcc -static -O2`, as
/// /pause.
pub fn pause_image() -> Result<ImageSpec> {
    let source = crate::repo_root().join("e2e/images/pause.c");
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("pause");
    let result = Command::new("gcc")
        .args(["-static", "-O2", "-s", "-Wall", "-Wextra", "-o"])
        .arg(&out)
        .arg(&source)
        .output()
        .context("running gcc (install gcc and libc6-dev)")?;
    ensure!(
        result.status.success(),
        "gcc -static {} failed: {}",
        source.display(),
        String::from_utf8_lossy(&result.stderr).trim()
    );
    let mut layer = base_layer()?;
    layer.bytes("/pause", std::fs::read(&out)?, 0o755)?;
    let mut spec = ImageSpec::new(PAUSE_IMAGE, layer);
    spec.entrypoint = Some(vec!["/pause".into()]);
    Ok(spec)
}

/// [`BUSYBOX_IMAGE`]: Debian's static busybox as /bin/busybox with a symlink
/// in /bin for every applet it has; entrypoint /bin/sh.
pub fn busybox_image() -> Result<ImageSpec> {
    let mut layer = base_layer()?;
    add_busybox(&mut layer, &BTreeSet::new())?;
    add_users(&mut layer, &[("root", 0, "/root", "/bin/sh"), ("nobody", 65534, "/nonexistent", "/bin/false")])?;
    let mut spec = ImageSpec::new(BUSYBOX_IMAGE, layer);
    spec.entrypoint = Some(vec!["/bin/sh".into()]);
    Ok(spec)
}

/// Debian's static busybox at /bin/busybox and a /bin symlink for each of its
/// applets but those in `except` (tools the image has for real). Fails when
/// an applet of [`BUSYBOX_APPLETS`] is missing.
fn add_busybox(layer: &mut Layer, except: &BTreeSet<&str>) -> Result<()> {
    let out = Command::new(HOST_BUSYBOX)
        .arg("--list")
        .output()
        .with_context(|| format!("running {HOST_BUSYBOX} --list (install busybox-static)"))?;
    ensure!(out.status.success(), "{HOST_BUSYBOX} --list failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    let applets: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
        .map(String::from)
        .collect();
    let missing: Vec<&str> = BUSYBOX_APPLETS.iter().copied().filter(|a| !applets.contains(*a)).collect();
    ensure!(missing.is_empty(), "{HOST_BUSYBOX} lacks the applets {}", missing.join(", "));
    layer.executable(Path::new(HOST_BUSYBOX), "/bin/busybox")?;
    for applet in applets.iter().filter(|a| !except.contains(a.as_str())) {
        layer.symlink(&format!("/bin/{applet}"), "busybox")?;
    }
    Ok(())
}

/// The three images of the local nodes.
#[derive(Clone, Debug)]
pub struct Images {
    /// `ghcr.io/carve-dev/carve:<tag>` in `carve.tar`.
    pub carve: BuiltImage,
    /// [`PAUSE_IMAGE`] in `pause.tar`: containerd's `sandbox_image`.
    pub pause: BuiltImage,
    /// [`BUSYBOX_IMAGE`] in `busybox.tar`.
    pub busybox: BuiltImage,
}

impl Images {
    pub fn all(&self) -> [&BuiltImage; 3] {
        [&self.carve, &self.pause, &self.busybox]
    }
}

/// Builds carve's image from `inputs`, the pause and the busybox image, as
/// `out_dir/{carve,pause,busybox}.tar`; each imports with
/// `ctr -n k8s.io images import <archive>` under its name.
///
/// `build_all(dir, &Inputs::release(&default_tag())?)` is what
/// `make image` writes to target/images.
pub fn build_all(out_dir: &Path, inputs: &Inputs) -> Result<Images> {
    let carve = write_archive(&carve_image(inputs)?, &out_dir.join("carve.tar"))?;
    let pause = write_archive(&pause_image()?, &out_dir.join("pause.tar"))?;
    let busybox = write_archive(&busybox_image()?, &out_dir.join("busybox.tar"))?;
    Ok(Images { carve, pause, busybox })
}

/// agnhost as the pinned e2e framework names it (test/utils/image/manifest.go
/// of k8s.io/kubernetes v1.35.4).
pub const AGNHOST_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost:2.59";
/// The DNS suites' querier image (a shell and dig).
pub const JESSIE_DNSUTILS_IMAGE: &str = "registry.k8s.io/e2e-test-images/jessie-dnsutils:1.7";
/// The e2e framework's pause and busybox: carve's own pause and busybox under those names.
pub const E2E_PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.10.1";
pub const E2E_BUSYBOX_IMAGE: &str = "registry.k8s.io/e2e-test-images/busybox:1.37.0-1";
/// The endpoints suites run this only as "a pod serving HTTP on :80": here
/// busybox httpd does that (there is no nginx build from Go or Debian files
/// that is worth its weight for it).
pub const E2E_NGINX_IMAGE: &str = "registry.k8s.io/e2e-test-images/nginx:1.14-4";
/// Azure NPM under the name Microsoft publishes it by (its manifest's
/// `image:`); here built from the module proxy ([`azure_npm_image`]).
pub const AZURE_NPM_IMAGE: &str = "mcr.microsoft.com/containernetworking/azure-npm:v1.7.0";
/// Cilium's images under the names its chart (v1.18.3, `useDigest: false`)
/// asks for; here built from the module proxy ([`cilium_image`]).
pub const CILIUM_IMAGE: &str = "quay.io/cilium/cilium:v1.18.3";
pub const CILIUM_OPERATOR_IMAGE: &str = "quay.io/cilium/operator-generic:v1.18.3";
/// CoreDNS as kubeadm v1.35 deploys it.
pub const COREDNS_IMAGE: &str = "registry.k8s.io/coredns/coredns:v1.13.1";

/// Host tools the agnhost image carries (upstream's is Alpine with
/// bind-tools, curl, netcat-openbsd, iproute2 and bash): (host path, image
/// path). busybox fills in the rest of a userland.
const AGNHOST_TOOLS: [(&str, &str); 5] = [
    ("/usr/bin/curl", "/usr/bin/curl"),
    ("/usr/bin/nc.openbsd", "/usr/bin/nc"),
    ("/usr/bin/dig", "/usr/bin/dig"),
    ("/usr/bin/ip", "/sbin/ip"),
    ("/usr/bin/ss", "/usr/bin/ss"),
];

/// A layer of `tools` (host path, image path) over busybox, whose applets of
/// the same names step aside, plus bash as /bin/sh (Debian's busybox ash
/// prefers its own applets to PATH, so `sh -c 'nc -u …'` would never reach
/// the real nc) and libc's getent (the DNS probes resolve with it). Fails
/// naming the Debian package when a tool is missing.
fn tools_layer(tools: &[(&str, &str)]) -> Result<Layer> {
    let always = [("/usr/bin/bash", "/bin/bash"), ("/usr/bin/getent", "/usr/bin/getent")];
    let all: Vec<(&str, &str)> = always.iter().chain(tools).copied().collect();
    let mut names: BTreeSet<&str> = all.iter().filter_map(|(_, to)| to.rsplit('/').next()).collect();
    names.insert("sh");
    let mut layer = base_layer()?;
    add_busybox(&mut layer, &names)?;
    layer.symlink("/bin/sh", "bash")?;
    for (from, to) in all {
        ensure!(
            Path::new(from).is_file(),
            "{from} is missing: install Debian's bash, libc-bin, curl, netcat-openbsd, bind9-dnsutils and iproute2"
        );
        layer.executable(Path::new(from), to)?;
    }
    Ok(layer)
}

/// [`AGNHOST_IMAGE`]: `bins/agnhost` at /agnhost (and /agnhost-2, which the
/// entrypoint tests use), `bins/coredns` at /coredns, porter's TLS pair
/// (`bins/agnhost-porter/localhost.{crt,key}`) at /, the tools the network
/// tests exec ([`AGNHOST_TOOLS`]), /uploads for netexec, and upstream's
/// user 1000 in group 50000. Entrypoint /agnhost, command `pause`.
pub fn agnhost_image(bins: &Path) -> Result<ImageSpec> {
    let mut layer = tools_layer(&AGNHOST_TOOLS)?;
    layer.executable(&bins.join("agnhost"), "/agnhost")?;
    layer.symlink("/agnhost-2", "agnhost")?;
    layer.executable(&bins.join("coredns"), "/coredns")?;
    for file in ["localhost.crt", "localhost.key"] {
        layer.file(bins.join("agnhost-porter").join(file), &format!("/{file}"), 0o644)?;
    }
    layer.dir("/uploads", 0o755)?;
    layer.bytes(
        "/etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nuser-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n",
        0o644,
    )?;
    layer.bytes(
        "/etc/group",
        "root:x:0:\nuser-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n",
        0o644,
    )?;
    let mut spec = ImageSpec::new(AGNHOST_IMAGE, layer);
    spec.entrypoint = Some(vec!["/agnhost".into()]);
    spec.cmd = Some(vec!["pause".into()]);
    Ok(spec)
}

/// [`JESSIE_DNSUTILS_IMAGE`]: busybox with bash and dig, which its probes run.
pub fn jessie_dnsutils_image() -> Result<ImageSpec> {
    let mut layer = tools_layer(&[("/usr/bin/dig", "/usr/bin/dig")])?;
    add_users(&mut layer, &[("root", 0, "/root", "/bin/sh")])?;
    Ok(ImageSpec::new(JESSIE_DNSUTILS_IMAGE, layer))
}

/// [`COREDNS_IMAGE`]: `bins/coredns` (a minimal plugin list, built by
/// `control-plane-bins.sh --conformance`) as /coredns, run as nonroot.
pub fn coredns_image(bins: &Path) -> Result<ImageSpec> {
    let mut layer = base_layer()?;
    layer.executable(&bins.join("coredns"), "/coredns")?;
    add_users(
        &mut layer,
        &[("root", 0, "/root", "/usr/sbin/nologin"), ("nonroot", NONROOT_ID, "/nonexistent", "/usr/sbin/nologin")],
    )?;
    let mut spec = ImageSpec::new(COREDNS_IMAGE, layer);
    spec.entrypoint = Some(vec!["/coredns".into()]);
    spec.user = Some(NONROOT_ID.to_string());
    Ok(spec)
}

/// What the upstream sig-network suites run, under the names the pinned e2e
/// framework asks for: agnhost, jessie-dnsutils, CoreDNS, and carve's pause,
/// busybox and a busybox httpd as the framework's pause, busybox and nginx.
/// `bins` holds agnhost and coredns; archives go to `out_dir`.
pub fn build_conformance(out_dir: &Path, bins: &Path) -> Result<Vec<BuiltImage>> {
    let mut pause = pause_image()?;
    pause.name = E2E_PAUSE_IMAGE.into();
    let mut busybox = busybox_image()?;
    busybox.name = E2E_BUSYBOX_IMAGE.into();
    let mut nginx = busybox_image()?;
    nginx.name = E2E_NGINX_IMAGE.into();
    nginx.layer.dir("/usr/share/nginx/html", 0o755)?;
    nginx.layer.bytes("/usr/share/nginx/html/index.html", "<p>busybox httpd standing in for nginx</p>\n", 0o644)?;
    nginx.entrypoint = Some(vec![
        "/bin/httpd".into(),
        "-f".into(),
        "-p".into(),
        "80".into(),
        "-h".into(),
        "/usr/share/nginx/html".into(),
    ]);
    let specs = [
        ("agnhost", agnhost_image(bins)?),
        ("jessie-dnsutils", jessie_dnsutils_image()?),
        ("coredns", coredns_image(bins)?),
        ("e2e-pause", pause),
        ("e2e-busybox", busybox),
        ("e2e-nginx", nginx),
    ];
    specs.iter().map(|(file, spec)| write_archive(spec, &out_dir.join(format!("{file}.tar")))).collect()
}

/// iptables (nft and legacy, under the names engines call: `iptables-nft*`,
/// `iptables-legacy*`, and plain `iptables*` for legacy as Azure NPM
/// expects), every xtables match and target module (loaded at run time, so
/// `ldd` cannot see them) and ipset, in /usr/sbin.
fn add_iptables(layer: &mut Layer) -> Result<()> {
    const XTABLES_MODULES: &str = "/usr/lib/x86_64-linux-gnu/xtables";
    for tool in ["/usr/sbin/xtables-nft-multi", "/usr/sbin/xtables-legacy-multi", "/usr/sbin/ipset"] {
        ensure!(Path::new(tool).is_file(), "{tool} is missing: install Debian's iptables and ipset");
        layer.executable(Path::new(tool), tool)?;
    }
    for family in ["iptables", "ip6tables"] {
        for suffix in ["", "-save", "-restore"] {
            layer.symlink(&format!("/usr/sbin/{family}-nft{suffix}"), "xtables-nft-multi")?;
            layer.symlink(&format!("/usr/sbin/{family}-legacy{suffix}"), "xtables-legacy-multi")?;
            layer.symlink(&format!("/usr/sbin/{family}{suffix}"), "xtables-legacy-multi")?;
        }
    }
    let mut modules: Vec<PathBuf> = std::fs::read_dir(XTABLES_MODULES)
        .with_context(|| format!("reading {XTABLES_MODULES} (install Debian's iptables)"))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "so"))
        .collect();
    modules.sort();
    for module in modules {
        let name = module.file_name().expect("read_dir names files").to_string_lossy().into_owned();
        layer.executable(&module, &format!("{XTABLES_MODULES}/{name}"))?;
    }
    Ok(())
}

/// Every file under the host directory `from` at the same place under
/// `to`, modes kept.
fn add_tree(layer: &mut Layer, from: &Path, to: &str) -> Result<()> {
    layer.dir(to, 0o755)?;
    let mut entries: Vec<_> =
        std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))?.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = format!("{to}/{}", e.file_name().to_string_lossy());
        if e.file_type()?.is_dir() {
            add_tree(layer, &path, &name)?;
        } else {
            let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
            layer.file(&path, &name, mode)?;
        }
    }
    Ok(())
}

/// Azure NPM's image as its Dockerfile (npm/linux.Dockerfile) lays it out:
/// `bins/azure-npm/azure-npm` at /usr/bin/azure-npm, entrypoint
/// `azure-npm start`, with the userland it runs: [`add_iptables`], and the
/// grep and bash its pipelines use.
pub fn azure_npm_image(bins: &Path) -> Result<ImageSpec> {
    let mut layer = base_layer()?;
    layer.executable(&bins.join("azure-npm/azure-npm"), "/usr/bin/azure-npm")?;
    layer.executable(Path::new("/usr/bin/bash"), "/usr/bin/bash")?;
    layer.symlink("/bin", "usr/bin")?;
    layer.symlink("/usr/bin/sh", "bash")?;
    layer.executable(Path::new("/usr/bin/grep"), "/usr/bin/grep")?;
    add_iptables(&mut layer)?;
    for d in ["/var/log", "/run", "/etc/azure-npm"] {
        layer.dir(d, 0o755)?;
    }
    add_users(&mut layer, &[("root", 0, "/root", "/usr/sbin/nologin")])?;
    let mut spec = ImageSpec::new(AZURE_NPM_IMAGE, layer);
    spec.entrypoint = Some(vec!["/usr/bin/azure-npm".into(), "start".into()]);
    Ok(spec)
}

/// The clang Cilium's agent compiles its BPF programs with (Debian's
/// clang-19: the agent needs LLVM >= 18.1, bookworm's default is 14).
pub const CILIUM_CLANG: &str = "/usr/lib/llvm-19/bin/clang";

/// Cilium's agent image under the name its chart asks for: from `cilium`
/// (`control-plane-bins.sh --cilium`'s folder) cilium-agent and cilium-dbg
/// in /usr/bin, cilium-cni in /opt/cni/bin and the reference loopback in
/// /cni (what the chart's install-plugin.sh copies to the node), the
/// image's scripts at /, the bpf/ sources at /var/lib/cilium/bpf; clang
/// ([`CILIUM_CLANG`]), iproute2's ip and tc, [`add_iptables`], bash and
/// busybox for the scripts.
pub fn cilium_image(cilium: &Path, loopback: &Path) -> Result<ImageSpec> {
    ensure!(Path::new(CILIUM_CLANG).is_file(), "{CILIUM_CLANG} is missing: install Debian's clang-19 and llvm-19");
    let mut layer = base_layer()?;
    add_busybox(&mut layer, &BTreeSet::from(["ip", "tc", "bash"]))?;
    // install-plugin.sh and cni-uninstall.sh are bash scripts.
    layer.executable(Path::new("/usr/bin/bash"), "/bin/bash")?;
    for bin in ["cilium-agent", "cilium-dbg"] {
        layer.executable(&cilium.join("bin").join(bin), &format!("/usr/bin/{bin}"))?;
    }
    layer.executable(&cilium.join("bin/cilium-cni"), "/opt/cni/bin/cilium-cni")?;
    layer.executable(loopback, "/cni/loopback")?;
    for script in ["init-container.sh", "install-plugin.sh", "cni-uninstall.sh"] {
        layer.file(cilium.join("scripts").join(script), &format!("/{script}"), 0o755)?;
    }
    add_tree(&mut layer, &cilium.join("bpf"), "/var/lib/cilium/bpf")?;
    // At its host path: its libraries are found through RUNPATH $ORIGIN/../lib.
    layer.executable(Path::new(CILIUM_CLANG), CILIUM_CLANG)?;
    layer.symlink("/usr/bin/clang", CILIUM_CLANG)?;
    layer.executable(Path::new("/usr/bin/ip"), "/usr/sbin/ip")?;
    layer.executable(Path::new("/usr/sbin/tc"), "/usr/sbin/tc")?;
    add_iptables(&mut layer)?;
    for d in ["/var/run", "/run", "/var/lib/cilium/clustermesh"] {
        layer.dir(d, 0o755)?;
    }
    add_users(&mut layer, &[("root", 0, "/root", "/bin/sh")])?;
    Ok(ImageSpec::new(CILIUM_IMAGE, layer))
}

/// Cilium's generic operator (identities' garbage collection, CRDs).
pub fn cilium_operator_image(cilium: &Path) -> Result<ImageSpec> {
    let mut layer = base_layer()?;
    layer.executable(&cilium.join("bin/cilium-operator-generic"), "/usr/bin/cilium-operator-generic")?;
    add_users(&mut layer, &[("root", 0, "/root", "/usr/sbin/nologin")])?;
    Ok(ImageSpec::new(CILIUM_OPERATOR_IMAGE, layer))
}

/// Cilium's two images, as `out_dir/cilium{,-operator}.tar`; `bins` is the
/// control plane's bin dir after `control-plane-bins.sh --cilium`.
pub fn build_cilium(out_dir: &Path, bins: &Path) -> Result<Vec<BuiltImage>> {
    let cilium = bins.join("cilium");
    Ok(vec![
        write_archive(&cilium_image(&cilium, &bins.join("cni-plugins/loopback"))?, &out_dir.join("cilium.tar"))?,
        write_archive(&cilium_operator_image(&cilium)?, &out_dir.join("cilium-operator.tar"))?,
    ])
}

/// The policy engines' images, as `out_dir/<engine>.tar`; `bins` is the
/// control plane's bin dir after `control-plane-bins.sh --policy`.
pub fn build_policy(out_dir: &Path, bins: &Path) -> Result<Vec<BuiltImage>> {
    Ok(vec![write_archive(&azure_npm_image(bins)?, &out_dir.join("azure-npm.tar"))?])
}

/// The OCI archives (`*.tar`) in `dir`, sorted; what `make image` wrote.
pub fn archives_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut archives: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {} (build the images with `make image`)", dir.display()))?
        .flatten()
        .filter_map(|e| std::fs::canonicalize(e.path()).ok())
        .filter(|p| p.extension().is_some_and(|e| e == "tar"))
        .collect();
    archives.sort();
    if archives.is_empty() {
        bail!("no image archives (*.tar) in {}: run `make image` first", dir.display());
    }
    Ok(archives)
}
