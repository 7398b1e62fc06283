#!/usr/bin/env bash
# Builds the local cluster's binaries from Go modules at pinned versions, into a
# cache outside the repo: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, and for real nodes kubelet and kube-proxy; cnitool
# (current, and v1.1.2: the libcni containerd 1.6/1.7 embed) and the reference
# CNI plugins; containerd 2 (daemon, runc shim and ctr) for nodes that run it
# instead of Debian's 1.6; helm and Prometheus. A second run finds the binaries and returns at once.
#
# With --conformance it also builds what the upstream sig-network suites need
# (see build_conformance): a network-only e2e test binary, ginkgo, agnhost and
# CoreDNS.
#
# Prints the bin dir on stdout; progress goes to stderr.
set -euo pipefail

K8S_VERSION="${CARVE_K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${CARVE_ETCD_VERSION:-v3.6.16}"
CNI_VERSION="${CARVE_CNITOOL_VERSION:-v1.3.0}"
OLD_LIBCNI_VERSION=v1.1.2
# Reference plugins new enough to speak CNI 1.1.0 (Debian bookworm's stop at 1.0.0).
PLUGINS_VERSION="${CARVE_CNI_PLUGINS_VERSION:-v1.9.1}"
CACHE="${CARVE_CACHE:-$HOME/.cache/carve}"
BIN="$CACHE/controlplane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-cni-$CNI_VERSION/bin"
PLUGINS="$CACHE/cni-plugins-$PLUGINS_VERSION"
# containerd 2.x for real nodes that run it (libcni >= 1.2: CNI 1.1.0, STATUS).
CONTAINERD2_VERSION="${CARVE_CONTAINERD2_VERSION:-v2.1.4}"
CONTAINERD2="$CACHE/containerd-$CONTAINERD2_VERSION"

# helm for the chart's tests and `make manifests`.
HELM_VERSION="${CARVE_HELM_VERSION:-v4.3.2}"
# The ServiceMonitor and PrometheusRule CRDs the chart's monitoring renders to.
PROMETHEUS_OPERATOR_VERSION="${CARVE_PROMETHEUS_OPERATOR_VERSION:-v0.94.0}"
# Prometheus 3.16 for the monitoring test (Debian's 2.42 is built without
# Kubernetes service discovery).
PROMETHEUS_VERSION="${CARVE_PROMETHEUS_VERSION:-v0.316.0}"
# Flannel (flanneld's VXLAN backend and its CNI plugin) for the data path
# benchmark's peer: --flannel.
FLANNEL_VERSION="${CARVE_FLANNEL_VERSION:-v0.28.10}"
# The last reference-plugins release that still carried the flannel CNI plugin
# (flannel-io/cni-plugin is not served by the module proxy).
FLANNEL_CNI_VERSION="${CARVE_FLANNEL_CNI_VERSION:-v0.9.1}"
FLANNEL="$CACHE/flannel-$FLANNEL_VERSION"
# Azure Network Policy Manager, the policy engine AKS runs beside Azure CNI
# (--network-policy azure): --policy. v1.7.0 is the release the proxy serves.
AZURE_NPM_VERSION="${CARVE_AZURE_NPM_VERSION:-v1.7.0}"
AZURE_NPM="$CACHE/azure-npm-$AZURE_NPM_VERSION"
# Cilium's agent, CNI plugin, CLI and generic operator, its BPF sources and
# Helm chart, for DATAPLANE=cilium: --cilium. v1.18.3: v1.18.4+ replace
# k8s.io/apimachinery with a fork the proxy refuses.
CILIUM_VERSION="${CARVE_CILIUM_VERSION:-v1.18.3}"
CILIUM="$CACHE/cilium-$CILIUM_VERSION"
# CoreDNS as kubeadm v1.35 deploys it.
COREDNS_VERSION="${CARVE_COREDNS_VERSION:-v1.13.1}"
CONFORMANCE=0 WITH_FLANNEL=0 WITH_POLICY=0 WITH_CILIUM=0
for arg in "$@"; do
  case $arg in
    --conformance) CONFORMANCE=1 ;;
    --flannel) WITH_FLANNEL=1 ;;
    --policy) WITH_POLICY=1 ;;
    --cilium) WITH_CILIUM=1 ;;
    *) echo "control-plane-bins: unknown option $arg (--conformance, --flannel, --policy, --cilium)" >&2; exit 2 ;;
  esac
done

export CGO_ENABLED=0 GOFLAGS=-buildvcs=false GOTOOLCHAIN=local

log() { echo "control-plane-bins: $*" >&2; }

need() { [[ -x "$BIN/$1" ]] || return 0; return 1; }

mkdir -p "$BIN"
# Parallel test processes may all ask on a cold cache: build once.
exec 9>"$CACHE/controlplane/.lock"
flock 9
work="$CACHE/controlplane/src"
mkdir -p "$work"

# A wrapper module named $2 at $1 that requires k8s.io/kubernetes at the
# pinned tag.
kubernetes_module() {
  local dir="$1" name="$2"
  mkdir -p "$dir"
  local gomod
  gomod="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  local staging_version="v0.${K8S_VERSION#v1.}"
  {
    echo "module $name"
    echo
    echo "go $(sed -n 's/^go //p' "$gomod")"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    # k8s.io/kubernetes points every staging module at ./staging; use the
    # published copies of the same release instead.
    sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#replace \1 => \1 '"$staging_version"'#p' "$gomod"
  } > "$dir/go.mod"
  cat > "$dir/tools.go" <<'GO'
//go:build tools

package tools
GO
}

kubernetes_ldflags() {
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean"
  done
  echo "$ldflags"
}

build_kubernetes() {
  local dir="$work/kubernetes-$K8S_VERSION"
  kubernetes_module "$dir" carve.dev/controlplane
  local ldflags
  ldflags="$(kubernetes_ldflags)"
  for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
    if need "$cmd"; then
      log "building $cmd $K8S_VERSION (cold builds take minutes)"
      (cd "$dir" && go build -mod=mod -trimpath -ldflags "$ldflags" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd")
      mv "$BIN/$cmd.tmp" "$BIN/$cmd"
    fi
  done
}

build_etcd() {
  need etcd || return 0
  local dir="$work/etcd-$ETCD_VERSION"
  mkdir -p "$dir"
  cat > "$dir/go.mod" <<GOMOD
module carve.dev/etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat > "$dir/main.go" <<'GO'
// etcd's server entry point, built from the published server module.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  log "building etcd $ETCD_VERSION"
  (cd "$dir" && go mod tidy >&2 && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" .)
  mv "$BIN/etcd.tmp" "$BIN/etcd"
}

build_cnitool() {
  if need cnitool; then
    log "building cnitool $CNI_VERSION"
    GOBIN="$BIN" go install "github.com/containernetworking/cni/cnitool@$CNI_VERSION"
  fi
  # containerd 1.6 and 1.7 vendor libcni v1.1.2, which knows results only up
  # to CNI 1.0.0: the regression tests run conflists through this one too.
  if need "cnitool-$OLD_LIBCNI_VERSION"; then
    log "building cnitool $OLD_LIBCNI_VERSION (containerd 1.6/1.7's libcni)"
    local tmp="$work/cnitool-$OLD_LIBCNI_VERSION"
    mkdir -p "$tmp"
    GOBIN="$tmp" go install "github.com/containernetworking/cni/cnitool@$OLD_LIBCNI_VERSION"
    mv "$tmp/cnitool" "$BIN/cnitool-$OLD_LIBCNI_VERSION"
  fi
}

build_cni_plugins() {
  local p
  for p in meta/portmap main/bridge ipam/host-local main/loopback; do
    [[ -x "$PLUGINS/${p##*/}" ]] && continue
    log "building CNI plugin ${p##*/} $PLUGINS_VERSION"
    mkdir -p "$PLUGINS"
    GOBIN="$PLUGINS" go install "github.com/containernetworking/plugins/plugins/$p@$PLUGINS_VERSION"
  done
  ln -sfn "$PLUGINS" "$BIN/cni-plugins"
}

build_helm() {
  need helm || return 0
  log "building helm $HELM_VERSION"
  local tmp="$work/helm-$HELM_VERSION"
  mkdir -p "$tmp"
  GOBIN="$tmp" go install -trimpath -ldflags "-s -w -X helm.sh/helm/v4/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v4/cmd/helm@$HELM_VERSION"
  mv "$tmp/helm" "$BIN/helm"
}

# Only Kubernetes service discovery is compiled in (Prometheus's own build
# tags); the API and rule engine are whole, the web UI's assets are not.
build_prometheus() {
  need prometheus || return 0
  log "building prometheus $PROMETHEUS_VERSION"
  # Module v0.3XY.Z is Prometheus 3.XY.Z.
  local tmp="$work/prometheus-$PROMETHEUS_VERSION" v="${PROMETHEUS_VERSION#v0.3}"
  mkdir -p "$tmp"
  GOBIN="$tmp" go install -trimpath -tags "remove_all_sd enable_kubernetes_sd" \
    -ldflags "-s -w -X github.com/prometheus/common/version.Version=3.$v" \
    "github.com/prometheus/prometheus/cmd/prometheus@$PROMETHEUS_VERSION"
  mv "$tmp/prometheus" "$BIN/prometheus"
}

# flanneld from its module source as the main module, with only the vxlan,
# host-gw and alloc backends linked: the others pull cloud SDK modules the
# proxy does not serve (tencentcloud). Nothing of it is kept in the repo.
build_flannel() {
  if [[ ! -x $FLANNEL/flanneld ]]; then
    local src="$work/flannel-$FLANNEL_VERSION" dir
    dir="$(go mod download -json "github.com/flannel-io/flannel@$FLANNEL_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
    rm -rf "$src"
    cp -r "$dir" "$src"
    chmod -R u+w "$src"
    rm -rf "$src/vendor"
    sed -i -E '/pkg\/backend\/(tencentvpc|ipsec|wireguard|extension|udp|ipip)"/d' "$src/main.go"
    log "building flanneld $FLANNEL_VERSION (vxlan, host-gw)"
    mkdir -p "$FLANNEL"
    (cd "$src" && go build -mod=mod -trimpath \
      -ldflags "-s -w -X github.com/flannel-io/flannel/pkg/version.Version=$FLANNEL_VERSION" -o "$FLANNEL/flanneld.tmp" .)
    mv "$FLANNEL/flanneld.tmp" "$FLANNEL/flanneld"
  fi
  if [[ ! -x $FLANNEL/flannel ]]; then
    log "building the flannel CNI plugin $FLANNEL_CNI_VERSION"
    GOBIN="$FLANNEL" go install -trimpath -ldflags "-s -w" \
      "github.com/containernetworking/plugins/plugins/meta/flannel@$FLANNEL_CNI_VERSION"
  fi
  ln -sfn "$FLANNEL" "$BIN/flannel"
}

# azure-npm from the azure-container-networking module's source as the main
# module (its go.mod replaces ginkgo and gomega, so `go install` refuses it).
# One constant changes: Microsoft's builds carry an Application Insights key
# (-X aiMetadata); without one NPM retries the telemetry init 3 times a
# minute apart before it starts. Here the retries do not wait (no telemetry
# is sent either way).
build_azure_npm() {
  if [[ ! -x $AZURE_NPM/azure-npm ]]; then
    local src="$work/acn-$AZURE_NPM_VERSION" dir
    dir="$(go mod download -json "github.com/Azure/azure-container-networking@$AZURE_NPM_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
    rm -rf "$src"
    cp -r "$dir" "$src"
    chmod -R u+w "$src"
    sed -i -E 's/(AiInitializeRetryInMin +int = )1/\10/' "$src/npm/util/const.go"
    grep -qE 'AiInitializeRetryInMin +int = 0' "$src/npm/util/const.go"
    log "building azure-npm $AZURE_NPM_VERSION"
    mkdir -p "$AZURE_NPM"
    (cd "$src" && go build -mod=mod -trimpath -ldflags "-s -w -X main.version=$AZURE_NPM_VERSION" \
      -o "$AZURE_NPM/azure-npm.tmp" ./npm/cmd)
    mv "$AZURE_NPM/azure-npm.tmp" "$AZURE_NPM/azure-npm"
    rm -rf "$src"
  fi
  ln -sfn "$AZURE_NPM" "$BIN/azure-npm"
}

# Cilium from its module source as the main module (its go.mod replaces
# gobgp and controller-tools with Cilium's forks, so `go install` refuses it):
# the four binaries the chart's pods run, and beside them the bpf/ tree the
# agent compiles at run time, the chart and the image's two scripts.
build_cilium() {
  if [[ ! -x $CILIUM/bin/cilium-operator-generic ]]; then
    local src="$work/cilium-$CILIUM_VERSION" dir v="${CILIUM_VERSION#v}"
    dir="$(go mod download -json "github.com/cilium/cilium@$CILIUM_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
    rm -rf "$src" "$CILIUM"
    cp -r "$dir" "$src"
    chmod -R u+w "$src"
    mkdir -p "$CILIUM/bin" "$CILIUM/scripts"
    # cilium-dbg status shows the version's three words (version, tag, date).
    local ldflags="-s -w -X 'github.com/cilium/cilium/pkg/version.ciliumVersion=$v $CILIUM_VERSION 2025-10-27T00:00:00+00:00'"
    local b name pkg tags
    for b in "cilium-agent ./daemon osusergo" "cilium-cni ./plugins/cilium-cni osusergo" \
      "cilium-dbg ./cilium-dbg osusergo" "cilium-operator-generic ./operator osusergo,ipam_provider_operator"; do
      read -r name pkg tags <<<"$b"
      log "building $name $CILIUM_VERSION (the agent takes minutes cold)"
      (cd "$src" && go build -mod=mod -trimpath -tags "$tags" -ldflags "$ldflags" -o "$CILIUM/bin/$name.tmp" "$pkg")
      mv "$CILIUM/bin/$name.tmp" "$CILIUM/bin/$name"
    done
    cp -r "$src/bpf" "$CILIUM/bpf"
    cp -r "$src/install/kubernetes/cilium" "$CILIUM/chart"
    cp "$src/images/cilium/init-container.sh" "$src/plugins/cilium-cni/install-plugin.sh" \
      "$src/plugins/cilium-cni/cni-uninstall.sh" "$CILIUM/scripts/"
    rm -rf "$src"
  fi
  ln -sfn "$CILIUM" "$BIN/cilium"
}

# The Prometheus Operator's CRDs (no operator: the API server only has to
# accept the chart's ServiceMonitors and PrometheusRule).
fetch_monitoring_crds() {
  local out="$BIN/monitoring-crds-$PROMETHEUS_OPERATOR_VERSION"
  if [[ ! -f $out/monitoring.coreos.com_prometheusrules.yaml ]]; then
    fetch_monitoring_crds_into "$out"
  fi
  ln -sfn "$out" "$BIN/monitoring-crds"
}

fetch_monitoring_crds_into() {
  local out="$1" kind
  log "fetching the Prometheus Operator $PROMETHEUS_OPERATOR_VERSION CRDs"
  local dir
  dir="$(go mod download -json "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION" |
    sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
  mkdir -p "$out.tmp"
  for kind in servicemonitors podmonitors prometheusrules; do
    cp "$dir/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$out.tmp/"
  done
  rm -rf "$out"
  mv "$out.tmp" "$out"
}

# containerd refuses `go install` (its go.mod has exclude directives) and its
# module zip carries no vendor tree: build its module source as the main module.
# The runc shim and ctr come from the same source; nodes on containerd 2 point
# their runtime at this shim (runtime_path), not at Debian's 1.6 one on PATH.
build_containerd2() {
  local cmd missing=()
  for cmd in containerd containerd-shim-runc-v2 ctr; do
    [[ -x "$CONTAINERD2/$cmd" ]] || missing+=("$cmd")
  done
  if ((${#missing[@]})); then
    local src="$work/containerd-$CONTAINERD2_VERSION"
    if [[ ! -f "$src/go.mod" ]]; then
      local dir
      dir="$(go mod download -json "github.com/containerd/containerd/v2@$CONTAINERD2_VERSION" |
        sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
      rm -rf "$src.tmp"
      # The module cache is read-only; the build writes go.sum.
      cp -r "$dir" "$src.tmp"
      chmod -R u+w "$src.tmp"
      rm -rf "$src.tmp/vendor"
      mv "$src.tmp" "$src"
    fi
    local tags="no_btrfs urfave_cli_no_docs"
    local ldflags="-s -w -X github.com/containerd/containerd/v2/version.Version=${CONTAINERD2_VERSION#v}"
    mkdir -p "$CONTAINERD2"
    for cmd in "${missing[@]}"; do
      log "building $cmd $CONTAINERD2_VERSION (cold: minutes)"
      local t="$tags"
      [[ $cmd == containerd-shim-runc-v2 ]] && t+=" no_grpc"
      (cd "$src" && go build -mod=mod -trimpath -tags "$t" -ldflags "$ldflags" -o "$CONTAINERD2/$cmd.tmp" "./cmd/$cmd")
      mv "$CONTAINERD2/$cmd.tmp" "$CONTAINERD2/$cmd"
    done
  fi
  ln -sfn "$CONTAINERD2" "$BIN/containerd2"
}

# For `make conformance` and the conformance tier of `make test`:
# - e2e-network.test: the upstream e2e framework with test/e2e/network only
#   (e2e/conformance/e2e-network), built like e2e.test with `go test -c`;
# - ginkgo, the runner that drives it in parallel, at the version
#   k8s.io/kubernetes requires;
# - agnhost from test/images/agnhost, the image most network tests run;
# - CoreDNS with a minimal plugin list (e2e/conformance/coredns).
build_conformance() {
  local repo
  repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  local dir="$work/conformance-$K8S_VERSION"
  kubernetes_module "$dir" carve.dev/conformance
  rm -rf "$dir/e2e-network"
  cp -r "$repo/e2e/conformance/e2e-network" "$dir/e2e-network"
  local ldflags
  ldflags="$(kubernetes_ldflags)"
  if need e2e-network.test; then
    log "building e2e-network.test $K8S_VERSION (cold: minutes)"
    (cd "$dir" && go test -c -mod=mod -trimpath -ldflags "$ldflags" -o "$BIN/e2e-network.test.tmp" ./e2e-network)
    mv "$BIN/e2e-network.test.tmp" "$BIN/e2e-network.test"
  fi
  if need agnhost; then
    log "building agnhost $K8S_VERSION"
    (cd "$dir" && go build -mod=mod -trimpath -ldflags "-s -w" -o "$BIN/agnhost.tmp" k8s.io/kubernetes/test/images/agnhost)
    mv "$BIN/agnhost.tmp" "$BIN/agnhost"
  fi
  # The TLS pair agnhost's porter serves from its working directory (the
  # image's /), as upstream's Dockerfile adds it.
  if [[ ! -f $BIN/agnhost-porter/localhost.key ]]; then
    local kdir
    kdir="$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')"
    mkdir -p "$BIN/agnhost-porter"
    cp "$kdir/test/images/agnhost/porter/localhost.crt" "$kdir/test/images/agnhost/porter/localhost.key" "$BIN/agnhost-porter/"
  fi
  if need ginkgo; then
    log "building ginkgo"
    (cd "$dir" && go build -mod=mod -trimpath -ldflags "-s -w" -o "$BIN/ginkgo.tmp" github.com/onsi/ginkgo/v2/ginkgo)
    mv "$BIN/ginkgo.tmp" "$BIN/ginkgo"
  fi
  if need coredns; then
    local cdir="$work/coredns-$COREDNS_VERSION"
    mkdir -p "$cdir"
    cp "$repo/e2e/conformance/coredns/main.go" "$cdir/main.go"
    printf 'module carve.dev/coredns\n\ngo 1.24\n\nrequire github.com/coredns/coredns %s\n' "$COREDNS_VERSION" > "$cdir/go.mod"
    log "building coredns $COREDNS_VERSION"
    (cd "$cdir" && go mod tidy >&2 && go build -trimpath -ldflags "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION" -o "$BIN/coredns.tmp" .)
    mv "$BIN/coredns.tmp" "$BIN/coredns"
  fi
}

build_etcd
build_kubernetes
build_cnitool
build_cni_plugins
build_containerd2
build_helm
build_prometheus
fetch_monitoring_crds
((CONFORMANCE)) && build_conformance
((WITH_FLANNEL)) && build_flannel
((WITH_POLICY)) && build_azure_npm
((WITH_CILIUM)) && build_cilium
echo "$BIN"
