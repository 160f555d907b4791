#!/usr/bin/env bash
# Fuzzes the parsers of untrusted input with libFuzzer (the cargo-fuzz crate in fuzz/):
#
#   frame_header  comm::tcp::check_frame_header: a data-plane frame header from a peer
#   handshake     comm::tcp::parse_hello: a data-plane hello from whoever connects
#   job_config    a job file / [net] table as TOML: JobConfig::validate + hash, NetConfig::validate
#
#   scripts/fuzz.sh              # 60 s per target
#   scripts/fuzz.sh 300          # 300 s per target
#   TARGETS="handshake" scripts/fuzz.sh 30
#
# Needs a nightly Rust toolchain (libFuzzer's coverage instrumentation and AddressSanitizer
# are nightly-only) and cargo-fuzz:
#
#   rustup toolchain install nightly
#   cargo install cargo-fuzz --locked
#
# (FUZZ_TOOLCHAIN=nightly-YYYY-MM-DD picks a dated nightly.) The stable build and `cargo test`
# of the crate do not need either: fuzz/ is a workspace of its own.
#
# Targets are built with debug assertions, so an arithmetic overflow is a crash too. Per
# target it prints the executions (libFuzzer's stat::number_of_executed_units) and whether it
# crashed; a crashing input is kept in fuzz/artifacts/TARGET/ and replays with
#   cargo +nightly fuzz run --debug-assertions TARGET fuzz/artifacts/TARGET/crash-...
# Exits 1 if any target crashed, 2 if the tools are missing or the build fails.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

SECS=${1:-60}
TOOLCHAIN=${FUZZ_TOOLCHAIN:-nightly}
TARGETS=${TARGETS:-frame_header handshake job_config}

if ! [[ "$SECS" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [SECONDS_PER_TARGET]   (a positive number of seconds, default 60)" >&2
  exit 2
fi
if ! command -v rustup >/dev/null || ! rustup run "$TOOLCHAIN" rustc --version >/dev/null 2>&1; then
  echo "error: fuzzing needs the Rust toolchain '$TOOLCHAIN' (libFuzzer instrumentation is nightly-only)." >&2
  echo "       install it with:  rustup toolchain install nightly" >&2
  exit 2
fi
if ! cargo "+$TOOLCHAIN" fuzz --version >/dev/null 2>&1; then
  echo "error: cargo-fuzz is not installed." >&2
  echo "       install it with:  cargo install cargo-fuzz --locked" >&2
  exit 2
fi

# cargo-fuzz runs from the crate root; corpora, artifacts and logs live in fuzz/.
F=fuzz
mkdir -p "$F/logs"
FLAGS=(--debug-assertions)

echo "== building the fuzz targets ($(rustup run "$TOOLCHAIN" rustc --version)) ..." >&2
start=$(date +%s)
if ! cargo "+$TOOLCHAIN" fuzz build "${FLAGS[@]}" >"$F/logs/build.log" 2>&1; then
  tail -n 40 "$F/logs/build.log" >&2
  echo "error: the fuzz targets do not build (full log: fuzz/logs/build.log)" >&2
  exit 2
fi
echo "== built in $(($(date +%s) - start)) s" >&2

crashed=0
summary=()
for t in $TARGETS; do
  # The corpus grows at run time (and is git-ignored); seed it from the committed seeds.
  mkdir -p "$F/corpus/$t" "$F/artifacts/$t"
  if [ -d "$F/seeds/$t" ]; then cp -n "$F/seeds/$t"/* "$F/corpus/$t"/ 2>/dev/null || true; fi
  if [ "$t" = job_config ]; then cp -n jobs/*.toml "$F/corpus/$t"/ 2>/dev/null || true; fi
  stamp=$(mktemp)
  echo "== $t: ${SECS} s ..." >&2
  cargo "+$TOOLCHAIN" fuzz run "${FLAGS[@]}" "$t" -- \
    -max_total_time="$SECS" -timeout=10 -print_final_stats=1 >"$F/logs/$t.log" 2>&1
  rc=$?
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$F/logs/$t.log" | grep -o '[0-9]*$' | tail -n 1)
  if [ -z "$execs" ]; then
    execs=$(grep -oE '^#[0-9]+' "$F/logs/$t.log" | tail -n 1 | tr -d '#')
  fi
  new=$(find "$F/artifacts/$t" -type f -newer "$stamp" 2>/dev/null)
  rm -f "$stamp"
  if [ "$rc" -ne 0 ] || [ -n "$new" ]; then
    crashed=1
    summary+=("$(printf '%-13s %12s executions  CRASH (exit %s)' "$t" "${execs:-?}" "$rc")")
    echo "-- $t crashed (exit $rc); log: fuzz/logs/$t.log" >&2
    grep -m 3 -E 'panicked at|^thread .* panicked|ERROR: (libFuzzer|AddressSanitizer)' -A 2 "$F/logs/$t.log" >&2 || true
    for a in $new; do
      echo "   input: $a  (replay: cargo +$TOOLCHAIN fuzz run ${FLAGS[*]} $t $a)" >&2
    done
  else
    summary+=("$(printf '%-13s %12s executions  ok' "$t" "${execs:-?}")")
  fi
done

echo
echo "fuzzing, ${SECS} s per target:"
printf '  %s\n' "${summary[@]}"
exit "$crashed"
