#!/usr/bin/env bash
# The same job two ways on this machine, in one run: one process holding both columns
# (`alexnet train`) and the two columns in two worker processes exchanging over TCP
# (`alexnet launch`). Prints images/s of each (median over the logged steps, after warm-up),
# their ratio, and the share of the workers' training time spent in the column exchange.
#
#   scripts/bench-distributed.sh                # the paper's widths on the grey sample, batch 128
#   NET=demo BATCH=64 STEPS=60 scripts/bench-distributed.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/alexnet}
BATCH=${BATCH:-128}
STEPS=${STEPS:-8}
WARMUP=${WARMUP:-2}
NET=${NET:-paper-grey}
[ -x "$BIN" ] || cargo build --release
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if [ "$NET" = paper-grey ]; then
    # The paper's network at its input size, for the carried grey Fashion-MNIST sample.
    printf 'input_size = 224\nin_channels = 1\nclasses = 10\n' > "$work/net.toml"
    NET="$work/net.toml"
fi
common=(--net "$NET" --batch "$BATCH" --steps "$STEPS" --log-every 1)

median_rate() {
    grep -oE 'step=[0-9]* of=[0-9]* .*images_per_s="?[0-9.]*"?' "$1" |
        awk -v w="$WARMUP" '{ split($1, s, "="); if (s[2] > w) { match($0, /images_per_s="?[0-9.]+/);
             v = substr($0, RSTART + 13, RLENGTH - 13); gsub(/"/, "", v); print v } }' |
        sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) { print 0 } else { print a[int((NR + 1) / 2)] } }'
}

"$BIN" train "${common[@]}" --backend cpu 2> "$work/one.log"
"$BIN" launch "${common[@]}" --run-dir "$work/run" 2> "$work/two.log"
one=$(median_rate "$work/one.log")
two=$(median_rate "$work/two.log")
echo "net $NET, batch $BATCH, $STEPS steps ($WARMUP warm-up), $(nproc) cores"
printf '%-40s %10s images/s\n' "one process, both columns" "$one"
printf '%-40s %10s images/s\n' "two worker processes, one column each" "$two"
awk -v a="$two" -v b="$one" 'BEGIN { if (b > 0) printf "%-40s %10.2f\n", "ratio (two processes / one)", a / b }'
grep 'time in the exchanges' "$work/two.log" | sed 's/.*rank=/  rank=/'
