"""MME: yes/no parsing on the first characters, per-subtask 100·acc + 100·acc+, as LLaVA-1.5 / MME's tool.

acc+ counts an image only when both of its questions are right. Perception sums 10 subtasks (the
headline number), cognition 4.
"""

from __future__ import annotations

import os

from llavakit.eval.answers import read_answers

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
_SUFFIXES = (" Please answer yes or no.", "\nAnswer the question using a single word or phrase.")


def parse_yes_no(text: str) -> str:
    t = text.lower().strip()
    if t in ("yes", "no"):
        return t
    prefix = t[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def _question_key(q: str) -> str:
    for s in _SUFFIXES:
        q = q.replace(s, "")
    return q.strip()


def score(answers_file: str, annotations: str) -> dict:
    """``annotations``: the folder of ground-truth ``<subtask>.txt`` files (image, question, answer)."""
    preds: dict[tuple[str, str, str], str] = {}
    for a in read_answers(answers_file):
        qid = str(a["question_id"])
        subtask, image = qid.split("/")[0], qid.split("/")[-1]
        preds[(subtask, image, _question_key(a.get("prompt", "")))] = a["text"]
    subtasks = {}
    for name in PERCEPTION + COGNITION:
        path = os.path.join(annotations, f"{name}.txt")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing MME ground truth (from MME's eval_tool, Your_Results/)")
        per_image: dict[str, list[bool]] = {}
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                image, question, truth = line.rstrip("\n").split("\t")[:3]
                key = (name, image, _question_key(question))
                if key not in preds:
                    raise ValueError(f"{answers_file}: no answer for {name}/{image} {question!r} ({path}:{lineno})")
                per_image.setdefault(image, []).append(parse_yes_no(preds[key]) == truth.strip().lower())
        n_q = sum(len(v) for v in per_image.values())
        acc = 100 * sum(sum(v) for v in per_image.values()) / n_q
        acc_plus = 100 * sum(all(v) for v in per_image.values()) / len(per_image)
        subtasks[name] = {"accuracy": acc, "accuracy_plus": acc_plus, "score": acc + acc_plus}
    perception = sum(subtasks[n]["score"] for n in PERCEPTION)
    cognition = sum(subtasks[n]["score"] for n in COGNITION)
    return {"score": perception, "perception": perception, "cognition": cognition, "subtasks": subtasks}
