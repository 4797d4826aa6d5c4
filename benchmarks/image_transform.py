"""Image preprocessing speed: llavakit's PIL + numpy path against transformers' CLIPImageProcessorPil.

Both start from a decoded RGB PIL image (decode time is the same for both and reported separately) and
end with the float32 (3, 336, 336) tensor. Run: `python benchmarks/image_transform.py [--n 200] [--json]`.
"""

from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--size", type=int, default=336)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from llavakit.data.images import ImageTransform, expand2square, open_image

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    # a smooth photo-like 640x480 JPEG
    base = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).resize((640, 480), Image.BICUBIC).save(buf, "JPEG", quality=90)
    path = "/tmp/llavakit_bench.jpg"
    with open(path, "wb") as f:
        f.write(buf.getvalue())

    proc = CLIPImageProcessorPil(size={"shortest_edge": args.size},
                                 crop_size={"height": args.size, "width": args.size})
    results = {}
    for mode in ("square", "pad"):
        ours = ImageTransform.from_processor(proc, aspect_ratio=mode)
        im = open_image(path)
        ref_in = expand2square(im, ours.background) if mode == "pad" else im
        assert np.array_equal(ours(im), proc(images=ref_in, return_tensors="np")["pixel_values"][0])
        timings = {}
        for name, fn in [
            ("transformers_ms", lambda im=im, ours=ours: proc(
                images=expand2square(im, ours.background) if ours.aspect_ratio == "pad" else im,
                return_tensors="np")["pixel_values"]),
            ("llavakit_ms", lambda im=im, ours=ours: ours(im)),
            ("llavakit_uint8_only_ms", lambda im=im, ours=ours: ours.to_uint8(im)),
        ]:
            for _ in range(5):
                fn()
            t = time.perf_counter()
            for _ in range(args.n):
                fn()
            timings[name] = round((time.perf_counter() - t) / args.n * 1000, 2)
        timings["speedup"] = round(timings["transformers_ms"] / timings["llavakit_ms"], 2)
        results[mode] = timings
    t = time.perf_counter()
    for _ in range(args.n):
        open_image(path)
    results["decode_ms"] = round((time.perf_counter() - t) / args.n * 1000, 2)
    print(json.dumps(results) if args.json else json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
