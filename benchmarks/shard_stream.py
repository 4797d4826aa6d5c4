"""Samples/s per core from shards vs a converted record directory vs JSON, on the same data; and the
memory of data-loader workers over a long stream of shards.

    python benchmarks/shard_stream.py [--n 2000] [--epochs 10]

Data: ``--n`` records (3-round conversations, ~300 text tokens) with 640×480 JPEGs (every record its own
file), CLIP-L/14-336 preprocessing with padding, a Llama-style BPE tokenizer trained on the spot. The same
records are read three ways — the JSON file and the image folder; ``llavakit data convert``'s record
directory and the image folder; ``llavakit data shard``'s shards (local files) — each through its
training sampler, ``LlavaDataset`` / ``ShardDataset`` and the collator, in one process with one thread
(5 interleaved passes, the fastest counts). Then the shards stream for ``--epochs`` epochs through a
DataLoader with 2 workers while the workers' resident memory is sampled.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from input_path import WORDS, make_data  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10, help="epochs of the memory run")
    ap.add_argument("--window", type=int, default=1000)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import psutil
    from PIL import Image
    from torch.utils.data import DataLoader
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from llavakit.data.collate import LlavaCollator
    from llavakit.data.dataset import LlavaDataset, build_sample_index
    from llavakit.data.images import ImageTransform
    from llavakit.data.records import convert_records, load_records
    from llavakit.data.sampler import LengthGroupedBatchSampler
    from llavakit.data.shards import SAMPLES, ShardSource, write_shards
    from llavakit.data.stream import ShardDataset
    from llavakit.data.templates import VICUNA_V1
    from llavakit.data.tokenize import ConversationEncoder
    from llavakit.demo.backbones import train_tokenizer
    from llavakit.model.build import prepare_tokenizer

    root = Path(tempfile.mkdtemp(prefix="llavakit-shards-"))
    atexit.register(shutil.rmtree, root, True)
    records = make_data(root, 50)
    import numpy as np

    rng = np.random.default_rng(1)
    base = [np.asarray(Image.open(root / "images" / f"{i}.jpg")) for i in range(50)]
    for i in range(args.n):  # every record its own file, as in real data
        arr = np.roll(base[i % 50], int(rng.integers(0, 640)), axis=1)
        Image.fromarray(arr).save(root / "images" / f"s{i}.jpg", quality=90)
    records = [{**records[i % 50], "id": str(i), "image": f"s{i}.jpg"} for i in range(args.n)]
    (root / "data.json").write_text(json.dumps(records))
    tok = train_tokenizer([" ".join(WORDS)] * 50 + [VICUNA_V1.system] * 10, vocab_size=400)
    prepare_tokenizer(tok)
    proc = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                 do_center_crop=True, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                 image_std=[0.26862954, 0.26130258, 0.27577711], resample=3, do_convert_rgb=True)
    transform = ImageTransform.from_processor(proc, "pad")
    enc = ConversationEncoder(tok, VICUNA_V1, 576)
    collate = LlavaCollator(tok.pad_token_id, transform, normalize=False)
    convert_records(root / "data.json", root / "records")
    t = time.perf_counter()
    write_shards(str(root / "data.json"), str(root / "images"), str(root / "shards"), shard_bytes=50 * 10**6,
                 workers=1)
    shard_seconds = time.perf_counter() - t
    json_bytes = sum(os.path.getsize(root / "images" / r["image"]) for r in records)

    def dataset(kind: str):
        path = {"json": root / "data.json", "records": root / "records", "shards": root / "shards"}[kind]
        store, valid, _ = load_records(path)
        index = build_sample_index(store, valid, enc, 4096, cache_dir=root / "cache")
        if kind != "shards":
            ds = LlavaDataset(store, index, enc, transform, str(root / "images"), 4096)
            sampler = LengthGroupedBatchSampler(ds.modality_lengths, args.batch, group_by_modality=True,
                                                has_image=index.has_image, window_steps=8)
            return ds, sampler
        ds = ShardDataset(store, index, enc, transform, None, 4096, source=ShardSource(str(path)),
                          samples=dict(np.load(path / SAMPLES)), window=args.window)
        return ds, ds.sampler(args.batch, 1, 0, seed=0, group_by_modality=True, sort_by_length=True,
                              drop_last=False)

    def one_pass(kind: str) -> float:
        ds, sampler = dataset(kind)
        t = time.perf_counter()
        n = 0
        for batch in sampler:
            items = ds.__getitems__(batch) if kind == "shards" else [ds[i] for i in batch]
            collate(items)
            n += len(items)
        assert n == args.n, (kind, n)
        return time.perf_counter() - t

    kinds = ("json", "records", "shards")
    times = {k: [] for k in kinds}
    for k in kinds:
        one_pass(k)  # warm: page cache, length caches
    for _ in range(args.repeats):
        for k in kinds:
            times[k].append(one_pass(k))
    results = {f"{k}_samples_per_second": round(args.n / min(times[k]), 1) for k in kinds}

    # memory over a long stream: 2 workers, --epochs epochs
    ds, sampler = dataset("shards")
    sampler = ds.sampler(args.batch, 1, 2, seed=0, group_by_modality=True, sort_by_length=True, drop_last=False)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2, persistent_workers=True)
    me = psutil.Process()
    samples_rss: list[tuple[int, float]] = []
    seen = 0

    def workers_uss() -> float:
        return sum(c.memory_full_info().uss for c in me.children()) / 2**20

    t = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for batch in loader:
            seen += batch["num_samples"]
            if seen % (args.batch * 25) == 0:
                samples_rss.append((seen, workers_uss()))
    stream_seconds = time.perf_counter() - t
    rss = [r for _, r in samples_rss]
    results.update({
        "n": args.n, "image_bytes": json_bytes, "shard_bytes": sum(p.stat().st_size for p in (root / "shards").glob("*.tar")),
        "write_shards_seconds": round(shard_seconds, 1),
        "stream_samples": seen, "stream_samples_per_second_2_workers": round(seen / stream_seconds, 1),
        "workers_uss_mib_first": round(rss[0], 1), "workers_uss_mib_max": round(max(rss), 1),
        "workers_uss_mib_last": round(rss[-1], 1),
        "workers_uss_mib_after_epoch_1_max": max((round(r, 1) for s, r in samples_rss if s > args.n), default=None),
    })
    print(json.dumps(results))


if __name__ == "__main__":
    main()
