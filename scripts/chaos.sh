#!/usr/bin/env bash
# Faults on a seeded schedule against `alexnet launch`, ending byte-identical to a quiet run:
# see scripts/chaos.py (or scripts/chaos.sh --help) for the faults and the table it prints.
#   scripts/chaos.sh [--minutes M] [--seed S] [--alexnet BIN] [--keep]
set -euo pipefail
exec python3 "$(dirname "$0")/chaos.py" "$@"
