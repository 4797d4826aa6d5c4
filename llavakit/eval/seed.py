"""SEED-Bench (image part): multiple choice with LLaVA-1.5's letter prompt; accuracy ×100 over the image
questions, per question type beside it."""

from __future__ import annotations

from collections import defaultdict

from llavakit.eval.answers import answers_by_id, read_json
from llavakit.eval.mmbench import parse_choice


def score_seed(answers_file: str, annotations: str) -> dict:
    """``annotations``: ``SEED-Bench.json`` (``questions`` with ``question_id``, ``answer``, ``data_type``,
    ``question_type_id``; ``question_type`` names the types)."""
    data = read_json(annotations, "SEED-Bench.json")
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise ValueError(f"{annotations}: not SEED-Bench.json (no 'questions' list)")
    type_names = {v: k for k, v in data.get("question_type", {}).items()}
    answers = answers_by_id(answers_file, whole=True)
    per: dict[str, list[bool]] = defaultdict(list)
    missing = 0
    for q in data["questions"]:
        if q.get("data_type", "image") != "image":
            continue
        a = answers.get(str(q["question_id"]))
        if a is None:
            missing += 1
            continue
        per[type_names.get(q.get("question_type_id"), str(q.get("question_type_id")))].append(
            parse_choice(a["text"], []) == q["answer"])
    if missing:
        raise ValueError(f"{answers_file}: no answer for {missing} image questions of {annotations}")
    flat = [x for v in per.values() for x in v]
    return {"score": 100 * sum(flat) / len(flat) if flat else 0.0, "questions": len(flat),
            "per_type": {t: 100 * sum(v) / len(v) for t, v in sorted(per.items())}}
