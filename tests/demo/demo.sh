#!/usr/bin/env bash
# `make demo`: the operator doing its job end to end on this machine, no
# Docker needed. It
#   1. builds the binary and starts the local control plane (cached builds),
#   2. installs the CRDs and applies examples/ into a demo namespace,
#   3. runs the controller, checking DNS against a knot on loopback,
#   4. publishes the records through a DNSProvider (RFC 2136 with TSIG into
#      knot): the tenant edits no DNS,
#   5. runs a relay on the config the operator rendered, with an smtp-sink
#      upstream, sends a message with swaks using the tenant's credentials,
#   6. verifies the stored message's DKIM signature with dkimpy,
#   7. rotates the key by annotation and shows the rotation completing by
#      itself (the new record published, verified, the new key signing),
# prints a short report and cleans up after itself.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_until() { # wait_until <seconds> <what> <command...>
  local deadline=$((SECONDS + $1)) what="$2"; shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then echo "timed out waiting for $what" >&2; return 1; fi
    sleep 0.5
  done
}

# The real peers the demo talks to, and what they must be able to do (swaks
# with TLS and AUTH, dkimpy, knot, smtp-sink, ...): `.ci/install-deps` is the
# one list, for CI and the demo alike. It checks each capability by running
# the tool; as root it installs what is missing first.
if ! bash .ci/install-deps --check >/dev/null 2>&1; then
  if ((EUID == 0)); then
    say "Installing the peers the demo uses (.ci/install-deps, once per machine)"
    bash .ci/install-deps
  else
    bash .ci/install-deps --check || true
    echo "run 'sudo bash .ci/install-deps' once, then 'make demo' again" >&2
    exit 1
  fi
fi

work="$(mktemp -d /tmp/mailauth-demo.XXXXXX)"
# A namespace of its own per run: this control plane has no namespace
# controller, so a namespace deleted by an earlier run never finishes
# terminating, and waiting for it would hang a second run.
ns="mailauth-demo-$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
pids=()
cleanup() {
  local code=$?
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [[ -n "${kubectl:-}" ]] && $kubectl delete namespace "$ns" --wait=false >/dev/null 2>&1 || true
  if ((code != 0)); then
    echo "demo failed; logs kept in $work" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

say "Building (cached after the first run)"
cargo build --locked --quiet
bin="$repo/target/debug/mailauth-operator"
tests/controlplane/cluster.sh up
export KUBECONFIG="$repo/target/cluster/kubeconfig"
kubectl="$repo/target/cluster/bin/kubectl"

say "Installing the CRDs and applying examples/ into namespace $ns"
$kubectl apply --server-side --force-conflicts -f crds/ >/dev/null
$kubectl wait --for=condition=Established crd/maildomains.mailauth.dev crd/mailrelays.mailauth.dev --timeout=60s >/dev/null
$kubectl create namespace "$ns" >/dev/null
# The example relay admits namespaces labelled for it (allowedNamespaces).
$kubectl label namespace "$ns" mailauth.dev/relay=shared >/dev/null
$kubectl apply -n "$ns" -f examples/

say "Starting an smtp-sink upstream and knot on loopback"
sink_port="$(free_port)"
mkdir -p "$work/sink"
smtp-sink -u root -d "$work/sink/%M." "127.0.0.1:$sink_port" 100 >"$work/sink.log" 2>&1 &
pids+=($!)
# The demo relay forwards to the local sink, without TLS, from loopback.
$kubectl patch mr shared -n "$ns" --type merge -p "{\"spec\":{\"upstream\":{\"host\":\"127.0.0.1\",\"port\":$sink_port,\"tls\":\"None\"},\"spf\":{\"include\":null,\"egressIPs\":[\"127.0.0.1\"]},\"listener\":{\"tlsSecretName\":null}}}" >/dev/null

dns_port="$(free_port)"
tsig="$(head -c 32 /dev/urandom | base64)"
mkdir -p "$work/knot/zones" "$work/knot/db" "$work/knot/run"
for zone in acme.example mail.globex.example; do
  printf '$ORIGIN %s.\n$TTL 60\n@ SOA ns.%s. hostmaster.%s. 1 3600 600 86400 60\n@ NS ns.%s.\nns A 127.0.0.1\n' \
    "$zone" "$zone" "$zone" "$zone" >"$work/knot/zones/$zone.zone"
done
cat >"$work/knot/knot.conf" <<EOF
server:
  rundir: $work/knot/run
  listen: 127.0.0.1@$dns_port
log:
  - target: stderr
    any: warning
database:
  storage: $work/knot/db
key:
  - id: demo
    algorithm: hmac-sha256
    secret: $tsig
acl:
  - id: tenant-updates
    key: demo
    action: update
template:
  - id: default
    storage: $work/knot/zones
    file: $work/knot/zones/%s.zone
    acl: tenant-updates
    zonefile-sync: -1
zone:
  - domain: acme.example.
  - domain: mail.globex.example.
EOF
knotd -c "$work/knot/knot.conf" >"$work/knot.log" 2>&1 &
pids+=($!)
wait_until 15 knot kdig +short @127.0.0.1 -p "$dns_port" SOA acme.example

say "Running the controller (DNS checks against 127.0.0.1:$dns_port)"
metrics_port="$(free_port)"
"$bin" controller --namespace "$ns" --dns-server "127.0.0.1:$dns_port" \
  --dns-retry-min 2s --dns-retry-max 5s --metrics-listen "127.0.0.1:$metrics_port" \
  >"$work/controller.log" 2>&1 &
pids+=($!)
has_key() { [[ -n "$($kubectl get md acme -n "$ns" -o jsonpath='{.status.dkim.keys[0].selector}')" ]]; }
wait_until 120 "a DKIM key for acme" has_key
$kubectl get md -n "$ns"

say "What acme.example needs in DNS (mailauth-operator records)"
$kubectl get md acme -n "$ns" -o yaml | "$bin" records -f - --spf-ip 127.0.0.1 --ttl 60

say "Publishing through a DNSProvider (RFC 2136 with TSIG): nobody edits DNS by hand"
$kubectl create secret generic acme-tsig -n "$ns" --from-literal=secret="$tsig" >/dev/null
$kubectl apply -n "$ns" -f - >/dev/null <<EOF
apiVersion: mailauth.dev/v1alpha1
kind: DNSProvider
metadata: {name: acme-dns}
spec:
  zones: [acme.example]
  rfc2136: {server: "127.0.0.1:$dns_port", tsigKeyName: demo, tsigSecretRef: {name: acme-tsig}}
  ttl: 60
EOF
$kubectl patch md acme -n "$ns" --type merge -p '{"spec":{"dns":{"providerRef":{"name":"acme-dns"}}}}' >/dev/null
$kubectl wait --for=condition=DNSPublished md/acme -n "$ns" --timeout=120s
$kubectl wait --for=condition=Ready md/acme -n "$ns" --timeout=120s
$kubectl get md -n "$ns"
echo "What the operator wrote (status.published), as knot now serves it:"
$kubectl get md acme -n "$ns" -o jsonpath='{range .status.published[*]}{.name}{"\n"}{end}' |
  while read -r name; do printf '  %s TXT ' "$name"; kdig +short @127.0.0.1 -p "$dns_port" "$name" TXT | cut -c1-70; done

say "Running the relay as the operator deploys it: its own ServiceAccount watching its config Secrets"
relay_ready() {
  $kubectl get mr shared -n "$ns" -o jsonpath='{.status.domains}' | grep -qx 1 &&
    $kubectl get rolebinding shared-relay -n "$ns" >/dev/null 2>&1
}
wait_until 60 "the relay config" relay_ready
$kubectl get secrets -n "$ns" -l mailauth.dev/relay-config=shared
server="$($kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.server}')"
$kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}' | base64 -d >"$work/ca.crt"
cat >"$work/relay.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: local, cluster: {server: "$server", certificate-authority: "$work/ca.crt"}}]
users: [{name: relay, user: {token: "$($kubectl create token shared-relay -n "$ns" --duration=1h)"}}]
contexts: [{name: relay, context: {cluster: local, user: relay, namespace: "$ns"}}]
current-context: relay
EOF
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=relay.platform.example" \
  -keyout "$work/tls.key" -out "$work/tls.crt" >/dev/null 2>&1
relay_port="$(free_port)"
admin_port="$(free_port)"
KUBECONFIG="$work/relay.kubeconfig" "$bin" relay --config-secrets shared --namespace "$ns" \
  --listen "127.0.0.1:$relay_port" --admin-listen "127.0.0.1:$admin_port" \
  --tls-cert "$work/tls.crt" --tls-key "$work/tls.key" >"$work/relay.log" 2>&1 &
pids+=($!)
relay_serves() { curl -fsS "http://127.0.0.1:$admin_port/metrics" | grep -qx 'mailauth_relay_config_domains 1'; }
wait_until 30 "the relay serving acme.example" relay_serves

say "Sending a message with swaks (AUTH over STARTTLS, the tenant's credentials Secret)"
user="$($kubectl get secret acme-smtp -n "$ns" -o go-template='{{.data.username | base64decode}}')"
pass="$($kubectl get secret acme-smtp -n "$ns" -o go-template='{{.data.password | base64decode}}')"
swaks --server "127.0.0.1:$relay_port" --tls --auth PLAIN --auth-user="$user" --auth-password="$pass" \
  --from hola@acme.example --to customer@example.net \
  --header "Subject: Hello from acme, signed by mailauth-operator" \
  --body "This message left through the platform's relay." --hide-all
wait_until 30 "the message at the sink" bash -c "ls $work/sink | grep -q ."
stored="$(ls "$work/sink"/* | head -1)"

say "Verifying the DKIM signature with dkimpy (keys from knot)"
/usr/bin/python3 - "$stored" "$dns_port" <<'EOF'
import sys, dkim, dns.resolver
message = open(sys.argv[1], "rb").read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers, resolver.port, resolver.cache = ["127.0.0.1"], int(sys.argv[2]), None
def txt(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    return b"".join(b"".join(r.strings) for r in resolver.resolve(name, "TXT", lifetime=timeout))
signature = [l for l in message.split(b"\r\n") if l.lower().startswith(b"dkim-signature")][0]
print(signature[:120].decode() + "...")
if not dkim.verify(message, dnsfunc=txt):
    sys.exit("DKIM verification FAILED")
print("dkimpy: signature verified")
EOF

say "A rotation completes by itself: the new key is published, verified and signs"
first="$($kubectl get md acme -n "$ns" -o jsonpath='{.status.dkim.activeSelector}')"
$kubectl annotate md acme -n "$ns" mailauth.dev/rotate-requested="demo-$(date +%s)" >/dev/null
rotated() { a="$($kubectl get md acme -n "$ns" -o jsonpath='{.status.dkim.activeSelector}')"; [[ -n "$a" && "$a" != "$first" ]]; }
wait_until 120 "the new key to be Active" rotated
$kubectl get md acme -n "$ns" -o jsonpath='{range .status.dkim.keys[*]}  {.selector} {.state}{"\n"}{end}'
second="$($kubectl get md acme -n "$ns" -o jsonpath='{.status.dkim.activeSelector}')"
kdig +short @127.0.0.1 -p "$dns_port" "$second._domainkey.acme.example" TXT | grep -q 'v=DKIM1' ||
  { echo "the new key's record is not in knot" >&2; exit 1; }
echo "  $second is published in knot by the operator and signing; $first stays published for the overlap."

say "Report"
$kubectl get md,mr -n "$ns"
echo
echo "Relay metrics:"
curl -fsS "http://127.0.0.1:$admin_port/metrics" | grep -E '^mailauth_relay_messages_(accepted|signed|forwarded)' || true
echo
echo "Demo complete: the message was signed for acme.example with selector" \
  "$($kubectl get md acme -n "$ns" -o jsonpath='{.status.dkim.activeSelector}') and verified by dkimpy."
