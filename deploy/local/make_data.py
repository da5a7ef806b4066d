"""Write the toy training data of deploy/local: ``data/<device>.csv``, one file per device.

Three Gaussian clusters in four dimensions: columns ``x1..x4`` (features) and
``label`` (the class, 0, 1 or 2), seeded by the device name, so every device
holds its own sample of the same task. Any CSV of that shape works in its
place: ``[data] path`` and ``label`` in the device's TOML name the file and
the label column. Run it from deploy/local: ``python make_data.py device-1``.
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path

import numpy as np

CENTERS = np.array([[2, 0, 0, 0], [0, 2, 0, 0], [0, 0, 2, 0]], dtype=np.float32)


def main() -> None:
    """Write one file per device name given on the command line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("devices", nargs="+", help="device names, e.g. device-1")
    parser.add_argument("--samples", type=int, default=600, help="rows per device")
    args = parser.parse_args()
    out_dir = Path("data")
    out_dir.mkdir(exist_ok=True)
    features = CENTERS.shape[1]
    for name in args.devices:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        y = rng.integers(0, len(CENTERS), size=args.samples)
        X = CENTERS[y] + rng.normal(size=(args.samples, features))
        path = out_dir / f"{name}.csv"
        np.savetxt(
            path,
            np.column_stack([X, y]),
            delimiter=",",
            header=",".join([*(f"x{i + 1}" for i in range(features)), "label"]),
            comments="",
            fmt=["%.5f"] * features + ["%d"],
        )
        print(f"{path}: {args.samples} rows, {features} features, {len(CENTERS)} classes")


if __name__ == "__main__":
    main()
