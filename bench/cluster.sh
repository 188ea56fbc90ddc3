#!/usr/bin/env bash
# A 3-node Leasehold cluster beside a 3-member etcd cluster, on loopback,
# in one run:
#
# 1. Leasehold: three `leasehold serve --peers` nodes; `bench cycle` and
#    `contended` against them (`--server a,b,c`: the load generator finds
#    the leader and sends every call there), each report kept as a JSON line.
# 2. Failover over KILLS kill -9s of the leader: from the kill to the first
#    grant a survivor acknowledges (an `acquire` started right after the
#    kill, given the two survivors), with the killed node restarted and
#    caught up between kills. Prints p50 and p99; over fewer than 100 kills
#    the p99 is the maximum, and is printed as such.
# 3. etcd 3.4 (Debian's etcd-server, installed when missing): three `etcd`
#    processes with --initial-cluster listing all three, default durability;
#    the same workloads through bench/peers (`etcd cycle`, `cycle-lease`,
#    `contended`) with `--endpoint a,b,c` (workers dealt over the three
#    members round-robin; followers forward to the leader), or the leader
#    alone with ETCD_ENDPOINTS=leader.
# 4. One Markdown table (`leasehold-peers table`) with Leasehold's ratio to
#    etcd, the failover figures, the machine, the load average before every
#    run and each process's CPU during it (% of one core, over warm-up and
#    measurement; `client` is the load generator).
#
# Loopback only; temporary data directories; every wait bounded, every run
# bounded by --duration, the whole script by `timeout` (LIMIT seconds).
# Uses target/release/leasehold (built if missing, or always with BUILD=1)
# and target/release/leasehold-peers (bench/peers, built as compare.sh does).
#
# Usage: bench/cluster.sh                 (C=64, 10 s per workload, 12 kills, etcd)
#        KILLS=20 DURATION=5s bench/cluster.sh
#        ETCD=0 bench/cluster.sh          (Leasehold and failover only)
#        KILLS=0 bench/cluster.sh         (no failover)
#        LEASEHOLD=0 KILLS=0 bench/cluster.sh   (etcd only)
set -euo pipefail

C=${C:-64}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
KILLS=${KILLS:-12}
LEASEHOLD=${LEASEHOLD:-1}  # 0: skip Leasehold's workloads (failover still runs if KILLS > 0)
ETCD=${ETCD:-1}            # 0: skip etcd
ETCD_ENDPOINTS=${ETCD_ENDPOINTS:-all}   # all | leader
PAUSE=${PAUSE:-5}          # seconds of quiet after `sync`, before each run
LIMIT=${LIMIT:-1500}       # the whole script, seconds
BASE=${BASE:-17520}        # Leasehold nodes listen on BASE+1..3
ETCD_BASE=${ETCD_BASE:-23900}  # etcd clients on ETCD_BASE+1..3, peers on ETCD_BASE+11..13
BUILD=${BUILD:-0}
EXTRA=${EXTRA:-}

if [ -z "${LEASEHOLD_CLUSTER_BOUNDED:-}" ]; then
    export LEASEHOLD_CLUSTER_BOUNDED=1
    exec timeout --kill-after=15 "$LIMIT" "$0" "$@"
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
B="$ROOT/target/release/leasehold"
PEERS_BIN="$ROOT/target/release/leasehold-peers"
WORK=$(mktemp -d /tmp/leasehold-cluster.XXXXXX)
RESULTS="$WORK/results.jsonl"
declare -a PIDS URLS EPIDS EURLS
for i in 1 2 3; do
    URLS[$i]="http://127.0.0.1:$((BASE + i))"
    EURLS[$i]="http://127.0.0.1:$((ETCD_BASE + i))"
done
PEERS="1=${URLS[1]},2=${URLS[2]},3=${URLS[3]}"
ALL="${URLS[1]},${URLS[2]},${URLS[3]}"
EALL="${EURLS[1]},${EURLS[2]},${EURLS[3]}"
COMMON=(-c "$C" -d "$DURATION" --warmup "$WARMUP" --json)

log() { echo "== $*" >&2; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    for i in 1 2 3; do
        [ -n "${PIDS[$i]:-}" ] && stop_pid "${PIDS[$i]}"
        [ -n "${EPIDS[$i]:-}" ] && stop_pid "${EPIDS[$i]}"
    done
    rm -rf "$WORK"
}
trap cleanup EXIT

# ---- build -----------------------------------------------------------------
if [ "$BUILD" = 1 ] || [ ! -x "$B" ]; then
    log "building leasehold (release)"
    (cd "$ROOT" && cargo build --release --quiet -p leasehold --bin leasehold)
fi
if [ "$ETCD" = 1 ]; then
    if ! command -v etcd >/dev/null; then
        log "installing etcd-server"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq etcd-server >/dev/null
    fi
    if [ -z "${PROTOC:-}" ]; then
        PROTOC=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/protoc-bin-vendored-linux-x86_64-*/bin/protoc 2>/dev/null | head -n1 || true)
        [ -n "$PROTOC" ] || PROTOC=$(command -v protoc || true)
        export PROTOC
    fi
    log "building bench/peers (release)"
    (cd "$ROOT/bench/peers" && CARGO_TARGET_DIR="$ROOT/target" cargo build --release --quiet)
fi

# ---- CPU of each process during a run ----------------------------------------
# utime + stime of a process, in clock ticks; the shell's reaped children
# (cutime + cstime of $$) give the load generator's, once it has exited.
TICK=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
child_ticks() { awk '{print $16 + $17}' "/proc/$$/stat"; }
declare -A CPU0
cpu_start() { # name=pid ...
    CPU_T0=$(date +%s%N)
    CPU_C0=$(child_ticks)
    CPU_WHO=("$@")
    local w
    for w in "$@"; do CPU0["${w%%=*}"]=$(ticks "${w#*=}"); done
}
cpu_report() { # label
    local t1 wall line w
    t1=$(date +%s%N)
    wall=$(( (t1 - CPU_T0) / 1000000 ))   # ms
    line="$1: load before $LOAD_BEFORE; CPU (% of one core over ${wall} ms):"
    for w in "${CPU_WHO[@]}"; do
        line="$line ${w%%=*} $(( ( $(ticks "${w#*=}") - ${CPU0["${w%%=*}"]} ) * 100000 / TICK / wall ))%"
    done
    line="$line client $(( ( $(child_ticks) - CPU_C0 ) * 100000 / TICK / wall ))%"
    echo "$line" >>"$WORK/loads"
    log "$line"
}

quiet() {
    sync
    sleep "$PAUSE"
    LOAD_BEFORE=$(loadavg)
}

# run label who... -- command...: quiet, then the command (its JSON report
# appended to RESULTS), then each process's CPU during it.
run() {
    local label=$1
    shift
    local who=()
    while [ "$1" != "--" ]; do who+=("$1"); shift; done
    shift
    quiet
    log "$label (load $LOAD_BEFORE)"
    cpu_start "${who[@]}"
    # A failed check exits 1 but still prints its report: keep going.
    "$@" | tee -a "$RESULTS" >&2 || true
    cpu_report "$label"
}

# ---- the Leasehold cluster -------------------------------------------------
start() {
    local i=$1
    # shellcheck disable=SC2086
    RUST_LOG=error,openraft=off "$B" serve --node-id "$i" --listen "127.0.0.1:$((BASE + i))" \
        --data-dir "$WORK/n$i" --peers "$PEERS" $EXTRA >>"$WORK/log$i" 2>&1 &
    PIDS[$i]=$!
}

field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)"; }
leader() {
    for _ in $(seq 1 200); do
        for i in 1 2 3; do
            s=$("$B" cluster status --json --server "${URLS[$i]}" 2>/dev/null || true)
            if [ -n "$s" ] && [ "$(echo "$s" | field "['serving']")" = "True" ]; then
                echo "$i"; return
            fi
        done
        sleep 0.05
    done
    echo "no leader" >&2; exit 1
}
applied() {
    local s
    s=$("$B" cluster status --json --server "${URLS[$1]}" 2>/dev/null || true)
    if [ -n "$s" ]; then echo "$s" | field "['applied_index']"; else echo "down$1"; fi
}
caught_up() {
    for _ in $(seq 1 300); do
        local a b c
        a=$(applied 1); b=$(applied 2); c=$(applied 3)
        if [ "$a" = "$b" ] && [ "$b" = "$c" ]; then return; fi
        sleep 0.05
    done
    echo "nodes did not catch up" >&2; exit 1
}
# Grants and Raft entries (commit batches) so far, from the leader's status.
grants_entries() {
    "$B" status --json --server "${URLS[$1]}" 2>/dev/null |
        python3 -c "import json,sys; d=json.load(sys.stdin); print(d['grants'], d['commit_batches'])" 2>/dev/null ||
        echo "0 0"
}

FAILOVER=""
if [ "$LEASEHOLD" = 1 ] || [ "$KILLS" -gt 0 ]; then
    for i in 1 2 3; do start "$i"; done
    L=$(leader)
    log "Leasehold cluster formed; leader node $L; $(nproc) cores; load $(loadavg)"
fi
if [ "$LEASEHOLD" = 1 ]; then
    for w in cycle contended; do
        L=$(leader)
        read -r g0 e0 < <(grants_entries "$L")
        run "leasehold $w (leader node $L)" \
            "n1=${PIDS[1]}" "n2=${PIDS[2]}" "n3=${PIDS[3]}" -- \
            "$B" bench "$w" --server "$ALL" "${COMMON[@]}" --server-pid "${PIDS[$L]}"
        read -r g1 e1 < <(grants_entries "$L")
        if [ "$((e1 - e0))" -gt 0 ]; then
            echo "leasehold $w: $((g1 - g0)) grants in $((e1 - e0)) Raft entries (proposer batches) on the leader, warm-up included: $(awk "BEGIN {printf \"%.1f\", $((g1 - g0)) / $((e1 - e0))}") grants per entry" |
                tee -a "$WORK/loads" >&2
        fi
    done
fi

# ---- failover --------------------------------------------------------------
if [ "$KILLS" -gt 0 ]; then
    TIMES=()
    log "failover: $KILLS kill -9s of the leader (load $(loadavg))"
    FAILOVER_LOAD0=$(loadavg)
    for k in $(seq 1 "$KILLS"); do
        caught_up
        L=$(leader)
        S=""
        for i in 1 2 3; do [ "$i" != "$L" ] && S="$S${S:+,}${URLS[$i]}"; done
        kill -9 "${PIDS[$L]}"; wait "${PIDS[$L]}" 2>/dev/null || true
        t0=$(date +%s%N)
        "$B" acquire "failover/$k" --server "$S" --ttl 30s --retry-for 10s --json >/dev/null
        t1=$(date +%s%N)
        TIMES+=($(( (t1 - t0) / 1000000 )))
        log "kill $k: leader $L, first grant after $(( (t1 - t0) / 1000000 )) ms"
        start "$L"
    done
    FAILOVER=$(printf '%s\n' "${TIMES[@]}" | sort -n | python3 -c "
import sys
v=[int(x) for x in sys.stdin]
p=lambda q: v[min(len(v)-1, int(q*len(v)))]
p99 = f'p99 {v[-1]} ms (the max: fewer than 100 kills)' if len(v) < 100 else f'p99 {p(0.99)} ms'
print(f'failover over {len(v)} kill -9s of the leader (kill to first grant by a survivor): p50 {p(0.5)} ms, {p99}, min {v[0]} ms; all: {\" \".join(map(str, v))}')")
    FAILOVER="$FAILOVER; load before $FAILOVER_LOAD0, after $(loadavg)"
    log "$FAILOVER"
fi
for i in 1 2 3; do
    if [ -n "${PIDS[$i]:-}" ]; then stop_pid "${PIDS[$i]}"; PIDS[$i]=""; fi
done

# ---- the etcd cluster ------------------------------------------------------
etcd_status() { # i -> "member_id leader" (decimal strings)
    curl -s -m 2 -X POST "${EURLS[$1]}/v3/maintenance/status" -d '{}' 2>/dev/null |
        python3 -c "import json,sys; d=json.load(sys.stdin); print(d['header']['member_id'], d['leader'])" 2>/dev/null || true
}
if [ "$ETCD" = 1 ]; then
    INITIAL=""
    for i in 1 2 3; do INITIAL="$INITIAL${INITIAL:+,}e$i=http://127.0.0.1:$((ETCD_BASE + 10 + i))"; done
    for i in 1 2 3; do
        etcd --name "e$i" --data-dir "$WORK/etcd$i" \
            --listen-client-urls "${EURLS[$i]}" --advertise-client-urls "${EURLS[$i]}" \
            --listen-peer-urls "http://127.0.0.1:$((ETCD_BASE + 10 + i))" \
            --initial-advertise-peer-urls "http://127.0.0.1:$((ETCD_BASE + 10 + i))" \
            --initial-cluster "$INITIAL" --initial-cluster-state new \
            --initial-cluster-token "leasehold-bench-$$" \
            --logger zap --log-level warn >"$WORK/etcd$i.log" 2>&1 &
        EPIDS[$i]=$!
    done
    EL=""
    for _ in $(seq 1 300); do
        healthy=0
        for i in 1 2 3; do
            curl -s -m 1 "${EURLS[$i]}/health" 2>/dev/null | grep -q '"health":"true"' && healthy=$((healthy + 1))
        done
        if [ "$healthy" = 3 ]; then
            for i in 1 2 3; do
                read -r id lead < <(etcd_status "$i") || true
                if [ -n "${id:-}" ] && [ "$id" = "${lead:-}" ]; then EL=$i; fi
            done
            [ -n "$EL" ] && break
        fi
        sleep 0.1
    done
    [ -n "$EL" ] || { log "the etcd cluster did not form (logs: $WORK/etcd*.log)"; tail -5 "$WORK"/etcd*.log >&2; exit 1; }
    log "etcd cluster formed; leader member e$EL; load $(loadavg)"
    if [ "$ETCD_ENDPOINTS" = leader ]; then ENDPOINT="${EURLS[$EL]}"; else ENDPOINT="$EALL"; fi
    for w in cycle cycle-lease contended; do
        run "etcd $w (leader e$EL; endpoints $ETCD_ENDPOINTS)" \
            "e1=${EPIDS[1]}" "e2=${EPIDS[2]}" "e3=${EPIDS[3]}" -- \
            "$PEERS_BIN" etcd "$w" --endpoint "$ENDPOINT" "${COMMON[@]}" --server-pid "${EPIDS[$EL]}"
    done
    for i in 1 2 3; do stop_pid "${EPIDS[$i]}"; EPIDS[$i]=""; done
fi

# ---- the report ------------------------------------------------------------
echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'). Machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, Linux $(uname -r); leasehold binary of $(date -u -r "$B" '+%Y-%m-%d %H:%M UTC') (HEAD now $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))$(command -v etcd >/dev/null && echo "; etcd $(etcd --version | awk 'NR==1 {print $3}')")"
echo "3 Leasehold nodes (Raft, every node on its own data dir) and 3 etcd members, all on loopback on the same cores as the load generator."
echo "Each run: C=$C, warm-up $WARMUP, measured $DURATION. Leasehold: \`--server a,b,c\` (every call to the leader); etcd: endpoints $ETCD_ENDPOINTS ($([ "$ETCD_ENDPOINTS" = leader ] && echo 'the leader only' || echo 'workers dealt over the three members round-robin'))."
echo
if [ -s "$RESULTS" ] && [ -x "$PEERS_BIN" ]; then
    "$PEERS_BIN" table "$RESULTS"
    echo
fi
[ -n "$FAILOVER" ] && { echo "$FAILOVER"; echo; }
if [ -s "$WORK/loads" ]; then
    echo "Load average before each run, and CPU during it:"
    sed 's/^/  /' "$WORK/loads"
fi
