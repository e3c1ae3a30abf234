#!/usr/bin/env bash
# `make demo` (as root): the operator doing its job end to end on a real
# one-node cluster on this machine, no Docker needed. It
#   1. builds the release binary and the image (tests/image/build.sh),
#      starts the control plane with a node (cluster.sh with NODE=1,
#      node.sh: containerd, kubelet, controller-manager, scheduler) in
#      target/node-cluster and imports the image into the node (cached:
#      a second run reuses all of it),
#   2. starts knot (RFC 2136 with TSIG) and an smtp-sink on loopback, which
#      the pods reach as 10.88.0.1 (node.sh expose),
#   3. installs the chart from charts/ with that image: two controller pods
#      under the chart's ServiceAccount, one holding the Lease,
#   4. applies examples/ (a MailRelay and MailDomains) into a demo
#      namespace, pointed at the local sink and knot; a DNSProvider
#      publishes the records (the tenant edits no DNS),
#   5. waits for the MailDomain to be Ready and the relay's pods to be
#      Ready and serving it,
#   6. sends a message with swaks to a relay pod over STARTTLS with the
#      tenant's credentials, and verifies what reaches the sink with dkimpy,
#   7. prints `kubectl get pods,md,mr`, and cleans up: the demo's objects,
#      the release, the namespaces, knot and the sink. The node stays up
#      for the next run (make node-down stops it).
# Every step fails the demo loudly, naming what did not happen.
set -Eeuo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
started=$SECONDS

say() { printf '\n\033[1m== %s\033[0m  (%d s)\n' "$*" "$((SECONDS - started))"; }
fail() { echo "demo FAILED: $*" >&2; exit 1; }
trap 'echo "demo FAILED (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_until() { # wait_until <seconds> <what> <command...>
  local deadline=$((SECONDS + $1)) what="$2"; shift 2
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || fail "timed out after $1 s waiting for $what"
    sleep 0.5
  done
}

((EUID == 0)) || fail "make demo runs a real node (containerd, network namespaces, iptables): run it as root"

# The real peers the demo talks to (swaks with TLS and AUTH, dkimpy, knot,
# smtp-sink, containerd, ...): `.ci/install-deps` is the one list, for CI
# and the demo alike. It checks each capability by running the tool, and
# installs what is missing first.
if ! bash .ci/install-deps --check >/dev/null 2>&1; then
  say "Installing the peers the demo uses (.ci/install-deps, once per machine)"
  bash .ci/install-deps
fi

export CLUSTER_DIR="$repo/target/node-cluster"
export KUBECONFIG="$CLUSTER_DIR/kubeconfig"
kubectl="$CLUSTER_DIR/bin/kubectl"
helm="$CLUSTER_DIR/bin/helm"
node_sh=tests/controlplane/node.sh
image_repository=mailauth.local/mailauth-operator
image_tag=demo
gateway=10.88.0.1
suffix="$(od -An -N3 -tx1 /dev/urandom | tr -d ' \n')"
ns="mailauth-demo-$suffix"
system="mailauth-demo-system-$suffix"
work="$(mktemp -d /tmp/mailauth-demo.XXXXXX)"
pids=()
exposed=()
installed=""
cleanup() {
  local code=$?
  trap - ERR
  if [[ -x "$kubectl" ]] && "$kubectl" get namespace "$ns" >/dev/null 2>&1; then
    # The MailDomains first, while the operator still runs to let them go
    # (its finalizer removes what it published).
    "$kubectl" delete md --all -n "$ns" --timeout=60s >/dev/null 2>&1 || true
  fi
  [[ -n "$installed" ]] && "$helm" uninstall mailauth -n "$system" --wait --timeout 120s >/dev/null 2>&1 || true
  for n in "$ns" "$system"; do
    [[ -x "$kubectl" ]] && "$kubectl" delete namespace "$n" --wait=false >/dev/null 2>&1 || true
  done
  for port in "${exposed[@]}"; do "$node_sh" unexpose "$port" >/dev/null 2>&1 || true; done
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if ((code != 0)); then
    echo "demo failed after $((SECONDS - started)) s; logs kept in $work" >&2
    [[ -d "$CLUSTER_DIR/node" ]] && echo "node logs: $CLUSTER_DIR/node/*.log" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

say "Building the release binary and the image, starting the node (cached after the first run)"
cargo build --release --locked --quiet
NODE=1 tests/controlplane/cluster.sh up
"$node_sh" up
IMAGE="$image_repository:$image_tag" OUT="$CLUSTER_DIR/demo-image" tests/image/build.sh --import >/dev/null
"$kubectl" get nodes

say "Starting knot (RFC 2136 with TSIG) and an smtp-sink on loopback; pods reach them as $gateway"
sink_port="$(free_port)"
mkdir -p "$work/sink"
smtp-sink -u root -d "$work/sink/%M." "127.0.0.1:$sink_port" 100 >"$work/sink.log" 2>&1 &
pids+=($!)
dns_port="$(free_port)"
tsig="$(head -c 32 /dev/urandom | base64)"
mkdir -p "$work/knot/zones" "$work/knot/db" "$work/knot/run"
for zone in acme.example mail.globex.example; do
  printf '$ORIGIN %s.\n$TTL 60\n@ SOA ns.%s. hostmaster.%s. 1 3600 600 86400 60\n@ NS ns.%s.\nns A 127.0.0.1\n' \
    "$zone" "$zone" "$zone" "$zone" >"$work/knot/zones/$zone.zone"
done
cat >"$work/knot/knot.conf" <<CONF
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
CONF
knotd -c "$work/knot/knot.conf" >"$work/knot.log" 2>&1 &
pids+=($!)
wait_until 15 knot kdig +short @127.0.0.1 -p "$dns_port" SOA acme.example
for port in "$dns_port" "$sink_port"; do "$node_sh" expose "$port"; exposed+=("$port"); done

say "Installing the chart (charts/mailauth-operator) with the image $image_repository:$image_tag"
"$kubectl" create namespace "$system" >/dev/null
installed=yes
"$helm" install mailauth charts/mailauth-operator --namespace "$system" \
  --set image.repository="$image_repository" --set image.tag="$image_tag" --set image.pullPolicy=Never \
  --set "dns.servers[0]=$gateway:$dns_port" >/dev/null
"$kubectl" rollout status deployment/mailauth-mailauth-operator -n "$system" --timeout=120s
echo "Lease held by: $("$kubectl" get lease mailauth-mailauth-operator -n "$system" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || echo '(not yet)')"

say "Applying examples/ into namespace $ns, pointed at the local sink and knot"
"$kubectl" create namespace "$ns" >/dev/null
# The example relay admits namespaces labelled for it (allowedNamespaces).
"$kubectl" label namespace "$ns" mailauth.dev/relay=shared >/dev/null
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj "/CN=relay.platform.example" \
  -keyout "$work/tls.key" -out "$work/tls.crt" >/dev/null 2>&1
"$kubectl" create secret tls relay-tls -n "$ns" --cert "$work/tls.crt" --key "$work/tls.key" >/dev/null
"$kubectl" create secret generic acme-tsig -n "$ns" --from-literal=secret="$tsig" >/dev/null
"$kubectl" apply -n "$ns" -f - >/dev/null <<YAML
apiVersion: mailauth.dev/v1alpha1
kind: DNSProvider
metadata: {name: acme-dns}
spec:
  zones: [acme.example]
  rfc2136: {server: "$gateway:$dns_port", tsigKeyName: demo, tsigSecretRef: {name: acme-tsig}}
  ttl: 60
YAML
# The demo relay forwards to the local sink, without TLS; tenants' SPF
# authorizes the address the sink sees.
sed -e "s/host: smtp.platform.example/host: \"$gateway\"/" -e "s/port: 25$/port: $sink_port/" \
  -e 's/tls: StartTLS/tls: None/' -e 's/include: _spf.platform.example/include: null/' \
  -e "s/- 192.0.2.10/- $gateway/" -e '/- 2001:db8::10/d' examples/mailrelay.yaml >"$work/mailrelay.yaml"
"$kubectl" apply -n "$ns" -f "$work/mailrelay.yaml" -f examples/maildomain.yaml -f examples/maildomain-dual.yaml
"$kubectl" patch md acme -n "$ns" --type merge -p '{"spec":{"dns":{"providerRef":{"name":"acme-dns"}}}}' >/dev/null

say "Waiting for acme.example to be published and Ready, and for the relay's pods"
"$kubectl" wait --for=condition=DNSPublished md/acme -n "$ns" --timeout=120s
"$kubectl" wait --for=condition=Ready md/acme -n "$ns" --timeout=120s
wait_until 60 "the relay Deployment" "$kubectl" get deployment shared-relay -n "$ns"
"$kubectl" rollout status deployment/shared-relay -n "$ns" --timeout=120s
pod_ip="$("$kubectl" get pods -n "$ns" -l app.kubernetes.io/name=mailauth-relay \
  -o jsonpath='{.items[0].status.podIP}')"
[[ -n "$pod_ip" ]] || fail "no relay pod IP"
relay_serves() { curl -fsS "http://$pod_ip:9090/metrics" | grep -qx 'mailauth_relay_config_domains 1'; }
wait_until 60 "the relay pod $pod_ip to serve acme.example" relay_serves
echo "What the operator published (status.published), as knot serves it:"
"$kubectl" get md acme -n "$ns" -o jsonpath='{range .status.published[*]}{.name}{"\n"}{end}' |
  while read -r name; do printf '  %s TXT ' "$name"; kdig +short @127.0.0.1 -p "$dns_port" "$name" TXT | cut -c1-70; done

say "Sending a message with swaks to the relay pod $pod_ip:587 (STARTTLS, AUTH with the tenant's credentials)"
user="$("$kubectl" get secret acme-smtp -n "$ns" -o go-template='{{.data.username | base64decode}}')"
pass="$("$kubectl" get secret acme-smtp -n "$ns" -o go-template='{{.data.password | base64decode}}')"
# The password goes on stdin, never in argv.
printf '%s\n' "$pass" | swaks --server "$pod_ip:587" --tls --auth PLAIN --auth-user="$user" --auth-password \
  --from hola@acme.example --to customer@example.net \
  --header "Subject: Hello from acme, signed by a relay pod" \
  --body "This message left through the platform's relay." --hide-all ||
  fail "swaks could not submit the message to the relay pod"
wait_until 30 "the message at the sink" bash -c "ls '$work/sink' | grep -q ."
stored="$(ls "$work/sink"/* | head -1)"

say "Verifying the DKIM signature with dkimpy (keys from knot)"
/usr/bin/python3 - "$stored" "$dns_port" <<'PY'
import sys, dkim, dns.resolver
message = open(sys.argv[1], "rb").read().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
resolver = dns.resolver.Resolver(configure=False)
resolver.nameservers, resolver.port, resolver.cache = ["127.0.0.1"], int(sys.argv[2]), None
def txt(name, timeout=5):
    name = name.decode() if isinstance(name, bytes) else name
    return b"".join(b"".join(r.strings) for r in resolver.resolve(name, "TXT", lifetime=timeout))
signatures = [l for l in message.split(b"\r\n") if l.lower().startswith(b"dkim-signature")]
if not signatures:
    sys.exit("the stored message has no DKIM-Signature")
print(signatures[0][:120].decode() + "...")
if not dkim.verify(message, dnsfunc=txt):
    sys.exit("DKIM verification FAILED")
print("dkimpy: signature verified")
PY

say "Report"
"$kubectl" get pods,md,mr -n "$ns" -o wide
echo
"$kubectl" get pods -n "$system"
echo
echo "Demo complete in $((SECONDS - started)) s: a message through relay pod $pod_ip, signed for acme.example" \
  "with selector $("$kubectl" get md acme -n "$ns" -o jsonpath='{.status.dkim.activeSelector}'), verified by dkimpy."
echo "Cleaning up (the node stays up for the next run: make node-down stops it)."
