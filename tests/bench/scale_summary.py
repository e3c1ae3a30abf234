"""The table of tests/bench/scale.sh: reads target/bench/scale-*.txt
(key value lines from the scale bench) and prints what was measured next
to the targets of docs/product.md and issue 9."""

import os
import sys

out = sys.argv[1]


def load(name):
    path = os.path.join(out, name)
    values = {}
    if os.path.exists(path):
        for line in open(path):
            key, _, value = line.strip().partition(" ")
            if key:
                values[key] = value
    return values


def f(values, key, default=float("nan")):
    try:
        return float(values[key])
    except (KeyError, ValueError):
        return default


rows = []


def row(what, value, target=""):
    rows.append((what, value, target))


keygen = {"rsa": load("scale-keygen-rsa.txt"), "ed25519": load("scale-keygen-ed25519.txt")}
RUNS = (("rsa", "RSA-2048", 1.0), ("ed25519", "Ed25519", 0.0), ("mixed", "half RSA-2048, half Ed25519", 0.5))
for label, algo, rsa_share in RUNS:
    s = load(f"scale-{label}.txt")
    if not s or "all_served_seconds" not in s:
        continue
    n = int(s["domains"])
    row(f"{algo}: MailDomains on one MailRelay", f"{n}  (load average {s.get('loadavg_before', '?')} before, {s.get('loadavg_after', '?')} after)")
    row("  all in the relay's shard Secrets after", f"{f(s, 'all_in_config_seconds'):.1f} s  (creates took {f(s, 'create_seconds'):.1f} s; per domain p50 {f(s, 'in_config_seconds_p50'):.1f} s, p90 {f(s, 'in_config_seconds_p90'):.1f} s)")
    row("  all served by the running relay after", f"{f(s, 'all_served_seconds'):.1f} s  (= {f(s, 'domains_per_second'):.1f} domains/s)",
        "Ed25519: 10,000 onboarded within 60 s" if label == "ed25519" else "")
    row("  all KeysReady / all Ready after", f"{f(s, 'all_keys_ready_seconds'):.1f} s / {f(s, 'all_ready_seconds'):.1f} s")
    # Key generation alone for as many keys, from the keygen bench's rate.
    kps = []
    cpu_per_key = 0.0
    for algorithm, share in (("rsa", rsa_share), ("ed25519", 1.0 - rsa_share)):
        if share > 0:
            k = keygen[algorithm]
            kps.append((share, f(k, "keygen_keys_per_second")))
            cpu_per_key += share * f(k, "keygen_cpu_ms_per_key")
    keygen_seconds = sum(share * n / rate for share, rate in kps)
    row("  key generation alone, all cores (keygen bench)", f"{keygen_seconds:.1f} s for {n} keys (extrapolated from {keygen['rsa'].get('keygen_count', '?')} keys), {cpu_per_key:.2f} ms CPU/key")
    cpu_ms = f(s, "controller_cpu_ms_per_domain")
    row("  controller CPU", f"{f(s, 'controller_cpu_seconds'):.1f} s = {cpu_ms:.2f} ms/domain = {cpu_ms / cpu_per_key:.2f}x key generation" if cpu_per_key > 0 else f"{cpu_ms:.2f} ms/domain",
        "<= 1.1x key generation")
    row("  controller peak memory (VmHWM)", f"{f(s, 'controller_peak_rss_mib'):.1f} MiB  (RSS at the end {f(s, 'controller_rss_mib'):.1f} MiB)")
    row("  machine CPU busy during it", f"{f(s, 'machine_busy_percent'):.0f}% of all cores; kube-apiserver {s.get('peer_cpu_seconds_kube-apiserver', '?')} s, etcd {s.get('peer_cpu_seconds_etcd', '?')} s, relay {s.get('relay_onboarding_cpu_seconds', '?')} s CPU")
    verbs = " ".join(f"{k.removeprefix('onboard_api_verb_')} {float(v):.0f}" for k, v in sorted(s.items()) if k.startswith("onboard_api_verb_"))
    row("  API requests/domain at the API server", f"{f(s, 'onboard_api_requests_per_domain'):.2f}  (all: {verbs}; minus the bench's {f(s, 'onboard_api_requests_bench_own'):.0f} creates)")
    row("  API writes/domain at the API server", f"{f(s, 'onboard_api_writes_per_domain'):.2f}  (metrics: {f(s, 'mailauth_status_writes_total'):.0f} status + {f(s, 'mailauth_secret_writes_total'):.0f} secret writes; {f(s, 'mailauth_keys_generated_total'):.0f} keys)",
        "<= 3 with a relay")
    writes = sorted(((k.removeprefix("onboard_api_"), float(v)) for k, v in s.items()
                     if k.startswith("onboard_api_") and k.split("_")[2] in ("POST", "PUT", "PATCH", "APPLY", "DELETE")),
                    key=lambda kv: -kv[1])
    row("    writes by verb and resource", ", ".join(f"{k} {v:.0f}" for k, v in writes[:8]))
    reads = sorted(((k.removeprefix("onboard_api_"), float(v)) for k, v in s.items()
                    if k.startswith("onboard_api_") and k.split("_")[2] in ("GET", "LIST")),
                   key=lambda kv: -kv[1])
    row("    reads by verb and resource", ", ".join(f"{k} {v:.0f}" for k, v in reads[:6]))
    if "steady_seconds" in s:
        row(f"  steady {f(s, 'steady_seconds'):.0f} s: API writes", f"{f(s, 'steady_api_writes_operator'):.0f} = {f(s, 'steady_writes_per_domain_per_day'):.3f}/domain/day; {f(s, 'steady_api_requests_operator'):.0f} requests in all", "< 1/domain/day")
        row(f"  steady: controller CPU, memory", f"{f(s, 'steady_controller_cpu_percent_of_core'):.2f}% of a core, {f(s, 'steady_controller_rss_mib'):.1f} MiB RSS", "< 1% of a core, < 150 MB")
    row("  relay memory after onboarding (RSS / peak)", f"{f(s, 'relay_rss_mib'):.1f} / {f(s, 'relay_peak_rss_mib'):.1f} MiB  ({s.get('relay_onboarding_reloads', '?')} reloads while onboarding)",
        "< 300 MB with 10,000 RSA" if rsa_share > 0 else "")
    row("  fresh relay: load all N (start to serving)", f"{f(s, 'fresh_relay_load_seconds'):.2f} s, {f(s, 'fresh_relay_cpu_seconds'):.2f} s CPU, RSS {f(s, 'fresh_relay_rss_mib'):.1f} MiB (peak {f(s, 'fresh_relay_peak_rss_mib'):.1f})",
        "< 300 MB with 10,000 RSA" if rsa_share > 0 else "")
    if "rotations" in s:
        r = int(s["rotations"])
        row(f"  rotations ({r}, one after another)", f"request to first message signed with the new key: p50 {f(s, 'rotation_request_to_signed_p50'):.2f} s, p99 {f(s, 'rotation_request_to_signed_p99'):.2f} s, max {f(s, 'rotation_request_to_signed_max'):.2f} s",
            "< 10 s at p99")
        row("    record published -> signed", f"p50 {f(s, 'rotation_published_to_signed_p50'):.2f} s, p99 {f(s, 'rotation_published_to_signed_p99'):.2f} s")
        row("    operator's Active -> signed", f"p50 {f(s, 'rotation_active_to_signed_p50'):.2f} s, p99 {f(s, 'rotation_active_to_signed_p99'):.2f} s")
        row("    steps (p50 / p99)", "request->Pending {:.2}/{:.2}, Pending->published {:.2}/{:.2}, published->Active {:.2}/{:.2}, Active->shard {:.2}/{:.2} s".format(
            f(s, "rotation_request_to_pending_p50"), f(s, "rotation_request_to_pending_p99"),
            f(s, "rotation_pending_to_published_p50"), f(s, "rotation_pending_to_published_p99"),
            f(s, "rotation_published_to_active_p50"), f(s, "rotation_published_to_active_p99"),
            f(s, "rotation_active_to_shard_p50"), f(s, "rotation_active_to_shard_p99")))
        row("  relay incremental reload (shard change -> reload)", f"p50 {f(s, 'rotation_shard_to_reload_p50'):.3f} s, p99 {f(s, 'rotation_shard_to_reload_p99'):.3f} s (includes the relay's 100 ms debounce)")
        row("  relay memory after the rotations (RSS / peak)", f"{f(s, 'relay_rss_after_rotations_mib'):.1f} / {f(s, 'relay_peak_rss_after_rotations_mib'):.1f} MiB")
        row("  API requests/rotation (minus the bench's 2)", f"{f(s, 'rotation_api_requests_per_domain'):.1f}, writes {f(s, 'rotation_api_writes_per_domain'):.1f}")
    if "cleanup_seconds" in s:
        row("  cleanup (delete all, not measured)", f"{f(s, 'cleanup_seconds'):.0f} s")

if not rows:
    print("no scale results")
    sys.exit(0)
w1 = max(len(r[0]) for r in rows)
w2 = min(max(len(r[1]) for r in rows), 110)
print(f"{'what'.ljust(w1)}  {'measured'.ljust(w2)}  target")
print("-" * (w1 + w2 + 30))
for what, value, target in rows:
    print(f"{what.ljust(w1)}  {value.ljust(w2)}  {target}".rstrip())
print()
print("API requests are counted by the API server (apiserver_request_total, before")
print("and after, its own lease renewals left out): the controller's, the relay's")
print("(a watch of its config Secrets) and the bench's watches; the bench's creates")
print("are taken off. Writes are POST, PUT, PATCH, APPLY and DELETE.")
print("Rotations: the controller re-checks an unverified record after")
print("--dns-retry-min (1s here; 30 s by default), which bounds published -> Active.")
