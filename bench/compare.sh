#!/usr/bin/env bash
# Side by side: Leasehold, etcd and ZooKeeper on this machine, one table.
#
# Installs Debian's etcd-server and zookeeperd when missing, builds
# `leasehold` and the peer load generators (bench/peers) in release mode,
# then for each system in turn: starts it fresh on loopback with a temporary
# data directory and its default durability, runs the same `cycle` and
# `contended` workloads (same concurrency, warm-up and duration), and stops
# it by PID. Prints one Markdown table with Leasehold's ratio to each peer,
# plus the machine and the load average seen before each run.
#
# Loopback only; every run is bounded by --duration and --max-ops, and the
# whole script by `timeout` (LIMIT seconds).
#
# Usage: bench/compare.sh            (C=64, 10 s per workload)
#        C=16 DURATION=5s bench/compare.sh
set -euo pipefail

C=${C:-64}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
PAUSE=${PAUSE:-5}          # seconds of quiet after `sync`, before each run
LIMIT=${LIMIT:-1800}       # the whole script, seconds
LH_PORT=${LH_PORT:-17420}
ETCD_PORT=${ETCD_PORT:-23790}
ETCD_PEER_PORT=${ETCD_PEER_PORT:-23800}
ZK_PORT=${ZK_PORT:-21810}

if [ -z "${LEASEHOLD_COMPARE_BOUNDED:-}" ]; then
    export LEASEHOLD_COMPARE_BOUNDED=1
    exec timeout --kill-after=15 "$LIMIT" "$0" "$@"
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/leasehold-compare.XXXXXX)
RESULTS="$WORK/results.jsonl"
PIDS=()

stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    for pid in "${PIDS[@]}"; do stop_pid "$pid"; done
    rm -rf "$WORK"
}
trap cleanup EXIT

log() { echo "== $*" >&2; }

wait_port() { # port, seconds
    local deadline=$((SECONDS + $2))
    until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
        if [ $SECONDS -ge "$deadline" ]; then
            log "nothing listens on 127.0.0.1:$1 after $2 s"
            return 1
        fi
        sleep 0.2
    done
}

quiet() {
    sync
    sleep "$PAUSE"
    log "load before run: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "$1: load $(cut -d' ' -f1-3 /proc/loadavg)" >>"$WORK/loads"
}

# ---- install what is missing ---------------------------------------------
if ! command -v etcd >/dev/null || [ ! -f /usr/share/java/zookeeper.jar ]; then
    log "installing etcd-server and zookeeperd"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server zookeeperd >/dev/null
fi

# ---- build -----------------------------------------------------------------
log "building leasehold and bench/peers (release)"
(cd "$ROOT" && cargo build --release --quiet)
if [ -z "${PROTOC:-}" ]; then
    PROTOC=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/protoc-bin-vendored-linux-x86_64-*/bin/protoc 2>/dev/null | head -n1 || true)
    [ -n "$PROTOC" ] || PROTOC=$(command -v protoc || true)
    export PROTOC
fi
(cd "$ROOT/bench/peers" && CARGO_TARGET_DIR="$ROOT/target" cargo build --release --quiet)
LEASEHOLD="$ROOT/target/release/leasehold"
PEERS="$ROOT/target/release/leasehold-peers"
COMMON=(--concurrency "$C" --duration "$DURATION" --warmup "$WARMUP" --json)

run() { # label, command...
    local label=$1
    shift
    quiet "$label"
    log "$label"
    # A failed check exits 1 but still prints its report: keep going.
    "$@" --server-pid "$SERVER_PID" | tee -a "$RESULTS" >&2 || true
}

# ---- Leasehold -------------------------------------------------------------
log "starting leasehold"
mkdir -p "$WORK/leasehold"
"$LEASEHOLD" serve --listen "127.0.0.1:$LH_PORT" --data-dir "$WORK/leasehold/data" \
    >"$WORK/leasehold/out" 2>"$WORK/leasehold/log" &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
wait_port "$LH_PORT" 30
LH=(--server "http://127.0.0.1:$LH_PORT")
# Leasehold's default durability: every batch is synced to the device
# (O_DSYNC write of the log) before it is answered, as etcd and ZooKeeper do.
run "leasehold cycle" "$LEASEHOLD" bench cycle "${LH[@]}" "${COMMON[@]}"
run "leasehold contended" "$LEASEHOLD" bench contended "${LH[@]}" "${COMMON[@]}"
# The same calls as messages on one Session stream per worker (what the
# client library's Session does); ZooKeeper's client likewise pipelines
# every call of a session over one connection.
run "leasehold cycle --session" "$LEASEHOLD" bench cycle --session "${LH[@]}" "${COMMON[@]}"
run "leasehold contended --session" "$LEASEHOLD" bench contended --session "${LH[@]}" "${COMMON[@]}"
stop_pid "$SERVER_PID"

# ---- etcd ------------------------------------------------------------------
log "starting etcd"
etcd --name bench --data-dir "$WORK/etcd" \
    --listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
    --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
    --initial-cluster "bench=http://127.0.0.1:$ETCD_PEER_PORT" \
    >"$WORK/etcd.log" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
wait_port "$ETCD_PORT" 30
ETCD=(--endpoint "http://127.0.0.1:$ETCD_PORT")
run "etcd cycle" "$PEERS" etcd cycle "${ETCD[@]}" "${COMMON[@]}"
run "etcd cycle-lease" "$PEERS" etcd cycle-lease "${ETCD[@]}" "${COMMON[@]}"
run "etcd contended" "$PEERS" etcd contended "${ETCD[@]}" "${COMMON[@]}"
stop_pid "$SERVER_PID"

# ---- ZooKeeper -------------------------------------------------------------
log "starting zookeeper"
mkdir -p "$WORK/zk/data" "$WORK/zk/log"
cat >"$WORK/zk/zoo.cfg" <<CFG
tickTime=2000
initLimit=10
syncLimit=5
dataDir=$WORK/zk/data
clientPort=$ZK_PORT
clientPortAddress=127.0.0.1
# One session per worker, all from 127.0.0.1 (the default allows 60).
maxClientCnxns=0
admin.enableServer=false
CFG
java -Dzookeeper.log.dir="$WORK/zk/log" -Dzookeeper.root.logger=WARN,CONSOLE \
    -cp "/etc/zookeeper/conf:/usr/share/java/zookeeper.jar" \
    org.apache.zookeeper.server.quorum.QuorumPeerMain "$WORK/zk/zoo.cfg" \
    >"$WORK/zk/out" 2>&1 &
SERVER_PID=$!
PIDS+=("$SERVER_PID")
wait_port "$ZK_PORT" 60
ZK=(--endpoint "127.0.0.1:$ZK_PORT")
# cycle-bare first: it also warms the JVM's JIT, so the recipe is measured warm.
run "zookeeper cycle-bare" "$PEERS" zookeeper cycle-bare "${ZK[@]}" "${COMMON[@]}"
run "zookeeper cycle" "$PEERS" zookeeper cycle "${ZK[@]}" "${COMMON[@]}"
run "zookeeper contended" "$PEERS" zookeeper contended "${ZK[@]}" "${COMMON[@]}"
stop_pid "$SERVER_PID"

# ---- the table -------------------------------------------------------------
echo
echo "Machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, Linux $(uname -r); etcd $(etcd --version | awk 'NR==1 {print $3}'), ZooKeeper $(dpkg-query -W -f='${Version}' zookeeper 2>/dev/null || echo '?')"
echo "Each run: C=$C, warm-up $WARMUP, measured $DURATION; client and server on the same cores, loopback."
echo
"$PEERS" table "$RESULTS"
echo
echo "Load average before each run:"
sed 's/^/  /' "$WORK/loads"
