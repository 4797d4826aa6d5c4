"""POPE (object hallucination, COCO): yes/no parsing and per-split precision / recall / F1, as LLaVA-1.5.

An answer is "no" when the text before its first "." contains the word No, not or no; otherwise "yes".
The headline number is the mean F1 of the adversarial, popular and random splits, ×100.
"""

from __future__ import annotations

import os

from llavakit.eval.answers import answers_by_id, read_jsonl

SPLITS = ("adversarial", "popular", "random")


def parse_yes_no(text: str) -> str:
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


def split_metrics(predictions: list[str], labels: list[str]) -> dict:
    tp = sum(p == "yes" and t == "yes" for p, t in zip(predictions, labels))
    fp = sum(p == "yes" and t == "no" for p, t in zip(predictions, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(predictions, labels))
    fn = sum(p == "no" and t == "yes" for p, t in zip(predictions, labels))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(labels)
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": (tp + fp) / n if n else 0.0, "questions": n}


def score(answers_file: str, question_file: str, annotations: str) -> dict:
    """``annotations``: the folder holding ``coco_pope_{adversarial,popular,random}.json``."""
    answers = answers_by_id(answers_file)
    questions = read_jsonl(question_file, ("question_id", "category"), "POPE's question file")
    per_split = {}
    for split in SPLITS:
        label_file = os.path.join(annotations, f"coco_pope_{split}.json")
        if not os.path.isdir(annotations):
            raise ValueError(f"--annotations {annotations}: the folder holding coco_pope_<split>.json")
        labels = [x["label"] for x in read_jsonl(label_file, ("label",), "a POPE label file")]
        qs = [q for q in questions if q.get("category") == split]
        if len(qs) != len(labels):
            raise ValueError(f"{label_file}: {len(labels)} labels for {len(qs)} '{split}' questions in "
                             f"{question_file}")
        missing = [q["question_id"] for q in qs if q["question_id"] not in answers]
        if missing:
            raise ValueError(f"{answers_file}: no answer for {len(missing)} '{split}' questions "
                             f"(first: {missing[0]}); finish the predictions first")
        preds = [parse_yes_no(answers[q["question_id"]]) for q in qs]
        per_split[split] = split_metrics(preds, labels)
    return {"score": 100 * sum(m["f1"] for m in per_split.values()) / len(per_split), "splits": per_split}
