"""What the demo's pretrained language model answers by itself, given the true descriptions of the held-out
scenes (no image, no projector): the ceiling stage 1 can align to, per question type.

    python benchmarks/demo_lm_alone.py --seed 1 --output /tmp/lm-alone [--steps 1000] [--batch 64] [--lr 3e-3] \
        [--no-object-lists] [--extra is|adjacent|colour-first|mixed] [--extra-order place|random] [--hidden 256] \
        [--plain-descriptions] [--shape-scale 2]

Makes the demo's data, tokenizer and language model exactly as ``llavakit demo --seed S`` does (with
``--steps`` language-model steps), then for every held-out colour, shape and position question scores each of
its type's answers by the model's log-likelihood after ``<s> [description words] question`` (the
question-answer texts' format in pretraining) and counts the likeliest. Prints the pretraining loss every
100 steps and the accuracy per type.

The texts are the demo's (captions, object lists, question-answer texts; ``--no-object-lists`` leaves the object
lists out). ``--extra`` adds one text per training scene that names each object's colour right after its shape
("The circle is red." with ``is``, "circle red." with ``adjacent``) — or its shape right after its colour ("red
circle." with ``colour-first``), or either at random (``mixed``) — with the objects in quadrant order or, with
``--extra-order random``, in a random order, and then also scores that form on the held-out scenes by the
number of objects (the colour after "<s> [description] circle", or the shape after "... red": one of the
scene's colours at random scores 1 / 0.5 / 0.33). ``--hidden`` and ``--plain-descriptions`` (each
description word its own embedding, not composed from its parts) vary the language model; ``--shape-scale``
multiplies the shape part's weight in each composed description word (the others stay 1/sqrt(4)).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="language-model steps (default: the demo's)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--extra", choices=("is", "adjacent", "colour-first", "mixed"), default=None,
                    help="add a text per scene naming each object's colour after its shape (or its shape after its "
                         "colour)")
    ap.add_argument("--extra-order", choices=("place", "random"), default="place",
                    help="the added text's objects in quadrant order (as captions) or in a random order")
    ap.add_argument("--lr", type=float, default=3e-3, help="the language model's peak learning rate")
    ap.add_argument("--batch", type=int, default=None, help="texts per step (default: the demo's)")
    ap.add_argument("--no-object-lists", action="store_true", help="without the object lists (as before)")
    ap.add_argument("--hidden", type=int, default=None, help="the language model's width (default: the demo's)")
    ap.add_argument("--plain-descriptions", action="store_true",
                    help="description words not composed from their parts")
    ap.add_argument("--shape-scale", type=float, default=1.0,
                    help="the shape part's weight in a composed description word, times this")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from llavakit.demo import pretrain
    from llavakit.demo.backbones import train_tokenizer
    from llavakit.demo.pretrain import pretrain_language_model
    from llavakit.demo.run import DemoConfig, chat_texts, question_answer_text
    from llavakit.demo.scenes import (
        ANSWER_SETS,
        COLOURS,
        DESCRIPTION_WORDS,
        PLACES,
        SHAPES,
        describe,
        description_parts,
        write_dataset,
    )

    cfg, out = DemoConfig(), Path(args.output)
    cfg = dataclasses.replace(cfg, lm_hidden=args.hidden or cfg.lm_hidden,
                              lm_composed_descriptions=cfg.lm_composed_descriptions and not args.plain_descriptions)

    def statement(o) -> tuple[str, str, tuple[str, ...]]:
        """The added form for an object: its beginning, the word that follows, and that word's choices."""
        if args.extra == "colour-first" or (args.extra == "mixed" and order.random() < 0.5):
            return o.colour, o.shape, SHAPES
        return (f"The {o.shape} is" if args.extra == "is" else o.shape), o.colour, tuple(COLOURS)
    steps = args.steps or cfg.lm_steps
    torch.manual_seed(args.seed)
    data = write_dataset(out / "data", cfg.n_train, cfg.n_test, cfg.render_size, args.seed)
    instruct, scenes = data["instruct"], data["scenes"]
    corpus = chat_texts(instruct) + [c["conversations"][1]["value"] for c in data["captions"]]
    tok = train_tokenizer(corpus * 2, vocab_size=cfg.vocab_size, extra_special_tokens=[])
    tok.add_tokens(list(DESCRIPTION_WORDS))
    texts = data["captions"] + data["object_lists"] + [question_answer_text(r) for r in instruct if "image" in r]
    if args.no_object_lists:
        texts = [t for t in texts if not t["id"].startswith("objects-")]
    if args.extra:
        order = random.Random(args.seed)
        for c in data["captions"]:
            objects = sorted(scenes[c["image"]].objects, key=lambda o: PLACES.index(o.place))
            if args.extra_order == "random":
                order.shuffle(objects)
            texts.append({"id": c["id"] + "-extra", "image": c["image"], "conversations": [
                {"from": "human", "value": "<image>"},
                {"from": "gpt", "value": " ".join("{} {}.".format(*statement(o)[:2]) for o in objects)}]})
    if args.shape_scale != 1.0:
        compose = pretrain._Composed.__init__

        def scaled(self, tokenizer, parts, *rest):
            compose(self, tokenizer, parts, *rest)
            names = sorted({n for ps in parts.values() for n in ps})
            for shape in SHAPES:
                self.weights[:, names.index(shape)] *= args.shape_scale

        pretrain._Composed.__init__ = scaled
    t0 = time.time()
    losses = pretrain_language_model(
        tok, [(r, describe(scenes[r["image"]])) for r in texts], out / "llm", hidden=cfg.lm_hidden,
        layers=cfg.lm_layers, steps=steps, image_tokens=4, batch=args.batch or cfg.lm_batch, seed=args.seed, lr=args.lr,
        parts={w: description_parts(w) for w in DESCRIPTION_WORDS} if cfg.lm_composed_descriptions else None)
    print(f"pretraining {time.time() - t0:.0f} s; loss every 100 steps:",
          [round(losses[i], 3) for i in range(99, steps, 100)])
    lm = AutoModelForCausalLM.from_pretrained(out / "llm").eval()
    right: dict[str, list[bool]] = {}

    def likeliest(prefix: list[int], text: str, answers) -> str:
        start = len(prefix) + len(tok(text, add_special_tokens=False)["input_ids"]) - 1
        scores = []
        for answer in answers:
            ids = torch.tensor([prefix + tok(f"{text} {answer}.", add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(lm(ids).logits[0, :-1], -1)
            scores.append(float(logp[start:].gather(1, ids[0, 1:][start:, None]).sum()))
        return list(answers)[max(range(len(scores)), key=scores.__getitem__)]

    for q in map(json.loads, Path(data["files"]["heldout"]).read_text().splitlines()):
        if q["type"] not in ("colour", "shape", "position"):
            continue
        prefix = [tok.bos_token_id, *tok.convert_tokens_to_ids(describe(scenes[q["image"]]))]
        right.setdefault(q["type"], []).append(likeliest(prefix, q["text"], ANSWER_SETS[q["type"]]) == q["answer"])
    if args.extra:  # the added form on the held-out scenes, by the number of objects
        for rel in sorted({q["image"] for q in map(json.loads, Path(data["files"]["heldout"]).read_text().splitlines())}):
            scene = scenes[rel]
            prefix = [tok.bos_token_id, *tok.convert_tokens_to_ids(describe(scene))]
            for o in scene.objects:
                key = f"{args.extra}, {len(scene.objects)} objects"
                start, word, choices = statement(o)
                right.setdefault(key, []).append(likeliest(prefix, start, choices) == word)
    print(json.dumps({"seed": args.seed, "steps": steps, **{t: round(sum(v) / len(v), 3) for t, v in right.items()}}))


if __name__ == "__main__":
    main()
