#!/usr/bin/env bash
# Catch-up after many grants: does the Raft log stay bounded, and how long
# does a follower that missed LEASES grants take to catch up?
#
# 1. Starts a 3-node cluster on loopback (as bench/cluster.sh does), stops
#    one follower with SIGTERM.
# 2. Grants LEASES leases (default 1,000,000) through the other two with
#    `leasehold bench fill` (every grant a new resource, TTL 1 h, so they all
#    stay live; the fill goes to the leader), bounded by FILL_FOR.
# 3. Records, on every node: the Raft log file size, the snapshot file
#    size, the data directory's size, RSS (VmRSS) and applied index.
# 4. Restarts the follower and measures the time until its applied index
#    reaches the leader's (polled every POLL s), then the same figures again.
#
# Loopback only; temporary data directories; every wait bounded, the whole
# script by `timeout` (LIMIT seconds). Uses target/release/leasehold (built
# if missing).
#
# Usage: bench/catchup.sh                     (1,000,000 leases)
#        LEASES=200000 bench/catchup.sh
#        SNAPSHOT_EVERY=5000 bench/catchup.sh (any `serve` flag: EXTRA=...)
set -euo pipefail

LEASES=${LEASES:-1000000}
C=${C:-64}
TTL=${TTL:-1h}
FILL_FOR=${FILL_FOR:-480s}    # the fill stops after this, however far it got
CATCHUP_FOR=${CATCHUP_FOR:-300}  # seconds the restarted follower has to catch up
POLL=${POLL:-0.1}
LOG=${LOG:-error,openraft=off}   # RUST_LOG of the nodes (openraft=warn shows why a catch-up fails)
SNAPSHOT_EVERY=${SNAPSHOT_EVERY:-}
LIMIT=${LIMIT:-1200}
BASE=${BASE:-17620}
EXTRA=${EXTRA:-}

if [ -z "${LEASEHOLD_CATCHUP_BOUNDED:-}" ]; then
    export LEASEHOLD_CATCHUP_BOUNDED=1
    exec timeout --kill-after=15 "$LIMIT" "$0" "$@"
fi

ROOT=$(cd "$(dirname "$0")/.." && pwd)
B="$ROOT/target/release/leasehold"
[ -x "$B" ] || (cd "$ROOT" && cargo build --release --quiet -p leasehold --bin leasehold)
WORK=$(mktemp -d /tmp/leasehold-catchup.XXXXXX)
declare -a PIDS URLS
for i in 1 2 3; do URLS[$i]="http://127.0.0.1:$((BASE + i))"; done
PEERS="1=${URLS[1]},2=${URLS[2]},3=${URLS[3]}"
[ -n "$SNAPSHOT_EVERY" ] && EXTRA="$EXTRA --snapshot-every $SNAPSHOT_EVERY"

log() { echo "== $(date -u +%H:%M:%S) $*" >&2; }
loadavg() { cut -d' ' -f1-3 /proc/loadavg; }

start() {
    local i=$1
    # shellcheck disable=SC2086
    RUST_LOG=$LOG "$B" serve --node-id "$i" --listen "127.0.0.1:$((BASE + i))" \
        --data-dir "$WORK/n$i" --peers "$PEERS" --max-ttl 2h $EXTRA >>"$WORK/log$i" 2>&1 &
    PIDS[$i]=$!
}
stop_pid() {
    local pid=$1
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 300); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    log "pid $pid still running 30 s after SIGTERM: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    for i in 1 2 3; do [ -n "${PIDS[$i]:-}" ] && stop_pid "${PIDS[$i]}"; done
    rm -rf "$WORK"
}
trap cleanup EXIT

status() { "$B" cluster status --json --server "${URLS[$1]}" 2>/dev/null || true; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(d$1)" 2>/dev/null || true; }
leader() {
    for _ in $(seq 1 400); do
        for i in 1 2 3; do
            [ -n "${PIDS[$i]:-}" ] || continue
            if [ "$(status "$i" | field "['serving']")" = "True" ]; then
                echo "$i"; return
            fi
        done
        sleep 0.05
    done
    echo "no leader" >&2; exit 1
}
applied() { local a; a=$(status "$1" | field "['applied_index']"); echo "${a:-down}"; }
term() { local t; t=$(status "$1" | field "['term']"); echo "${t:-?}"; }
size() { if [ -e "$1" ]; then stat -c %s "$1"; else echo 0; fi; }
mib() { awk "BEGIN {printf \"%.1f MiB\", $1 / 1048576}"; }

# One line per node: log file, snapshot file, the data directory, RSS, applied index.
figures() { # title
    echo "$1 (load $(loadavg)):"
    for i in 1 2 3; do
        local d="$WORK/n$i" rss="stopped" dir
        if [ -n "${PIDS[$i]:-}" ] && [ -r "/proc/${PIDS[$i]}/status" ]; then
            rss=$(awk '/^VmRSS/ {printf "%.0f MiB", $2 / 1024}' "/proc/${PIDS[$i]}/status")
        fi
        dir=$(du -sb "$d" 2>/dev/null | cut -f1)
        echo "  node $i$([ "$i" = "$L" ] && echo ' (leader)')$([ "$i" = "$F" ] && echo ' (the follower)'): raft-log $(mib "$(size "$d/raft/raft-log")"), raft-snapshot $(mib "$(size "$d/raft/raft-snapshot")"), data dir $(mib "${dir:-0}"), RSS $rss, applied index $(applied "$i")"
    done
}

log "$(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB; leasehold $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'); load $(loadavg)"
for i in 1 2 3; do start "$i"; done
L=$(leader)
F=$(( L % 3 + 1 ))
log "cluster formed, leader node $L; stopping follower node $F (SIGTERM)"
stop_pid "${PIDS[$F]}"
PIDS[$F]=""
SURVIVORS=""
for i in 1 2 3; do [ "$i" != "$F" ] && SURVIVORS="$SURVIVORS${SURVIVORS:+,}${URLS[$i]}"; done

sync
log "granting $LEASES leases (TTL $TTL, C=$C, at most $FILL_FOR) through nodes $SURVIVORS; load $(loadavg)"
FILL_LOAD=$(loadavg)
t0=$(date +%s%N)
"$B" bench fill --leases "$LEASES" --server "$SURVIVORS" --ttl "$TTL" -c "$C" -d "$FILL_FOR" \
    --op-timeout 10s --server-pid "${PIDS[$L]}" --json >"$WORK/fill.json" || true
t1=$(date +%s%N)
FILL=$(python3 -c "
import json
d=json.load(open('$WORK/fill.json'))
e=d.get('extra', {})
held=int(e.get('leases_held', d['ops']))
first = f\" (first: {d['first_error']})\" if d.get('first_error') else ''
print(f\"{held:,} leases granted and held in {d['seconds']:.1f} s = {d['rate']:,.0f} grants/s, p50 {d['latency']['p50_us']/1000:.1f} ms, p99 {d['latency']['p99_us']/1000:.1f} ms, errors {d['errors']}{first}; leader CPU {e.get('server_cpu_cores', '?')} cores, leader RSS {e.get('server_rss_mib', '?')} MiB\")" 2>/dev/null || cat "$WORK/fill.json")
log "fill: $FILL (load before $FILL_LOAD, after $(loadavg))"
L=$(leader)
# Let the leader's and the other follower's snapshot policy run its course.
sleep 5
figures "after the fill, follower $F stopped" | tee "$WORK/before" >&2

LEADER_APPLIED=$(applied "$L")
TERM0=$(term "$L")
log "restarting follower node $F; leader $L at applied index $LEADER_APPLIED, term $TERM0"
t0=$(date +%s%N)
start "$F"
CAUGHT=""
PEAK_RSS=0
deadline=$((SECONDS + CATCHUP_FOR))
next_note=$((SECONDS + 15))
while [ "$SECONDS" -lt "$deadline" ]; do
    a=$(applied "$F")
    r=$(awk '/^VmRSS/ {print $2}' "/proc/${PIDS[$F]}/status" 2>/dev/null || echo 0)
    [ "${r:-0}" -gt "$PEAK_RSS" ] && PEAK_RSS=$r
    L2=$(leader)
    target=$(applied "$L2")
    if [ "$SECONDS" -ge "$next_note" ]; then
        log "catching up: follower $F applied $a, leader $L2 applied $target, term $(term "$L2"); RSS (MiB) $(for i in 1 2 3; do awk '/^VmRSS/ {printf "%d ", $2 / 1024}' "/proc/${PIDS[$i]}/status" 2>/dev/null; done)"
        next_note=$((SECONDS + 15))
    fi
    if [ "$a" != down ] && [ "$target" != down ] && [ "$a" -ge "$target" ]; then
        t1=$(date +%s%N)
        CAUGHT=$(( (t1 - t0) / 1000000 ))
        break
    fi
    sleep "$POLL"
done
L=$(leader)
if [ -n "$CAUGHT" ]; then
    RESULT="follower $F caught up in $CAUGHT ms from its restart (applied index $a = leader's $target); its peak RSS while catching up $((PEAK_RSS / 1024)) MiB; term $TERM0 before, $(term "$L") after"
else
    RESULT="follower $F did NOT catch up within $CATCHUP_FOR s (its applied index $(applied "$F"), the leader's (node $L) $(applied "$L")); its peak RSS $((PEAK_RSS / 1024)) MiB; term $TERM0 at its restart, $(term "$L") now"
fi
log "$RESULT"
sleep 2
figures "after the catch-up" >"$WORK/after"

echo
echo "$(date -u '+%Y-%m-%d %H:%M UTC'). Machine: $(nproc) cores, $(free -g | awk '/^Mem:/ {print $2}') GiB, Linux $(uname -r); leasehold $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'); serve flags:${EXTRA:- (defaults)} --max-ttl 2h"
echo "3 nodes on loopback; node $F stopped (SIGTERM) before the fill, restarted after it."
echo
echo "Fill: $FILL (load before $FILL_LOAD)"
echo
cat "$WORK/before"
echo
echo "Catch-up: $RESULT"
echo
cat "$WORK/after"
echo
for i in "$F" "$L"; do
    echo "Node $i's log (RUST_LOG=$LOG): its most frequent messages, counted"
    sed 's/\x1b\[[0-9;]*m//g; s/^[0-9T:.Z-]* *//' "$WORK/log$i" | cut -c1-160 | sort | uniq -c | sort -rn | sed -n 1,8p | sed 's/^/  /' || true
done
