#!/usr/bin/env bash
# The replicas' gradient average over TCP: the ring (reduce-scatter then all-gather, the
# default) beside all-to-all, on the same job, alternating (ring, all-to-all, ring, ...) so that
# the machine's noise falls on both alike. Prints each run's seconds spent averaging and MiB
# sent (rank 0's `finished` line), the medians, and their ratio.
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
