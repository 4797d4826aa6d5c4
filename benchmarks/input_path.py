"""The whole training input path per sample, one core: decode → pad/resize → tokenize → collate.

    python benchmarks/input_path.py [--n 200]

llavakit: ``LlavaDataset`` (decode, ``expand2square`` + resize to uint8, one tokenization with character
offsets) and ``LlavaCollator`` handing over uint8 (normalised later on the device).
Baseline, the original's way: PIL decode, ``expand2square``, ``CLIPImageProcessorPil`` (float32), the
prompt tokenized around ``<image>`` and every round tokenized again to place the label mask, then a
float32 batch. Samples: 640×480 JPEGs with LLaVA-style 3-round conversations (~300 text tokens), the
CLIP ViT-L/14-336 preprocessing config, a Llama-style BPE tokenizer trained on the spot. Before timing,
the last batch of each path is compared: the script stops unless the pixels are the same to the bit.
"""

from __future__ import annotations

import argparse
import atexit
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WORDS = ("the a person is sitting on bench near table with red blue car street sign building window left right "
         "holding phone wearing hat looking at camera there are two three dogs cats").split()


def make_data(root: Path, n: int, seed: int = 0) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    r = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(min(n, 50)):  # 50 distinct images, reused
        base = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
        Image.fromarray(base).resize((640, 480), Image.BILINEAR).save(root / "images" / f"{i}.jpg", quality=90)
    for i in range(n):
        turns = []
        for t in range(3):
            q = " ".join(r.choice(WORDS) for _ in range(r.randint(8, 20))) + "?"
            a = " ".join(r.choice(WORDS) for _ in range(r.randint(20, 60))) + "."
            turns += [{"from": "human", "value": ("<image>\n" if t == 0 else "") + q}, {"from": "gpt", "value": a}]
        records.append({"id": str(i), "image": f"{i % 50}.jpg", "conversations": turns})
    return records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="timed passes of each path; the fastest counts")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from llavakit.data.collate import LlavaCollator
    from llavakit.data.dataset import LlavaDataset, build_sample_index
    from llavakit.data.images import ImageTransform, expand2square
    from llavakit.data.records import load_records
    from llavakit.data.templates import VICUNA_V1
    from llavakit.data.tokenize import ConversationEncoder
    from llavakit.demo.backbones import train_tokenizer
    from llavakit.model.build import prepare_tokenizer

    root = Path(tempfile.mkdtemp(prefix="llavakit-input-"))
    atexit.register(shutil.rmtree, root, True)
    records = make_data(root, args.n)
    (root / "data.json").write_text(json.dumps(records))
    tok = train_tokenizer([" ".join(WORDS)] * 50 + [VICUNA_V1.system] * 10, vocab_size=400)
    prepare_tokenizer(tok)
    clip_cfg = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
                    image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                    resample=3, do_convert_rgb=True)
    proc = CLIPImageProcessorPil(**clip_cfg)
    transform = ImageTransform.from_processor(proc, "pad")
    store, valid, _ = load_records(root / "data.json")
    enc = ConversationEncoder(tok, VICUNA_V1, 576)
    index = build_sample_index(store, valid, enc, 4096, cache_dir=root / "cache")
    ds = LlavaDataset(store, index, enc, transform, str(root / "images"), 4096)
    collate = LlavaCollator(tok.pad_token_id, transform, normalize=False)

    def ours():
        for s in range(0, args.n, args.batch):
            batch = collate([ds[i] for i in range(s, min(s + args.batch, args.n))])
        return transform.normalize(batch["pixel_values"])

    mean_color = tuple(int(x * 255) for x in proc.image_mean)

    def original():
        from PIL import Image

        for s in range(0, args.n, args.batch):
            pixels, ids = [], []
            for rec in records[s:s + args.batch]:
                with Image.open(root / "images" / rec["image"]) as im:
                    im = expand2square(im.convert("RGB"), mean_color)
                pixels.append(torch.from_numpy(proc(im, return_tensors="np")["pixel_values"][0]))
                turns = [t["value"] for t in rec["conversations"]]
                prompt = VICUNA_V1.system + " "
                rounds = []
                for q, a in zip(turns[0::2], turns[1::2]):
                    rnd = f"USER: {q} ASSISTANT: {a}</s>"
                    rounds.append(rnd)
                    prompt += rnd
                chunks = prompt.split("<image>")
                full = [t for c in chunks for t in tok(c, add_special_tokens=False)["input_ids"]]
                for rnd in rounds:  # the label mask: each round, and its instruction part, tokenized again
                    parts = rnd.split("ASSISTANT: ")
                    tok(rnd.replace("<image>", ""))
                    tok(parts[0] + "ASSISTANT: ")
                ids.append(torch.tensor(full))
            batch = torch.stack(pixels)
            torch.nn.utils.rnn.pad_sequence(ids, batch_first=True)
        return batch

    results = {}
    paths = (("original", original), ("llavakit", ours))
    times = {name: [] for name, _ in paths}
    warm = [fn() for _, fn in paths]
    if not torch.equal(*warm):
        raise SystemExit("the two paths gave different pixels")
    for _ in range(args.repeats):  # interleaved, so that a slow spell of the machine hits both
        for name, fn in paths:
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    for name, _ in paths:
        results[f"{name}_samples_per_second"] = round(args.n / min(times[name]), 1)
    results["speedup"] = round(results["llavakit_samples_per_second"] / results["original_samples_per_second"], 2)
    results["n"] = args.n
    results["same_pixels"] = True
    print(json.dumps(results))


if __name__ == "__main__":
    main()
