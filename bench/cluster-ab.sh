#!/usr/bin/env bash
# A/B of two `leasehold` binaries on a 3-node loopback cluster: `bench cycle`
# and `bench contended` (C=64) against a fresh cluster of each binary in
# turn, ROUNDS rounds interleaved so that a drifting machine load hits both
# alike. Prints one line per run with the load average.
#
# Loopback only; temporary data directories; every run bounded by
# `timeout`, the whole script by LIMIT seconds.
#
# Usage: bench/cluster-ab.sh OLD_BINARY NEW_BINARY     (2 rounds, 8 s each)
#        ROUNDS=3 D=10s bench/cluster-ab.sh /tmp/leasehold-old target/release/leasehold
set -uo pipefail

ROUNDS=${ROUNDS:-2}
D=${D:-8s}
BASE=${BASE:-18520}
LIMIT=${LIMIT:-900}
[ $# -eq 2 ] || { echo "usage: $0 OLD_BINARY NEW_BINARY" >&2; exit 2; }

if [ -z "${LEASEHOLD_AB_BOUNDED:-}" ]; then
    export LEASEHOLD_AB_BOUNDED=1
    exec timeout --kill-after=15 "$LIMIT" "$0" "$@"
fi

run_one() { # binary label
    local b=$1 label=$2 work peers all pids=() w
    work=$(mktemp -d /tmp/leasehold-ab.XXXXXX)
    peers="1=http://127.0.0.1:$((BASE + 1)),2=http://127.0.0.1:$((BASE + 2)),3=http://127.0.0.1:$((BASE + 3))"
    all="http://127.0.0.1:$((BASE + 1)),http://127.0.0.1:$((BASE + 2)),http://127.0.0.1:$((BASE + 3))"
    for i in 1 2 3; do
        RUST_LOG=error,openraft=off "$b" serve --node-id "$i" --listen "127.0.0.1:$((BASE + i))" \
            --data-dir "$work/n$i" --peers "$peers" >"$work/log$i" 2>&1 &
        pids+=($!)
    done
    for _ in $(seq 100); do
        "$b" cluster status --json --server "$all" 2>/dev/null | grep -q '"serving": *true' && break
        sleep 0.1
    done
    sleep 1
    for w in cycle contended; do
        r=$(timeout 60 "$b" bench "$w" --server "$all" -c 64 -d "$D" --warmup 2s 2>&1 | grep -E "ops/s" | head -1)
        echo "$label $w: $r (load $(cut -d' ' -f1 /proc/loadavg))"
    done
    kill "${pids[@]}" 2>/dev/null
    wait 2>/dev/null
    rm -rf "$work"
}

for _ in $(seq "$ROUNDS"); do
    sync; sleep 3; run_one "$1" old
    sync; sleep 3; run_one "$2" new
done
