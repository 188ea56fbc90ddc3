#!/usr/bin/env bash
# A 3-node Leasehold cluster on loopback: `bench cycle` and `contended`
# against it (through every node: `--server a,b,c`), then the failover time
# over KILLS kill -9s of the leader: from the kill to the first grant a
# survivor acknowledges (an `acquire` started right after the kill, given
# the two survivors), with the killed node restarted and caught up between
# kills. Prints p50/p99.
#
# Loopback only; temporary data directories; every wait bounded, the whole
# script by `timeout` (LIMIT seconds). Uses target/release/leasehold (built
# if missing).
#
# Usage: bench/cluster.sh                (C=64, 10 s per workload, 12 kills)
#        KILLS=20 DURATION=5s bench/cluster.sh
set -euo pipefail

C=${C:-64}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
KILLS=${KILLS:-12}
LIMIT=${LIMIT:-900}
BASE=${BASE:-17520}
EXTRA=${EXTRA:-}

if [ -z "${LEASEHOLD_CLUSTER_BOUNDED:-}" ]; then
    export LEASEHOLD_CLUSTER_BOUNDED=1
    exec timeout --kill-after=15 "$LIMIT" "$0" "$@"
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
B="$ROOT/target/release/leasehold"
[ -x "$B" ] || (cd "$ROOT" && cargo build --release -p leasehold --bin leasehold)
WORK=$(mktemp -d /tmp/leasehold-cluster.XXXXXX)
declare -a PIDS URLS
for i in 1 2 3; do URLS[$i]="http://127.0.0.1:$((BASE + i))"; done
PEERS="1=${URLS[1]},2=${URLS[2]},3=${URLS[3]}"
ALL="${URLS[1]},${URLS[2]},${URLS[3]}"

start() {
    local i=$1
    # shellcheck disable=SC2086
    RUST_LOG=error,openraft=off "$B" serve --node-id "$i" --listen "127.0.0.1:$((BASE + i))" \
        --data-dir "$WORK/n$i" --peers "$PEERS" $EXTRA >"$WORK/log$i" 2>&1 &
    PIDS[$i]=$!
}
cleanup() {
    for i in 1 2 3; do
        [ -n "${PIDS[$i]:-}" ] && kill "${PIDS[$i]}" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

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

for i in 1 2 3; do start "$i"; done
L=$(leader)
echo "cluster formed; leader node $L; $(nproc) cores; load $(cut -d' ' -f1-3 /proc/loadavg)"
for w in cycle contended; do
    "$B" bench "$w" --server "$ALL" -c "$C" -d "$DURATION" --warmup "$WARMUP" | sed "s/^/$w: /" | grep -E "ops/s|latency|errors|check" || true
done

TIMES=()
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
    echo "kill $k: leader $L, first grant after $(( (t1 - t0) / 1000000 )) ms"
    start "$L"
done
printf '%s\n' "${TIMES[@]}" | sort -n | python3 -c "
import sys
v=[int(x) for x in sys.stdin]
p=lambda q: v[min(len(v)-1, int(q*len(v)))]
print(f'failover over {len(v)} kills: p50 {p(0.5)} ms, p99 {v[-1]} ms (max), min {v[0]} ms')"
