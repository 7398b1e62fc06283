#!/usr/bin/env bash
# What `make demo`, `make test` and `.ci/run` need on the machine, checked in
# seconds before any long build: root, Go and Rust, a kernel and cgroup setup
# the real-node harness runs on, and the Debian packages below (installed when
# missing). A check that fails prints one line naming the cause and the fix.
#
# The package list lives here only: .ci/run and the Makefile both call this.
#
# For its own test, CARVE_PREREQS_EXTRA adds packages to the list and
# CARVE_PREREQS_CGROUP_ROOT replaces /sys/fs/cgroup.
set -uo pipefail

# Network namespaces and links (iproute2), ping, SNAT rules (nftables), the
# reference CNI plugins (bridge, portmap, host-local), pgrep (procps), curl,
# the scripts' linter (shellcheck); for the real nodes containerd + runc, and
# for their images busybox-static, a static libc and gcc (the pause binary),
# binutils (strip); nsenter/unshare (util-linux) and mount; for the upstream
# e2e images (agnhost, jessie-dnsutils) bash, dig, OpenBSD nc and ss; promtool
# (Debian's prometheus package) for the chart's alert rules; iperf3 and sockperf
# for the data path benchmark; iptables, ipset and grep for Azure NPM's image;
# clang-19 for Cilium's agent (it compiles its BPF programs at run time).
PACKAGES=(iproute2 iputils-ping nftables containernetworking-plugins procps curl shellcheck
  containerd runc busybox-static gcc libc6-dev binutils util-linux mount
  bash bind9-dnsutils netcat-openbsd prometheus iperf3 sockperf iptables ipset grep clang-19)
read -r -a extra <<<"${CARVE_PREREQS_EXTRA:-}"
PACKAGES+=("${extra[@]}")
# The Go toolchain the control plane's modules need (k8s.io/kubernetes v1.35's go.mod).
GO_MIN=1.24
# The workspace's rust-version.
RUST_MIN=1.89
CGROUP_ROOT=${CARVE_PREREQS_CGROUP_ROOT:-/sys/fs/cgroup}

fail() {
  echo "prereqs: $*" >&2
  exit 1
}

# "1.24.3" >= "1.24"?
at_least() { [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1) == "$2" ]]; }

[[ $(id -u) == 0 ]] ||
  fail "not root: the tests and the demo create network namespaces, cgroups and real nodes; run as root (sudo -E make ...)"

# Go and Rust come with the machine; nothing here installs a toolchain.
command -v go >/dev/null || fail "go is missing: install Go >= $GO_MIN (it builds the control plane from Go modules)"
go_version=$(go env GOVERSION 2>/dev/null) || fail "'go env GOVERSION' failed: check the Go installation"
go_version=${go_version#go}
at_least "$go_version" "$GO_MIN" || fail "Go $go_version is older than $GO_MIN: install a newer Go (GOTOOLCHAIN=local is used, nothing is downloaded)"
command -v cargo >/dev/null || fail "cargo is missing: install Rust >= $RUST_MIN with rustup"
rust_version=$(rustc --version 2>/dev/null | awk '{print $2}')
at_least "${rust_version:-0}" "$RUST_MIN" || fail "Rust ${rust_version:-?} is older than $RUST_MIN: run 'rustup update'"
# make test's lint step.
for component in rustfmt clippy; do
  sub=${component/rustfmt/fmt}
  cargo "$sub" --version >/dev/null 2>&1 || rustup component add "$component" >/dev/null 2>&1 ||
    fail "cargo $sub is missing and 'rustup component add $component' failed: install it with rustup"
done

# The kernel and cgroups the real nodes run on (see DESIGN.md, "Test tiers").
[[ $(uname -s) == Linux ]] || fail "$(uname -s) is not Linux: carve's nodes are Linux network namespaces"
[[ -e /proc/self/ns/net && -e /proc/self/ns/mnt ]] ||
  fail "this kernel has no network or mount namespaces (CONFIG_NET_NS, CONFIG_NAMESPACES): use a kernel built with them"
hierarchies=()
for c in cpu memory pids devices freezer; do
  [[ -e $CGROUP_ROOT/$c/cgroup.procs ]] || hierarchies+=("$c")
done
if ((${#hierarchies[@]})); then
  fail "no cgroup v1 hierarchy for ${hierarchies[*]} under $CGROUP_ROOT: the real-node harness gives each node a cgroup root in the v1 hierarchies (kubelet with cgroupDriver cgroupfs); boot with systemd.unified_cgroup_hierarchy=0 or mount them (mount -t cgroup -o <controller> cgroup $CGROUP_ROOT/<controller>)"
fi

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  command -v apt-get >/dev/null ||
    fail "packages missing (${missing[*]}) and there is no apt-get: carve's harness installs Debian's packages; install their equivalents by hand"
  echo "prereqs: installing Debian packages: ${missing[*]}" >&2
  apt-get update -qq >/dev/null 2>&1 || fail "'apt-get update' failed: check the machine's Debian sources (/etc/apt/sources.list*)"
  unknown=()
  for p in "${missing[@]}"; do
    apt-cache show "$p" >/dev/null 2>&1 || unknown+=("$p")
  done
  ((${#unknown[@]} == 0)) ||
    fail "Debian package(s) ${unknown[*]} not in this machine's package sources: add a source that has them (carve is tested on Debian 12, bookworm)"
  log=$(DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" 2>&1) ||
    fail "'apt-get install ${missing[*]}' failed: $(tail -n1 <<<"$log")"
fi

# The overlay's device type, checked in a throwaway namespace.
unshare -n ip link add carve-probe type vxlan id 1 dstport 4789 2>/dev/null ||
  fail "this kernel cannot create VXLAN devices (CONFIG_VXLAN): carve's Overlay pools need them"
exit 0
