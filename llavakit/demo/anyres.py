"""``llavakit demo --anyres``: why AnyRes (LLaVA-NeXT) — a detail too fine for the base resolution.

Each 56-px image holds one 22-px square in one of four colours, in one of its four quadrants, filled with a
pattern of 1-px lines: horizontal, vertical or checked. The vision tower's input is 28 px, so the base view
(LLaVA-1.5's ``pad``: the image downscaled 2×) averages every pattern to the same flat tint — its colour and
place survive, its pattern does not (1-px lines are at the full image's Nyquist frequency). AnyRes with the grid
``[[56, 56]]`` adds the four 28-px quadrants at full resolution as tiles, where the lines are whole.

Both models start from the same backbones — a small CLIP tower pretrained to tell what is in each 14-px patch
(colour and pattern; on base views, where the pattern cannot be seen, it is not asked) and a small random
Llama with a tokenizer trained on the demo's conversations — and train stage 2 (a new projector and the
language model) on the same records with the same flags and budget; only ``--image_aspect_ratio`` differs.
Each is then asked about held-out images: pattern, colour, position. ``views.png`` shows what each sees.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from llavakit.demo.scenes import COLOURS, PLACES

PATTERNS = ("horizontal", "vertical", "checked")
QUESTIONS = {"pattern": "What pattern is on the square?", "colour": "What colour is the square?",
             "position": "Where is the square?"}
ANSWER_SETS = {"pattern": PATTERNS, "colour": tuple(COLOURS), "position": PLACES}
#: what the tower is pretrained to read in each patch (index 0 = nothing there) and where the patch is
PATCH_ATTRIBUTES = (("", *COLOURS), ("", *PATTERNS), ("0", "1", "2", "3"))


@dataclass
class AnyResDemoConfig:
    n_train: int = 1500
    n_test: int = 120
    image_size: int = 56  # the image files: 2×2 tiles of the tower's input
    tile: int = 28  # the tower's input
    patch: int = 14
    square: int = 22  # the patterned square's side, in 1-px lines, centred in a quadrant
    vision_steps: int = 400
    vocab_size: int = 200
    lm_hidden: int = 128
    lm_layers: int = 4
    epochs: int = 3
    batch: int = 16
    lr: float = 1e-3


QUICK = AnyResDemoConfig(n_train=300, n_test=30, vision_steps=60, epochs=1)


def draw(colour: str, pattern: str, quadrant: int, cfg: AnyResDemoConfig, rng: random.Random) -> Image.Image:
    """A light grey image with a square of 1-px ``pattern`` lines in ``colour``, centred in ``quadrant`` (an
    index into ``PLACES``) and shifted by up to a pixel, so that the lines' phase varies."""
    a = np.full((cfg.image_size, cfg.image_size, 3), rng.randint(215, 245), np.uint8)
    half, side = cfg.image_size // 2, cfg.square
    y0 = (quadrant // 2) * half + (half - side) // 2 + rng.randint(-1, 1)
    x0 = (quadrant % 2) * half + (half - side) // 2 + rng.randint(-1, 1)
    yy, xx = np.mgrid[0:side, 0:side]
    on = {"horizontal": yy % 2 == 0, "vertical": xx % 2 == 0, "checked": (yy + xx) % 2 == 0}[pattern]
    a[y0:y0 + side, x0:x0 + side][on] = COLOURS[colour]
    return Image.fromarray(a)


def write_dataset(root: Path, cfg: AnyResDemoConfig, seed: int) -> dict:
    """Images, stage-2 records (three questions per image, in a random order) and held-out questions; with
    each image's square (colour, pattern, quadrant)."""
    rng = random.Random(seed)
    images = root / "images"
    images.mkdir(parents=True)
    records, heldout, squares = [], [], {}
    for i in range(cfg.n_train + cfg.n_test):
        colour, pattern, quadrant = rng.choice(list(COLOURS)), rng.choice(PATTERNS), rng.randrange(4)
        rel = f"{i:05d}.png"
        draw(colour, pattern, quadrant, cfg, rng).save(images / rel)
        answers = {"pattern": pattern, "colour": colour, "position": PLACES[quadrant]}
        squares[rel] = (colour, pattern, quadrant)
        if i >= cfg.n_train:
            heldout += [{"question_id": f"{i}-{t}", "image": rel, "type": t, "text": q, "answer": answers[t]}
                        for t, q in QUESTIONS.items()]
            continue
        kinds = list(QUESTIONS)
        rng.shuffle(kinds)
        conv = []
        for k, kind in enumerate(kinds):
            q = QUESTIONS[kind]
            conv += [{"from": "human", "value": f"<image>\n{q}" if k == 0 else q},
                     {"from": "gpt", "value": answers[kind]}]
        records.append({"id": f"sq-{i}", "image": rel, "conversations": conv})
    (root / "train.json").write_text(json.dumps(records, indent=1))
    (root / "heldout.jsonl").write_text("".join(json.dumps(q) + "\n" for q in heldout))
    return {"records": records, "heldout": heldout, "squares": squares, "images": images,
            "train": root / "train.json"}


def views_of(im: Image.Image, quadrant: int, cfg: AnyResDemoConfig) -> tuple[np.ndarray, Image.Image]:
    """What the tower sees of an image: the base view (downscaled to ``tile`` px, uint8 (3, H, W)) and the
    quadrant holding the square at full resolution (the AnyRes tile)."""
    from llavakit.data.images import ImageTransform

    base = ImageTransform(shortest_edge=cfg.tile, crop_hw=(cfg.tile, cfg.tile)).to_uint8(im)
    y0, x0 = (quadrant // 2) * cfg.tile, (quadrant % 2) * cfg.tile
    return base, im.crop((x0, y0, x0 + cfg.tile, y0 + cfg.tile))


def tower_examples(data: dict, cfg: AnyResDemoConfig) -> tuple[list, np.ndarray]:
    """The tower's pretraining inputs and per-patch labels (colour, pattern, place): every training image as
    the base view sees it (one patch per quadrant; the pattern is not asked there: -100), and the quadrant
    holding its square at full resolution, as an AnyRes tile (the square spans its four patches)."""
    from llavakit.data.images import ImageTransform, open_image

    tile_input = ImageTransform(shortest_edge=cfg.tile, crop_hw=(cfg.tile, cfg.tile))
    pixels, labels = [], []
    for record in data["records"]:
        colour, pattern, q = data["squares"][record["image"]]
        base, tile = views_of(open_image(data["images"] / record["image"]), q, cfg)
        c, p = list(COLOURS).index(colour) + 1, PATTERNS.index(pattern) + 1
        pixels.append(base)
        labels.append([[c, -100, k] if k == q else [0, 0, k] for k in range(4)])
        pixels.append(tile_input.to_uint8(tile))
        labels.append([[c, p, k] for k in range(4)])
    return pixels, np.array(labels)


def arms(cfg: AnyResDemoConfig) -> dict[str, dict]:
    """The two models' flags: all else is the same."""
    return {"base": {"image_aspect_ratio": "pad"},
            "anyres": {"image_aspect_ratio": "anyres",
                       "image_grid_pinpoints": f"[[{cfg.image_size}, {cfg.image_size}]]"}}


def train_and_ask(out: Path, flags: dict, llm_dir: Path, clip_dir: Path, data: dict, cfg: AnyResDemoConfig,
                  seed: int) -> dict:
    """Stage 2 from the backbones with ``flags``, then the held-out questions."""
    from llavakit.config import RunConfig
    from llavakit.demo.run import evaluate, stop_if_interrupted
    from llavakit.infer.generate import Predictor
    from llavakit.train import run as train

    t0 = time.time()
    run = train(RunConfig.from_options(
        model_name_or_path=llm_dir, vision_tower=clip_dir, image_folder=data["images"], version="v1",
        data_path=data["train"], output_dir=out, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch, learning_rate=cfg.lr, weight_decay=0.0, warmup_ratio=0.03,
        lr_scheduler_type="cosine", model_max_length=512, mm_projector_type="mlp2x_gelu",
        mm_vision_select_layer=-2, dataloader_num_workers=0, report_to="none", seed=seed,
        disable_tqdm=True, save_strategy="no", logging_steps=25, group_by_modality_length=True,
        length_group_steps=8, **flags))
    stop_if_interrupted(run)
    train_seconds = time.time() - t0
    res = evaluate(Predictor.from_pretrained(str(out)), data["heldout"], data["images"])
    return {"accuracy": round(res["accuracy"], 4),
            "per_type": {t: round(v, 4) for t, v in sorted(res["per_type"].items())},
            "final_loss": round(run.summary["final_loss"] or run.summary["train_loss"], 4),
            "tokens_trained": run.summary["tokens_seen"], "train_seconds": round(train_seconds, 1),
            "model": str(out), "examples": res["examples"]}


def make_backbones(out: Path, data: dict, cfg: AnyResDemoConfig, seed: int, progress=None):
    """The tower (pretrained per patch) and the language model (random, with a tokenizer trained on the
    conversations as the chat template renders them), saved under ``out``: their directories and the tower's
    pretraining losses."""
    from llavakit.demo.backbones import new_llama, save_llama, train_tokenizer
    from llavakit.demo.pretrain import pretrain_vision
    from llavakit.demo.run import chat_texts

    pixels, labels = tower_examples(data, cfg)
    clip_dir, llm_dir = out / "clip", out / "llm"
    vision_losses = pretrain_vision(pixels, labels, clip_dir, image_size=cfg.tile, patch_size=cfg.patch,
                                    hidden=64, layers=4, steps=cfg.vision_steps,
                                    num_classes=tuple(len(a) for a in PATCH_ATTRIBUTES), seed=seed,
                                    progress=progress.loop("vision tower") if progress else None)
    tok = train_tokenizer(chat_texts(data["records"]) * 2, vocab_size=cfg.vocab_size, extra_special_tokens=[])
    save_llama(new_llama(tok, cfg.lm_hidden, cfg.lm_layers, max(1, cfg.lm_hidden // 32), cfg.lm_hidden * 3,
                         max_positions=1024, seed=seed), tok, llm_dir)
    return llm_dir, clip_dir, vision_losses


def write_views(path: Path, data: dict, cfg: AnyResDemoConfig, per_pattern: int = 2) -> None:
    """``views.png``: held-out images of each pattern as the files hold them, as the base view sees them (what
    the tower gets, at the file's scale) and the AnyRes tile holding the square, each enlarged 4×."""
    from llavakit.data.images import open_image

    picked: dict[str, list[str]] = {p: [] for p in PATTERNS}
    for q in data["heldout"]:
        if q["type"] == "pattern" and len(picked[q["answer"]]) < per_pattern:
            picked[q["answer"]].append(q["image"])
    rows = [rel for p in PATTERNS for rel in picked[p]]
    zoom, gap, size = 4, 8, cfg.image_size
    sheet = Image.new("RGB", (3 * size * zoom + 4 * gap, len(rows) * (size * zoom + gap) + gap), "white")
    for r, rel in enumerate(rows):
        im = open_image(data["images"] / rel)
        base, tile = views_of(im, data["squares"][rel][2], cfg)
        base = Image.fromarray(base.transpose(1, 2, 0))
        for c, part in enumerate((im, base, tile)):
            sheet.paste(part.resize((size * zoom, size * zoom), Image.NEAREST),
                        (gap + c * (size * zoom + gap), gap + r * (size * zoom + gap)))
    sheet.save(path)


def run_anyres_demo(output: str | Path, quick: bool = False, seed: int = 0,
                    cfg: AnyResDemoConfig | None = None) -> dict:
    from llavakit.demo.run import Progress, cpu_description, fresh_start

    cfg = cfg or (QUICK if quick else AnyResDemoConfig())
    if cfg.image_size != 2 * cfg.tile or cfg.tile != 2 * cfg.patch:
        raise ValueError("the AnyRes demo needs image_size = 2 tiles = 4 patches")
    out = fresh_start(output, seed)
    p = Progress()

    p.step(f"1/4 data: {cfg.n_train} training images, {cfg.n_test} held-out ({cfg.image_size} px, "
           f"{cfg.square}-px squares of 1-px lines)", "data")
    data = write_dataset(out / "data", cfg, seed)

    p.step(f"2/4 backbones: a CLIP tower ({cfg.tile} px) pretrained per patch, a language model", "backbones")
    llm_dir, clip_dir, vision_losses = make_backbones(out / "backbones", data, cfg, seed, p)

    from llavakit.data.anyres import AnyRes, parse_grid_pinpoints

    grid = arms(cfg)["anyres"]["image_grid_pinpoints"]
    image_tokens = {"base": (cfg.tile // cfg.patch) ** 2,
                    "anyres": AnyRes(parse_grid_pinpoints(grid, cfg.tile), cfg.tile, cfg.patch).num_tokens(
                        cfg.image_size, cfg.image_size)}
    results = {}
    for k, (name, flags) in enumerate(arms(cfg).items()):
        what = ("base resolution (--image_aspect_ratio pad)" if name == "base" else
                f"AnyRes (--image_aspect_ratio anyres --image_grid_pinpoints {flags['image_grid_pinpoints']!r})")
        p.step(f"{3 + k}/4 stage 2, {what}", f"stage2_{name}")
        results[name] = res = train_and_ask(out / name, flags, llm_dir, clip_dir, data, cfg, seed)
        res["image_tokens"] = image_tokens[name]
        print(f"    {name}: held-out {res['accuracy']:.0%} "
              + ", ".join(f"{t} {v:.0%}" for t, v in res["per_type"].items()), flush=True)
    p.step("report", "report")
    write_views(out / "views.png", data, cfg)
    p.end_phase()
    summary = {
        "base_accuracy": results["base"]["accuracy"], "anyres_accuracy": results["anyres"]["accuracy"],
        "base": results["base"], "anyres": results["anyres"],
        "chance_per_type": {t: round(1 / len(a), 4) for t, a in sorted(ANSWER_SETS.items())},
        "heldout_questions": len(data["heldout"]), "vision_tower_final_loss": round(vision_losses[-1], 4),
        "seed": seed, "quick": quick, "cpu": cpu_description(), "config": asdict(cfg),
        "phase_seconds": p.phase_seconds, "wall_seconds": round(time.time() - p.t0, 1),
        "outputs": {"views": str(out / "views.png"), "data": str(out / "data")},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(render_table(summary), flush=True)
    return summary


def render_table(s: dict) -> str:
    from llavakit.demo.run import cpu_label

    lines = ["", f"{'question type':<16}{'chance':>10}{'base res.':>12}{'AnyRes':>10}",
             f"{'(image tokens)':<16}{'':>10}{s['base']['image_tokens']:>12}{s['anyres']['image_tokens']:>10}",
             "-" * 48]
    for t in sorted(s["chance_per_type"]):
        lines.append(f"{t:<16}{s['chance_per_type'][t]:>10.2f}{s['base']['per_type'].get(t, 0):>12.2f}"
                     f"{s['anyres']['per_type'].get(t, 0):>10.2f}")
    lines += ["-" * 48, f"{'all':<16}{'':>10}{s['base_accuracy']:>12.2f}{s['anyres_accuracy']:>10.2f}"]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in s["phase_seconds"].items())
    lines += ["", f"done in {s['wall_seconds']:.0f} s on {cpu_label(s['cpu'])}: {phases}",
              f"models: {s['base']['model']}, {s['anyres']['model']}",
              f"what each sees: {s['outputs']['views']} (the image, the base view, the AnyRes tile)"]
    return "\n".join(lines)
