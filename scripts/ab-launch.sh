#!/usr/bin/env bash
# Two builds of alexnet on the same distributed job, alternating (A B A B ...) so that the
# machine's noise falls on both alike: prints each run's training seconds and seconds spent
# waiting in the column exchange (rank 0's `finished` line), the medians, and whether the two
# builds trained byte-identical parameters.
#
#   scripts/ab-launch.sh OLD_BINARY NEW_BINARY [launch flags...]
#   ROUNDS=4 scripts/ab-launch.sh /tmp/old/alexnet target/release/alexnet --batch 64 --steps 60
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,8p' "$0"; exit 2; }
A=$1 B=$2
shift 2
ROUNDS=${ROUNDS:-3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for r in $(seq "$ROUNDS"); do
    for side in A B; do
        bin=$A
        [ "$side" = B ] && bin=$B
        dir="$work/$side.$r"
        "$bin" launch --backend cpu --run-dir "$dir" "$@" 2>"$dir.log" >/dev/null ||
            { echo "$side run $r failed:"; tail -n 20 "$dir.log"; exit 1; }
        line=$(grep 'rank=0 .*finished steps=' "$dir.log" | tail -n 1)
        # Older builds quote the numbers.
        train=$(sed -E 's/.*train_seconds="?([0-9.]+)"?.*/\1/' <<<"$line")
        exch=$(sed -E 's/.* exchange_seconds="?([0-9.]+)"?.*/\1/' <<<"$line")
        echo "$side $r train_s=$train exchange_s=$exch" | tee -a "$work/rows"
    done
done
median() { sort -g | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }
for side in A B; do
    t=$(awk -v s="$side" '$1 == s { sub("train_s=", "", $3); print $3 }' "$work/rows" | median)
    e=$(awk -v s="$side" '$1 == s { sub("exchange_s=", "", $4); print $4 }' "$work/rows" | median)
    echo "median $side: train ${t} s, waiting in the column exchange ${e} s"
done
same=yes
for f in $(cd "$work/A.1/params" && ls); do
    cmp -s "$work/A.1/params/$f" "$work/B.1/params/$f" || same=no
done
echo "parameters byte-identical between A and B: $same"
