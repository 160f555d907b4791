#!/usr/bin/env python3
"""Prints the scalars of a run's TensorBoard event files as JSON, read with TensorBoard's own
event reader (so a file it cannot read, or a bad CRC, is an error here too).

    scripts/tensorboard-scalars.py RUN_DIR/tensorboard

Output: {"files": [names in reading order], "scalars": {tag: [[step, value, wall_time], ...]}},
each tag's points in the order they appear in the files (no step is dropped or merged, so a
step written twice shows twice). Needs `pip install tensorboard`.
"""

import json
import os
import sys

from tensorboard.backend.event_processing import event_file_loader


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    folder = sys.argv[1]
    files = sorted(f for f in os.listdir(folder) if "tfevents" in f)
    scalars: dict[str, list] = {}
    for name in files:
        loader = event_file_loader.EventFileLoader(os.path.join(folder, name))
        for event in loader.Load():
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    v = value.simple_value
                elif value.HasField("tensor"):
                    # The loader migrates simple values to scalar tensors.
                    v = value.tensor.float_val[0]
                else:
                    continue
                scalars.setdefault(value.tag, []).append([event.step, v, event.wall_time])
    json.dump({"files": files, "scalars": scalars}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
