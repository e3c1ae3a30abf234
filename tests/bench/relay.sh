#!/usr/bin/env bash
# Relay benchmark (docs/product.md "Targets", issue 5 item 9): messages/s
# through `mailauth-operator relay` (STARTTLS, AUTH PLAIN, RSA-2048 signing,
# forwarding to Postfix's smtp-sink), the relay's CPU time per message next
# to what mail-auth needs to sign the same messages alone (the sign_only
# bench, same run), the latency the relay adds (the same generator straight
# to the sink), and the same generator and sink through Postfix + OpenDKIM.
#
# Everything listens on 127.0.0.1; every process started here is stopped on
# exit. Results: a table on stdout and in target/bench/relay.txt.
#
# A second matrix (issue 14) uses a client that sends one command per round
# trip, as Go's net/smtp and most application mailers do, with 1 and 50
# messages per connection, and sets the relay next to the same generator
# sent straight to the sink.
#
#   tests/bench/relay.sh                     # full run, a few minutes
#   RELAY_BENCH_MESSAGES=500 tests/bench/relay.sh   # quicker, noisier
#   RELAY_BENCH_POSTFIX=0 tests/bench/relay.sh      # skip Postfix + OpenDKIM
#   RELAY_BENCH_ONLY=lockstep tests/bench/relay.sh  # only the lockstep matrix
#
# Needs: postfix (smtp-sink), opendkim, openssl, python3.
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$PWD
MESSAGES=${RELAY_BENCH_MESSAGES:-2000}
WITH_POSTFIX=${RELAY_BENCH_POSTFIX:-1}
ONLY=${RELAY_BENCH_ONLY:-all}
OUT_DIR=$ROOT/target/bench
OUT=$OUT_DIR/relay.txt
mkdir -p "$OUT_DIR"

# Postfix's daemons run as user postfix and must reach their directories
# below this one: others may traverse it, not list it. (OpenDKIM would
# refuse the key below /tmp, which is world-writable; RequireSafeKeys is
# off below.)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/relay-bench.XXXXXX")
chmod 0711 "$WORK"
PIDS=()
POSTFIX_DIR=""

cleanup() {
    set +e
    if [[ -n $POSTFIX_DIR && -f $POSTFIX_DIR/queue/pid/master.pid ]]; then
        postfix -c "$POSTFIX_DIR/etc" stop >/dev/null 2>&1
        # `postfix stop` returns before the master has gone.
        local master
        master=$(tr -d ' ' <"$POSTFIX_DIR/queue/pid/master.pid" 2>/dev/null)
        for _ in $(seq 100); do
            [[ -n $master ]] && kill -0 "$master" 2>/dev/null || break
            sleep 0.1
        done
    fi
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null
    done
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { printf '%s\n' "$*" >&2; }
die() {
    log "relay bench: $*"
    exit 1
}

for tool in smtp-sink openssl python3; do
    command -v "$tool" >/dev/null || die "$tool is missing (apt-get install postfix openssl python3)"
done

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Waits (at most 20 s) until something accepts connections on port $1.
wait_port() {
    local port=$1
    for _ in $(seq 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    die "nothing listens on 127.0.0.1:$port"
}

now_ns() { date +%s%N; }

# utime + stime of process $1, in clock ticks.
proc_cpu_ticks() {
    awk '{ print $14 + $15 }' "/proc/$1/stat"
}

# CPU ticks Postfix and OpenDKIM have used: the master with its reaped
# children (smtpd, cleanup, smtp... come and go), its live children, and
# opendkim. Processes that vanish between the listing and the read are
# skipped.
postfix_cpu_ticks() {
    local master
    master=$(tr -d ' ' <"$POSTFIX_DIR/queue/pid/master.pid")
    {
        awk '{ print $14 + $15 + $16 + $17 }' "/proc/$master/stat"
        for child in $(pgrep -P "$master"); do
            awk '{ print $14 + $15 }' "/proc/$child/stat" 2>/dev/null || true
        done
        awk '{ print $14 + $15 }' "/proc/$OPENDKIM_PID/stat"
    } | awk '{ total += $1 } END { print total }'
}

TICKS_PER_SECOND=$(getconf CLK_TCK)
# Other work on the machine skews every figure here: say how busy it was.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

### Build #####################################################################

log "building (release)"
cargo build --release --locked --quiet
bench_binary() {
    cargo build --release --locked --quiet --bench "$1" --message-format=json |
        python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    message = json.loads(line)
    if message.get("reason") == "compiler-artifact" and message["target"]["name"] == name \
            and message.get("executable"):
        print(message["executable"])
' "$1"
}
RELAY_BIN=$ROOT/target/release/mailauth-operator
LOAD_BIN=$(bench_binary smtp_load)
SIGN_BIN=$(bench_binary sign_only)
[[ -x $RELAY_BIN && -x $LOAD_BIN && -x $SIGN_BIN ]] || die "build produced no binaries"

### Keys, certificate, relay config ###########################################

DOMAIN=bench.test
SELECTOR=bench
TENANT=bench
PASSWORD=bench-password-0123456789

openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$WORK/dkim.pem" 2>/dev/null
chmod 0600 "$WORK/dkim.pem"
openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=relay.bench \
    -keyout "$WORK/tls.key" -out "$WORK/tls.crt" 2>/dev/null

# $1: config directory, $2: upstream port, $3: allow plaintext AUTH
# (true/false).
write_relay_config() {
    local dir=$1 upstream_port=$2 plaintext=${3:-false}
    mkdir -p "$dir"
    python3 - "$dir" "$upstream_port" "$WORK/dkim.pem" "$DOMAIN" "$SELECTOR" "$TENANT" "$PASSWORD" "$plaintext" <<'EOF'
import base64, hashlib, json, os, sys
directory, port, key_file, domain, selector, tenant, password, plaintext = sys.argv[1:]
salt = os.urandom(16)
digest = hashlib.sha256(salt + password.encode()).digest()
settings = {
    "hostname": "relay.bench",
    "allowPlaintextAuth": plaintext == "true",
    "upstream": {"host": "127.0.0.1", "port": int(port), "tls": "None"},
    "limits": {
        "maxMessageBytes": 26214400,
        "maxRecipients": 100,
        "maxConnections": 1000,
        "messagesPerMinute": 1000000,
        "maxUnauthenticatedConnections": 1000,
        "maxUnauthenticatedConnectionsPerSource": 1000,
    },
}
shard = {
    "tenants": [{
        "username": tenant,
        "passwordHash": "sha256$%s$%s" % (base64.b64encode(salt).decode(), base64.b64encode(digest).decode()),
        "domains": [domain],
    }],
    "domains": [{
        "domain": domain,
        "messagesPerMinute": 1000000,
        "signingKeys": [{"selector": selector, "algorithm": "RSA", "privateKeyPem": open(key_file).read()}],
    }],
}
json.dump(settings, open(os.path.join(directory, "relay.json"), "w"))
json.dump(shard, open(os.path.join(directory, "domains-0.json"), "w"))
EOF
}

### Peers #####################################################################

# Starts smtp-sink on a free port with a running message counter on its
# stdout; extra arguments (e.g. -d TEMPLATE) go before the address.
# Sets SINK_PORT, SINK_PID, SINK_COUNTER.
start_sink() {
    SINK_PORT=$(free_port)
    SINK_COUNTER=$WORK/sink-$SINK_PORT.out
    smtp-sink -c -u root "$@" "127.0.0.1:$SINK_PORT" 1000 >"$SINK_COUNTER" 2>"$WORK/sink-$SINK_PORT.err" &
    SINK_PID=$!
    PIDS+=("$SINK_PID")
    wait_port "$SINK_PORT"
}

# Messages smtp-sink has received in full (it counts at the final dot).
sink_count() {
    local counter=$1 last
    last=$(tail -c 80 "$counter" | tr '\r' '\n' | grep 'mesg=' | tail -n 1 || true)
    echo "${last##*mesg=}" | grep -E '^[0-9]+$' || echo 0
}

# Waits (bounded) until the sink behind counter $1 has counted $2 messages.
wait_sink_count() {
    local counter=$1 target=$2 deadline=$(($(date +%s) + 300))
    while (($(sink_count "$counter") < target)); do
        (($(date +%s) < deadline)) || die "the sink received $(sink_count "$counter") of $target messages"
        sleep 0.01
    done
}

# Starts the relay forwarding to port $1 ($2: allow plaintext AUTH).
# Sets RELAY_PORT, RELAY_PID.
start_relay() {
    local upstream_port=$1 plaintext=${2:-false} dir=$WORK/relay-$1-${2:-false}
    write_relay_config "$dir" "$upstream_port" "$plaintext"
    RELAY_PORT=$(free_port)
    local admin_port
    admin_port=$(free_port)
    # Production settings: JSON logs at info, one line per message.
    LOG_FORMAT=json "$RELAY_BIN" relay --config-dir "$dir" \
        --listen "127.0.0.1:$RELAY_PORT" --admin-listen "127.0.0.1:$admin_port" \
        --tls-cert "$WORK/tls.crt" --tls-key "$WORK/tls.key" >"$dir.log" 2>&1 &
    RELAY_PID=$!
    PIDS+=("$RELAY_PID")
    wait_port "$RELAY_PORT"
    for _ in $(seq 100); do
        if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
            "http://127.0.0.1:$admin_port/readyz" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    die "the relay did not become ready: $(tail -5 "$dir.log")"
}

# `key=value` field $2 of line $1.
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

# Runs the generator against port $1 with extra arguments; prints its line.
load() {
    local port=$1
    shift
    "$LOAD_BIN" --port "$port" --from "alice@$DOMAIN" "$@" || die "smtp_load failed (port $port $*)"
}

### Relay matrix ##############################################################

start_sink
MAIN_SINK_PORT=$SINK_PORT
MAIN_SINK_COUNTER=$SINK_COUNTER
start_relay "$MAIN_SINK_PORT"
MAIN_RELAY_PID=$RELAY_PID
MAIN_RELAY_PORT=$RELAY_PORT

# Warm-up: TLS session set-up, upstream pool, page cache.
load "$MAIN_RELAY_PORT" --starttls --auth "$TENANT:$PASSWORD" --messages 200 --concurrency 20 --size 10240 >/dev/null
load "$MAIN_SINK_PORT" --messages 200 --concurrency 20 --size 10240 >/dev/null

ROWS=()
RATIOS=()
# size concurrency messages
[[ $ONLY == lockstep ]] && CASES=() || CASES=(
    "2048 1 $((MESSAGES / 4))"
    "2048 20 $MESSAGES"
    "10240 1 $((MESSAGES / 4))"
    "10240 20 $MESSAGES"
    "10240 50 $MESSAGES"
    "102400 1 $((MESSAGES / 8))"
    "102400 20 $((MESSAGES / 2))"
)
for case in ${CASES[@]+"${CASES[@]}"}; do
    read -r size concurrency count <<<"$case"
    log "size $size, concurrency $concurrency, $count messages"

    direct=$(load "$MAIN_SINK_PORT" --messages "$count" --concurrency "$concurrency" --size "$size")

    before=$(sink_count "$MAIN_SINK_COUNTER")
    cpu_before=$(proc_cpu_ticks "$MAIN_RELAY_PID")
    started=$(now_ns)
    relayed=$(load "$MAIN_RELAY_PORT" --starttls --auth "$TENANT:$PASSWORD" \
        --messages "$count" --concurrency "$concurrency" --size "$size")
    # The relay answers 250 only after the sink did, so this returns at
    # once; it makes the count the sink's, as for Postfix below.
    wait_sink_count "$MAIN_SINK_COUNTER" $((before + count))
    finished=$(now_ns)
    cpu_after=$(proc_cpu_ticks "$MAIN_RELAY_PID")

    signed=$("$SIGN_BIN" --key "$WORK/dkim.pem" --domain "$DOMAIN" --selector "$SELECTOR" \
        --from "alice@$DOMAIN" --messages "$count" --size "$size")

    python3 - "$size" "$concurrency" "$count" "$started" "$finished" "$cpu_before" "$cpu_after" \
        "$TICKS_PER_SECOND" "$direct" "$relayed" "$signed" >>"$WORK/rows.txt" <<'EOF'
import sys
size, concurrency, count, started, finished, cpu_before, cpu_after, tick = map(int, sys.argv[1:9])
def fields(line):
    return dict(item.split("=", 1) for item in line.split())
direct, relayed, signed = (fields(line) for line in sys.argv[9:12])
rate = count / ((finished - started) / 1e9)
relay_cpu = (cpu_after - cpu_before) / tick * 1000 / count
sign_cpu = float(signed["cpu_ms_per_msg"])
added_p50 = float(relayed["p50_ms"]) - float(direct["p50_ms"])
added_p99 = float(relayed["p99_ms"]) - float(direct["p99_ms"])
print(f"{size // 1024:>4} KB {concurrency:>4} {count:>6} {rate:>9.0f} "
      f"{float(relayed['p50_ms']):>8.2f} {float(relayed['p99_ms']):>8.2f} "
      f"{float(direct['p50_ms']):>8.2f} {float(direct['p99_ms']):>8.2f} "
      f"{added_p50:>8.2f} {added_p99:>8.2f} "
      f"{relay_cpu:>9.3f} {sign_cpu:>9.3f} {relay_cpu / sign_cpu:>6.2f}x")
EOF
    tail -n 1 "$WORK/rows.txt" >&2
done

### Lockstep matrix ############################################################
# One command per round trip (smtp_load --client lockstep), 1 and 50
# messages per connection, AUTH PLAIN. "direct": the generator straight to
# smtp-sink (which takes any AUTH); "plain": through a relay that allows
# AUTH without TLS, so the two differ only by the relay; "tls": through the
# relay with STARTTLS, as in production. CPU per message is the relay
# process's, next to signing alone (sign_only) for the same message.

start_relay "$MAIN_SINK_PORT" true
PLAIN_RELAY_PID=$RELAY_PID
PLAIN_RELAY_PORT=$RELAY_PORT
LOCKSTEP_CONCURRENCY=20
load "$PLAIN_RELAY_PORT" --client lockstep --per-connection 50 --auth "$TENANT:$PASSWORD" \
    --messages 200 --concurrency "$LOCKSTEP_CONCURRENCY" --size 10240 >/dev/null

# $1: label, $2: relay pid, $3: port, rest: generator arguments. Prints
# "rate cpu_ms_per_msg".
relay_run() {
    local pid=$2 port=$3 count before cpu_before started finished cpu_after
    shift 3
    count=$LOCKSTEP_COUNT
    before=$(sink_count "$MAIN_SINK_COUNTER")
    cpu_before=$(proc_cpu_ticks "$pid")
    started=$(now_ns)
    load "$port" "$@" >/dev/null
    wait_sink_count "$MAIN_SINK_COUNTER" $((before + count))
    finished=$(now_ns)
    cpu_after=$(proc_cpu_ticks "$pid")
    python3 -c "import sys; c, s, f, b, a, t = map(int, sys.argv[1:]); print(f'{c / ((f - s) / 1e9):.1f} {(a - b) / t * 1000 / c:.3f}')" \
        "$count" "$started" "$finished" "$cpu_before" "$cpu_after" "$TICKS_PER_SECOND"
}

LOCKSTEP_ROWS=()
if [[ $ONLY == all || $ONLY == lockstep ]]; then
    for case in "2048 1" "2048 50" "10240 1" "10240 50" "102400 1" "102400 50"; do
        read -r size per_connection <<<"$case"
        # 50 per connection: every client sends at least one whole connection.
        LOCKSTEP_COUNT=$MESSAGES
        ((size < 102400)) || LOCKSTEP_COUNT=$((MESSAGES / 2))
        ((LOCKSTEP_COUNT >= LOCKSTEP_CONCURRENCY * per_connection)) ||
            LOCKSTEP_COUNT=$((LOCKSTEP_CONCURRENCY * per_connection))
        log "lockstep: size $size, $per_connection per connection, $LOCKSTEP_COUNT messages"
        common=(--client lockstep --per-connection "$per_connection" --auth "$TENANT:$PASSWORD"
            --messages "$LOCKSTEP_COUNT" --concurrency "$LOCKSTEP_CONCURRENCY" --size "$size")
        direct=$(load "$MAIN_SINK_PORT" "${common[@]}")
        direct_rate=$(field "$direct" rate)
        read -r plain_rate plain_cpu <<<"$(relay_run plain "$PLAIN_RELAY_PID" "$PLAIN_RELAY_PORT" "${common[@]}")"
        read -r tls_rate tls_cpu <<<"$(relay_run tls "$MAIN_RELAY_PID" "$MAIN_RELAY_PORT" "${common[@]}" --starttls)"
        signed=$("$SIGN_BIN" --key "$WORK/dkim.pem" --domain "$DOMAIN" --selector "$SELECTOR" \
            --from "alice@$DOMAIN" --messages "$LOCKSTEP_COUNT" --size "$size")
        sign_cpu=$(field "$signed" cpu_ms_per_msg)
        row=$(python3 -c "
import sys
size, per, direct, plain, tls, plain_cpu, tls_cpu, sign = sys.argv[1:]
size, per = int(size), int(per)
direct, plain, tls, plain_cpu, tls_cpu, sign = map(float, (direct, plain, tls, plain_cpu, tls_cpu, sign))
print(f'{size // 1024:>4} KB {per:>4} {direct:>9.0f} {plain:>9.0f} {plain / direct * 100:>6.0f}% {tls:>9.0f} '
      f'{sign:>8.3f} {plain_cpu:>9.3f} {plain_cpu / sign:>6.2f}x {tls_cpu:>9.3f} {tls_cpu / sign:>6.2f}x')
" "$size" "$per_connection" "$direct_rate" "$plain_rate" "$tls_rate" "$plain_cpu" "$tls_cpu" "$sign_cpu")
        LOCKSTEP_ROWS+=("$row")
        log "$row"
    done
fi

### Postfix + OpenDKIM ########################################################

COMPARISON=""
[[ $ONLY == all ]] || WITH_POSTFIX=0
if [[ $WITH_POSTFIX == 1 ]]; then
    if ! command -v postfix >/dev/null || ! command -v opendkim >/dev/null; then
        log "installing postfix and opendkim"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q postfix opendkim opendkim-tools >/dev/null ||
            die "could not install postfix and opendkim (set RELAY_BENCH_POSTFIX=0 to skip)"
    fi
    COMPARE_SIZE=10240
    COMPARE_CONCURRENCY=20
    COMPARE_COUNT=$MESSAGES
    log "Postfix + OpenDKIM vs the relay: size $COMPARE_SIZE, concurrency $COMPARE_CONCURRENCY, $COMPARE_COUNT messages"

    # A fresh sink that also stores what it receives, to check that both
    # setups really delivered signed mail.
    mkdir -p "$WORK/stored"
    start_sink -d "$WORK/stored/%M."
    COMPARE_SINK_PORT=$SINK_PORT
    COMPARE_SINK_COUNTER=$SINK_COUNTER

    # OpenDKIM: the same key, relaxed/relaxed, the relay's header list,
    # every one over-signed as the relay does.
    MILTER_PORT=$(free_port)
    cat >"$WORK/opendkim.conf" <<EOF
Syslog                  no
Mode                    s
Socket                  inet:$MILTER_PORT@127.0.0.1
PidFile                 $WORK/opendkim.pid
Domain                  $DOMAIN
Selector                $SELECTOR
KeyFile                 $WORK/dkim.pem
RequireSafeKeys         false
Canonicalization        relaxed/relaxed
SignHeaders             From,Sender,Reply-To,To,Cc,Subject,Date,Message-ID,In-Reply-To,References,MIME-Version,Content-Type,Content-Transfer-Encoding,List-Id,List-Unsubscribe,List-Unsubscribe-Post
OversignHeaders         From,Sender,Reply-To,To,Cc,Subject,Date,Message-ID,In-Reply-To,References,MIME-Version,Content-Type,Content-Transfer-Encoding,List-Id,List-Unsubscribe,List-Unsubscribe-Post
InternalHosts           127.0.0.1
EOF
    opendkim -f -x "$WORK/opendkim.conf" >"$WORK/opendkim.log" 2>&1 &
    OPENDKIM_PID=$!
    PIDS+=("$OPENDKIM_PID")
    wait_port "$MILTER_PORT"

    # A throwaway Postfix instance: its own config, queue and data
    # directories; STARTTLS like the relay, but no AUTH (Postfix needs
    # Cyrus or Dovecot for SASL), so the generator authenticates to the
    # relay only.
    POSTFIX_DIR=$WORK/postfix
    mkdir -p "$POSTFIX_DIR/etc" "$POSTFIX_DIR/queue" "$POSTFIX_DIR/data"
    chown postfix "$POSTFIX_DIR/data"
    cp /etc/postfix/master.cf "$POSTFIX_DIR/etc/master.cf"
    POSTFIX_PORT=$(free_port)
    cat >"$POSTFIX_DIR/etc/main.cf" <<EOF
compatibility_level = 3.6
queue_directory = $POSTFIX_DIR/queue
data_directory = $POSTFIX_DIR/data
maillog_file = $POSTFIX_DIR/maillog
maillog_file_prefixes = $WORK
myhostname = postfix.bench
mydomain = bench
myorigin = \$myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mydestination =
mynetworks = 127.0.0.0/8
relay_domains =
relayhost = [127.0.0.1]:$COMPARE_SINK_PORT
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_transport = error:no local delivery
smtpd_tls_security_level = may
smtpd_tls_cert_file = $WORK/tls.crt
smtpd_tls_key_file = $WORK/tls.key
smtp_tls_security_level = none
smtpd_milters = inet:127.0.0.1:$MILTER_PORT
non_smtpd_milters = \$smtpd_milters
milter_default_action = tempfail
default_process_limit = 100
smtpd_client_connection_count_limit = 0
smtpd_client_message_rate_limit = 0
anvil_rate_time_unit = 60s
EOF
    # No chroot (it would need copies of /etc files), submission on a free
    # port instead of 25.
    postconf -c "$POSTFIX_DIR/etc" -F '*/*/chroot = n'
    postconf -c "$POSTFIX_DIR/etc" -M# smtp/inet
    postconf -c "$POSTFIX_DIR/etc" -M "127.0.0.1:$POSTFIX_PORT/inet = 127.0.0.1:$POSTFIX_PORT inet n - n - - smtpd"
    postfix -c "$POSTFIX_DIR/etc" check >"$WORK/postfix-check.log" 2>&1 ||
        die "postfix check: $(cat "$WORK/postfix-check.log")"
    postfix -c "$POSTFIX_DIR/etc" start >"$WORK/postfix-start.log" 2>&1 ||
        die "postfix start: $(cat "$WORK/postfix-start.log")"
    wait_port "$POSTFIX_PORT"

    # Warm-up both, so that neither pays for process start-up in the run.
    load "$POSTFIX_PORT" --starttls --messages 100 --concurrency 20 --size "$COMPARE_SIZE" >/dev/null
    wait_sink_count "$COMPARE_SINK_COUNTER" 100
    grep -q '^DKIM-Signature:.*' "$(find "$WORK/stored" -type f | head -n 1)" ||
        die "Postfix relayed a message without a DKIM-Signature (OpenDKIM log: $(tail -3 "$WORK/opendkim.log"))"

    start_relay "$COMPARE_SINK_PORT"
    load "$RELAY_PORT" --starttls --auth "$TENANT:$PASSWORD" --messages 100 --concurrency 20 --size "$COMPARE_SIZE" >/dev/null
    wait_sink_count "$COMPARE_SINK_COUNTER" 200

    # $1: label, $2: port, $3: function printing the server's CPU ticks,
    # rest: generator arguments. A message counts when the sink has it
    # (Postfix answers 250 once queued, before delivery).
    compare_run() {
        local label=$1 port=$2 cpu=$3 before cpu_before started line finished cpu_after
        shift 3
        before=$(sink_count "$COMPARE_SINK_COUNTER")
        cpu_before=$($cpu)
        started=$(now_ns)
        line=$(load "$port" "$@" --messages "$COMPARE_COUNT" --concurrency "$COMPARE_CONCURRENCY" --size "$COMPARE_SIZE")
        wait_sink_count "$COMPARE_SINK_COUNTER" $((before + COMPARE_COUNT))
        finished=$(now_ns)
        cpu_after=$($cpu)
        python3 - "$label" "$COMPARE_COUNT" "$started" "$finished" "$cpu_before" "$cpu_after" \
            "$TICKS_PER_SECOND" "$line" <<'EOF'
import sys
label = sys.argv[1]
count, started, finished, cpu_before, cpu_after, tick = map(int, sys.argv[2:8])
fields = dict(item.split("=", 1) for item in sys.argv[8].split())
seconds = (finished - started) / 1e9
print(f"{label:<22} {count / seconds:>9.0f} {float(fields['rate']):>10.0f} "
      f"{float(fields['p50_ms']):>8.2f} {float(fields['p99_ms']):>8.2f} "
      f"{(cpu_after - cpu_before) / tick * 1000 / count:>13.2f}")
EOF
    }
    COMPARE_RELAY_PID=$RELAY_PID
    relay_cpu_ticks() { proc_cpu_ticks "$COMPARE_RELAY_PID"; }
    POSTFIX_ROW=$(compare_run "Postfix + OpenDKIM" "$POSTFIX_PORT" postfix_cpu_ticks --starttls)
    log "$POSTFIX_ROW"
    RELAY_ROW=$(compare_run "mailauth relay" "$RELAY_PORT" relay_cpu_ticks --starttls --auth "$TENANT:$PASSWORD")
    log "$RELAY_ROW"
    grep -q '^DKIM-Signature:' "$(find "$WORK/stored" -type f -newer "$WORK/opendkim.conf" | tail -n 1)" ||
        die "a stored message has no DKIM-Signature"
    postfix_rate=$(awk '{ print $(NF-4) }' <<<"$POSTFIX_ROW")
    relay_rate=$(awk '{ print $(NF-4) }' <<<"$RELAY_ROW")
    COMPARISON=$(
        printf '%-22s %9s %10s %8s %8s %12s\n' "10 KB, concurrency 20" "to sink/s" "accepted/s" "p50 ms" "p99 ms" "server ms/msg"
        printf '%s\n%s\n' "$POSTFIX_ROW" "$RELAY_ROW"
        printf 'relay / Postfix+OpenDKIM, end to end: %sx (target: at least 5x)\n' \
            "$(python3 -c "print(f'{$relay_rate / $postfix_rate:.1f}')")"
        printf 'Postfix: STARTTLS, no AUTH (no SASL backend); relay: STARTTLS + AUTH PLAIN.\n'
        printf '"to sink/s": until the sink received all %s; "accepted/s": the generator'"'"'s own rate.\n' "$COMPARE_COUNT"
        printf '"server ms/msg": CPU per message of the relay process, or of Postfix (all its processes) + OpenDKIM.\n'
    )
fi

### Report ####################################################################

{
    printf 'Relay benchmark, %s, %s cores, commit %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(nproc)" \
        "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    printf 'Load average (1, 5, 15 min) before: %s, after: %s\n' "$LOAD_BEFORE" "$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'STARTTLS + AUTH PLAIN, RSA-2048 relaxed/relaxed, smtp-sink upstream, one connection per client.\n\n'
    printf '%7s %4s %6s %9s %8s %8s %8s %8s %8s %8s %9s %9s %7s\n' \
        size conc msgs "msgs/s" "p50 ms" "p99 ms" "sink p50" "sink p99" "+p50 ms" "+p99 ms" \
        "relay ms" "sign ms" "ratio"
    [[ -f $WORK/rows.txt ]] && cat "$WORK/rows.txt"
    printf '\nmsgs/s: relay, until the sink counted them all. p50/p99: per message through the relay;\n'
    printf 'sink p50/p99: the same generator straight to smtp-sink (no TLS, no AUTH); +p50/+p99: the\n'
    printf 'difference, i.e. what the relay adds (target: +p99 < 5 ms). relay ms: the relay'"'"'s CPU\n'
    printf '(utime+stime) per message; sign ms: mail-auth signing the same messages alone, one thread;\n'
    printf 'ratio: relay / sign (target: at most 2x). Generator, relay and sink share the cores.\n'
    if ((${#LOCKSTEP_ROWS[@]} > 0)); then
        printf '\nOne command per round trip (as Go net/smtp), AUTH PLAIN, concurrency %s, RSA-2048:\n' "$LOCKSTEP_CONCURRENCY"
        printf '%7s %4s %9s %9s %7s %9s %8s %9s %7s %9s %7s\n' size "/con" "direct/s" "plain/s" "of dir" "tls/s" \
            "sign ms" "plain ms" ratio "tls ms" ratio
        printf '%s\n' "${LOCKSTEP_ROWS[@]}"
        printf '/con: messages per connection. direct/s: the generator straight to smtp-sink; plain/s: through\n'
        printf 'the relay without TLS (targets: at least 90%% of direct, "of dir"); tls/s: through the relay\n'
        printf 'with STARTTLS (a full handshake per connection). plain/tls ms: relay CPU per message; ratio:\n'
        printf 'relay / sign alone (target: at most 1.5x).\n'
    fi
    if [[ -n $COMPARISON ]]; then
        printf '\n%s\n' "$COMPARISON"
    fi
} | tee "$OUT"
log "written to $OUT"
