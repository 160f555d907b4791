#!/usr/bin/env bash
# The replicas' gradient average over TCP: the ring (reduce-scatter then all-gather, the
# default) beside all-to-all, on the same job, alternating (ring, all-to-all, ring, ...) so that
# the machine's noise falls on both alike. Prints each run's seconds spent averaging and MiB
# sent (rank 0's `finished` line), the medians, and their ratio; then what `alexnet plan`
# predicts for the same case, beside the measurement.
#
#   scripts/bench-replicas.sh [BINARY] [launch flags...]
#   ROUNDS=5 scripts/bench-replicas.sh target/release/alexnet --replicas 4 --steps 40
#
# Defaults: 4 replicas of the demo network, each process holding both columns (4 processes),
# 40 steps. Two replicas always go all-to-all (the same bytes, one round trip), so the
# comparison needs three or more.
set -euo pipefail
BIN=${1:-target/release/alexnet}
[[ $# -gt 0 ]] && shift
[[ -x $BIN ]] || { echo "no binary at $BIN: cargo build --release first" >&2; exit 2; }
ARGS=("$@")
[[ ${#ARGS[@]} -gt 0 ]] || ARGS=(--replicas 4 --columns-per-worker 2 --steps 40)
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for r in $(seq "$ROUNDS"); do
    for algo in ring all-to-all; do
        dir="$work/$algo.$r"
        ALEXNET_REPLICA_REDUCE=$algo "$BIN" launch --backend cpu --run-dir "$dir" \
            "${ARGS[@]}" 2>"$dir.log" >/dev/null ||
            { echo "$algo run $r failed:"; tail -n 20 "$dir.log"; exit 1; }
        line=$(grep 'rank=0 .*finished steps=' "$dir.log" | tail -n 1)
        secs=$(sed -E 's/.* replica_seconds="?([0-9.]+)"?.*/\1/' <<<"$line")
        mib=$(sed -E 's/.* replica_mib="?([0-9]+)"?.*/\1/' <<<"$line")
        echo "$algo $r replica_s=$secs replica_mib=$mib" | tee -a "$work/rows"
    done
done
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
for algo in ring all-to-all; do
    s=$(awk -v a="$algo" '$1 == a { sub("replica_s=", "", $3); print $3 }' "$work/rows" | median)
    m=$(awk -v a="$algo" '$1 == a { sub("replica_mib=", "", $4); print $4 }' "$work/rows" | median)
    echo "median $algo: ${s} s averaging, ${m} MiB sent by rank 0"
    eval "median_${algo//-/_}=$s"
done
# shellcheck disable=SC2154 # set by the eval above
awk -v r="$median_ring" -v a="$median_all_to_all" \
    'BEGIN { if (a > 0) printf "ring / all-to-all, time spent averaging: %.2f\n", r / a }'

# The planner's prediction for the same case beside the measurement: one host per replica
# (the replica's two columns in one process: no column link), the hosts' link this machine's
# loopback TCP (scripts/loopback-link.py), the compute the measured step time less the
# exchanges (rank 0's, median of the ring runs), the runtime's buckets and overlap.
flag() { # flag NAME DEFAULT: the value of --NAME in ARGS
    local i
    for ((i = 0; i < ${#ARGS[@]} - 1; i++)); do
        [[ ${ARGS[i]} == "--$1" ]] && { echo "${ARGS[i + 1]}"; return; }
    done
    echo "$2"
}
replicas=$(flag replicas 1)
batch=$(flag batch 64)
((replicas >= 2)) || exit 0
read -r link_gbit latency_us < <(python3 "$(dirname "$0")/loopback-link.py")
steps_run=$(grep -h 'rank=0 .*finished steps=' "$work"/ring.*.log | head -n 1 |
    sed -E 's/.* steps=([0-9]+).*/\1/')
compute_ms=$(grep -h 'rank=0 .*finished steps=' "$work"/ring.*.log |
    sed -E 's/.* train_seconds="?([0-9.]+)"? exchange_seconds="?([0-9.]+)"? replica_seconds="?([0-9.]+)"?.*/\1 \2 \3/' |
    awk -v n="$steps_run" '{ print 1000 * ($1 - $2 - $3) / n }' | median)
echo "planner inputs: loopback ${link_gbit} Gbit/s, ${latency_us} us; compute ${compute_ms} ms per step at $((batch / replicas)) images per replica"
predict() {
    "$BIN" plan --hosts "$replicas" --gpus-per-host 2 --link "$link_gbit" --nvlink 1000000 \
        --latency-us "$latency_us" --step-ms "$compute_ms" --net demo --batch $((batch / replicas)) \
        --reduce "$1" --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["replica_exposed_ms"])'
}
planned_ring=$(predict ring)
planned_all=$(predict all-to-all)
awk -v mr="$median_ring" -v ma="$median_all_to_all" -v n="$steps_run" -v pr="$planned_ring" -v pa="$planned_all" 'BEGIN {
    printf "%-12s %22s %26s\n", "", "measured ms/step", "planner ms/step (exposed)"
    printf "%-12s %22.2f %26.2f\n", "ring", 1000 * mr / n, pr
    printf "%-12s %22.2f %26.2f\n", "all-to-all", 1000 * ma / n, pa
    if (ma > 0 && pa > 0) printf "%-12s %22.2f %26.2f\n", "ring / a2a", mr / ma, pr / pa
}'
