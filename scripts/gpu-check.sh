#!/usr/bin/env bash
# The GPU check, for one call on a machine with an NVIDIA GPU and no Rust toolchain.
#
#   scripts/gpu-check.sh prepare   here: builds the release binary and the op tests into
#                                  target/gpu-check/ (carry that folder with the tree)
#   scripts/gpu-check.sh [run] [STEP...]
#                                  there, in the repository root: finds the CUDA libraries
#                                  that Python wheels ship (site-packages/nvidia/*/lib), then
#                                  1. alexnet selftest --backend cuda: every op against the CPU
#                                     on fresh random inputs and against PyTorch's golden
#                                     vectors, one whole training step, a short job in two
#                                     worker processes on the GPU against one, TF32 beside
#                                  2. the op tests on the GPU: PyTorch's golden vectors, finite
#                                     differences, a direct convolution (convolutions by
#                                     unfolding, then by cuDNN with its timed algorithms)
#                                  3. two worker processes on the one GPU over the TCP exchange,
#                                     and training on the carried photographs with the views
#                                     finished on the GPU
#                                  4. alexnet bench --backend cuda --batch 128 (convolutions by
#                                     unfolding + cuBLAS, also with each step uploading its
#                                     input, then by cuDNN) and PyTorch's paper AlexNet
#                                     (bench/reference/) on the same GPU
#                                  5. a batch too large for the GPU: the error must name the
#                                     layer and the batch size
#                                  and prints one table. Results also go to $OUT/gpu-check/.
#                                  With STEPs, only those run (a warm machine reruns what
#                                  failed); the table also shows earlier results left in
#                                  $OUT/gpu-check/. Steps: selftest op-tests two-workers-one-gpu
#                                  views-on-gpu bench bench-cudnn pytorch out-of-memory two-gpus
#                                  (two-gpus: only on a machine with 2 or more GPUs, else it says
#                                  so and passes in a second)
#
# Each step has its own time limit (475 s in all): the whole run stays under 8 minutes. A step that fails is
# reported and the next one still runs; the exit status is non-zero if any failed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DIR=target/gpu-check

if [[ ${1:-run} == prepare ]]; then
    set -e
    cargo build --release --locked
    ops=$(cargo test --locked --no-run --test ops --message-format=json 2>/dev/null |
        python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "ops" and m.get("executable"):
        print(m["executable"])')
    mkdir -p "$DIR"
    cp target/release/alexnet "$DIR/alexnet"
    cp "$ops" "$DIR/ops"
    # Debug information is not needed there, and the carried tree is limited in size.
    strip --strip-debug "$DIR/alexnet" "$DIR/ops"
    du -sh "$DIR"/*
    echo "carry: [\"$DIR\"], then run: scripts/gpu-check.sh"
    exit 0
fi

STEPS=(selftest op-tests two-workers-one-gpu views-on-gpu bench bench-cudnn pytorch out-of-memory two-gpus)
usage() {
    echo "usage: scripts/gpu-check.sh prepare | scripts/gpu-check.sh [run] [STEP...]" >&2
    echo "steps (all when none is named): ${STEPS[*]}" >&2
    exit 2
}
[[ ${1:-} == run ]] && shift
declare -A WANTED
for name in "$@"; do
    case " ${STEPS[*]} " in
    *" $name "*) WANTED[$name]=1 ;;
    *)
        echo "unknown step: $name" >&2
        usage
        ;;
    esac
done
if [[ $# == 0 ]]; then
    for name in "${STEPS[@]}"; do WANTED[$name]=1; done
fi

BIN=$DIR/alexnet
OPS=$DIR/ops
[[ -x $BIN && -x $OPS ]] || { echo "no $BIN or $OPS: run scripts/gpu-check.sh prepare first, and carry $DIR" >&2; exit 2; }
RESULTS=${OUT:-/tmp}/gpu-check
mkdir -p "$RESULTS"

# The CUDA libraries of the Python wheels (cuBLAS, NVRTC, NCCL, ...), from every site-packages
# that has some (user, system, virtual environment). NCCL ships libnccl.so.2 only; the loader
# looks for libnccl.so too.
mapfile -t NVS < <(python3 -c 'import nvidia; print("\n".join(dict.fromkeys(nvidia.__path__)))' 2>/dev/null)
NV=${NVS[*]:-}
LIBDIR=$(mktemp -d /tmp/alexnet-gpu-lib.XXXXXX)
PREP=/tmp/alexnet-gpu-prepared-$$
# The scratch folders go at exit: the libraries' links, the two workers' run, the prepared data
# and its two trainings.
trap 'rm -rf "$LIBDIR" "/tmp/alexnet-gpu-launch-$$" "/tmp/alexnet-gpu-two-$$".* "$PREP" "$PREP".*' EXIT
LIBS=$LIBDIR
for nv in "${NVS[@]}"; do
    for d in "$nv"/*/lib; do [[ -d $d ]] && LIBS="$LIBS:$d"; done
done
if [[ -n $NV ]]; then
    nccl=$(find "${NVS[@]}" -name 'libnccl.so.2' | head -n 1)
    [[ -n $nccl ]] && ln -sf "$nccl" "$LIBDIR/libnccl.so"
fi
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== GPU"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
echo "CUDA libraries from: ${NV:-(no nvidia wheels found)}"
# The libraries the binary will load, as it finds them: kernels compiled by an NVRTC newer than
# the driver's CUDA may not load.
VERSIONS=$(python3 - <<'PY'
import ctypes
def ask(lib, fn, n):
    try:
        vals = [ctypes.c_int() for _ in range(n)]
        rc = getattr(ctypes.CDLL(lib), fn)(*[ctypes.byref(v) for v in vals])
        return [v.value for v in vals] if rc == 0 else f"error {rc}"
    except OSError as e:
        return f"not loaded ({e})"
d = ask("libcuda.so.1", "cuDriverGetVersion", 1)
n = ask("libnvrtc.so.13", "nvrtcVersion", 2)
print("driver's CUDA " + (f"{d[0] // 1000}.{d[0] % 1000 // 10}" if isinstance(d, list) else d)
      + ", NVRTC " + (f"{n[0]}.{n[1]}" if isinstance(n, list) else n))
PY
)
echo "$VERSIONS"

declare -A STATUS
# step NAME SECONDS COMMAND...: runs COMMAND (if NAME was asked for) with a time limit; its standard output goes to
# $RESULTS/NAME.out, its log (standard error) to $RESULTS/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    [[ -n ${WANTED[$name]:-} ]] || return 0
    echo "== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$RESULTS/$name.out" 2>"$RESULTS/$name.log"
    local rc=$?
    tail -n 15 "$RESULTS/$name.log"
    tail -n 40 "$RESULTS/$name.out"
    STATUS[$name]="rc=$rc, $((SECONDS - t0)) s"
    echo "-- $name: ${STATUS[$name]}"
}

step selftest 120 env NCCL_DEBUG=WARN "$BIN" selftest --backend cuda --require-all --json \
    --process-timeout 25
step op-tests 75 env ALEXNET_REQUIRE_GPU=1 ALEXNET_GOLDEN_DIR=tests/golden \
    "$OPS" cuda --test-threads=1
step two-workers-one-gpu 30 "$BIN" launch --backend cuda --steps 40 --log-every 10 \
    --run-dir "/tmp/alexnet-gpu-launch-$$"
# The carried photographs, prepared, and two epochs whose views the GPU finishes from the bytes
# the loader cuts (the selftest checks that op bit for bit against the loader's), then the same
# with the views finished by the loader: our kernels use no atomics, so the two runs should end
# with the same parameters.
step views-on-gpu 40 bash -c "'$BIN' prepare --input data/sample/imagenet-photos --output $PREP \
    --shard-images 8 && printf 'conv_channels = [8, 16, 16, 16, 8]\nfc_widths = [16, 16]\nclasses = 20\n' \
    > $PREP.toml && for on in device host; do '$BIN' train --backend cuda --data $PREP --val $PREP \
    --net $PREP.toml --batch 4 --epochs 2 --log-every 1 --augment-on \$on --out $PREP.\$on || exit 1; \
    done && if cmp -s $PREP.device/column0.safetensors $PREP.host/column0.safetensors && \
    cmp -s $PREP.device/column1.safetensors $PREP.host/column1.safetensors; then \
    echo 'views on the GPU and on the host: identical parameters'; else \
    echo 'views on the GPU and on the host: parameters DIFFER'; exit 1; fi"
# --upload: as many steps again, each uploading its input as bytes, as training does.
step bench 45 "$BIN" bench --backend cuda --batch 128 --steps 20 --warmup 3 --upload --json
# The debug lines name the algorithms cuDNN's timing chose for each convolution.
step bench-cudnn 45 env RUST_LOG=info,alexnet::backend::cuda::cudnn=debug \
    "$BIN" bench --backend cuda --conv cudnn --batch 128 --steps 20 --warmup 3 --json
step pytorch 95 python3 bench/reference/pytorch_alexnet_gpu.py --batch 128 --steps 15 \
    --json "$RESULTS/pytorch.json"
# 30,000 paper-size images need about 0.4 TB of activations: the network must refuse the batch
# before the first step, with an error that names the layer and the batch size.
# shellcheck disable=SC2016 # the script is bash -c's, its $1 the binary
step out-of-memory 25 bash -c 'msg=$("$1" bench --backend cuda --batch 30000 --steps 1 \
    --warmup 0 2>&1 >/dev/null); rc=$?; printf "%s\n" "$msg" >&2; echo "exit status $rc"
    [[ $rc != 0 ]] && grep -q "at batch 30000 does not fit" <<<"$msg"' _ "$BIN"

# Two GPUs: the columns in two workers, one per GPU, exchanging over NCCL in place in GPU
# memory, against one process holding both columns on one GPU. The exchange only moves values
# and sums in column order, and the unfolding path's kernels use no atomics: the parameters
# should be identical. Then 2 replicas on 4 GPUs, where there are 4.
# shellcheck disable=SC2016 # the script is bash -c's, its $1 the binary, $2 a scratch prefix
step two-gpus 150 bash -c 'n=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU"); echo "$n GPU(s)"
    if (( n < 2 )); then echo "skipped: this step needs 2 GPUs"; exit 0; fi
    same() { python3 - "$1" "$2" <<"PY"
import json, struct, sys
def tensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    return {k: raw[8 + n + v["data_offsets"][0]:8 + n + v["data_offsets"][1]]
            for k, v in head.items() if k != "__metadata__"}
a, b = tensors(sys.argv[1]), tensors(sys.argv[2])
bad = [k for k in a if a[k] != b.get(k)]
print(f"{sys.argv[1]} against {sys.argv[2]}: " + ("identical" if not bad and a.keys() == b.keys() else f"DIFFER in {bad}"))
sys.exit(1 if bad or a.keys() != b.keys() else 0)
PY
    }
    "$1" train --backend cuda --steps 40 --log-every 10 --out "$2.one" || exit 1
    "$1" launch --backend cuda --steps 40 --log-every 10 --run-dir "$2.two" || exit 1
    grep -h "data plane connected" "$2.two"/rank*.log | head -n 2 >&2
    for c in 0 1; do same "$2.one/column$c.safetensors" "$2.two/params/column$c.safetensors" || exit 1; done
    if (( n >= 4 )); then
        "$1" launch --backend cuda --steps 40 --log-every 10 --replicas 2 --run-dir "$2.four" || exit 1
        for c in 0 1; do same "$2.one/column$c.safetensors" "$2.four/params/column$c.safetensors" \
            || echo "(2 replicas: NCCL sums in its own order; a difference in the last bits is expected)"; done
    fi' _ "$BIN" "/tmp/alexnet-gpu-two-$$"

echo
echo "== summary"
echo "$VERSIONS"
python3 - "$RESULTS" <<'EOF'
import json, os, re, sys
res = sys.argv[1]

def last_json(name):
    try:
        return json.load(open(os.path.join(res, name + ".out")))
    except (OSError, ValueError):
        return None

sel = last_json("selftest")
def err(c):
    # A check that could not run is an infinite error, which JSON writes as null.
    return float("inf") if c["error"] is None else c["error"]

if sel:
    worst = max(sel["checks"], key=err)
    print(f"selftest (strict f32)   {len(sel['checks']) - sel['failed']}/{len(sel['checks'])} passed, "
          f"worst {err(worst):.2e} ({worst['what']})")
    for c in sel["checks"]:
        if not err(c) <= c["tolerance"]:
            print(f"  FAILED: {c['what']} ({err(c):.2e})")
    if sel.get("tf32"):
        w = max(sel["tf32"], key=err)
        print(f"selftest (TF32)         worst {err(w):.2e} ({w['what']}), not judged")
else:
    print("selftest                no result (see selftest.log)")
try:
    ops = open(os.path.join(res, "op-tests.out")).read()
    m = re.search(r"test result: (\w+)\. (\d+) passed; (\d+) failed", ops)
    print(f"op tests on the GPU     {m.group(2)} passed, {m.group(3)} failed" if m else "op tests                no result")
except OSError:
    print("op tests                not run")
try:
    launch = open(os.path.join(res, "two-workers-one-gpu.log")).read()
    shares = re.findall(r'rank=(\d+) column_exchange_share(?:_pct)?="?([0-9.]+)%?"?', launch)
    share = ", time in the column exchange " + ", ".join(f"rank {r} {s}%" for r, s in sorted(shares)) if shares else ""
    print("two workers, one GPU    " + ("finished" + share if "every worker finished" in launch else "FAILED (see two-workers-one-gpu.log)"))
except OSError:
    pass
try:
    views = open(os.path.join(res, "views-on-gpu.log")).read()
    same = open(os.path.join(res, "views-on-gpu.out")).read()
    ok = "bytes, finished by the backend" in views and "validation epoch=2" in views
    print("views finished on GPU   " + ("2 epochs trained and validated; " + same.strip().split(": ")[-1]
                                         if ok else "FAILED (see views-on-gpu.log)"))
except OSError:
    pass
try:
    oom = open(os.path.join(res, "out-of-memory.log")).read()
    line = next((l for l in oom.splitlines() if "does not fit" in l), None)
    print("batch too large         " + (line.strip()[-160:] if line else "NO clear error (see out-of-memory.log)"))
except OSError:
    pass
ours = last_json("bench")
ours_dnn = last_json("bench-cudnn")
try:
    torch = json.load(open(os.path.join(res, "pytorch.json")))
except (OSError, ValueError):
    torch = None
print()
print(f"{'training, batch 128':34} {'images/s':>10} {'GPU memory':>12} {'vs PyTorch':>11}")
base = None
if torch:
    for r in torch["rows"]:
        if not r["tf32"] and not r["channels_last"]:
            base = r["train_img_s"]
for r in (ours, ours_dnn):
    if not r:
        continue
    mem = r.get("device_memory_bytes")
    ratio = f"{r['images_per_s'] / base:.2f}x" if base else "-"
    print(f"{('alexnet ' + r['backend'])[:34]:34} {r['images_per_s']:10.1f} "
          f"{(mem or 0) / 2**30:10.2f} GiB {ratio:>11}")
    up = r.get("uploading_images_per_s")
    if up:
        ratio = f"{up / base:.2f}x" if base else "-"
        print(f"{'  each step uploading its input':34} {up:10.1f} {'':>14} {ratio:>11}")
if torch:
    for r in torch["rows"]:
        label = f"PyTorch {torch['torch']} tf32={r['tf32']} cl={r['channels_last']}"
        print(f"{label[:34]:34} {r['train_img_s']:10.1f} {r['peak_mem_gib']:10.2f} GiB "
              f"{r['train_img_s'] / base if base else float('nan'):10.2f}x")
print("(alexnet: device memory in use; PyTorch: peak allocated by its caching allocator)")
runs = [(n, r) for n, r in (("unfolding", ours), ("cuDNN", ours_dnn)) if r and r.get("layers")]
if runs:
    print()
    print("where a step's time goes, ms (forward + backward, each layer timed to its end):")
    print(f"{'layer':10}" + "".join(f"{n:>22}" for n, _ in runs))
    names = [l["layer"] for l in runs[0][1]["layers"]]
    for name in names:
        cells = []
        for _, r in runs:
            l = next((l for l in r["layers"] if l["layer"] == name), None)
            cells.append(f"{l['forward_ms']:8.2f} + {l['backward_ms']:8.2f}  " if l else " " * 22)
        print(f"{name:10}" + "".join(f"{c:>22}" for c in cells))
try:
    planned = [l for l in open(os.path.join(res, "bench-cudnn.log")).read().splitlines()
               if "cuDNN convolution planned" in l]
except OSError:
    planned = []
if planned:
    print()
    print("cuDNN's algorithms (forward / backward filter / backward data; timed: chosen by timing):")
    short = lambda v: re.sub(r"CUDNN_CONVOLUTION_(FWD|BWD_FILTER|BWD_DATA)_ALGO_", "", v)
    for l in planned:
        f = dict(re.findall(r"(\w+)=(\S+)", l.split("cuDNN convolution planned", 1)[1]))
        c = re.search(r"in_c: (\d+), in_h: (\d+).*out_c: (\d+), kernel: (\d+)", l)
        shape = f"{c.group(1)}x{c.group(2)} -> {c.group(3)}, k{c.group(4)}" if c else "?"
        print(f"  {shape:22} timed={f.get('timed', '?'):5} {short(f.get('forward', '?'))} / "
              f"{short(f.get('filter', '?'))} / {short(f.get('data', '?'))}, "
              f"workspace {f.get('workspace_mib', '?')} MiB")
EOF

echo
failed=0
for name in "${!STATUS[@]}"; do
    echo "$name: ${STATUS[$name]}"
    [[ ${STATUS[$name]} == rc=0,* ]] || failed=1
done
exit $failed
