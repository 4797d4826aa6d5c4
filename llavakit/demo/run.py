"""``llavakit demo``: train a tiny LLaVA end to end on a CPU and show that it learned.

1. synthetic scenes → real image files and LLaVA records (captions and object lists, multi-turn QA, text-only,
   held-out);
2. backbones made on the spot: a tokenizer trained on the demo's text, a small Llama pretrained on it (its
   captions, object lists and question-answer texts, each image replaced by a description the model learns
   to read, as a real LLM reads text), a small CLIP vision tower pretrained on the demo images — all saved
   with ``save_pretrained``;
3. stage 1 and stage 2 through ``llavakit train`` with the original's flags (same code path as a real run);
4. after stage 1: captions of held-out images (do they name each object's colour and shape?); held-out
   exact-match accuracy per question type for the stage-1-only model and the final model, against chance;
   a two-turn chat about a held-out image;
5. a table, ``loss_curves.png``, ``report.html`` (a page to open from disk) and ``summary.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from llavakit.demo.scenes import ANSWER_SETS, chance_accuracy, describe, named_objects, write_dataset

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    n_train: int = 3000
    n_test: int = 200
    render_size: int = 56  # the image files
    image_size: int = 28  # the vision tower's input: one 14-px patch per quadrant of the scene
    patch_size: int = 14
    vocab_size: int = 400
    lm_hidden: int = 128
    lm_layers: int = 4
    # a third of the texts are captions, a third object lists, a third question-answer texts, packed into rows;
    # reading the descriptions (and finding an object by its shape) forms abruptly, at a seed's own pace: seed 1
    # answers colour questions 0.69-0.995 by itself after 600 steps of 64 texts (by kernels; seed 0 0.695),
    # 1.00 after 1,000 — measured (benchmarks/demo_lm_alone.py)
    lm_steps: int = 1000
    lm_batch: int = 64
    # each description word's embedding is the sum of its parts' (place, size, colour, shape) while the
    # language model learns to read them
    lm_composed_descriptions: bool = True
    vision_hidden: int = 64
    vision_layers: int = 4
    vision_steps: int = 400
    # stage 1 at LLaVA-1.5's rate; one epoch of 3,000 captions and 3,000 object lists
    stage1_epochs: int = 1
    stage1_batch: int = 32
    stage1_lr: float = 1e-3
    # the stage-1 model already answers most questions (as its language model read them); stage 2 teaches the
    # chat format and the rest
    stage2_epochs: int = 3
    stage2_batch: int = 16
    stage2_lr: float = 1e-3
    # --mm_projector_lr: the projector moves slowly while the language model learns to read it; at the
    # language model's rate the projector amplifies colour until shape is unreadable (measured)
    stage2_projector_lr: float = 1e-4
    packing: bool = False  # measured: slower here (short samples; SDPA block masks, and torch_varlen too)
    # sort by length over 8 steps' samples: 95% of the stage-2 tokens are real instead of 70%; an epoch
    # takes 15-17.5 s instead of 22 s (measured)
    length_group_steps: int = 8


QUICK = DemoConfig(n_train=1000, n_test=40, lm_steps=250, vision_steps=80, stage2_epochs=3)


class Progress:
    """Prints each phase with the time since the start, and keeps each phase's seconds."""

    def __init__(self):
        self.t0 = time.time()
        self.phase_seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def step(self, title: str, phase: str | None = None) -> None:
        now = time.time()
        if phase is not None:
            self.end_phase()
            self._current = (phase, now)
        print(f"\n[{now - self.t0:6.1f}s] == {title}", flush=True)

    def end_phase(self) -> None:
        if self._current is not None:
            name, start = self._current
            self.phase_seconds[name] = round(self.phase_seconds.get(name, 0.0) + time.time() - start, 1)
            self._current = None

    def loop(self, name: str):
        def report(step: int, total: int, loss: float) -> None:
            if step == 0 or (step + 1) % max(1, total // 5) == 0 or step + 1 == total:
                print(f"[{time.time() - self.t0:6.1f}s]    {name} step {step + 1}/{total} loss {loss:.3f}",
                      flush=True)
        return report


def cpu_description() -> dict:
    """The CPU this ran on: its name, whether it has AVX-512, and the kernels PyTorch chose
    (``ATEN_CPU_CAPABILITY=avx2`` makes an AVX-512 machine take the AVX2 ones)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
    except OSError:
        pass
    return {"name": name, "cores": os.cpu_count(), "avx512": "avx512f" in flags,
            "torch_kernels": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads()}


def cpu_label(cpu: dict) -> str:
    """``cpu_description()`` in one line: "AMD EPYC (2 cores, AVX-512, PyTorch AVX512 kernels)"."""
    return (f"{cpu['name']} ({cpu['cores']} cores, {'AVX-512' if cpu['avx512'] else 'no AVX-512'}, "
            f"PyTorch {cpu['torch_kernels']} kernels)")


def normalise(answer: str) -> str:
    """An answer as compared: up to its first full stop, lower case, without commas."""
    return " ".join(answer.split(".")[0].lower().replace(",", " ").split())


def evaluate(predictor, heldout: list[dict], image_root: Path) -> dict:
    from llavakit.infer.generate import Query

    queries = [Query(q["text"], str(image_root / q["image"])) for q in heldout]
    answers = predictor.generate(queries, max_new_tokens=6, batch_size=32)
    per_type: dict[str, list[int]] = {}
    for q, a in zip(heldout, answers):
        per_type.setdefault(q["type"], []).append(int(normalise(a) == q["answer"]))
    acc = {t: sum(v) / len(v) for t, v in per_type.items()}
    overall = sum(sum(v) for v in per_type.values()) / max(1, len(heldout))
    rows = [{"question": q["text"], "image": q["image"], "type": q["type"], "expected": q["answer"], "answer": a,
             "right": normalise(a) == q["answer"]} for q, a in zip(heldout, answers)]
    return {"accuracy": overall, "per_type": acc, "examples": rows[:5], "answers": rows}


def caption_accuracy(predictor, images: list[str], scenes: dict, image_root: Path) -> dict:
    """Caption each image with the ``plain`` template (stage 1's format: the image, then the caption) and count
    the objects whose colour and shape the caption names together. Chance: a colour and a shape picked at
    random name an object 1 time in (colours × shapes)."""
    from llavakit.demo.scenes import COLOURS, SHAPES
    from llavakit.infer.generate import Query

    answers = predictor.generate([Query("", str(image_root / rel)) for rel in images], max_new_tokens=48,
                                 batch_size=32)
    examples = []
    for rel, answer in zip(images, answers):
        caption = answer.split("\n")[0].strip()
        examples.append({"image": rel, "caption": caption, "named": named_objects(scenes[rel], caption),
                         "objects": len(scenes[rel].objects)})
    total = sum(e["objects"] for e in examples)
    return {"accuracy": sum(e["named"] for e in examples) / max(1, total),
            "chance": 1 / (len(COLOURS) * len(SHAPES)), "objects": total, "examples": examples}


def question_answer_text(record: dict) -> dict:
    """A conversation about an image as one text after the image (``plain``): "Q? A. Q? A." — for the
    language model's pretraining, where the image is a description."""
    from llavakit import IMAGE_PLACEHOLDER

    turns = [t["value"].replace(IMAGE_PLACEHOLDER, "").strip() for t in record["conversations"]]
    text = " ".join(f"{q} {a.rstrip('.')}." for q, a in zip(turns[::2], turns[1::2]))
    return {"id": record.get("id"), "image": record["image"],
            "conversations": [{"from": "human", "value": IMAGE_PLACEHOLDER}, {"from": "gpt", "value": text}]}


#: a prompt in the format of :func:`question_answer_text` (the image, then the question), for asking the
#: stage-1-only model: its language model has read questions only in that format
QUESTION_AFTER_IMAGE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                        "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
                        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{% endfor %}")


def chat_texts(records: list[dict]) -> list[str]:
    """Conversations as text for a chat LM: in the Vicuna v1 format, without their images."""
    from llavakit import IMAGE_PLACEHOLDER
    from llavakit.data.records import InvalidRecordsError, Turn, check_record
    from llavakit.data.templates import get_template

    template = get_template("v1")
    out = []
    for i, raw in enumerate(records):
        record, problems = check_record(raw, i, "demo conversations")
        if record is None:
            raise InvalidRecordsError("demo conversations", problems)
        turns = [Turn(t.role, t.text.replace(IMAGE_PLACEHOLDER, "").strip()) for t in record.turns]
        out.append("".join(seg.text for seg in template.render(turns)))
    return out


def chat_about(predictor, image: str, questions: list[str]) -> list[dict]:
    """A multi-turn chat about one image (the image goes with the first question, as in training)."""
    from llavakit.infer.generate import Sampling, user_message

    messages: list[dict] = []
    turns = []
    for k, q in enumerate(questions):
        messages.append(user_message(q, 1 if k == 0 else 0))
        answer = predictor.chat(messages, [image], Sampling(max_new_tokens=40))
        messages.append({"role": "assistant", "content": answer})
        turns.append({"user": q, "assistant": answer})
    return turns


def _loss_history(out: Path) -> list[tuple[int, float]]:
    state = json.loads((out / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def plot_losses(curves: dict[str, list[tuple[int, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5))
    for ax, (name, pts) in zip(np.atleast_1d(axes), curves.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fresh_start(output: str | Path, seed: int) -> Path:
    """An empty output directory (what was there is removed) and every random generator seeded."""
    out = Path(output)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return out


def run_demo(output: str | Path, quick: bool = False, seed: int = 0, cfg: DemoConfig | None = None) -> dict:
    cfg = cfg or (QUICK if quick else DemoConfig())
    if cfg.image_size // cfg.patch_size != 2:
        raise ValueError("the demo describes its scenes per quadrant: image_size must be 2 patches wide")
    out = fresh_start(output, seed)
    p = Progress()

    p.step(f"1/5 data: {cfg.n_train} training scenes, {cfg.n_test} held-out scenes ({cfg.render_size} px)", "data")
    data = write_dataset(out / "data", cfg.n_train, cfg.n_test, cfg.render_size, seed)
    files = data["files"]
    heldout = [json.loads(x) for x in Path(files["heldout"]).read_text().splitlines()]
    instruct, scenes = data["instruct"], data["scenes"]
    print(f"    {len(data['captions'])} captions and {len(data['object_lists'])} object lists (stage 1), "
          f"{len(instruct)} instruction records, "
          f"{len(heldout)} held-out questions", flush=True)

    p.step("2/5 backbones: tokenizer, language model (pretrained on text), CLIP vision tower (on images)",
           "backbones")
    from llavakit.data.images import ImageTransform, open_image
    from llavakit.demo.backbones import train_tokenizer
    from llavakit.demo.pretrain import pretrain_language_model, pretrain_vision
    from llavakit.demo.scenes import (
        DESCRIPTION_WORDS,
        QUADRANT_ATTRIBUTES,
        description_parts,
        quadrant_labels,
    )

    # the language model reads text as Vicuna does: here, a description of a scene (one word per quadrant, put
    # where the image's tokens will be) followed by its caption, its object list, or questions about it and their
    # answers; the tokenizer is trained on the demo's text
    corpus = chat_texts(instruct) + [c["conversations"][1]["value"] for c in data["captions"]]
    tok = train_tokenizer(corpus * 2, vocab_size=cfg.vocab_size, extra_special_tokens=[])
    tok.add_tokens(list(DESCRIPTION_WORDS))
    texts = data["captions"] + data["object_lists"] + [question_answer_text(r) for r in instruct if "image" in r]
    examples = [(r, describe(scenes[r["image"]])) for r in texts]
    llm_dir, clip_dir = out / "backbones" / "llm", out / "backbones" / "clip"
    lm_losses = pretrain_language_model(tok, examples, llm_dir, hidden=cfg.lm_hidden, layers=cfg.lm_layers,
                                        steps=cfg.lm_steps, image_tokens=4, batch=cfg.lm_batch, seed=seed,
                                        parts={w: description_parts(w) for w in DESCRIPTION_WORDS}
                                        if cfg.lm_composed_descriptions else None,
                                        progress=p.loop("language model"))
    transform = ImageTransform(shortest_edge=cfg.image_size, crop_hw=(cfg.image_size, cfg.image_size))
    image_root = Path(files["images"])
    train_images = [c["image"] for c in data["captions"]]
    pixels = [transform(open_image(image_root / rel)) for rel in train_images]
    labels = np.array([quadrant_labels(scenes[rel]) for rel in train_images])
    vision_losses = pretrain_vision(pixels, labels, clip_dir, image_size=cfg.image_size, patch_size=cfg.patch_size,
                                    hidden=cfg.vision_hidden, layers=cfg.vision_layers, steps=cfg.vision_steps,
                                    num_classes=tuple(len(a) for a in QUADRANT_ATTRIBUTES), seed=seed,
                                    progress=p.loop("vision tower"))

    from llavakit.config import RunConfig
    from llavakit.train import run as train

    common = dict(model_name_or_path=llm_dir, vision_tower=clip_dir, image_folder=image_root,
                  mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_use_im_start_end=False,
                  mm_use_im_patch_token=False, evaluation_strategy="no", save_strategy="no", weight_decay=0.0,
                  warmup_ratio=0.03, lr_scheduler_type="cosine", model_max_length=512,
                  dataloader_num_workers=0, report_to="none", seed=seed, disable_tqdm=True)
    p.step("3/5 stage 1: feature alignment (projector only, --version plain)", "stage1")
    s1 = out / "stage1"
    stop_if_interrupted(train(RunConfig.from_options(
        **common, version="plain", data_path=files["captions"], tune_mm_mlp_adapter=True, output_dir=s1,
        num_train_epochs=cfg.stage1_epochs, per_device_train_batch_size=cfg.stage1_batch,
        learning_rate=cfg.stage1_lr, logging_steps=5)))

    p.step("    after stage 1: captions and answers for held-out images", "stage1_eval")
    from llavakit.data.templates import get_template
    from llavakit.infer.generate import Predictor
    from llavakit.model.build import assemble
    from llavakit.model.processing import build_processor, chat_template_for, image_processor_for
    from llavakit.model.projector import load_projector

    asm = assemble(str(llm_dir), str(clip_dir))
    load_projector(asm.model.model.multi_modal_projector, str(s1 / "mm_projector.bin"))

    def stage1_predictor(chat_template: str) -> Predictor:
        proc = build_processor(asm.tokenizer, image_processor_for(asm.image_processor, "pad"),
                               asm.model.config.vision_config, "default", chat_template)
        return Predictor(asm.model, proc)

    test_images = sorted({q["image"] for q in heldout})
    captions = caption_accuracy(stage1_predictor(chat_template_for(get_template("plain"), asm.tokenizer)),
                                test_images, scenes, image_root)
    # asked as its language model read questions (the image, then the question): it knows no chat template yet
    stage1_res = evaluate(stage1_predictor(QUESTION_AFTER_IMAGE), heldout, image_root)
    print(f"    stage-1 captions name {captions['accuracy']:.0%} of the objects' colour and shape (chance "
          f"{captions['chance']:.0%}); answers {stage1_res['accuracy']:.0%} right", flush=True)

    p.step("3/5 stage 2: visual instruction tuning (projector + LLM, --version v1)", "stage2")
    s2 = out / "stage2"
    stop_if_interrupted(train(RunConfig.from_options(
        **common, version="v1", data_path=files["instruct"], pretrain_mm_mlp_adapter=s1 / "mm_projector.bin",
        image_aspect_ratio="pad", group_by_modality_length=True, length_group_steps=cfg.length_group_steps,
        packing=cfg.packing, output_dir=s2,
        num_train_epochs=cfg.stage2_epochs, per_device_train_batch_size=cfg.stage2_batch,
        learning_rate=cfg.stage2_lr, mm_projector_lr=cfg.stage2_projector_lr,
        logging_steps=25)))  # a log line every ~2 s

    p.step("4/5 evaluation on held-out images", "eval")
    final = Predictor.from_pretrained(str(s2))
    final_res = evaluate(final, heldout, image_root)
    chance = chance_accuracy(heldout)
    chat_q = heldout[0]
    chat = chat_about(final, str(image_root / chat_q["image"]), [chat_q["text"], "Describe the image briefly."])
    chat[0]["expected"] = chat_q["answer"]

    p.step("5/5 report", "report")
    curves = {"language model pretraining": list(enumerate(lm_losses)),
              "vision tower pretraining": list(enumerate(vision_losses)),
              "stage 1 (projector)": _loss_history(s1), "stage 2 (instruction)": _loss_history(s2)}
    plot_losses(curves, out / "loss_curves.png")
    summary = {
        "heldout_accuracy": round(final_res["accuracy"], 4),
        "stage1_only_accuracy": round(stage1_res["accuracy"], 4),
        "chance_accuracy": round(chance, 4),
        "stage1_caption_accuracy": round(captions["accuracy"], 4),
        "stage1_caption_chance": round(captions["chance"], 4),
        "per_type": {t: round(v, 4) for t, v in sorted(final_res["per_type"].items())},
        "stage1_only_per_type": {t: round(v, 4) for t, v in sorted(stage1_res["per_type"].items())},
        "chance_per_type": {t: round(1 / len(a), 4) for t, a in ANSWER_SETS.items()},
        "heldout_questions": len(heldout),
        "examples": final_res["examples"],
        "stage1_captions": captions["examples"][:8],
        "chat": {"image": chat_q["image"], "turns": chat},
        "seed": seed,
        "quick": quick,
        "cpu": cpu_description(),
        "config": asdict(cfg),
        "outputs": {"model": str(s2), "projector": str(s1 / "mm_projector.bin"),
                    "loss_curves": str(out / "loss_curves.png"), "report": str(out / "report.html")},
    }
    from llavakit.demo.report import write_report

    p.end_phase()
    summary["phase_seconds"] = p.phase_seconds
    summary["wall_seconds"] = round(time.time() - p.t0, 1)
    write_report(out / "report.html", summary, final_res["answers"], stage1_res["answers"], captions["examples"],
                 image_root, out / "loss_curves.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(render_table(summary), flush=True)
    return summary


def stop_if_interrupted(result) -> None:
    """Ctrl-C during a stage: the stage saved a checkpoint and stopped; the demo stops too."""
    if result.stopped:
        print("demo interrupted", flush=True)
        raise SystemExit(130)


def render_table(s: dict) -> str:
    lines = ["", f"{'question type':<16}{'chance':>10}{'stage 1 only':>15}{'final':>10}", "-" * 51]
    for t in sorted(s["per_type"]):
        lines.append(f"{t:<16}{s['chance_per_type'][t]:>10.2f}{s['stage1_only_per_type'].get(t, 0):>15.2f}"
                     f"{s['per_type'][t]:>10.2f}")
    lines.append("-" * 51)
    lines.append(f"{'all':<16}{s['chance_accuracy']:>10.2f}{s['stage1_only_accuracy']:>15.2f}"
                 f"{s['heldout_accuracy']:>10.2f}")
    chat = s["chat"]
    lines += ["", f"chat about held-out image {chat['image']}:"]
    for turn in chat["turns"]:
        lines += [f"  USER: {turn['user']}", f"  ASSISTANT: {turn['assistant']}"]
    lines += ["", f"stage-1 captions of held-out images name {s['stage1_caption_accuracy']:.0%} of the objects "
              f"(colour and shape; chance {s['stage1_caption_chance']:.0%})"]
    phases = ", ".join(f"{k} {v:.0f} s" for k, v in s["phase_seconds"].items())
    lines += ["", f"done in {s['wall_seconds']:.0f} s on {cpu_label(s['cpu'])}: {phases}",
              f"model: {s['outputs']['model']}",
              f"report: {s['outputs']['report']} (open it in a browser); loss curves: {s['outputs']['loss_curves']}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="llavakit demo", description=__doc__.split("\n")[0])
    ap.add_argument("--output", default="demo-output")
    ap.add_argument("--quick", action="store_true", help="a smaller run (under 2 minutes)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--anyres", action="store_true",
                    help="AnyRes (LLaVA-NeXT) against the base resolution on detail too fine for it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, force=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.anyres:
        from llavakit.demo.anyres import run_anyres_demo

        run_anyres_demo(args.output, args.quick, args.seed)
    else:
        run_demo(args.output, args.quick, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
