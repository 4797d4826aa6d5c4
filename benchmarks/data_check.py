"""``llavakit data check`` speed: images decoded and checked per minute, per worker process.

    python benchmarks/data_check.py [--n 1000] [--workers 1]

Writes ``--n`` 640×480 JPEGs (COCO-sized) and a record file pointing at them, then times ``run_check``
with ``--workers`` processes (every pixel decoded, so truncated files are caught).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from PIL import Image

    from llavakit.data.check import run_check

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llavakit-check-"))
    rng = np.random.default_rng(0)
    (root / "coco").mkdir()
    records = []
    for i in range(args.n):
        small = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(small).resize((640, 480), Image.BILINEAR).save(root / "coco" / f"{i}.jpg", quality=90)
        records.append({"id": str(i), "image": f"coco/{i}.jpg",
                        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                          {"from": "gpt", "value": "A picture."}]})
    (root / "data.json").write_text(json.dumps(records))
    t = time.perf_counter()
    report = run_check(str(root / "data.json"), str(root), workers=args.workers)
    dt = time.perf_counter() - t
    assert not report.problems, report.summary()
    print(json.dumps({"images": args.n, "workers": args.workers, "seconds": round(dt, 2),
                      "images_per_minute": round(args.n / dt * 60), "per_worker_per_minute":
                      round(args.n / dt * 60 / args.workers)}))


if __name__ == "__main__":
    main()
