"""``llavakit bench padding|train``: how much of a batch is real tokens, and what packing buys.

``padding`` needs no data: it draws sample lengths shaped like LLaVA-1.5's mix665k from published facts
(665k records; ~6% text-only ShareGPT with ~1,050 text tokens on average, capped at 2,048; image records
576 image tokens plus text from ~70 tokens (TextCaps) to ~535 (VG); overall mean ~875, median ~820, p90
~1,140, p99 ~1,980 — the drawn distribution's own figures are printed beside the result) and builds
per-device batches (16 per device × 8 devices) three ways:

* the original's: modality-grouped megabatches of 128, each split into 8 "even" chunks that balance the
  total length per device (so every device batch mixes long and short samples), padded to the longest;
* llavakit's grouping: the same megabatches, sorted and cut into contiguous batches of similar lengths;
  and sorted over 50 steps' samples (``--length_group_steps 50``);
* packed: the same batches without padding (one row per micro-batch, FlashAttention-2 varlen), and in rows
  of at most 2,048 tokens (what SDPA / eager would use).

With ``--anyres`` every image record's 576 image tokens become what LLaVA-NeXT's AnyRes gives its image
(336-px CLIP tiles, the five LLaVA-NeXT grids, unpadded rows plus a newline each: up to 2,928 tokens)
and the length cap is 4,096 (LLaVA-NeXT's). The image sizes are modelled per source, from the sources'
published conventions: COCO images (LLaVA-Instruct, VQAv2, OK-VQA, A-OKVQA, RefCOCO) 640 px on the long
side, GQA and Visual Genome 500 px, TextCaps (Open Images) 1,024 px — three in four landscape, with the
common short sides of each; OCR-VQA's book covers portrait, about 500 × 330. Text lengths are as above.

``train`` runs a few steps of a tiny model on the CPU, padded and packed, on the same samples.
"""

from __future__ import annotations

import json

import numpy as np

#: image-record sources of mix665k: (name, records, median text tokens, lognormal sigma)
MIX665K_IMAGE_SOURCES = (("llava_instruct", 157712, 330, 0.6), ("vqav2", 82783, 190, 0.35),
                         ("gqa", 72140, 230, 0.35), ("okvqa", 8998, 60, 0.3), ("ocrvqa", 80000, 150, 0.3),
                         ("aokvqa", 66160, 110, 0.35), ("textcaps", 21953, 70, 0.25),
                         ("refcoco", 48447, 260, 0.4), ("vg", 86417, 535, 0.3))
MIX665K_RECORDS = 665298
IMAGE_TOKENS = 576
MAX_LEN = 2048


ANYRES_MAX_LEN = 4096
#: image sizes per source for ``--anyres``: (long side, {short side: probability}, landscape probability)
SOURCE_IMAGE_SIZES = {
    "coco": (640, {480: 0.55, 427: 0.3, 360: 0.1, 640: 0.05}, 0.75),
    "gqa_vg": (500, {375: 0.5, 333: 0.3, 281: 0.1, 500: 0.1}, 0.75),
    "textcaps": (1024, {768: 0.6, 683: 0.3, 1024: 0.1}, 0.75),
    "ocrvqa": (500, {330: 0.7, 300: 0.2, 380: 0.1}, 0.0),
}
SOURCE_KIND = {"gqa": "gqa_vg", "vg": "gqa_vg", "textcaps": "textcaps", "ocrvqa": "ocrvqa"}


def anyres_image_tokens(source: str, n: int, rng) -> np.ndarray:
    """AnyRes image tokens of ``n`` images of a mix665k source (LLaVA-NeXT's grids, 336-px CLIP tiles)."""
    from llavakit.data.anyres import LLAVA_NEXT_PINPOINTS, AnyRes

    geometry = AnyRes(LLAVA_NEXT_PINPOINTS, 336, 14)
    long, shorts, landscape = SOURCE_IMAGE_SIZES[SOURCE_KIND.get(source, "coco")]
    short = rng.choice(list(shorts), size=n, p=list(shorts.values()))
    wide = rng.random(n) < landscape
    tokens = {(int(s), bool(w)): geometry.num_tokens(*((s, long) if w else (long, s)))
              for s in shorts for w in (True, False)}
    return np.array([tokens[(int(s), bool(w))] for s, w in zip(short, wide)], dtype=np.int64)


def mix665k_lengths(seed: int = 0, anyres: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, has_image) for a mix665k-shaped dataset (see the module docstring)."""
    rng = np.random.default_rng(seed)
    parts, images = [], []
    for name, n, median, sigma in MIX665K_IMAGE_SOURCES:
        text = np.exp(rng.normal(np.log(median), sigma, n)).astype(np.int64)
        parts.append(text + (anyres_image_tokens(name, n, rng) if anyres else IMAGE_TOKENS))
        images.append(np.ones(n, bool))
    text_n = MIX665K_RECORDS - sum(n for _, n, _, _ in MIX665K_IMAGE_SOURCES)
    parts.append(np.exp(rng.normal(np.log(900), 0.7, text_n)).astype(np.int64))
    images.append(np.zeros(text_n, bool))
    lengths = np.minimum(np.concatenate(parts), ANYRES_MAX_LEN if anyres else MAX_LEN)
    has_image = np.concatenate(images)
    perm = rng.permutation(len(lengths))
    return lengths[perm], has_image[perm]


def _even_chunks(indices: np.ndarray, lengths: np.ndarray, n: int) -> list[list[int]]:
    """The original's split of a length-sorted megabatch: each sample to the lightest chunk with room."""
    size = len(indices) // n if len(indices) % n == 0 else len(indices) // n + 1
    chunks: list[list[int]] = [[] for _ in range(n)]
    totals = [0] * n
    for i in indices:
        k = min((c for c in range(n) if len(chunks[c]) < size), key=lambda c: totals[c])
        chunks[k].append(int(i))
        totals[k] += int(lengths[i])
    return [c for c in chunks if c]


def original_batches(lengths: np.ndarray, has_image: np.ndarray, batch: int = 16, world: int = 8,
                     seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    for group in (np.flatnonzero(has_image), np.flatnonzero(~has_image)):
        perm = group[rng.permutation(len(group))]
        for s in range(0, len(perm), batch * world):
            mb = perm[s:s + batch * world]
            mb = mb[np.argsort(-lengths[mb], kind="stable")]
            out += _even_chunks(mb, lengths, world)
    return out


def grouped_batches(lengths: np.ndarray, has_image: np.ndarray, batch: int = 16, world: int = 8,
                    seed: int = 0, window_steps: int = 1) -> list[list[int]]:
    from llavakit.data.sampler import LengthGroupedBatchSampler

    return LengthGroupedBatchSampler(lengths, batch, world, group_by_modality=True, has_image=has_image,
                                     seed=seed, window_steps=window_steps).batches()


def real_fraction_padded(batches: list[list[int]], lengths: np.ndarray) -> float:
    real = sum(int(lengths[b].sum()) for b in batches)
    return real / sum(len(b) * int(lengths[b].max()) for b in batches)


def real_fraction_rows(batches: list[list[int]], lengths: np.ndarray, capacity: int | None) -> float:
    from llavakit.data.collate import pack_rows

    real = processed = 0
    for b in batches:
        ls = [int(lengths[i]) for i in b]
        rows = pack_rows(ls, capacity)
        real += sum(ls)
        processed += len(rows) * max(sum(ls[i] for i in r) for r in rows)
    return real / processed


def bench_padding(seed: int = 0, batch: int = 16, world: int = 8, anyres: bool = False) -> dict:
    lengths, has_image = mix665k_lengths(seed, anyres)
    cap = ANYRES_MAX_LEN if anyres else MAX_LEN
    orig = original_batches(lengths, has_image, batch, world, seed)
    ours = grouped_batches(lengths, has_image, batch, world, seed)
    return {
        "original_real_fraction": round(real_fraction_padded(orig, lengths), 4),
        "grouped_real_fraction": round(real_fraction_padded(ours, lengths), 4),
        "grouped_50_steps_real_fraction": round(real_fraction_padded(
            grouped_batches(lengths, has_image, batch, world, seed, window_steps=50), lengths), 4),
        "packed_real_fraction": round(real_fraction_rows(ours, lengths, None), 4),
        f"packed_rows_{cap}_real_fraction": round(real_fraction_rows(ours, lengths, cap), 4),
        "anyres": anyres,
        "records": int(len(lengths)), "text_only_fraction": round(float((~has_image).mean()), 4),
        "per_device_batch": batch, "world_size": world,
        "lengths": {"mean": round(float(lengths.mean()), 1), "median": int(np.median(lengths)),
                    "p90": int(np.percentile(lengths, 90)), "p99": int(np.percentile(lengths, 99)),
                    "text_only_mean": round(float(lengths[~has_image].mean()), 1)},
    }


def timed_train_step(model, inputs: dict, optimizer, device) -> tuple[float, float]:
    """One optimizer step as training takes it (bf16 autocast on CUDA): its seconds (synchronised on CUDA)
    and its loss. The step the benchmark scripts time."""
    import time

    import torch

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        loss = model(**inputs).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t, float(loss.detach())


def bench_train(steps: int = 12, batch: int = 8, seed: int = 0, workdir: str | None = None,
                rows_of: int = 512) -> dict:
    """Tiny-model training steps on the CPU on the same samples (mixed lengths): padded (SDPA); packed into one
    row per micro-batch (SDPA, block mask); packed into rows of at most ``rows_of`` tokens (SDPA); packed into
    one row attended per sample (``torch_varlen``)."""
    import random
    import tempfile
    from pathlib import Path

    from llavakit.config import RunConfig
    from llavakit.demo.backbones import tiny_clip, tiny_llama, train_tokenizer
    from llavakit.train import run

    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="llavakit-bench-") as tmp:
            return bench_train(steps, batch, seed, tmp, rows_of)
    root = Path(workdir)
    rng = random.Random(seed)
    words = "the a red blue green circle square image left right top bottom there is of and".split()
    corpus = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(200)]
    tok = train_tokenizer(corpus, vocab_size=300)
    llm = tiny_llama(tok, root / "llm", hidden=128, layers=4, heads=4)
    clip = tiny_clip(root / "clip")
    from PIL import Image

    (root / "images").mkdir(exist_ok=True)
    records = []
    for i in range(batch * steps):
        Image.new("RGB", (32, 32), (rng.randrange(256), 0, 0)).save(root / "images" / f"{i}.png")
        answer = " ".join(rng.choice(words) for _ in range(rng.choice((4, 16, 64, 200))))
        rec = {"id": str(i), "conversations": [{"from": "human", "value": "Describe it."},
                                               {"from": "gpt", "value": answer}]}
        if i % 8:
            rec["image"] = f"{i}.png"
            rec["conversations"][0]["value"] = "<image>\nDescribe it."
        records.append(rec)
    (root / "data.json").write_text(json.dumps(records))
    out = {}
    packed = {"packing": True}
    variants = (("padded", "sdpa", {}), ("packed", "sdpa", {**packed, "packing_max_length": batch * rows_of}),
                ("packed_rows", "sdpa", {**packed, "packing_max_length": rows_of}),
                ("packed_varlen", "torch_varlen", packed))
    for name, attn, extra in variants:
        res = run(RunConfig.from_options(
            model_name_or_path=llm, vision_tower=clip, version="v1", data_path=root / "data.json",
            image_folder=root / "images", output_dir=root / name, max_steps=steps,
            per_device_train_batch_size=batch, logging_steps=1, save_strategy="no", report_to="none",
            learning_rate=1e-4, seed=seed, attn_implementation=attn, model_max_length=rows_of,
            group_by_modality_length=True, dataloader_num_workers=0, disable_tqdm=True, **extra))
        logs = [h for h in res.trainer.state.log_history if "real_tokens_per_second" in h][1:]  # warm-up out
        out[f"{name}_real_tokens_per_second"] = round(float(np.mean([h["real_tokens_per_second"] for h in logs])), 1)
        out[f"{name}_real_token_fraction"] = round(float(np.mean([h["real_token_fraction"] for h in logs])), 4)
    for name in ("packed", "packed_rows", "packed_varlen"):
        out[f"{name}_speedup"] = round(out[f"{name}_real_tokens_per_second"] / out["padded_real_tokens_per_second"],
                                       3)
    out["steps"], out["per_device_batch"] = steps, batch
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="llavakit bench", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("padding", help="real-token fraction: original batching, our grouping, packing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--anyres", action="store_true", help="LLaVA-NeXT's AnyRes image tokens (see the module doc)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("train", help="tiny-model CPU steps, padded vs packed")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "padding":
        result = bench_padding(args.seed, anyres=args.anyres)
    else:
        import logging

        logging.basicConfig(level=logging.WARNING, force=True)
        result = bench_train(args.steps, args.batch)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:>34}: {v}")
    return 0
