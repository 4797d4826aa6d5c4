"""MMBench: LLaVA-1.5's prompt and circular scoring.

MMBench's dev TSV holds each question several times with its options rotated (``index`` and
``index + k·1,000,000``). A base question (``index % 1,000,000``) counts as right only when every copy is
answered with the right letter. The headline number is that circular accuracy ×100 (LLaVA-v1.5-13B dev:
67.69). Ground truth comes from the official TSV or from a submission ``.xlsx`` with an ``answer`` column.
"""

from __future__ import annotations

import csv
import os
import re
import sys
from collections import defaultdict

from llavakit.eval.answers import answers_by_id

LETTERS = ("A", "B", "C", "D", "E", "F")
CIRCULAR = 1_000_000
PROMPT_SUFFIX = "Answer with the option's letter from the given choices directly."


def read_table(path: str) -> list[dict]:
    """Rows of the official TSV or of an ``.xlsx`` (first sheet), as dicts by header."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    if path.endswith((".xlsx", ".xlsm")):
        import openpyxl

        wb = openpyxl.load_workbook(path, read_only=True)
        rows = list(wb.active.iter_rows(values_only=True))
        wb.close()
        header = [str(h) for h in rows[0]]
        return [dict(zip(header, r)) for r in rows[1:] if any(v is not None for v in r)]
    csv.field_size_limit(sys.maxsize)  # the TSV carries base64 images
    with open(path, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _present(value) -> bool:
    return value is not None and str(value).strip() != "" and str(value).lower() != "nan"


def options_of(row: dict) -> list[tuple[str, str]]:
    return [(c, str(row[c])) for c in LETTERS if c in row and _present(row[c])]


def build_prompt(row: dict) -> str:
    """LLaVA-1.5's MMBench prompt: hint, question, lettered options, the letter instruction."""
    question = str(row["question"])
    if _present(row.get("hint")):
        question = f"{row['hint']}\n{question}"
    for letter, text in options_of(row):
        question += f"\n{letter}. {text}"
    return f"{question}\n{PROMPT_SUFFIX}"


def parse_choice(text: str, options: list[tuple[str, str]]) -> str | None:
    """The letter an answer picks: a bare letter, "B.", "(B)", "B) ...", or exactly one option's text."""
    t = text.strip()
    letters = [c for c, _ in options] or list(LETTERS[:4])
    m = re.match(r"^\(?([A-F])(?:[.):]|\s|$)", t)
    if m and m.group(1) in letters:
        return m.group(1)
    low = t.lower().rstrip(".")
    hits = [c for c, o in options if o.strip().lower().rstrip(".") == low]
    return hits[0] if len(hits) == 1 else None


def score(answers_file: str, annotations: str) -> dict:
    """``annotations``: the official dev TSV or a submission .xlsx (``index``, options, ``answer``)."""
    rows = read_table(annotations)
    if not rows or "answer" not in rows[0] or "index" not in rows[0]:
        raise ValueError(f"{annotations}: needs 'index' and 'answer' columns (the dev split's TSV or a "
                         "submission .xlsx with the ground truth)")
    answers = answers_by_id(answers_file, whole=True)
    groups: dict[int, list[bool]] = defaultdict(list)
    categories: dict[int, str] = {}
    missing = []
    for row in rows:
        idx = int(row["index"])
        a = answers.get(idx)
        if a is None:
            missing.append(idx)
            continue
        ok = parse_choice(str(a["text"]), options_of(row)) == str(row["answer"]).strip()
        groups[idx % CIRCULAR].append(ok)
        if _present(row.get("category")):
            categories[idx % CIRCULAR] = str(row["category"])
    if missing:
        raise ValueError(f"{answers_file}: no answer for {len(missing)} of {len(rows)} rows of {annotations} "
                         f"(first index: {missing[0]})")
    right = {g: all(v) for g, v in groups.items()}
    result = {"score": 100 * sum(right.values()) / len(right), "questions": len(right), "rows": len(rows),
              "single_pass_accuracy": 100 * sum(v[0] for v in groups.values()) / len(groups)}
    if categories:
        per: dict[str, list[bool]] = defaultdict(list)
        for g, ok in right.items():
            per[categories.get(g, "?")].append(ok)
        result["per_category"] = {c: 100 * sum(v) / len(v) for c, v in sorted(per.items())}
    return result
