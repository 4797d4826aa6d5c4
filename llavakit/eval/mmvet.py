"""MM-Vet: open answers judged by GPT against the ground truth (0 to 1 each; the headline is the mean ×100).

The official number comes from MM-Vet's own evaluator: ``mmvet_submission`` writes the file it takes
(``{"v1_<id>": answer}``); ``judge_mmvet`` gives a local estimate through any OpenAI-compatible judge.
"""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict

from llavakit.eval.answers import read_answers, read_json, read_jsonl


def mmvet_submission(answers_file: str, out_path: str) -> int:
    rows = {f"v1_{a['question_id']}": a["text"] for a in read_answers(answers_file)}
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=2)
    return len(rows)


MMVET_SYSTEM = "You grade answers to questions about images against a ground-truth answer."
MMVET_INSTRUCTION = (
    "Compare the model's answer with the ground truth and output how correct it is, as one number from 0.0 "
    "(wrong) to 1.0 (fully right); partial answers get partial credit. In the ground truth, <AND> means "
    "every part is required and <OR> means any one alternative is enough. Output the number only.")


def parse_grade(text: str) -> float | None:
    m = re.search(r"\d+(?:\.\d+)?", text)
    if not m:
        return None
    v = float(m.group())
    return v if 0.0 <= v <= 1.0 else None


def judge_mmvet(answers_file: str, annotations: str, review_file: str, client) -> dict:
    """Grade every answer (resumable, one line per question) and return the mean ×100 and per capability.
    ``annotations``: MM-Vet's ``mm-vet.json`` (``v1_<id>`` → question, answer, capability)."""
    truth = read_json(annotations, "mm-vet.json")
    answers = {f"v1_{a['question_id']}": a["text"] for a in read_answers(answers_file)}
    done = {r["id"]: r for r in read_jsonl(review_file)} if os.path.isfile(review_file) else {}
    with open(review_file, "a", encoding="utf-8") as f:
        for key, t in truth.items():
            if key in done:
                continue
            if key not in answers:
                raise ValueError(f"{answers_file}: no answer for MM-Vet question {key}")
            user = (f"[Question]\n{t['question']}\n\n[Ground truth]\n{t['answer']}\n\n"
                    f"[Model answer]\n{answers[key]}\n\n[Task]\n{MMVET_INSTRUCTION}")
            grade = None
            for _ in range(3):  # a reply without a usable number is asked again
                grade = parse_grade(client.complete(MMVET_SYSTEM, user))
                if grade is not None:
                    break
            row = {"id": key, "grade": 0.0 if grade is None else grade, "capability": t.get("capability", [])}
            done[key] = row
            f.write(json.dumps(row) + "\n")
            f.flush()
    grades = [r["grade"] for r in done.values()]
    per: dict[str, list[float]] = defaultdict(list)
    for r in done.values():
        for cap in r.get("capability", []):
            per[cap].append(r["grade"])
    return {"score": 100 * sum(grades) / len(grades) if grades else 0.0, "questions": len(grades),
            "per_capability": {c: 100 * sum(v) / len(v) for c, v in sorted(per.items())}}
