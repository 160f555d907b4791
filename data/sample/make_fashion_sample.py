#!/usr/bin/env python3
"""Regenerate the class-balanced Fashion-MNIST sample in data/sample/fashion-mnist/.

Source: Debian's `dataset-fashion-mnist` package (apt-get install dataset-fashion-mnist),
which installs the original Zalando Research IDX files under
/usr/share/datasets/fashion-mnist.

For each split we keep the first N images of every class, in file order, and
interleave the classes round-robin (class 0, 1, ..., 9, 0, 1, ...) so that any
prefix of the sample is close to class-balanced: a quick run on the first few
hundred images still sees every class.

The output is byte-for-byte deterministic: gzip headers carry mtime 0 and no
file name, so rerunning the script leaves `git status` clean.

Python 3 standard library only.

Usage: python3 data/sample/make_fashion_sample.py [--src DIR] [--out DIR]
"""

import argparse
import gzip
import os
import struct
import sys

NUM_CLASSES = 10
# (output/input file prefix, images kept per class)
SPLITS = (("train", 300), ("t10k", 50))

IMAGE_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
LABEL_MAGIC = 0x00000801  # unsigned byte, 1 dimension


def read_idx(path, magic):
    """Return (dims, payload bytes) of a gzipped IDX file, checking its magic and length."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        sys.exit(f"{path}: too short for an IDX header")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        sys.exit(f"{path}: magic {found:#010x}, expected {magic:#010x}")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    expected = 1
    for d in dims:
        expected *= d
    payload = data[header_len:]
    if len(payload) != expected:
        sys.exit(f"{path}: {len(payload)} payload bytes, header says {expected}")
    return dims, payload


def write_idx_gz(path, magic, dims, payload):
    header = struct.pack(f">I{len(dims)}I", magic, *dims)
    # gzip.compress writes no file name; mtime=0 makes the output reproducible.
    blob = gzip.compress(header + payload, compresslevel=9, mtime=0)
    with open(path, "wb") as f:
        f.write(blob)


def make_split(src, out, prefix, per_class):
    img_path = os.path.join(src, f"{prefix}-images-idx3-ubyte.gz")
    lbl_path = os.path.join(src, f"{prefix}-labels-idx1-ubyte.gz")
    (n, rows, cols), pixels = read_idx(img_path, IMAGE_MAGIC)
    (n_labels,), labels = read_idx(lbl_path, LABEL_MAGIC)
    if n != n_labels:
        sys.exit(f"{img_path} has {n} images but {lbl_path} has {n_labels} labels")

    # Indices of the first `per_class` images of each class, in file order.
    by_class = [[] for _ in range(NUM_CLASSES)]
    for i, label in enumerate(labels):
        if label >= NUM_CLASSES:
            sys.exit(f"{lbl_path}: label {label} at index {i} is out of range")
        if len(by_class[label]) < per_class:
            by_class[label].append(i)
    for c, idxs in enumerate(by_class):
        if len(idxs) < per_class:
            sys.exit(f"{lbl_path}: class {c} has only {len(idxs)} images, need {per_class}")

    order = [by_class[c][k] for k in range(per_class) for c in range(NUM_CLASSES)]
    size = rows * cols
    out_pixels = b"".join(pixels[i * size:(i + 1) * size] for i in order)
    out_labels = bytes(labels[i] for i in order)

    count = len(order)
    write_idx_gz(os.path.join(out, f"{prefix}-images-idx3-ubyte.gz"),
                 IMAGE_MAGIC, (count, rows, cols), out_pixels)
    write_idx_gz(os.path.join(out, f"{prefix}-labels-idx1-ubyte.gz"),
                 LABEL_MAGIC, (count,), out_labels)
    print(f"{prefix}: {count} images ({per_class} per class), {rows}x{cols}")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="/usr/share/datasets/fashion-mnist",
                        help="folder holding the full Fashion-MNIST .gz files")
    parser.add_argument("--out", default=os.path.join(here, "fashion-mnist"),
                        help="folder to write the sample into")
    args = parser.parse_args()

    os.makedirs(args.out, exist_ok=True)
    for prefix, per_class in SPLITS:
        make_split(args.src, args.out, prefix, per_class)


if __name__ == "__main__":
    main()
