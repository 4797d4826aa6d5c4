"""What AnyRes buys on small objects, CPU-sized: the same backbones and budget trained at the base resolution
(LLaVA-1.5, ``pad``) and with AnyRes (2×2 tiles), then asked about held-out images.

    python benchmarks/anyres_small_objects.py --output /tmp/anyres-bench [--object 7] [--epochs 8] [--seed 0]

Data: 56-px images, one object (``--object`` px; a circle, square or triangle in one of four colours) centred
in one of the 14-px cells of one quadrant; each training record asks its shape, colour and position (quadrant)
in three turns. Backbones: a 28-px CLIP tower (14-px patches) pretrained to tell what is in each patch, on the
whole image downscaled to 28 px (what the base view sees) and on the 28-px quadrants (what the tiles see); a
random 4-layer Llama with a tokenizer trained on the texts. Each model: stage 2 from these backbones (new
projector), ``--epochs`` epochs; base: ``--image_aspect_ratio pad`` (the image downscaled to 28 px, 4 image
tokens); AnyRes: ``--image_grid_pinpoints [[56, 56]]`` (the base view plus four full-resolution tiles, 24
tokens). Prints each model's held-out exact-match accuracy per question type and its time.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE, CELL = 56, 14
QUESTIONS = (("shape", "What shape is the object?"), ("colour", "What colour is the object?"),
             ("position", "Where is the object?"))


def draw(colour: str, shape: str, place: str, side: int, rng: random.Random):
    """The image and the (row, column) of the 14-px cell holding the object."""
    from llavakit.demo.scenes import COLOURS, PLACES

    im = Image.new("RGB", (SIZE, SIZE), (rng.randint(200, 250),) * 3)
    q = PLACES.index(place)
    cell = (2 * (q // 2) + rng.randint(0, 1), 2 * (q % 2) + rng.randint(0, 1))
    x = cell[1] * CELL + (CELL - side) // 2 + rng.randint(-1, 1)
    y = cell[0] * CELL + (CELL - side) // 2 + rng.randint(-1, 1)
    box = (x, y, x + side, y + side)
    d = ImageDraw.Draw(im)
    if shape == "circle":
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=COLOURS[colour])
    return im, cell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--output", required=True)
    ap.add_argument("--object", type=int, default=7, help="object side in pixels")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--train", type=int, default=2000)
    ap.add_argument("--test", type=int, default=150)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from llavakit.config import RunConfig
    from llavakit.data.images import ImageTransform
    from llavakit.demo.backbones import new_llama, save_llama, train_tokenizer
    from llavakit.demo.pretrain import pretrain_vision
    from llavakit.demo.scenes import COLOURS, PLACES, QUADRANT_ATTRIBUTES, SHAPES
    from llavakit.infer.generate import Predictor, Query
    from llavakit.train import run as train

    out = Path(args.output)
    shutil.rmtree(out, ignore_errors=True)
    images = out / "data" / "images"
    images.mkdir(parents=True)
    rng = random.Random(args.seed)
    records, heldout, pixels, labels = [], [], [], []
    view = ImageTransform(shortest_edge=28, crop_hw=(28, 28))

    def patch_labels(colour, shape, where):  # per patch: colour, shape (0 = empty), size (unused), place
        return [[list(COLOURS).index(colour) + 1 if k == where else 0, SHAPES.index(shape) + 1 if k == where else 0,
                 0, k] for k in range(4)]

    for i in range(args.train + args.test):
        colour, shape, place = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(PLACES)
        im, (row, col) = draw(colour, shape, place, args.object, rng)
        rel = f"{i:05d}.png"
        im.save(images / rel)
        answers = {"shape": shape, "colour": colour, "position": place}
        if i >= args.train:
            heldout += [{"image": rel, "type": t, "text": q, "answer": answers[t]} for t, q in QUESTIONS]
            continue
        turns = list(QUESTIONS)
        rng.shuffle(turns)
        conv = [{"from": "human", "value": f"<image>\n{turns[0][1]}"}, {"from": "gpt", "value": answers[turns[0][0]]}]
        for t, q in turns[1:]:
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": answers[t]}]
        records.append({"id": f"r{i}", "image": rel, "conversations": conv})
        if i < 1500:  # the tower: the downscaled image (quadrant = patch) and the object's quadrant as a tile
            q = PLACES.index(place)
            pixels.append(view.to_uint8(im))
            labels.append(patch_labels(colour, shape, q))
            r, c = q // 2, q % 2
            pixels.append(view.to_uint8(im.crop((c * 28, r * 28, c * 28 + 28, r * 28 + 28))))
            labels.append(patch_labels(colour, shape, (row - 2 * r) * 2 + (col - 2 * c)))
    (out / "data" / "train.json").write_text(json.dumps(records))
    t0 = time.time()
    pretrain_vision(pixels, np.array(labels), out / "clip", image_size=28, patch_size=14, hidden=64, layers=4,
                    steps=500, num_classes=tuple(len(a) for a in QUADRANT_ATTRIBUTES), seed=args.seed)
    tok = train_tokenizer([t["value"] for r in records for t in r["conversations"]] * 2, vocab_size=300,
                          extra_special_tokens=[])
    save_llama(new_llama(tok, 128, 4, 4, 384, max_positions=1024, seed=args.seed), tok, out / "llm")
    print(f"backbones {time.time() - t0:.0f} s", flush=True)
    result = {}
    for name, over in (("base", {"image_aspect_ratio": "pad"}),
                       ("anyres", {"image_aspect_ratio": "anyres", "image_grid_pinpoints": "[[56, 56]]"})):
        t1 = time.time()
        run = train(RunConfig.from_options(
            model_name_or_path=out / "llm", vision_tower=out / "clip", image_folder=images, version="v1",
            data_path=out / "data" / "train.json", output_dir=out / name, num_train_epochs=args.epochs,
            per_device_train_batch_size=16, learning_rate=1e-3, weight_decay=0.0, warmup_ratio=0.03,
            lr_scheduler_type="cosine", model_max_length=512, dataloader_num_workers=0, report_to="none",
            seed=args.seed, disable_tqdm=True, save_strategy="no", logging_steps=50,
            group_by_modality_length=True, length_group_steps=8, **over))
        predictor = Predictor.from_pretrained(str(out / name), device="cpu")
        answers = predictor.generate([Query(q["text"], str(images / q["image"])) for q in heldout],
                                     max_new_tokens=5, batch_size=32)
        right: dict[str, list[bool]] = {}
        for q, a in zip(heldout, answers):
            right.setdefault(q["type"], []).append(a.split(".")[0].strip().lower() == q["answer"])
        result[name] = {"accuracy": {t: round(sum(v) / len(v), 3) for t, v in right.items()},
                        "final_loss": round(run.summary["final_loss"], 4), "seconds": round(time.time() - t1)}
        print(name, json.dumps(result[name]), flush=True)
    print(json.dumps({"object_px": args.object, "epochs": args.epochs, "seed": args.seed, **result}))


if __name__ == "__main__":
    main()
