#!/usr/bin/env bash
# A real node for the local control plane (cluster.sh), on this machine, as
# root: containerd and runc from Debian, CNI bridge + host-local, and
# kube-controller-manager, kube-scheduler and kubelet built from the pinned
# Kubernetes module (build.sh node). No image is ever pulled: the pod sandbox
# image is built here, and pods use images imported into this containerd
# (`node.sh import FILE.tar`) with a pull policy that never reaches a
# registry.
#
#   NODE=1 cluster.sh up && node.sh up   start the node, wait until it is Ready
#   node.sh down                         stop it, its pods and containers, and
#                                        remove its state
#   node.sh status                       exit 0 when the node is Ready
#   node.sh import FILE.tar              import a docker-archive image
#   node.sh ctr ARGS...                  ctr against this node's containerd
#   node.sh expose PORT / unexpose PORT  pods reach 127.0.0.1:PORT as
#                                        10.88.0.1:PORT (tcp and udp)
#
# The cluster is the one in ${CLUSTER_DIR:-<repo>/target/cluster}; the node's
# state (certificates, configs, containerd and kubelet roots, logs, pids)
# lives in <cluster dir>/node.
#
# Network: pods live in network namespaces on the bridge mailauth0, in
# 10.88.0.0/16 (gateway 10.88.0.1, the host). Nothing is forwarded out of the
# bridge (IP forwarding stays as it is and a FORWARD rule drops what would
# leave it): pods reach the host and each other only. The API server listens
# on 127.0.0.1; the `kubernetes` Service address 10.0.0.1:443 that pods use
# is DNAT-ed to it (route_localnet on the bridge). There is no kube-proxy:
# other ClusterIPs do not route, reach pods by their IPs. `node.sh expose
# PORT` lets pods reach a test's server on 127.0.0.1:PORT as 10.88.0.1:PORT.
# containerd, its shims and the kubelet run in a cgroup of their own whose
# traffic may only go to loopback and the bridge: an image that is not
# imported fails to pull at once, no request leaves this machine.
set -Eeuo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cluster="$(realpath -m "${CLUSTER_DIR:-$repo/target/cluster}")"
dir="$cluster/node"
kubectl=("$cluster/bin/kubectl" --kubeconfig "$cluster/kubeconfig")
node_name="${NODE_NAME:-mailauth-node}"
bridge=mailauth0
pod_cidr=10.88.0.0/16
gateway=10.88.0.1
service_ip=10.0.0.1
chain=MAILAUTH-NODE
egress_chain=MAILAUTH-NODE-EGRESS
cgroup_name=mailauth-node
pause_image=mailauth.local/pause:1
sock="$dir/containerd/containerd.sock"
# One node per machine (the bridge, the pod CIDR, the netfilter chains and
# the cgroup are the machine's): this file names the state dir of the node
# that owns them.
owner_file=/run/mailauth-node.owner

log() { echo "node: $*" >&2; }
trap 'log "FAILED (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
die() { log "FAILED: $*"; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_for() { # wait_for <seconds> <what (its log: $dir/<what>.log)> <command...>
  local deadline=$((SECONDS + $1)) what="$2"
  shift 2
  until "$@" >/dev/null 2>&1; do
    if [[ -f "$dir/$what.pid" ]] && ! kill -0 "$(cat "$dir/$what.pid")" 2>/dev/null; then
      log "$what exited; last lines of $dir/$what.log:"
      tail -n 40 "$dir/$what.log" >&2 || true
      die "$what exited"
    fi
    if ((SECONDS >= deadline)); then
      log "$what did not come up within $1 s; last lines of $dir/$what.log:"
      tail -n 40 "$dir/$what.log" >&2 || true
      die "$what did not come up"
    fi
    sleep 0.2
  done
}

start() { # start <name> <command...>: in the background, log and pid in $dir
  local name="$1"
  shift
  setsid "$@" >>"$dir/$name.log" 2>&1 </dev/null 9>&- &
  echo $! > "$dir/$name.pid"
}

# The cgroup v2 directory whose processes' traffic network_up confines
# (the unified hierarchy of a hybrid cgroup v1 machine, or the root of v2).
egress_cgroup() {
  local root
  root="$(findmnt -n -t cgroup2 -o TARGET | head -n1)"
  [[ -n "$root" ]] || die "no cgroup2 hierarchy is mounted (needed to confine containerd's traffic)"
  echo "$root/$cgroup_name"
}

start_confined() { # start_confined <name> <command...>: start, in the egress cgroup
  local name="$1" cg
  shift
  cg="$(egress_cgroup)"
  mkdir -p "$cg"
  start "$name" bash -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg" "$@"
}

stop_process() { # stop_process <name>
  local pid
  [[ -f "$dir/$1.pid" ]] || return 0
  pid="$(cat "$dir/$1.pid")"
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$dir/$1.pid"
}

ctr_() { ctr --address "$sock" --namespace k8s.io "$@"; }

node_ready() {
  [[ "$("${kubectl[@]}" get node "$node_name" \
    -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status} {.spec.taints[*].key}' 2>/dev/null)" == "True " ]]
}

processes_alive() {
  local name
  for name in containerd kube-controller-manager kube-scheduler kubelet; do
    [[ -f "$dir/$name.pid" ]] && kill -0 "$(cat "$dir/$name.pid")" 2>/dev/null || return 1
  done
}

preflight() {
  ((EUID == 0)) || die "run as root (containerd, network namespaces, cgroups)"
  local tool
  for tool in containerd containerd-shim-runc-v2 runc ctr iptables ip openssl; do
    command -v "$tool" >/dev/null || die "$tool is missing (make deps: containerd runc iptables)"
  done
  for tool in bridge host-local loopback portmap; do
    [[ -x "/usr/lib/cni/$tool" ]] || die "CNI plugin /usr/lib/cni/$tool is missing (containernetworking-plugins)"
  done
  [[ -f "$cluster/kubeconfig" ]] && "${kubectl[@]}" --request-timeout=5s get --raw /readyz >/dev/null 2>&1 ||
    die "the control plane in $cluster is not running: NODE=1 $here/cluster.sh up"
  [[ -f "$cluster/node-mode" ]] ||
    die "the control plane in $cluster was started without NODE=1 (no ServiceAccount admission, no Node authorizer): cluster.sh down, then NODE=1 cluster.sh up"
  if ip -o addr show | grep -v " $bridge " | grep -q ' inet 10\.88\.'; then
    die "$pod_cidr is in use on this machine"
  fi
  local owner
  owner="$(cat "$owner_file" 2>/dev/null || true)"
  if [[ -n "$owner" && "$owner" != "$dir" && -d "$owner" ]]; then
    die "the node of $owner runs on this machine (one node per machine): CLUSTER_DIR=$(dirname "$owner") $0 down"
  fi
}

# Client certificates from the cluster's CA, and a kubeconfig for each.
make_identity() { # make_identity <name> <subject>
  local name="$1" subject="$2" pki="$dir/pki" api
  openssl req -newkey rsa:2048 -nodes -subj "$subject" -keyout "$pki/$name.key" -out "$pki/$name.csr" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' > "$pki/client.ext"
  openssl x509 -req -in "$pki/$name.csr" -CA "$cluster/pki/ca.crt" -CAkey "$cluster/pki/ca.key" \
    -CAcreateserial -CAserial "$pki/ca.srl" -days 3650 -extfile "$pki/client.ext" -out "$pki/$name.crt" 2>/dev/null
  api="$("${kubectl[@]}" config view -o 'jsonpath={.clusters[0].cluster.server}')"
  cat > "$dir/$name.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mailauth-local
  cluster:
    server: $api
    certificate-authority: $cluster/pki/ca.crt
users:
- name: $name
  user:
    client-certificate: $pki/$name.crt
    client-key: $pki/$name.key
contexts:
- name: $name
  context: {cluster: mailauth-local, user: $name}
current-context: $name
EOF
}

write_configs() {
  local kubelet_port="$1" healthz_port="$2"
  mkdir -p "$dir/cni/net.d" "$dir/containerd" "$dir/kubelet"
  # No ipMasq, no isGateway: the bridge gets its address from us and pods
  # route through it to the host, never further.
  cat > "$dir/cni/net.d/10-mailauth.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "mailauth",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "$bridge",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$dir/cni/ipam",
        "ranges": [[{"subnet": "$pod_cidr", "gateway": "$gateway"}]],
        "routes": [{"dst": "0.0.0.0/0", "gw": "$gateway"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
EOF
  cat > "$dir/containerd/config.toml" <<EOF
version = 2
root = "$dir/containerd/root"
state = "$dir/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "$sock"

[ttrpc]
  address = "$dir/containerd/containerd.sock.ttrpc"

[debug]
  address = "$dir/containerd/debug.sock"

[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$pause_image"
  disable_apparmor = true
  enable_selinux = false
  stream_server_address = "127.0.0.1"
  # This machine's root lacks CAP_SYS_RESOURCE: runc cannot lower a
  # container's oom_score_adj (the kubelet asks -998 for sandboxes), so
  # containers keep containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$dir/containerd/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni/net.d"
EOF
  # resolvConf "": pods get no name servers from this machine (the network
  # rule: nothing leaves it). Eviction and image GC thresholds are near zero:
  # a test node must not evict its pods or delete imported images because
  # the shared disk is fuller than a production node's would be.
  cat > "$dir/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: true
address: $gateway
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $healthz_port
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: false
  x509:
    clientCAFile: $cluster/pki/ca.crt
authorization:
  mode: Webhook
containerRuntimeEndpoint: unix://$sock
imageServiceEndpoint: unix://$sock
clusterDomain: cluster.local
podLogsDir: $dir/kubelet/pod-logs
# No CAP_SYS_RESOURCE here (see restrict_oom_score_adj above).
oomScoreAdj: 0
resolvConf: ""
registerNode: true
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  nodefs.inodesFree: 1%
  imagefs.available: 1%
  imagefs.inodesFree: 1%
EOF
}

# The pod sandbox image: a static binary that waits for SIGTERM.
pause_tarball() {
  local work="$dir/pause"
  mkdir -p "$work/rootfs"
  (cd "$here/node/pause" && CGO_ENABLED=0 GOFLAGS=-mod=mod GOTOOLCHAIN=local \
    go build -trimpath -ldflags "-s -w" -o "$work/rootfs/pause" .) || die "building the pause binary"
  "$repo/tests/image/docker-archive.py" --rootfs "$work/rootfs" --tag "$pause_image" \
    --user 65535:65535 --entrypoint '["/pause"]' --out "$work/pause.tar" >/dev/null ||
    die "writing the pause image"
  echo "$work/pause.tar"
}

network_up() {
  if ! ip link show "$bridge" >/dev/null 2>&1; then
    ip link add "$bridge" type bridge
  fi
  ip addr replace "$gateway/16" dev "$bridge"
  ip link set "$bridge" up
  sysctl -qw "net.ipv4.conf.$bridge.route_localnet=1"
  local api_port
  api_port="$("${kubectl[@]}" config view -o 'jsonpath={.clusters[0].cluster.server}' | grep -o '[0-9]*$')"
  iptables -t nat -N "$chain" 2>/dev/null || iptables -t nat -F "$chain"
  iptables -t nat -A "$chain" -i "$bridge" -d "$service_ip/32" -p tcp --dport 443 \
    -j DNAT --to-destination "127.0.0.1:$api_port"
  iptables -t nat -C PREROUTING -j "$chain" 2>/dev/null || iptables -t nat -I PREROUTING -j "$chain"
  iptables -N "$chain" 2>/dev/null || iptables -F "$chain"
  iptables -A "$chain" -i "$bridge" ! -o "$bridge" -j DROP
  iptables -C FORWARD -j "$chain" 2>/dev/null || iptables -I FORWARD -j "$chain"
  # containerd (image pulls), its shims and the kubelet: loopback and the
  # bridge only. REJECT, so a pull of a missing image fails at once.
  local cg
  cg="$(egress_cgroup)"
  mkdir -p "$cg"
  iptables -N "$egress_chain" 2>/dev/null || iptables -F "$egress_chain"
  iptables -A "$egress_chain" -o lo -j RETURN
  iptables -A "$egress_chain" -o "$bridge" -j RETURN
  iptables -A "$egress_chain" -j REJECT
  iptables -C OUTPUT -m cgroup --path "$cgroup_name" -j "$egress_chain" 2>/dev/null ||
    iptables -I OUTPUT -m cgroup --path "$cgroup_name" -j "$egress_chain"
}

# What the node adds to the machine's netfilter: an address the pods use
# for a server a test runs on 127.0.0.1 (tcp and udp).
expose() { # expose <port>
  local port="$1" proto
  [[ "$port" =~ ^[0-9]+$ ]] || die "usage: $0 expose PORT"
  for proto in tcp udp; do
    iptables -t nat -C "$chain" -i "$bridge" -d "$gateway/32" -p "$proto" --dport "$port" \
      -j DNAT --to-destination "127.0.0.1:$port" 2>/dev/null ||
      iptables -t nat -A "$chain" -i "$bridge" -d "$gateway/32" -p "$proto" --dport "$port" \
        -j DNAT --to-destination "127.0.0.1:$port"
  done
}

unexpose() { # unexpose <port>
  local port="$1" proto
  for proto in tcp udp; do
    iptables -t nat -D "$chain" -i "$bridge" -d "$gateway/32" -p "$proto" --dport "$port" \
      -j DNAT --to-destination "127.0.0.1:$port" 2>/dev/null || true
  done
}

network_down() {
  iptables -t nat -D PREROUTING -j "$chain" 2>/dev/null || true
  iptables -t nat -F "$chain" 2>/dev/null || true
  iptables -t nat -X "$chain" 2>/dev/null || true
  iptables -D FORWARD -j "$chain" 2>/dev/null || true
  iptables -F "$chain" 2>/dev/null || true
  iptables -X "$chain" 2>/dev/null || true
  iptables -D OUTPUT -m cgroup --path "$cgroup_name" -j "$egress_chain" 2>/dev/null || true
  iptables -F "$egress_chain" 2>/dev/null || true
  iptables -X "$egress_chain" 2>/dev/null || true
  # The chains the kubelet makes (KUBE-FIREWALL, KUBE-KUBELET-CANARY); no
  # other kubelet runs on this machine.
  local table rule kube_chain
  for table in filter nat mangle; do
    while read -r rule; do
      eval "iptables -t $table ${rule/-A /-D }" 2>/dev/null || true
    done < <(iptables -t "$table" -S 2>/dev/null | grep -E '^-A [A-Z]+ .*-j KUBE-(FIREWALL|KUBELET-CANARY)$' || true)
    for kube_chain in KUBE-FIREWALL KUBE-KUBELET-CANARY; do
      iptables -t "$table" -F "$kube_chain" 2>/dev/null || true
      iptables -t "$table" -X "$kube_chain" 2>/dev/null || true
    done
  done
  ip link del "$bridge" 2>/dev/null || true
  rmdir "$(egress_cgroup)" 2>/dev/null || true
}

up() {
  preflight
  mkdir -p "$dir"
  exec 9>"$dir/.lock"
  flock 9
  if processes_alive && node_ready; then
    log "already up: node $node_name is Ready"
    return 0
  fi
  local started=$SECONDS bin
  bin="$("$here/build.sh" node)" || die "building kubelet, kube-controller-manager, kube-scheduler"
  teardown
  echo "$dir" > "$owner_file"
  mkdir -p "$dir/pki"

  local kubelet_port healthz_port kcm_port sched_port
  kubelet_port="$(free_port)"
  healthz_port="$(free_port)"
  kcm_port="$(free_port)"
  sched_port="$(free_port)"
  echo "$kubelet_port $healthz_port $kcm_port $sched_port" > "$dir/ports"

  make_identity kubelet "/O=system:nodes/CN=system:node:$node_name"
  make_identity kube-controller-manager "/CN=system:kube-controller-manager"
  make_identity kube-scheduler "/CN=system:kube-scheduler"
  write_configs "$kubelet_port" "$healthz_port"
  network_up

  start_confined containerd containerd --config "$dir/containerd/config.toml"
  wait_for 60 containerd ctr --address "$sock" version
  ctr_ images import "$(pause_tarball)" >/dev/null || die "importing the pause image"

  start kube-controller-manager "$bin/kube-controller-manager" \
    --kubeconfig "$dir/kube-controller-manager.kubeconfig" \
    --authentication-kubeconfig "$dir/kube-controller-manager.kubeconfig" \
    --authorization-kubeconfig "$dir/kube-controller-manager.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$kcm_port" \
    --leader-elect=false \
    --controllers '*' \
    --use-service-account-credentials \
    --service-account-private-key-file "$cluster/pki/sa.key" \
    --root-ca-file "$cluster/pki/ca.crt" \
    --cluster-name mailauth-local \
    --service-cluster-ip-range 10.0.0.0/24
  start kube-scheduler "$bin/kube-scheduler" \
    --kubeconfig "$dir/kube-scheduler.kubeconfig" \
    --authentication-kubeconfig "$dir/kube-scheduler.kubeconfig" \
    --authorization-kubeconfig "$dir/kube-scheduler.kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$sched_port" \
    --leader-elect=false
  start_confined kubelet "$bin/kubelet" \
    --config "$dir/kubelet/config.yaml" \
    --kubeconfig "$dir/kubelet.kubeconfig" \
    --root-dir "$dir/kubelet/root" \
    --cert-dir "$dir/kubelet/pki" \
    --hostname-override "$node_name" \
    --node-ip "$gateway"

  wait_for 60 kube-controller-manager curl -fsSk "https://127.0.0.1:$kcm_port/healthz"
  wait_for 60 kube-scheduler curl -fsSk "https://127.0.0.1:$sched_port/healthz"
  wait_for 60 kubelet curl -fsS "http://127.0.0.1:$healthz_port/healthz"
  wait_for 120 kubelet node_ready
  # The ServiceAccount controller is what pods wait for first.
  wait_for 60 kube-controller-manager "${kubectl[@]}" get serviceaccount default -n default
  log "up in $((SECONDS - started)) s: node $node_name is Ready (pods in $pod_cidr; state in $dir)"
}

# Stops everything the node started and removes its state, whether or not
# the API server still answers: containers are killed through containerd
# (their shims outlive it), their network namespaces and mounts removed.
teardown() {
  stop_process kubelet
  stop_process kube-scheduler
  stop_process kube-controller-manager
  local netns=() id
  if [[ -S "$sock" ]] && ctr --address "$sock" version >/dev/null 2>&1; then
    for id in $(ctr_ containers ls -q 2>/dev/null); do
      while read -r ns; do [[ -n "$ns" ]] && netns+=("$ns"); done < <(
        ctr_ containers info "$id" 2>/dev/null | python3 -c '
import json, sys
spec = json.load(sys.stdin).get("Spec") or {}
for ns in (spec.get("linux") or {}).get("namespaces") or []:
    if ns.get("type") == "network" and ns.get("path"):
        print(ns["path"])' || true)
      ctr_ tasks kill -s SIGKILL "$id" >/dev/null 2>&1 || true
    done
    for id in $(ctr_ containers ls -q 2>/dev/null); do
      for _ in $(seq 50); do
        ctr_ tasks delete "$id" >/dev/null 2>&1 && break
        ctr_ tasks ls -q 2>/dev/null | grep -qx "$id" || break
        sleep 0.1
      done
      ctr_ containers delete "$id" >/dev/null 2>&1 || true
    done
  fi
  stop_process containerd
  kill_leftovers
  local ns
  for ns in "${netns[@]}"; do
    umount "$ns" 2>/dev/null || true
    rm -f "$ns"
  done
  # Secret and projected volumes (tmpfs), rootfs overlays, netns files.
  if [[ -d "$dir" ]]; then
    { findmnt -rn -o TARGET | grep "^$dir/" || true; } | sort -r | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  fi
  network_down
  # The pods' cgroups (kubelet with cgroupfs: /kubepods in every hierarchy).
  local sub
  for sub in /sys/fs/cgroup/*/kubepods; do
    [[ -d "$sub" ]] && find "$sub" -depth -type d -exec rmdir {} + 2>/dev/null || true
  done
  rm -rf "$dir/containerd" "$dir/kubelet" "$dir/cni" "$dir/pki" "$dir/pause" "$dir"/*.kubeconfig "$dir/ports"
}

# Whatever is left in the node's cgroup: containerd's shims (they outlive
# containerd), or anything a crashed run left behind. Nothing else is in it.
kill_leftovers() {
  local cg pid
  cg="$(egress_cgroup)"
  [[ -f "$cg/cgroup.procs" ]] || return 0
  for _ in $(seq 50); do
    [[ -s "$cg/cgroup.procs" ]] || return 0
    while read -r pid; do kill -9 "$pid" 2>/dev/null || true; done < "$cg/cgroup.procs"
    sleep 0.1
  done
  log "processes left in $cg: $(tr '\n' ' ' < "$cg/cgroup.procs")"
}

case "${1:-}" in
  up) up ;;
  down)
    ((EUID == 0)) || die "run as root"
    if [[ -d "$dir" ]]; then
      exec 9>"$dir/.lock"
      flock 9
      teardown
      rm -rf "$dir"
      if [[ "$(cat "$owner_file" 2>/dev/null)" == "$dir" ]]; then rm -f "$owner_file"; fi
    fi
    log "down" ;;
  status) trap - ERR; processes_alive && node_ready ;;
  import)
    trap - ERR
    [[ -f "${2:-}" ]] || die "usage: $0 import FILE.tar"
    ctr_ images import "$2" ;;
  ctr) trap - ERR; shift; ctr_ "$@" ;;
  expose) expose "${2:-}" ;;
  unexpose) unexpose "${2:-}" ;;
  *) echo "usage: $0 up|down|status|import FILE.tar|ctr ARGS...|expose PORT|unexpose PORT" >&2; exit 2 ;;
esac
