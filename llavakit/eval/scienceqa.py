"""ScienceQA-IMG: letter parsing and accuracy on the problems that have an image, as LLaVA-1.5.

An answer counts as letter X when the whole text is X, or it starts with "X. ", or it contains exactly one
"The answer is X."; anything else is wrong. The headline number is the IMG-subset accuracy ×100.
"""

from __future__ import annotations

import re

from llavakit.eval.answers import answers_by_id, read_json

OPTIONS = ("A", "B", "C", "D", "E")
_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def parse_letter(text: str) -> str | None:
    if text in OPTIONS:
        return text
    if len(text) >= 3 and text[0] in OPTIONS and text[1:3] == ". ":
        return text[0]
    found = _ANSWER_IS.findall(text)
    return found[0] if len(found) == 1 else None


def score(answers_file: str, question_file: str) -> dict:
    """``question_file``: the LLaVA-format problem file (the gpt turn is the correct letter)."""
    problems = read_json(question_file, "ScienceQA problem file")
    if not isinstance(problems, list):
        raise ValueError(f"{question_file}: not LLaVA's ScienceQA problem file (a JSON list of records)")
    answers = answers_by_id(answers_file)
    right = {"all": 0, "img": 0}
    total = {"all": 0, "img": 0}
    missing = 0
    for p in problems:
        pid = str(p["id"])
        truth = p["conversations"][1]["value"].strip()
        pred = answers.get(pid, answers.get(p["id"]))
        if pred is None:
            missing += 1
        ok = pred is not None and parse_letter(pred) == truth
        for key in ("all", "img") if "image" in p else ("all",):
            total[key] += 1
            right[key] += ok
    if missing:
        raise ValueError(f"{answers_file}: no answer for {missing} of {len(problems)} problems")
    acc = {k: 100 * right[k] / total[k] if total[k] else 0.0 for k in total}
    return {"score": acc["img"], "img_accuracy": acc["img"], "all_accuracy": acc["all"],
            "img_problems": total["img"], "problems": total["all"]}
