# Every target a person runs. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
KUBECONFIG_OUT := target/e2e/kubeconfig
CLUSTER := target/debug/carve-cluster
BINS = $(shell e2e/scripts/control-plane-bins.sh)
KUBECTL = $(BINS)/kubectl --kubeconfig $(KUBECONFIG_OUT)

.PHONY: help build release crds bins cluster-up cluster-down demo test lint unit bench clean dist

help:
	@echo "make demo          start the local control plane, install carve, show the result"
	@echo "make test          every test (lint, unit, real API server)"
	@echo "make bench         benchmarks; prints figures"
	@echo "make cluster-up    local etcd + kube-apiserver in the background ($(KUBECONFIG_OUT))"
	@echo "make cluster-down  stop it"
	@echo "make crds          regenerate crds/*.yaml from the Rust types"
	@echo "make release       release binaries in target/release/"
	@echo "make dist          CNI plugin tarball for VMs (target/dist/carve-cni-plugins-linux-<arch>-v<version>.tgz)"

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --workspace --release

# carve-cni and carve-ipam for hosts without the DaemonSet (VMs), as a release
# tarball + sha256sum file; scripts/install-cni-plugin.sh installs it.
DIST_DIR := target/dist
dist:
	$(CARGO) build --release -p carve-node-plugin --bin carve-cni --bin carve-ipam
	@set -euo pipefail; \
	version=$$(sed -n '/^\[workspace\.package\]/,/^\[/ s/^version *= *"\(.*\)"/\1/p' Cargo.toml); \
	[[ -n $$version ]] || { echo "make dist: no [workspace.package] version in Cargo.toml" >&2; exit 1; }; \
	case $$(uname -m) in x86_64|amd64) arch=amd64 ;; aarch64|arm64) arch=arm64 ;; \
	  *) echo "make dist: unsupported architecture $$(uname -m) (amd64 and arm64 are built)" >&2; exit 1 ;; esac; \
	name=carve-cni-plugins-linux-$$arch-v$$version.tgz; \
	mkdir -p $(DIST_DIR); \
	tar -C target/release --owner=0 --group=0 --numeric-owner --mode=0755 -czf $(DIST_DIR)/$$name.tmp carve-cni carve-ipam; \
	mv -f $(DIST_DIR)/$$name.tmp $(DIST_DIR)/$$name; \
	(cd $(DIST_DIR) && sha256sum $$name > $$name.sha256.tmp && mv -f $$name.sha256.tmp $$name.sha256); \
	echo $(DIST_DIR)/$$name

crds:
	$(CARGO) run -q -p carve-crds --bin crdgen

# Builds etcd, kube-apiserver, kube-controller-manager, kubectl and cnitool from
# Go modules once; later runs find them in ~/.cache/carve.
bins:
	@e2e/scripts/control-plane-bins.sh

$(CLUSTER): FORCE
	@$(CARGO) build -q -p carve-e2e --bin carve-cluster
FORCE:

cluster-up: $(CLUSTER)
	@$(CLUSTER) --kubeconfig $(KUBECONFIG_OUT) up

cluster-down: $(CLUSTER)
	@if [ -f target/e2e/controller.pid ]; then kill $$(cat target/e2e/controller.pid) 2>/dev/null || true; rm -f target/e2e/controller.pid; fi
	@$(CLUSTER) --kubeconfig $(KUBECONFIG_OUT) down

# The main job on the embedded control plane: carve-controller carves the
# overlay pool into a /24 per Node, records it in each NodeNetworkConfig and
# sets the Nodes' podCIDRs.
DEMO_NODES := node-1 node-2 node-3
demo: cluster-up
	$(CARGO) build -q --release -p carve-controller
	$(KUBECTL) apply -f crds/
	$(KUBECTL) wait --for=condition=Established --timeout=60s crd/podcidrs.carve.dev crd/nodenetworkconfigs.carve.dev
	$(KUBECTL) apply -f examples/overlay.yaml
	$(KUBECTL) create namespace carve-system --dry-run=client -o yaml | $(KUBECTL) apply -f -
	@if [ -f target/e2e/controller.pid ]; then kill $$(cat target/e2e/controller.pid) 2>/dev/null || true; fi
	@nohup target/release/carve-controller --kubeconfig $(KUBECONFIG_OUT) --metrics-addr 127.0.0.1:9464 \
		> target/e2e/controller.log 2>&1 & echo $$! > target/e2e/controller.pid
	@n=1; for node in $(DEMO_NODES); do \
		printf 'apiVersion: v1\nkind: Node\nmetadata:\n  name: %s\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 192.168.56.%s\n' $$node $$((n+10)) \
		| $(KUBECTL) apply -f - ; n=$$((n+1)); done
	@for i in $$(seq 1 50); do \
		[ "$$($(KUBECTL) get nodes -o jsonpath='{range .items[*]}{.spec.podCIDR}{" "}{end}' | wc -w)" -ge 3 ] \
		&& [ "$$($(KUBECTL) get pcidr overlay -o jsonpath='{.status.allocated}')" = 3 ] && break; sleep 0.2; done
	@echo
	$(KUBECTL) get podcidrs
	@echo
	$(KUBECTL) get nodenetworkconfigs
	@echo
	$(KUBECTL) get nodes -o custom-columns=NODE:.metadata.name,POD-CIDR:.spec.podCIDR
	@echo
	@echo "The control plane and carve-controller keep running (metrics on http://127.0.0.1:9464/metrics)."
	@echo "  export KUBECONFIG=$(abspath $(KUBECONFIG_OUT))"
	@echo "  make cluster-down   stops both"

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace --lib --bins

# The last line sums every test binary's result, so the run ends on one total.
test: lint bins
	@mkdir -p target
	set -o pipefail; $(CARGO) test --workspace 2>&1 | tee target/test.log
	@awk '/^test result:/ { p += $$4; f += $$6; i += $$8 } END { printf "summary: %d passed, %d failed, %d skipped\n", p, f, i }' target/test.log

bench: bins
	$(CARGO) run -q --release -p carve-e2e --bin carve-bench-controlplane
	$(CARGO) build -q --release -p carve-controller
	$(CARGO) run -q --release -p carve-e2e --bin carve-bench-nodes
	$(CARGO) build -q --release -p carve-node-plugin && $(CARGO) run -q --release -p carve-e2e --bin carve-bench-cni

clean:
	$(CARGO) clean
