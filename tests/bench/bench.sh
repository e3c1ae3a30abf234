#!/usr/bin/env bash
# Benchmarks (numbers, not pass/fail), in one run, on 127.0.0.1:
#
#  1. Onboarding: BENCH_DOMAINS (default 1000) RSA-2048 MailDomains created at
#     once in a fresh namespace watched by the release controller; time until
#     all are KeysReady, next to the time this machine needs just to generate
#     as many keys on all cores (the physical bound); controller CPU, peak
#     memory and API writes per domain; then a steady-state minute. The same
#     for Ed25519 (BENCH_ED25519_DOMAINS, default BENCH_DOMAINS).
#  2. DNS check: BENCH_DNS_DOMAINS (default 1000) domains served by knot,
#     checked by `mailauth-operator check` (DKIM, SPF, DMARC) and by
#     checkdmarc (SPF, DMARC), with the DNS queries each made as knot's
#     mod-stats counts them.
#  3. Publishing: BENCH_PUBLISH_DOMAINS MailDomains with a DNSProvider (RFC
#     2136 into knot): time until all are Ready, UPDATE messages and queries
#     per domain as knot counts them, and the UPDATEs their deletion takes.
#  4. A summary table, also written to target/bench/summary.txt.
#
# Settings: BENCH_DOMAINS, BENCH_ED25519_DOMAINS, BENCH_DNS_DOMAINS,
# BENCH_STEADY_SECONDS (60), BENCH_CONTROLLER_CONCURRENCY (the controller's
# default when unset), BENCH_CREATE_CONCURRENCY (32), BENCH_SKIP (comma list
# of rsa, ed25519, dns, publish), BENCH_PUBLISH_DOMAINS (1000),
# BENCH_PUBLISH_ALGORITHM (RSA), BENCH_KEEP=1 keeps the work dir (logs, zone).
# The bench fails loudly (non-zero, with the reason) when a run is broken:
# domains that never become KeysReady, a controller that dies, a check that
# fails on the zone it was built to pass.
set -euo pipefail

cd "$(dirname "$0")/../.."
repo="$PWD"
out="$repo/target/bench"
mkdir -p "$out"
work="$(mktemp -d /tmp/mailauth-bench.XXXXXX)"

N="${BENCH_DOMAINS:-1000}"
N_ED="${BENCH_ED25519_DOMAINS:-$N}"
N_DNS="${BENCH_DNS_DOMAINS:-1000}"
N_PUBLISH="${BENCH_PUBLISH_DOMAINS:-1000}"
STEADY="${BENCH_STEADY_SECONDS:-60}"
CREATE_CONCURRENCY="${BENCH_CREATE_CONCURRENCY:-32}"
SKIP=",${BENCH_SKIP:-},"
SPF_IP=192.0.2.10
SELECTOR=bench2026

kubeconfig="$repo/target/cluster/kubeconfig"
kubectl="$repo/target/cluster/bin/kubectl"

BENCH_NAME=bench
# shellcheck source=tests/bench/common.sh
source "$repo/tests/bench/common.sh"

# --- processes we start, stopped on any exit ---------------------------------
knot_pid=""
controller_pid=""
namespaces=()
on_exit() {
  local rc=$?
  stop_pid "$controller_pid"
  stop_pid "$knot_pid"
  # Namespaces left by a failed run: deleted in the background (their
  # MailDomains keep finalizers without a controller; as the tests' are).
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
# The bench binaries with the release profile too, so the library is not
# built a second time for the `bench` profile.
cargo build --release --locked --bench keygen --bench onboard --message-format=json \
  >"$work/build.json"
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
keygen_bin="$(bench_bin keygen)"
onboard_bin="$(bench_bin onboard)"
operator_bin="$repo/target/release/mailauth-operator"
[[ -x "$operator_bin" ]] || die "$operator_bin was not built"

# --- knot: one server for everything, counting queries with mod-stats -------
# Zone `test.`: the DNS-check domains d0001.bench.test ... (DKIM, SPF, DMARC),
# `_dmarc.test` and `_dmarc.bench.test` (so checkdmarc's organisational
# lookups get answers, not timeouts), and nothing under onboard.test: the
# onboarding domains get fast, truthful NXDOMAINs.
start_knot() {
  local dir="$work/knot" dkim_p
  mkdir -p "$dir/zones" "$dir/db" "$dir/run"
  dkim_p="$(openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 2>/dev/null |
    openssl pkey -pubout -outform DER | base64 -w0)"
  local dkim="v=DKIM1; k=rsa; p=$dkim_p"
  local dkim_txt="\"${dkim:0:255}\" \"${dkim:255}\""
  : >"$work/dns-domains.txt"
  {
    printf '$ORIGIN test.\n$TTL 300\n'
    printf '@ SOA ns.test. hostmaster.test. 1 3600 600 86400 300\n@ NS ns.test.\nns A 127.0.0.1\n'
    printf '_dmarc TXT "v=DMARC1; p=reject"\n_dmarc.bench TXT "v=DMARC1; p=reject"\n'
    for i in $(seq 1 "$N_DNS"); do
      local d
      d="$(printf 'd%04d' "$i")"
      echo "$d.bench.test" >>"$work/dns-domains.txt"
      printf '%s.bench TXT "v=spf1 ip4:%s -all"\n' "$d" "$SPF_IP"
      printf '_dmarc.%s.bench TXT "v=DMARC1; p=reject"\n' "$d"
      printf '%s._domainkey.%s.bench TXT %s\n' "$SELECTOR" "$d" "$dkim_txt"
    done
  } >"$dir/zones/test.zone"
  # The zone a DNSProvider publishes the publishing run's domains into.
  printf '$ORIGIN publish.example.\n$TTL 300\n@ SOA ns.publish.example. hostmaster.publish.example. 1 3600 600 86400 300\n@ NS ns.publish.example.\nns A 127.0.0.1\n' \
    >"$dir/zones/publish.example.zone"
  publish_tsig="$(head -c 32 /dev/urandom | base64)"
  knot_port="$(free_port)"
  knot_sock="$dir/run/knot.sock"
  cat >"$dir/knot.conf" <<EOF
server:
  rundir: $dir/run
  listen: 127.0.0.1@$knot_port
  udp-workers: 2
  tcp-workers: 1
  background-workers: 1
log:
  - target: stderr
    any: warning
database:
  storage: $dir/db
control:
  listen: $knot_sock
key:
  - id: bench-publish
    algorithm: hmac-sha256
    secret: $publish_tsig
acl:
  - id: bench-publish
    key: bench-publish
    action: update
mod-stats:
  - id: bench
    request-protocol: on
    server-operation: on
    response-code: on
    query-type: on
template:
  - id: default
    storage: $dir/zones
    file: $dir/zones/%s.zone
    zonefile-sync: -1
    global-module: mod-stats/bench
zone:
  - domain: test.
  - domain: publish.example.
    acl: bench-publish
EOF
  knotd -c "$dir/knot.conf" >"$dir/knot.log" 2>&1 &
  knot_pid=$!
  local deadline=$((SECONDS + 20))
  until [[ -n "$(kdig @127.0.0.1 -p "$knot_port" +short +time=1 +tries=1 _dmarc.bench.test TXT 2>/dev/null)" ]]; do
    kill -0 "$knot_pid" 2>/dev/null || { cat "$dir/knot.log" >&2; die "knotd exited"; }
    ((SECONDS < deadline)) || { cat "$dir/knot.log" >&2; die "knot did not answer"; }
    sleep 0.1
  done
  log "knot on 127.0.0.1:$knot_port serving test. ($N_DNS check domains)"
}
# Every request knot has received (all protocols), from mod-stats.
knot_queries() {
  knotc -s "$knot_sock" stats mod-stats.request-protocol 2>/dev/null |
    awk -F'= ' '{ s += $2 } END { print s + 0 }'
}

# One knot counter from mod-stats (0 when absent): server-operation[update].
knot_stat() { # knot_stat SECTION[ITEM]
  # knotc exits non-zero for a counter that has not counted anything yet.
  local section="${1%%\[*}" item="${1#*\[}"
  item="${item%\]}"
  { knotc -s "$knot_sock" stats "mod-stats.$section" 2>/dev/null || true; } |
    awk -F' = ' -v item="[$item]" 'index($1, item) { s += $2 } END { print s + 0 }'
}

# --- the control plane ---------------------------------------------------------
need_cluster() {
  [[ -n "${cluster_ready:-}" ]] && return 0
  log "starting (or reusing) the control plane"
  tests/controlplane/cluster.sh up
  k apply --server-side --force-conflicts -f crds/ >/dev/null
  k wait --for condition=established --timeout=60s crd/maildomains.mailauth.dev >/dev/null
  cluster_ready=1
}

start_controller() { # start_controller NAMESPACE LABEL
  local ns="$1" label="$2"
  metrics_port="$(free_port)"
  local args=(controller --namespace "$ns" --metrics-listen "127.0.0.1:$metrics_port"
    --dns-server "127.0.0.1:$knot_port")
  [[ -n "${BENCH_CONTROLLER_CONCURRENCY:-}" ]] && args+=(--concurrency "$BENCH_CONTROLLER_CONCURRENCY")
  KUBECONFIG="$kubeconfig" "$operator_bin" "${args[@]}" >"$work/controller-$label.log" 2>&1 &
  controller_pid=$!
  local deadline=$((SECONDS + 30))
  until curl -sf "http://127.0.0.1:$metrics_port/readyz" >/dev/null 2>&1; do
    kill -0 "$controller_pid" 2>/dev/null || { tail -30 "$work/controller-$label.log" >&2; die "the controller exited"; }
    ((SECONDS < deadline)) || die "the controller did not become ready"
    sleep 0.1
  done
}

# Deletes the namespace's MailDomains while the controller still runs (it
# removes its finalizers), then the rest. Not measured; time reported.
cleanup_namespace() { # cleanup_namespace NAMESPACE LABEL
  local ns="$1" label="$2" t0 deadline
  t0="$(now)"
  # A delete-collection of thousands can outlive the API server's request
  # timeout; the server carries on, and the wait below sees the outcome.
  k delete --raw "/apis/mailauth.dev/v1alpha1/namespaces/$ns/maildomains" >/dev/null 2>&1 || true
  deadline=$((SECONDS + 900))
  until k get --raw "/apis/mailauth.dev/v1alpha1/namespaces/$ns/maildomains?limit=1" 2>/dev/null | grep -q '"items":\[\]'; do
    if ((SECONDS >= deadline)); then
      log "warning: MailDomains in $ns not all deleted after 900 s; leaving them"
      break
    fi
    sleep 2
    # Re-issue it now and then, in case a timed-out one stopped half-way.
    if ((SECONDS % 30 < 2)); then
      k delete --raw "/apis/mailauth.dev/v1alpha1/namespaces/$ns/maildomains" >/dev/null 2>&1 || true
    fi
  done
  echo "cleanup_seconds $(elapsed "$t0" "$(now)")" >>"$out/onboard-$label.txt"
  k delete --raw "/api/v1/namespaces/$ns/secrets" >/dev/null 2>&1 || true
  k delete --raw "/api/v1/namespaces/$ns/events" >/dev/null 2>&1 || true
  k delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
}

run_keygen() { # run_keygen LABEL ALGORITHM COUNT
  log "$1: generating $3 $2 keys on all cores (the physical bound)"
  "$keygen_bin" --algorithm "$2" --count "$3" >"$out/keygen-$1.txt"
  echo "loadavg_after $(cut -d' ' -f1 /proc/loadavg)" >>"$out/keygen-$1.txt"
  cat "$out/keygen-$1.txt" >&2
}

run_onboard() { # run_onboard LABEL ALGORITHM COUNT STEADY TIMEOUT [onboard args...]
  local label="$1" algorithm="$2" count="$3" steady="$4" timeout="$5" ns
  shift 5
  local extra=("$@") suffix=onboard.test
  need_cluster
  ns="bench-$label-$(date +%s)-$RANDOM"
  k create namespace "$ns" >/dev/null
  namespaces+=("$ns")
  if [[ "$label" == publish ]]; then
    # A DNSProvider for publish.example, with knot's TSIG key.
    suffix=publish.example
    k create secret generic bench-tsig -n "$ns" --from-literal=secret="$publish_tsig" >/dev/null
    k apply -n "$ns" -f - >/dev/null <<EOF
apiVersion: mailauth.dev/v1alpha1
kind: DNSProvider
metadata: {name: bench-dns}
spec:
  zones: [publish.example]
  rfc2136: {server: "127.0.0.1:$knot_port", tsigKeyName: bench-publish, tsigSecretRef: {name: bench-tsig}}
EOF
  fi
  start_controller "$ns" "$label"
  # The control plane's CPU in the same window (it shares these cores).
  local peers=() name
  for name in kube-apiserver etcd; do
    [[ -f "$repo/target/cluster/$name.pid" ]] && peers+=(--peer-pid "$name:$(cat "$repo/target/cluster/$name.pid")")
  done
  log "$label: creating $count $algorithm MailDomains in $ns (controller pid $controller_pid)"
  local load_before
  load_before="$(cut -d' ' -f1 /proc/loadavg)"
  if ! KUBECONFIG="$kubeconfig" "$onboard_bin" --namespace "$ns" --count "$count" \
    --algorithm "$algorithm" --concurrency "$CREATE_CONCURRENCY" --domain-suffix "$suffix" \
    --controller-pid "$controller_pid" --metrics "127.0.0.1:$metrics_port" \
    --timeout-seconds "$timeout" --steady-seconds "$steady" "${peers[@]}" "${extra[@]}" >"$out/onboard-$label.txt"; then
    log "last lines of the controller's log:"
    tail -20 "$work/controller-$label.log" >&2
    die "$label onboarding run broken (see above)"
  fi
  kill -0 "$controller_pid" 2>/dev/null || die "the controller died during the $label run"
  echo "loadavg_before $load_before" >>"$out/onboard-$label.txt"
  echo "loadavg_after $(cut -d' ' -f1 /proc/loadavg)" >>"$out/onboard-$label.txt"
  cp "$work/controller-$label.log" "$out/controller-$label.log"
  if [[ "$label" == publish ]]; then
    publish_u_ready="$(knot_stat 'server-operation[update]')"
    publish_q_ready="$(knot_stat 'server-operation[query]')"
  fi
  log "$label: cleaning up $ns"
  cleanup_namespace "$ns" "$label"
  stop_pid "$controller_pid"
  controller_pid=""
  unset 'namespaces[-1]'
  cat "$out/onboard-$label.txt" >&2
}

run_dns() {
  local domains="$work/dns-domains.txt" times=() q0 q1 t0 t1 runs=3
  log "dns: mailauth-operator check over $N_DNS domains, $runs runs"
  q0="$(knot_queries)"
  for r in $(seq 1 $runs); do
    t0="$(now)"
    if ! "$operator_bin" check --domains-file "$domains" --selector "$SELECTOR" --spf-ip "$SPF_IP" \
      --dns-server "127.0.0.1:$knot_port" --output json >"$work/check-$r.json"; then
      python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); bad=[d for d in r["domains"]][:1]; print(json.dumps(bad, indent=1)[:3000])' "$work/check-$r.json" >&2 || true
      die "mailauth-operator check failed on domains built to pass"
    fi
    t1="$(now)"
    times+=("$(elapsed "$t0" "$t1")")
  done
  q1="$(knot_queries)"
  python3 - "$work/check-1.json" "$N_DNS" "$(( (q1 - q0) / runs ))" "${times[@]}" >"$out/dns-check.txt" <<'EOF'
import json, statistics, sys
report = json.load(open(sys.argv[1]))
n = int(sys.argv[2]); knot = int(sys.argv[3]); times = [float(t) for t in sys.argv[4:]]
if len(report["domains"]) != n or report["failed"]:
    sys.exit(f"check reported {len(report['domains'])} domains, {report['failed']} failed")
median = statistics.median(times)
print(f"check_domains {n}")
print(f"check_runs_seconds {' '.join(f'{t:.3f}' for t in times)}")
print(f"check_seconds {median:.3f}")
print(f"check_domains_per_second {n / median:.1f}")
print(f"check_queries_reported {report['dnsQueries']}")
print(f"check_queries_knot {knot}")
print(f"check_queries_per_domain {knot / n:.2f}")
EOF
  cat "$out/dns-check.txt" >&2

  log "dns: checkdmarc (SPF and DMARC) over the same $N_DNS domains"
  q0="$(knot_queries)"
  python3 tests/bench/checkdmarc_bench.py "$domains" "$knot_port" >"$out/dns-checkdmarc.txt" ||
    die "checkdmarc did not find valid SPF and DMARC on domains built to have them"
  q1="$(knot_queries)"
  echo "checkdmarc_queries_knot $((q1 - q0))" >>"$out/dns-checkdmarc.txt"
  python3 -c 'import sys; print(f"checkdmarc_queries_per_domain {int(sys.argv[1]) / int(sys.argv[2]):.2f}")' \
    "$((q1 - q0))" "$N_DNS" >>"$out/dns-checkdmarc.txt"
  cat "$out/dns-checkdmarc.txt" >&2
}

# --- the run ---------------------------------------------------------------------
rm -f "$out"/keygen-*.txt "$out"/onboard-*.txt "$out"/dns-*.txt "$out/summary.txt"
start_knot
if [[ "$SKIP" != *,rsa,* ]]; then
  # The bound is measured right before and right after onboarding, and the
  # ratio uses their mean: on a shared machine, load changes within a run.
  run_keygen rsa rsa "$N"
  # Generous: three times the bound plus 5 minutes; a broken run fails here.
  bound="$(awk '/^keygen_seconds/ { print int($2) }' "$out/keygen-rsa.txt")"
  run_onboard rsa RSA "$N" "$STEADY" "$((bound * 3 + 300))"
  run_keygen rsa-after rsa "$N"
fi
if [[ "$SKIP" != *,ed25519,* ]]; then
  run_keygen ed25519 ed25519 "$N_ED"
  run_onboard ed25519 Ed25519 "$N_ED" 0 "${BENCH_ED25519_TIMEOUT_SECONDS:-900}"
  run_keygen ed25519-after ed25519 "$N_ED"
fi
if [[ "$SKIP" != *,dns,* ]]; then
  run_dns
fi
if [[ "$SKIP" != *,publish,* ]]; then
  # Onboarding through RFC 2136: every record written by the operator into
  # knot, each domain counted when Ready (its DKIM record verified through
  # the resolver). UPDATE messages and queries as knot counted them.
  u0="$(knot_stat 'server-operation[update]')"
  q0="$(knot_stat 'server-operation[query]')"
  run_onboard publish "${BENCH_PUBLISH_ALGORITHM:-RSA}" "$N_PUBLISH" 0 "${BENCH_PUBLISH_TIMEOUT_SECONDS:-1800}" \
    --provider bench-dns --condition Ready
  # Until all were Ready, and then for deleting them (each record removed).
  u1="$(knot_stat 'server-operation[update]')"
  python3 -c 'import sys; n, u, q, d = map(int, sys.argv[1:]); print(f"publish_updates_knot {u}\npublish_updates_per_domain {u / n:.2f}\npublish_queries_knot {q}\npublish_queries_per_domain {q / n:.2f}\npublish_cleanup_updates_per_domain {d / n:.2f}")' \
    "$N_PUBLISH" "$((publish_u_ready - u0))" "$((publish_q_ready - q0))" "$((u1 - publish_u_ready))" | tee -a "$out/onboard-publish.txt" >&2
fi

# --- summary -----------------------------------------------------------------------
python3 - "$out" <<'EOF' | tee "$out/summary.txt"
import os, sys
out = sys.argv[1]

def load(name):
    path = os.path.join(out, name)
    values = {}
    if os.path.exists(path):
        for line in open(path):
            key, _, value = line.strip().partition(" ")
            values[key] = value
    return values

def f(values, key):
    return float(values[key])

rows = []
def row(what, value, target=""):
    rows.append((what, value, target))

for label, algo in (("rsa", "RSA-2048"), ("ed25519", "Ed25519")):
    kg, ob, kg2 = load(f"keygen-{label}.txt"), load(f"onboard-{label}.txt"), load(f"keygen-{label}-after.txt")
    if not ob:
        continue
    n = int(ob["domains"])
    row(f"Onboarding {algo}: MailDomains", f"{n}  (load average {ob.get('loadavg_before', '?')} before, {ob.get('loadavg_after', '?')} after)")
    row(f"  all KeysReady after", f"{f(ob, 'ready_seconds'):.1f} s  (creates took {f(ob, 'apply_seconds'):.1f} s; p50 {f(ob, 'ready_p50_seconds'):.1f} s)",
        "<= 60 s for 10,000" if label == "ed25519" else "")
    bounds = [f(k, "keygen_seconds") for k in (kg, kg2) if k]
    bound = sum(bounds) / len(bounds)
    row(f"  key generation alone, all cores", f"{bound:.1f} s  (mean of {' and '.join(f'{b:.1f}' for b in bounds)} s before/after; {kg['keygen_threads']} threads)")
    ratio = f(ob, "ready_seconds") / bound
    row(f"  ratio onboarding / key generation", f"{ratio:.2f}x  (vs before only: {f(ob, 'ready_seconds') / bounds[0]:.2f}x)", "<= 1.25x" if label == "rsa" else "")
    cpu_keys = [f(k, "keygen_cpu_ms_per_key") for k in (kg, kg2) if k and "keygen_cpu_ms_per_key" in k]
    if cpu_keys:
        per_key = sum(cpu_keys) / len(cpu_keys)
        row(f"  CPU: controller per domain / keygen per key", f"{f(ob, 'controller_cpu_ms_per_domain'):.1f} / {per_key:.1f} ms = {f(ob, 'controller_cpu_ms_per_domain') / per_key:.2f}x")
    row(f"  onboarding rate", f"{f(ob, 'domains_per_second'):.1f} domains/s")
    row(f"  controller CPU", f"{f(ob, 'controller_cpu_seconds'):.1f} s  ({f(ob, 'controller_cpu_ms_per_domain'):.1f} ms/domain)")
    row(f"  controller peak memory (VmHWM)", f"{f(ob, 'controller_peak_rss_mib'):.1f} MiB")
    row(f"  machine CPU busy during it", f"{f(ob, 'machine_busy_percent'):.0f}% of all cores; kube-apiserver {ob.get('peer_cpu_seconds_kube-apiserver', '?')} s, etcd {ob.get('peer_cpu_seconds_etcd', '?')} s CPU")
    row(f"  API writes/domain: status+secret (metrics)", f"{f(ob, 'writes_per_domain_metrics'):.2f}  ({f(ob, 'mailauth_status_writes_total'):.0f} status + {f(ob, 'mailauth_secret_writes_total'):.0f} secret; {f(ob, 'mailauth_keys_generated_total'):.0f} keys generated)")
    row(f"  API writes/domain: + finalizer patch", f"{f(ob, 'writes_per_domain_metrics_plus_finalizer'):.2f}")
    row(f"  stored changes/domain seen by watches", f"{f(ob, 'writes_per_domain_watched'):.2f} MailDomain+Secret, {f(ob, 'writes_per_domain_watched_with_events'):.2f} with {f(ob, 'watched_event_writes'):.0f} Events")
    if "steady_seconds" in ob:
        s = ob["steady_seconds"]
        row(f"  steady {s} s: API writes (MD+Secret+Event)", f"{f(ob, 'steady_watched_maildomain_writes') + f(ob, 'steady_watched_secret_writes') + f(ob, 'steady_watched_event_writes'):.0f}  ({f(ob, 'steady_writes_per_domain'):.4f}/domain; metrics: {f(ob, 'steady_mailauth_status_writes_total'):.0f} status, {f(ob, 'steady_mailauth_secret_writes_total'):.0f} secret)", "<= 1/domain/day")
        row(f"  steady {s} s: reconciles", f"{f(ob, 'steady_mailauth_reconciles_total'):.0f}")
        row(f"  steady {s} s: controller CPU", f"{f(ob, 'steady_controller_cpu_seconds'):.2f} s = {f(ob, 'steady_controller_cpu_percent_of_core'):.2f}% of a core", "< 1% of a core")
        row(f"  steady: controller memory (RSS / peak)", f"{f(ob, 'steady_controller_rss_mib'):.1f} / {f(ob, 'steady_controller_peak_rss_mib'):.1f} MiB", "< 150 MB")

ck, cd = load("dns-check.txt"), load("dns-checkdmarc.txt")
if ck and cd:
    n = int(ck["check_domains"])
    row(f"DNS check: domains", f"{n}")
    row(f"  mailauth-operator check (DKIM+SPF+DMARC)", f"{f(ck, 'check_seconds'):.3f} s (median of {ck['check_runs_seconds']}) = {f(ck, 'check_domains_per_second'):.0f} domains/s", "1,000 in < 1 s")
    row(f"  checkdmarc (SPF+DMARC only)", f"{f(cd, 'checkdmarc_seconds'):.2f} s = {f(cd, 'checkdmarc_domains_per_second'):.0f} domains/s")
    row(f"  rate ratio ours / checkdmarc", f"{f(ck, 'check_domains_per_second') / f(cd, 'checkdmarc_domains_per_second'):.1f}x", ">= 10x")
    row(f"  DNS queries/domain, ours (knot count)", f"{f(ck, 'check_queries_per_domain'):.2f}  (check itself reports {f(ck, 'check_queries_reported') / n:.2f})")
    row(f"  DNS queries/domain, checkdmarc (knot count)", f"{f(cd, 'checkdmarc_queries_per_domain'):.2f}", "ours fewer")

pb = load("onboard-publish.txt")
if pb:
    n = f(pb, "count") if "count" in pb else float(os.environ.get("N_PUBLISH", "0") or 0)
    row("Publishing (RFC 2136): time until all Ready", f"{f(pb, 'ready_seconds'):.1f} s (p50 {f(pb, 'ready_p50_seconds'):.1f} s)")
    row("  DNS UPDATE messages/domain (knot count)", f"{f(pb, 'publish_updates_per_domain'):.2f}  (deletion: {f(pb, 'publish_cleanup_updates_per_domain'):.2f})")
    row("  DNS queries/domain (knot count)", f"{f(pb, 'publish_queries_per_domain'):.2f}")
    row("  API writes/domain (watched, with events)", f"{f(pb, 'writes_per_domain_watched_with_events'):.2f}")
if not rows:
    sys.exit("no run produced numbers")
w1 = max(len(r[0]) for r in rows); w2 = max(len(r[1]) for r in rows)
print(f"{'what'.ljust(w1)}  {'measured'.ljust(w2)}  target")
print("-" * (w1 + w2 + 20))
for what, value, target in rows:
    print(f"{what.ljust(w1)}  {value.ljust(w2)}  {target}".rstrip())
print()
print("API writes/domain counts the controller's status writes and Secret writes")
print("(its /metrics counters), plus one finalizer patch per MailDomain; the")
print("'seen by watches' line counts every stored change of the namespace's")
print("MailDomains (minus the creates) and Secrets, then also Events.")
print("'keys generated' above the number of domains means some domains got a")
print("second key during onboarding. The steady sample is KeysReady domains whose")
print("records are not published in DNS (knot answers NXDOMAIN): the controller")
print("re-checks them on its retry backoff, so it is busier than the all-Ready,")
print("verified steady state the product target speaks of.")
EOF
log "summary written to $out/summary.txt"
