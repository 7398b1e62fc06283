# Every target a person runs. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
KUBECONFIG_OUT := target/e2e/kubeconfig
CLUSTER := target/debug/carve-cluster
BINS = $(shell e2e/scripts/control-plane-bins.sh)
KUBECTL = $(BINS)/kubectl --kubeconfig $(KUBECONFIG_OUT)

.PHONY: help build release crds bins cluster-up cluster-down demo test lint unit bench clean

help:
	@echo "make demo          start the local control plane, install carve, show the result"
	@echo "make test          every test (lint, unit, real API server)"
	@echo "make bench         benchmarks; prints figures"
	@echo "make cluster-up    local etcd + kube-apiserver in the background ($(KUBECONFIG_OUT))"
	@echo "make cluster-down  stop it"
	@echo "make crds          regenerate crds/*.yaml from the Rust types"
	@echo "make release       release binaries in target/release/"

build:
	$(CARGO) build --workspace

release:
	$(CARGO) build --workspace --release

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
	@$(CLUSTER) --kubeconfig $(KUBECONFIG_OUT) down

demo: cluster-up
	$(KUBECTL) apply -f crds/
	$(KUBECTL) wait --for=condition=Established --timeout=60s crd/podcidrs.carve.dev crd/nodenetworkconfigs.carve.dev
	$(KUBECTL) apply -f examples/overlay.yaml
	@echo
	$(KUBECTL) get podcidrs
	@echo
	$(KUBECTL) get nodenetworkconfigs
	@echo
	@echo "The control plane keeps running: export KUBECONFIG=$(abspath $(KUBECONFIG_OUT)); stop it with make cluster-down"

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

clean:
	$(CARGO) clean
