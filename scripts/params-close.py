#!/usr/bin/env python3
"""Compares two folders of trained columns (column0.safetensors, column1.safetensors) tensor
by tensor: the relative error ||a - b|| / ||b|| of each must stay under TOL (the measure of
the Rust tests' `rel_err`). Prints the largest; exits 1 when one is over, 2 on a bad file.

Usage: scripts/params-close.py GOT_DIR WANT_DIR [TOL (default 1e-6)]
Pure Python (no numpy): it runs wherever the multi-host test does."""
import array
import json
import math
import struct
import sys


def tensors(path):
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    body = data[8 + n :]
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        if t["dtype"] != "F32":
            sys.exit(f"{path}: tensor {name} is {t['dtype']}, not F32")
        a, b = t["data_offsets"]
        values = array.array("f")
        values.frombytes(body[a:b])
        if sys.byteorder != "little":
            values.byteswap()
        out[name] = values
    return out


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    got_dir, want_dir = sys.argv[1], sys.argv[2]
    tol = float(sys.argv[3]) if len(sys.argv) == 4 else 1e-6
    worst = (0.0, "")
    for column in ("column0.safetensors", "column1.safetensors"):
        try:
            got, want = tensors(f"{got_dir}/{column}"), tensors(f"{want_dir}/{column}")
        except (OSError, ValueError, KeyError) as e:
            print(f"cannot read {column}: {e}", file=sys.stderr)
            sys.exit(2)
        if got.keys() != want.keys():
            print(f"{column}: the tensors differ: {sorted(got.keys() ^ want.keys())}", file=sys.stderr)
            sys.exit(1)
        for name in sorted(want):
            a, b = got[name], want[name]
            if len(a) != len(b):
                print(f"{column} {name}: {len(a)} values against {len(b)}", file=sys.stderr)
                sys.exit(1)
            diff = sum((x - y) ** 2 for x, y in zip(a, b))
            norm = sum(y * y for y in b)
            e = math.sqrt(diff / max(norm, 1e-30))
            if e > worst[0] or not worst[1]:
                worst = (e, f"{column} {name}")
    print(f"largest relative error {worst[0]:.3e} ({worst[1]}), tolerance {tol:.0e}")
    sys.exit(0 if worst[0] <= tol else 1)


if __name__ == "__main__":
    main()
