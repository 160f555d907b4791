#!/usr/bin/env bash
# Side-by-side CPU benchmark: this project's training step against PyTorch's on the same
# machine, in one run, reported as ratios (the machine is shared and noisy: absolute figures
# from different runs do not compare).
#
#   scripts/bench-cpu.sh                 # needs a Python with torch + torchvision
#   PYTHON=/path/to/venv/bin/python scripts/bench-cpu.sh
#   PYTORCH_BENCH=/path/to/pytorch_alexnet.py scripts/bench-cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PYTORCH_BENCH=${PYTORCH_BENCH:-../shared/bench/pytorch_alexnet.py}
STEPS=${STEPS:-5}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

cargo build --release --quiet
for b in 32 128; do
  echo "alexnet bench --batch $b ..." >&2
  RUST_LOG=warn ./target/release/alexnet bench --backend cpu --batch "$b" --steps "$STEPS" --json >"$out/ours_b$b.json"
done
echo "PyTorch ($PYTORCH_BENCH --quick) ..." >&2
"$PYTHON" "$PYTORCH_BENCH" --quick --json "$out/pytorch.json" >"$out/pytorch.log"

"$PYTHON" - "$out" <<'PY'
import json, sys, os
d = sys.argv[1]
pt = json.load(open(os.path.join(d, "pytorch.json")))
print(f"{'batch':>5} {'alexnet img/s':>14} {'of FMA peak':>12} {'pytorch img/s':>14} {'ratio':>7} {'peak RSS GiB':>13}")
pct = lambda f: f"{100 * f:.1f}%" if f is not None else "-"
for b in (32, 128):
    ours = json.load(open(os.path.join(d, f"ours_b{b}.json")))
    theirs = pt[f"train_paper_b{b}"]["img_s"]
    rss = (ours.get("peak_rss_bytes") or 0) / 2**30
    print(f"{b:>5} {ours['images_per_s']:>14.1f} {pct(ours.get('fraction_of_peak')):>12} {theirs:>14.1f} "
          f"{ours['images_per_s'] / theirs:>6.2f}x {rss:>13.2f}")
ours = json.load(open(os.path.join(d, "ours_b128.json")))
peak = ours.get("peak")
if peak:
    levels = ", ".join(f"{l['level']} {l['gflop_per_s']:.1f}" for l in peak["levels"])
    print(f"\n{ours.get('cpu_model', '')}: FMA peak {levels} GFLOP/s ({peak['threads']} threads; "
          f"fractions of {peak['kernels']}'s)")
print("\nalexnet per-layer time, batch 128 (ms per step, share; GFLOP/s as fractions of the FMA peak):")
for l in ours["layers"]:
    f, b = l.get("forward_fraction_of_peak"), l.get("backward_fraction_of_peak")
    roof = f"  of peak: fwd {pct(f):>6} bwd {pct(b):>6}" if f is not None or b is not None else ""
    print(f"  {l['layer']:<9} fwd {l['forward_ms']:7.1f}  bwd {l['backward_ms']:7.1f}  {100 * l['share']:5.1f}%{roof}")
PY
