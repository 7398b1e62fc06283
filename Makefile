# Every target a person runs. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
KUBECONFIG_OUT := target/e2e/kubeconfig
CLUSTER := target/debug/carve-cluster
BINS = $(shell e2e/scripts/control-plane-bins.sh)
KUBECTL = $(BINS)/kubectl --kubeconfig $(KUBECONFIG_OUT)

.PHONY: help prereqs build release crds manifests bins cluster-up cluster-down demo test lint unit bench bench-cni bench-datapath clean dist image conformance

help:
	@echo "make demo          start the local control plane, install carve, show the result; DATAPLANE=cilium: carve under Cilium, no kube-proxy"
	@echo "make test          every test (lint, unit, real API server)"
	@echo "make bench         benchmarks; prints figures (nodes, CNI, pod start, Pod Subnet bursts)"
	@echo "make bench-cni     the CNI plugins' figures alone (ADD/DEL vs bridge + host-local, pod start)"
	@echo "make bench-datapath  pod traffic: throughput, latency, CPU per Gbit on every path, against node-to-node"
	@echo "make prereqs       check root, Go, Rust, kernel and cgroups; install the Debian packages the tests use (demo and test run it first)"
	@echo "make cluster-up    local control plane in the background ($(KUBECONFIG_OUT)); NODES=N adds N real nodes; RUNTIMES=containerd2,... picks their containerd; POLICY=npm adds a NetworkPolicy engine; DATAPLANE=cilium runs Cilium on carve's podCIDRs"
	@echo "make cluster-down  stop it"
	@echo "make crds          regenerate crds/*.yaml and charts/carve/crds/ from the Rust types"
	@echo "make manifests     regenerate manifests/ from charts/carve (default values)"
	@echo "make release       release binaries in target/release/"
	@echo "make dist          the kubectl plugin (target/dist/kubectl-carve-linux-<arch>-v<version>.tgz) and the CNI plugin tarball for VMs (target/dist/carve-cni-plugins-linux-<arch>-v<version>.tgz)"
	@echo "make image         carve, pause and busybox images as OCI archives (target/images/*.tar)"
	@echo "make conformance   Kubernetes' sig-network conformance tests on carve (3 real nodes); PROCS=N ginkgo processes; POLICY=npm adds the NetworkPolicy suite"

# Seconds, before any long build: one line naming the cause and the fix when
# the machine cannot run the tiers; installs the Debian packages they use.
prereqs:
	@e2e/scripts/prereqs.sh

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --workspace --release

# carve-cni and carve-ipam for hosts without the DaemonSet (VMs), as a release
# tarball + sha256sum file; scripts/install-cni-plugin.sh installs it.
DIST_DIR := target/dist
dist:
	$(CARGO) build --release -p carve-node-plugin --bin carve-cni --bin carve-ipam
	$(CARGO) build --release -p carve-controller --bin carvectl
	@set -euo pipefail; \
	version=$$(sed -n '/^\[workspace\.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml); \
	[[ -n $$version ]] || { echo "make dist: no [workspace.package] version in Cargo.toml" >&2; exit 1; }; \
	case $$(uname -m) in x86_64|amd64) arch=amd64 ;; aarch64|arm64) arch=arm64 ;; \
	  *) echo "make dist: unsupported architecture $$(uname -m) (amd64 and arm64 are built)" >&2; exit 1 ;; esac; \
	mkdir -p $(DIST_DIR); \
	plugin=kubectl-carve-linux-$$arch-v$$version.tgz; \
	tar -C target/release --owner=0 --group=0 --numeric-owner --mode=0755 --transform 's/^carvectl$$/kubectl-carve/' \
	  -czf $(DIST_DIR)/$$plugin.tmp carvectl; \
	mv -f $(DIST_DIR)/$$plugin.tmp $(DIST_DIR)/$$plugin; \
	echo $(DIST_DIR)/$$plugin; \
	name=carve-cni-plugins-linux-$$arch-v$$version.tgz; \
	tar -C target/release --owner=0 --group=0 --numeric-owner --mode=0755 -czf $(DIST_DIR)/$$name.tmp carve-cni carve-ipam; \
	mv -f $(DIST_DIR)/$$name.tmp $(DIST_DIR)/$$name; \
	(cd $(DIST_DIR) && sha256sum $$name > $$name.sha256.tmp && mv -f $$name.sha256.tmp $$name.sha256); \
	echo $(DIST_DIR)/$$name

# The local nodes' images as one-layer OCI archives, no container engine:
# carve's (the release binaries, portmap, nft; the Dockerfile's layout), a
# static pause and busybox. Each imports with `ctr -n k8s.io images import`.
image:
	$(CARGO) build --release -p carve-controller -p carve-node-plugin
	$(CARGO) run -q --release -p carve-e2e --bin carve-image -- --out-dir target/images

crds:
	$(CARGO) run -q -p carve-crds --bin crdgen
	$(CARGO) run -q -p carve-crds --bin crdgen -- charts/carve/crds

# manifests/ is the chart rendered with its defaults: edit charts/carve.
manifests: bins
	@e2e/scripts/render-manifests.sh $(BINS)/helm manifests

# Builds etcd, kube-apiserver, kube-controller-manager, kubectl and cnitool from
# Go modules once; later runs find them in ~/.cache/carve.
bins: prereqs
	@e2e/scripts/control-plane-bins.sh

$(CLUSTER): FORCE
	@$(CARGO) build -q -p carve-e2e --bin carve-cluster
FORCE:

# NODES=0: etcd + kube-apiserver on loopback (the fast tiers). NODES=N: also
# kube-controller-manager, kube-scheduler and N kubelet + kube-proxy +
# containerd nodes on an isolated underlay (10.224.0.4, .5, ...), every node
# importing the images `make image` builds. Needs root.
NODES ?= 0
# Each node's containerd, in node order: containerd1.6 (default) or containerd2.
RUNTIMES ?=
# POLICY=npm: a NetworkPolicy engine (Azure NPM) on the nodes (README, NetworkPolicy).
POLICY ?=
# DATAPLANE=cilium: Cilium on carve's podCIDRs, no kube-proxy (README, Cilium).
DATAPLANE ?=
cluster-up: $(CLUSTER) $(if $(filter-out 0,$(NODES)),image)
	@$(CLUSTER) --kubeconfig $(KUBECONFIG_OUT) --nodes $(NODES) $(if $(RUNTIMES),--runtimes $(RUNTIMES)) $(if $(POLICY),--policy $(POLICY)) $(if $(DATAPLANE),--dataplane $(DATAPLANE)) up

cluster-down: $(CLUSTER)
	@if [ -f target/e2e/controller.pid ]; then kill $$(cat target/e2e/controller.pid) 2>/dev/null || true; rm -f target/e2e/controller.pid; fi
	@$(CLUSTER) --kubeconfig $(KUBECONFIG_OUT) down

# The main job on the embedded cluster: three real nodes, carve deployed from
# its image with `kubectl apply -f crds/ -f manifests/`, the overlay pool, six
# pods spread over the nodes and a ping between two of them. The cluster keeps
# running afterwards.
demo: prereqs
	@$(MAKE) --no-print-directory cluster-up NODES=3
	@e2e/scripts/demo.sh $(BINS)/kubectl $(KUBECONFIG_OUT) $(DATAPLANE)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace --lib --bins

# The last line sums every test binary's result, so the run ends on one total.
# The upstream e2e binaries too: the conformance tests' share runs here.
test: prereqs lint bins
	@e2e/scripts/control-plane-bins.sh --conformance --policy --cilium >/dev/null
	@mkdir -p target
	set -o pipefail; $(CARGO) test --workspace 2>&1 | tee target/test.log
	@awk '/^test result:/ { p += $$4; f += $$6; i += $$8 } END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, i }' target/test.log

bench: bins
	$(CARGO) run -q --release -p carve-e2e --bin carve-bench-controlplane
	$(CARGO) build -q --release -p carve-controller
	$(CARGO) run -q --release -p carve-e2e --bin carve-bench-nodes
	@$(MAKE) --no-print-directory bench-cni
	$(CARGO) build -q --release -p carve-controller -p carve-node-plugin && $(CARGO) run -q --release -p carve-e2e --bin carve-bench-podsubnet
	$(CARGO) build -q --release -p carve-node-plugin && $(CARGO) run -q --release -p carve-e2e --bin carve-bench-leaks
	@$(MAKE) --no-print-directory bench-datapath

# The CNI plugins alone: ADD/DEL against bridge + host-local, syscall counts
# (with strace), 200 concurrent IPAM calls, sizes, then pod create -> Running
# on real nodes with each plugin.
bench-cni: bins
	$(CARGO) build -q --release -p carve-node-plugin && $(CARGO) run -q --release -p carve-e2e --bin carve-bench-cni
	$(CARGO) run -q --release -p carve-e2e --bin carve-bench-pods

# Pod traffic on real nodes (iperf3, sockperf from Debian): every path against
# node-to-node in the same run, Overlay and VNet pools, 50 peers for scaling,
# and Flannel's VXLAN on the same paths.
bench-datapath: bins
	@e2e/scripts/control-plane-bins.sh --flannel >/dev/null
	$(CARGO) build -q --release -p carve-controller -p carve-node-plugin
	$(CARGO) run -q --release -p carve-e2e --bin carve-bench-datapath

# Kubernetes' sig-network conformance suites (e2e-network.test under ginkgo)
# on a fresh 3-node cluster running carve's overlay pool, kube-proxy and
# CoreDNS; prints a table and `conformance: <n> passed, <n> failed, <n> skipped`.
PROCS ?= 3
conformance: prereqs image
	@e2e/scripts/control-plane-bins.sh --conformance $(if $(POLICY),--policy) >/dev/null
	$(CARGO) run -q --release -p carve-e2e --bin carve-conformance -- --procs $(PROCS) $(if $(POLICY),--policy $(POLICY))

clean:
	$(CARGO) clean
