#!/usr/bin/env bash
# A real local Kubernetes control plane (etcd + kube-apiserver, no kubelet),
# as controller-runtime's envtest runs it, on 127.0.0.1.
#
#   cluster.sh up     start it in the background (or reuse a running one)
#   cluster.sh down   stop it and remove its state
#   cluster.sh status exit 0 when it answers
#   cluster.sh restart-apiserver  stop and start kube-apiserver (recovery tests)
#
# State lives in ${CLUSTER_DIR:-<repo>/target/cluster}: kubeconfig, certs,
# logs, pids, and bin/ with the matching kubectl and helm.
#
# NODE=1 cluster.sh up starts the API server ready for a node (node.sh): the
# Node authorizer and NodeRestriction, the ServiceAccount admission plugin,
# and a client certificate for kubelet calls (logs, exec). The choice is
# written to <state>/node-mode and kept by restart-apiserver. Without NODE=1
# nothing changes.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
dir="${CLUSTER_DIR:-$repo/target/cluster}"
kubeconfig="$dir/kubeconfig"

log() { echo "cluster: $*" >&2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_for() { # wait_for <seconds> <description> <command...>
  local deadline=$((SECONDS + $1)) what="$2"
  shift 2
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS >= deadline)); then
      log "$what did not come up; last lines of its log:"
      tail -n 30 "$dir/$what.log" >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

running() {
  [[ -f "$kubeconfig" ]] && "$dir/bin/kubectl" --kubeconfig "$kubeconfig" --request-timeout=5s get --raw /readyz >/dev/null 2>&1
}

stop() {
  for name in kube-apiserver etcd; do
    if [[ -f "$dir/$name.pid" ]]; then
      local pid
      pid="$(cat "$dir/$name.pid")"
      if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
      fi
      rm -f "$dir/$name.pid"
    fi
  done
}

make_certs() {
  local pki="$dir/pki"
  mkdir -p "$pki"
  (
    cd "$pki"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=mailauth-test-ca" \
      -keyout ca.key -out ca.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout apiserver.key -out apiserver.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1\nextendedKeyUsage=serverAuth\n' > apiserver.ext
    openssl x509 -req -in apiserver.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile apiserver.ext -out apiserver.crt 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=admin" -keyout admin.key -out admin.csr 2>/dev/null
    printf 'extendedKeyUsage=clientAuth\n' > admin.ext
    openssl x509 -req -in admin.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
      -extfile admin.ext -out admin.crt 2>/dev/null
    openssl genrsa -out sa.key 2048 2>/dev/null
    openssl rsa -in sa.key -pubout -out sa.pub 2>/dev/null
    if [[ "${NODE:-}" == 1 ]]; then
      openssl req -newkey rsa:2048 -nodes -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
        -keyout kubelet-client.key -out kubelet-client.csr 2>/dev/null
      openssl x509 -req -in kubelet-client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 \
        -extfile admin.ext -out kubelet-client.crt 2>/dev/null
    fi
  )
}

write_kubeconfig() {
  local port="$1" pki="$dir/pki"
  cat > "$kubeconfig.tmp" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: mailauth-local
  cluster:
    server: https://127.0.0.1:$port
    certificate-authority-data: $(base64 -w0 < "$pki/ca.crt")
users:
- name: admin
  user:
    client-certificate-data: $(base64 -w0 < "$pki/admin.crt")
    client-key-data: $(base64 -w0 < "$pki/admin.key")
contexts:
- name: mailauth-local
  context:
    cluster: mailauth-local
    user: admin
    namespace: default
current-context: mailauth-local
EOF
  mv "$kubeconfig.tmp" "$kubeconfig"
}

start_apiserver() { # start_apiserver <bin dir> <etcd port> <api port>
  local bin="$1" etcd_port="$2" api_port="$3" pki="$dir/pki"
  # Without a node (the default): RBAC only, and no ServiceAccount admission
  # (no controller-manager makes the accounts it would require).
  local mode=(--authorization-mode RBAC --disable-admission-plugins ServiceAccount)
  if [[ -f "$dir/node-mode" ]]; then
    mode=(
      --authorization-mode Node,RBAC
      --enable-admission-plugins NodeRestriction
      --kubelet-client-certificate "$pki/kubelet-client.crt"
      --kubelet-client-key "$pki/kubelet-client.key"
      --kubelet-preferred-address-types InternalIP
    )
  fi
  setsid "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --cert-dir "$pki" \
    --tls-cert-file "$pki/apiserver.crt" \
    --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --secure-port "$api_port" \
    --bind-address 127.0.0.1 \
    --advertise-address 127.0.0.1 \
    --service-cluster-ip-range 10.0.0.0/24 \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" \
    "${mode[@]}" \
    --allow-privileged=true \
    --endpoint-reconciler-type=none \
    >>"$dir/kube-apiserver.log" 2>&1 </dev/null 9>&- &
  echo $! > "$dir/kube-apiserver.pid"
}

# Stops kube-apiserver and starts it again on the same port and etcd, for
# tests that show clients recover by themselves.
restart_apiserver() {
  local bin ports pid
  bin="$("$here/build.sh")"
  if [[ ! -f "$dir/ports" ]]; then
    # Started by an older version of this script: read the ports back from
    # the running processes.
    etcd_port="$(tr '\0' ' ' < "/proc/$(cat "$dir/etcd.pid")/cmdline" | grep -o 'listen-client-urls http://127.0.0.1:[0-9]*' | grep -o '[0-9]*$')"
    api_port="$(tr '\0' ' ' < "/proc/$(cat "$dir/kube-apiserver.pid")/cmdline" | grep -o 'secure-port [0-9]*' | grep -o '[0-9]*$')"
    echo "$etcd_port $api_port" > "$dir/ports"
  fi
  read -r etcd_port api_port < "$dir/ports"
  pid="$(cat "$dir/kube-apiserver.pid")"
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  start_apiserver "$bin" "$etcd_port" "$api_port"
  wait_for 120 kube-apiserver running
  log "kube-apiserver restarted"
}

up() {
  mkdir -p "$dir"
  # One starter at a time: parallel test binaries may all ask at once. The
  # daemons must not inherit the lock's descriptor (9>&- below), or the lock
  # would be held for as long as they run.
  exec 9>"$dir/.lock"
  flock 9
  local bin
  bin="$("$here/build.sh")"
  mkdir -p "$dir/bin"
  ln -sf "$bin/kubectl" "$dir/bin/kubectl"
  ln -sf "$bin/helm" "$dir/bin/helm"
  if running; then
    if [[ "${NODE:-}" == 1 && ! -f "$dir/node-mode" ]]; then
      log "running without NODE=1 ($kubeconfig): run cluster.sh down first"
      return 1
    fi
    log "already running ($kubeconfig)"
    return 0
  fi
  stop
  rm -rf "$dir/etcd-data" "$dir/pki" "$kubeconfig" "$dir/node-mode"
  make_certs
  if [[ "${NODE:-}" == 1 ]]; then echo node > "$dir/node-mode"; fi

  local etcd_port etcd_peer_port api_port
  etcd_port="$(free_port)"
  etcd_peer_port="$(free_port)"
  api_port="$(free_port)"

  setsid "$bin/etcd" \
    --name mailauth-test \
    --data-dir "$dir/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "mailauth-test=http://127.0.0.1:$etcd_peer_port" \
    --unsafe-no-fsync \
    --quota-backend-bytes 8589934592 \
    >"$dir/etcd.log" 2>&1 </dev/null 9>&- &
  echo $! > "$dir/etcd.pid"
  wait_for 60 etcd curl -fsS "http://127.0.0.1:$etcd_port/health"

  echo "$etcd_port $api_port" > "$dir/ports"
  start_apiserver "$bin" "$etcd_port" "$api_port"
  write_kubeconfig "$api_port"
  wait_for 120 kube-apiserver running
  # The default namespace and RBAC bootstrap roles appear shortly after
  # /readyz; tests create namespaces and roles right away.
  wait_for 60 kube-apiserver "$dir/bin/kubectl" --kubeconfig "$kubeconfig" get namespace default
  log "up: KUBECONFIG=$kubeconfig (kubectl and helm in $dir/bin)"
}

case "${1:-}" in
  up) up ;;
  down)
    # A node of this cluster (node.sh) goes first: its kubelet and pods.
    if [[ -d "$dir/node" ]]; then CLUSTER_DIR="$dir" "$here/node.sh" down; fi
    stop; rm -rf "$dir/etcd-data" "$dir/pki" "$kubeconfig" "$dir/node-mode"; log "down" ;;
  status) running ;;
  restart-apiserver) restart_apiserver ;;
  *) echo "usage: $0 up|down|status|restart-apiserver" >&2; exit 2 ;;
esac
