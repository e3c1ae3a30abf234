# Helpers shared by the bench scripts (sourced, not run). Before sourcing,
# set BENCH_NAME (the log prefix), kubeconfig and kubectl.

log() { echo "$BENCH_NAME: $*" >&2; }
die() {
  echo "$BENCH_NAME: FAILED: $*" >&2
  exit 1
}
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
k() { KUBECONFIG="$kubeconfig" "$kubectl" "$@"; }
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.3f}')" "$1" "$2"; }
stop_pid() { # stop_pid PID: TERM, then KILL after 10 s
  local pid="$1"
  [[ -n "$pid" ]] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
