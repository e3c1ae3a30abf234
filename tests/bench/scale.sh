#!/usr/bin/env bash
# Scale benchmark (issue 9; numbers, not pass/fail): BENCH_SCALE_DOMAINS
# (default 10,000) MailDomains on one MailRelay, served by a running relay
# process, with the release binary, on 127.0.0.1:
#
#  1. time until all are in the relay's shard Secrets and the running relay
#     serves them (its mailauth_relay_config_domains reaches N);
#  2. API requests per domain, counted by the API server
#     (apiserver_request_total before/after, by verb and resource);
#  3. the controller's CPU and peak memory (/proc), next to key generation
#     alone (the keygen bench, same machine, same run);
#  4. the relay's memory, and reload times: a second relay process loading
#     all N domains from scratch, and each incremental reload during the
#     rotations (shard Secret change to the reload counter);
#  5. BENCH_SCALE_ROTATIONS (100) rotations one after another: the
#     annotation, the Pending key in status, its record published in knot,
#     Active, the shard rewritten, the relay reloaded, and the first
#     message the sink receives signed with the new selector.
#
# How a key activates promptly with the release binary: the operator makes a
# Pending key Active as soon as DNS verifies its record (no clock to move);
# it re-checks an unverified record after --dns-retry-min (30 s by
# default), so the controller runs with --dns-retry-min
# BENCH_SCALE_DNS_RETRY_MIN (1s). Everything else is the default.
#
# The domains of a run live in a tenant namespace, the MailRelay in a
# platform namespace that admits it by label; knot serves the run's zone
# and takes RFC 2136 updates from 127.0.0.1, through which the bench
# publishes every record a MailDomain's status asks for, as a tenant would.
#
# Settings: BENCH_SCALE_DOMAINS (10000), BENCH_SCALE_RUNS (space-separated
# runs: rsa, ed25519, mixed = half each; default "rsa ed25519"),
# BENCH_SCALE_ROTATIONS (100), BENCH_SCALE_STEADY_SECONDS (60),
# BENCH_SCALE_DNS_RETRY_MIN (1s), BENCH_SCALE_KEYGEN_COUNT (1000),
# BENCH_SCALE_TIMEOUT_SECONDS (7200), BENCH_CREATE_CONCURRENCY (32),
# BENCH_SKIP (comma list; `scale` skips this whole script), BENCH_KEEP=1
# keeps the work dir, CLUSTER_DIR (the control plane's state dir, as
# tests/controlplane/cluster.sh). Results: target/bench/scale-<run>.txt
# (key value lines) and the table in target/bench/scale-summary.txt.
set -euo pipefail

cd "$(dirname "$0")/../.."
repo="$PWD"
out="$repo/target/bench"
mkdir -p "$out"
SKIP=",${BENCH_SKIP:-},"
if [[ "$SKIP" == *,scale,* ]]; then
  echo "scale: skipped (BENCH_SKIP)" >&2
  exit 0
fi
N="${BENCH_SCALE_DOMAINS:-10000}"
RUNS="${BENCH_SCALE_RUNS:-rsa ed25519}"
ROTATIONS="${BENCH_SCALE_ROTATIONS:-100}"
STEADY="${BENCH_SCALE_STEADY_SECONDS:-60}"
DNS_RETRY_MIN="${BENCH_SCALE_DNS_RETRY_MIN:-1s}"
KEYGEN_COUNT="${BENCH_SCALE_KEYGEN_COUNT:-1000}"
TIMEOUT="${BENCH_SCALE_TIMEOUT_SECONDS:-7200}"
CREATE_CONCURRENCY="${BENCH_CREATE_CONCURRENCY:-32}"
cluster_dir="${CLUSTER_DIR:-$repo/target/cluster}"
export CLUSTER_DIR="$cluster_dir"
kubeconfig="$cluster_dir/kubeconfig"
kubectl="$cluster_dir/bin/kubectl"
work="$(mktemp -d /tmp/mailauth-scale.XXXXXX)"

BENCH_NAME=scale
# shellcheck source=tests/bench/common.sh
source "$repo/tests/bench/common.sh"

# --- processes we start, stopped on any exit ---------------------------------
knot_pid=""
controller_pid=""
bench_pid=""
namespaces=()
stop_relays() { # relays the bench binary started, if it could not stop them
  local f pid
  for f in "$work"/run-*/relay-*.pid; do
    [[ -f "$f" ]] || continue
    pid="$(cat "$f")"
    # Only if that pid is still one of our relays (pids are reused).
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "mailauth-operator relay"; then
      stop_pid "$pid"
    fi
    rm -f "$f"
  done
}
on_exit() {
  local rc=$?
  stop_pid "$bench_pid"
  stop_relays
  stop_pid "$controller_pid"
  stop_pid "$knot_pid"
  # Namespaces left by a failed run: deleted in the background (their
  # MailDomains keep finalizers without a controller, as the tests' do).
  for ns in "${namespaces[@]}"; do
    k delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
  done
  if [[ "${BENCH_KEEP:-}" == 1 || $rc -ne 0 ]]; then
    log "work dir kept: $work"
  else
    rm -rf "$work"
  fi
  exit $rc
}
trap on_exit EXIT
trap 'exit 130' INT TERM

# --- build --------------------------------------------------------------------
log "building (release)"
cargo build --release --locked
cargo build --release --locked --bench scale --bench keygen --message-format=json >"$work/build.json"
bench_bin() {
  python3 - "$work/build.json" "$1" <<'EOF'
import json, sys
path, name = sys.argv[1], sys.argv[2]
exe = None
for line in open(path):
    try:
        msg = json.loads(line)
    except ValueError:
        continue
    if msg.get("reason") == "compiler-artifact" and msg["target"]["name"] == name and msg.get("executable"):
        exe = msg["executable"]
if not exe:
    sys.exit(f"no executable for bench {name}")
print(exe)
EOF
}
scale_bin="$(bench_bin scale)"
keygen_bin="$(bench_bin keygen)"
operator_bin="$repo/target/release/mailauth-operator"
[[ -x "$operator_bin" ]] || die "$operator_bin was not built"
command -v knotd >/dev/null && command -v knsupdate >/dev/null ||
  die "knot and knot-dnsutils are needed (make deps)"

# --- knot: the run's zone, updates from 127.0.0.1 ---------------------------
start_knot() { # start_knot DIR ZONE
  local dir="$1" zone="$2"
  mkdir -p "$dir/zones" "$dir/db" "$dir/run"
  printf '$ORIGIN %s.\n$TTL 300\n@ SOA ns.%s. hostmaster.%s. 1 3600 600 86400 300\n@ NS ns.%s.\nns A 127.0.0.1\n' \
    "$zone" "$zone" "$zone" "$zone" >"$dir/zones/$zone.zone"
  knot_port="$(free_port)"
  cat >"$dir/knot.conf" <<EOF
server:
  rundir: $dir/run
  listen: 127.0.0.1@$knot_port
  udp-workers: 2
  tcp-workers: 2
  background-workers: 1
log:
  - target: stderr
    any: warning
database:
  storage: $dir/db
control:
  listen: $dir/run/knot.sock
acl:
  - id: local-update
    address: 127.0.0.1
    action: update
template:
  - id: default
    storage: $dir/zones
    file: $dir/zones/%s.zone
    zonefile-sync: -1
    journal-max-usage: 2G
    acl: local-update
zone:
  - domain: $zone.
EOF
  knotd -c "$dir/knot.conf" >"$dir/knot.log" 2>&1 &
  knot_pid=$!
  local deadline=$((SECONDS + 20))
  until [[ "$(kdig @127.0.0.1 -p "$knot_port" +time=1 +retry=0 "$zone" SOA 2>/dev/null | grep -c 'status: NOERROR')" -ge 1 ]]; do
    kill -0 "$knot_pid" 2>/dev/null || { cat "$dir/knot.log" >&2; die "knotd exited"; }
    ((SECONDS < deadline)) || { cat "$dir/knot.log" >&2; die "knot did not answer"; }
    sleep 0.1
  done
  log "knot on 127.0.0.1:$knot_port serving $zone."
}

# --- the control plane ---------------------------------------------------------
log "starting (or reusing) the control plane in $cluster_dir"
tests/controlplane/cluster.sh up
k apply --server-side --force-conflicts -f crds/ >/dev/null
k wait --for condition=established --timeout=60s crd/maildomains.mailauth.dev crd/mailrelays.mailauth.dev >/dev/null

start_controller() { # start_controller LABEL NAMESPACE...
  local label="$1"
  shift
  metrics_port="$(free_port)"
  local args=(controller --metrics-listen "127.0.0.1:$metrics_port" --dns-server "127.0.0.1:$knot_port"
    --dns-retry-min "$DNS_RETRY_MIN")
  local ns
  for ns in "$@"; do args+=(--namespace "$ns"); done
  KUBECONFIG="$kubeconfig" "$operator_bin" "${args[@]}" >"$work/controller-$label.log" 2>&1 &
  controller_pid=$!
  local deadline=$((SECONDS + 30))
  until curl -sf "http://127.0.0.1:$metrics_port/readyz" >/dev/null 2>&1; do
    kill -0 "$controller_pid" 2>/dev/null || { tail -30 "$work/controller-$label.log" >&2; die "the controller exited"; }
    ((SECONDS < deadline)) || die "the controller did not become ready"
    sleep 0.1
  done
}

# Deletes the tenant namespace's MailDomains while the controller still runs
# (it removes their finalizers once the relay no longer serves them), then
# the namespaces. Not measured; its time is reported.
cleanup_run() { # cleanup_run LABEL TENANT_NS RELAY_NS
  local label="$1" tenant="$2" relay_ns="$3" t0 deadline
  t0="$(now)"
  k delete --raw "/apis/mailauth.dev/v1alpha1/namespaces/$tenant/maildomains" >/dev/null 2>&1 || true
  deadline=$((SECONDS + 1200))
  until k get --raw "/apis/mailauth.dev/v1alpha1/namespaces/$tenant/maildomains?limit=1" 2>/dev/null | grep -q '"items":\[\]'; do
    if ((SECONDS >= deadline)); then
      log "warning: MailDomains in $tenant not all deleted after 1200 s; leaving them"
      break
    fi
    sleep 2
    if ((SECONDS % 30 < 2)); then
      k delete --raw "/apis/mailauth.dev/v1alpha1/namespaces/$tenant/maildomains" >/dev/null 2>&1 || true
    fi
  done
  echo "cleanup_seconds $(elapsed "$t0" "$(now)")" >>"$out/scale-$label.txt"
  k delete --raw "/apis/mailauth.dev/v1alpha1/namespaces/$relay_ns/mailrelays" >/dev/null 2>&1 || true
  for ns in "$tenant" "$relay_ns"; do
    k delete --raw "/api/v1/namespaces/$ns/secrets" >/dev/null 2>&1 || true
    k delete --raw "/api/v1/namespaces/$ns/events" >/dev/null 2>&1 || true
    k delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
  done
}

run_keygen() { # run_keygen ALGORITHM
  log "key generation alone: $KEYGEN_COUNT $1 keys on all cores"
  "$keygen_bin" --algorithm "$1" --count "$KEYGEN_COUNT" >"$out/scale-keygen-$1.txt"
  cat "$out/scale-keygen-$1.txt" >&2
}

run_scale() { # run_scale LABEL ALGORITHM
  local label="$1" algorithm="$2" suffix relay_ns tenant_ns zone
  suffix="$(date +%s)-$RANDOM"
  relay_ns="scale-relay-$label-$suffix"
  tenant_ns="scale-tenant-$label-$suffix"
  zone="$label.scale.test"
  mkdir -p "$work/run-$label"
  start_knot "$work/run-$label/knot" "$zone"
  k create namespace "$relay_ns" >/dev/null
  namespaces+=("$relay_ns")
  k create namespace "$tenant_ns" >/dev/null
  namespaces+=("$tenant_ns")
  k label namespace "$tenant_ns" mailauth.dev/bench=scale >/dev/null
  start_controller "$label" "$relay_ns" "$tenant_ns"
  local peers=() name
  for name in kube-apiserver etcd; do
    [[ -f "$cluster_dir/$name.pid" ]] && peers+=(--peer-pid "$name:$(cat "$cluster_dir/$name.pid")")
  done
  log "$label: $N $algorithm MailDomains in $tenant_ns on MailRelay $relay_ns/shared (controller pid $controller_pid)"
  KUBECONFIG="$kubeconfig" "$scale_bin" --tenant-namespace "$tenant_ns" --relay-namespace "$relay_ns" \
    --relay shared --count "$N" --algorithm "$algorithm" --concurrency "$CREATE_CONCURRENCY" \
    --zone "$zone" --knot "127.0.0.1:$knot_port" --controller-pid "$controller_pid" \
    --controller-metrics "127.0.0.1:$metrics_port" --operator-bin "$operator_bin" \
    --work "$work/run-$label" --rotations "$ROTATIONS" --steady-seconds "$STEADY" \
    --timeout-seconds "$TIMEOUT" "${peers[@]}" >"$out/scale-$label.txt" &
  bench_pid=$!
  if ! wait "$bench_pid"; then
    bench_pid=""
    log "last lines of the controller's log:"
    tail -20 "$work/controller-$label.log" >&2
    die "$label run broken (see above)"
  fi
  bench_pid=""
  stop_relays
  kill -0 "$controller_pid" 2>/dev/null || die "the controller died during the $label run"
  echo "dns_retry_min $DNS_RETRY_MIN" >>"$out/scale-$label.txt"
  echo "loadavg_after $(cut -d' ' -f1 /proc/loadavg)" >>"$out/scale-$label.txt"
  cp "$work/controller-$label.log" "$out/scale-controller-$label.log"
  cp "$work/run-$label/rotations.txt" "$out/scale-rotations-$label.txt" 2>/dev/null || true
  log "$label: cleaning up"
  cleanup_run "$label" "$tenant_ns" "$relay_ns"
  stop_pid "$controller_pid"
  controller_pid=""
  stop_pid "$knot_pid"
  knot_pid=""
  namespaces=()
  cat "$out/scale-$label.txt" >&2
}

# --- the runs --------------------------------------------------------------------
rm -f "$out"/scale-*.txt "$out"/scale-*.log
run_keygen rsa
run_keygen ed25519
for run in $RUNS; do
  case "$run" in
    rsa) run_scale rsa RSA ;;
    ed25519) run_scale ed25519 Ed25519 ;;
    mixed) run_scale mixed Mixed ;;
    *) die "BENCH_SCALE_RUNS: unknown run $run (rsa, ed25519, mixed)" ;;
  esac
done

# --- summary -----------------------------------------------------------------------
python3 tests/bench/scale_summary.py "$out" | tee "$out/scale-summary.txt"
log "summary written to $out/scale-summary.txt"
