"""What the demo's pretrained language model answers by itself, given the true descriptions of the held-out
scenes (no image, no projector): the ceiling stage 1 can align to, per question type.

    python benchmarks/demo_lm_alone.py --seed 1 --steps 700 --output /tmp/lm-alone

Makes the demo's data, tokenizer and language model exactly as ``llavakit demo --seed S`` does (with
``--steps`` language-model steps), then for every held-out colour, shape and position question scores each of
its type's answers by the model's log-likelihood after ``<s> [description words] question`` (the
question-answer texts' format in pretraining) and counts the likeliest. Prints the pretraining loss every
100 steps and the accuracy per type.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="language-model steps (default: the demo's)")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from llavakit.demo.backbones import train_tokenizer
    from llavakit.demo.pretrain import pretrain_language_model
    from llavakit.demo.run import DemoConfig, chat_texts, question_answer_text
    from llavakit.demo.scenes import (
        ANSWER_SETS,
        DESCRIPTION_WORDS,
        describe,
        description_parts,
        write_dataset,
    )

    cfg, out = DemoConfig(), Path(args.output)
    steps = args.steps or cfg.lm_steps
    torch.manual_seed(args.seed)
    data = write_dataset(out / "data", cfg.n_train, cfg.n_test, cfg.render_size, args.seed)
    instruct, scenes = data["instruct"], data["scenes"]
    corpus = chat_texts(instruct) + [c["conversations"][1]["value"] for c in data["captions"]]
    tok = train_tokenizer(corpus * 2, vocab_size=cfg.vocab_size, extra_special_tokens=[])
    tok.add_tokens(list(DESCRIPTION_WORDS))
    texts = data["captions"] + [question_answer_text(r) for r in instruct if "image" in r]
    t0 = time.time()
    losses = pretrain_language_model(
        tok, [(r, describe(scenes[r["image"]])) for r in texts], out / "llm", hidden=cfg.lm_hidden,
        layers=cfg.lm_layers, steps=steps, image_tokens=4, batch=cfg.lm_batch, seed=args.seed,
        parts={w: description_parts(w) for w in DESCRIPTION_WORDS} if cfg.lm_composed_descriptions else None)
    print(f"pretraining {time.time() - t0:.0f} s; loss every 100 steps:",
          [round(losses[i], 3) for i in range(99, steps, 100)])
    lm = AutoModelForCausalLM.from_pretrained(out / "llm").eval()
    right: dict[str, list[bool]] = {}
    for q in map(json.loads, Path(data["files"]["heldout"]).read_text().splitlines()):
        if q["type"] not in ("colour", "shape", "position"):
            continue
        prefix = [tok.bos_token_id, *tok.convert_tokens_to_ids(describe(scenes[q["image"]]))]
        start = len(prefix) + len(tok(q["text"], add_special_tokens=False)["input_ids"]) - 1
        scores = []
        for answer in ANSWER_SETS[q["type"]]:
            ids = torch.tensor([prefix + tok(f"{q['text']} {answer}.", add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(lm(ids).logits[0, :-1], -1)
            scores.append(float(logp[start:].gather(1, ids[0, 1:][start:, None]).sum()))
        best = ANSWER_SETS[q["type"]][max(range(len(scores)), key=scores.__getitem__)]
        right.setdefault(q["type"], []).append(best == q["answer"])
    print(json.dumps({"seed": args.seed, "steps": steps, **{t: round(sum(v) / len(v), 3) for t, v in right.items()}}))


if __name__ == "__main__":
    main()
