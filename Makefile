# Routine actions. `make demo` shows the operator working end to end;
# `make test` runs every test (what CI runs).
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
CLUSTER := tests/controlplane/cluster.sh
export KUBECONFIG_LOCAL := $(CURDIR)/target/cluster/kubeconfig

.PHONY: all build crds lint fmt test unit integration cluster-up cluster-down controlplane image node-up node-down demo bench deps fresh-check clean

all: build

## build: the release binary (controller, relay and CLI in one)
build:
	$(CARGO) build --release --locked

## crds: regenerate crds/ and the chart's crds/ from the Rust types
crds:
	$(CARGO) run --quiet --locked -- crd --out-dir crds
	$(CARGO) run --quiet --locked -- crd --out-dir charts/mailauth-operator/crds

fmt:
	$(CARGO) fmt

## lint: formatting and clippy with warnings as errors
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

## controlplane: build etcd, kube-apiserver, kubectl and helm (cached by version)
controlplane:
	tests/controlplane/build.sh

## cluster-up / cluster-down: the local control plane (target/cluster/kubeconfig)
cluster-up:
	$(CLUSTER) up

cluster-down:
	$(CLUSTER) down

## image: the operator image, built without Docker from the release binary
## (target/image/mailauth-operator.tar, a docker-archive; tests/image/build.sh)
image: build
	tests/image/build.sh

## node-up / node-down (as root): the control plane with a real node
## (containerd, kubelet, controller-manager, scheduler: tests/controlplane/node.sh),
## the image imported into it. node-down stops the node, cluster-down the rest.
node-up: build
	NODE=1 $(CLUSTER) up
	tests/controlplane/node.sh up
	tests/image/build.sh --import

node-down:
	tests/controlplane/node.sh down

## test: lint, unit and integration tests against the real control plane and peers
# Benchmarks are compiled by clippy --all-targets but never run here: they
# measure, they do not pass or fail (make bench).
# The node's binaries (kubelet, controller-manager, scheduler) are built
# here, cached by version, rather than inside tests/node.rs's first test.
test: lint cluster-up
	tests/controlplane/build.sh node >/dev/null
	$(CARGO) test --locked --lib --bins --tests --no-fail-fast

unit:
	$(CARGO) test --locked --lib

## demo (as root): see README; the chart and a relay on the real node, a message signed and verified
demo:
	tests/demo/demo.sh

## bench: benchmarks (numbers, not pass/fail): onboarding, DNS checks, relay,
## and 10,000 domains on one relay with rotations (scale.sh; BENCH_SKIP=scale)
bench:
	tests/bench/bench.sh
	tests/bench/relay.sh
	tests/bench/scale.sh

## deps: install (as root) and check the peers and build tools (.ci/install-deps)
deps:
	.ci/install-deps

## fresh-check: .ci/run, then make demo, on a clean clone of HEAD in a pristine
## Debian 12 root (as root; see README). FRESH_REUSE_CACHES=1 for a quicker one.
fresh-check:
	.ci/fresh-check

clean: cluster-down
	CLUSTER_DIR=$(CURDIR)/target/node-cluster $(CLUSTER) down
	$(CARGO) clean
