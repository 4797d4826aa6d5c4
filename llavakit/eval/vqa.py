"""Short-answer VQA benchmarks: TextVQA, GQA, VQAv2, VizWiz — LLaVA-1.5's answer handling and scoring.

Answers are normalised as the VQA / EvalAI evaluation does: whitespace folded, punctuation dropped (or
turned into a space where it separates words), periods kept only inside numbers, number words as digits,
articles removed, apostrophe-less contractions restored. Then:

* TextVQA: soft accuracy — an answer scores ``min(1, n/3)`` where ``n`` of the ten annotators gave it;
* VQAv2 / VizWiz (with annotations): VQA accuracy, ``min(1, n/3)`` against each set of nine of the ten
  annotators, averaged; without annotations, the submission file for the evaluation server;
* GQA: exact match of the lower-cased answer without a final period (testdev-balanced).
"""

from __future__ import annotations

import json
import re
from collections import Counter

from llavakit.eval.answers import answers_by_id, read_json, read_jsonl

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")


def _contractions() -> dict[str, str]:
    """Apostrophe-less spellings → the contraction ("dont" → "don't", "shouldntve" → "shouldn't've").
    Spellings that are words of their own ("its", "well", "were", "ill", "hell", "id") are left out."""
    out = {}
    for w in ("are", "could", "did", "does", "do", "had", "has", "have", "is", "might", "must", "need", "should",
              "was", "were", "would", "ca", "wo", "ai", "sha"):
        out[f"{w}nt"] = f"{w}n't"
    for w in ("could", "should", "would", "might", "must"):
        out[f"{w}ve"] = f"{w}'ve"
        out[f"{w}ntve"] = out[f"{w}nt've"] = out[f"{w}n'tve"] = f"{w}n't've"
    for w in ("i", "you", "we", "they", "who"):
        out[f"{w}ve"] = f"{w}'ve"
    for w in ("you", "they"):
        out[f"{w}re"] = f"{w}'re"
    for w in ("you", "they", "it", "that", "there", "she"):
        if w != "she":
            out[f"{w}ll"] = f"{w}'ll"
    for w in ("he", "she", "that", "what", "where", "how", "there", "here", "who", "somebody", "someone",
              "everyone", "nobody", "let"):
        out[f"{w}s"] = f"{w}'s"
    for w in ("you", "they", "it", "he", "there", "who"):
        out[f"{w}d"] = f"{w}'d"
        out[f"{w}dve"] = out[f"{w}d've"] = out[f"{w}'dve"] = f"{w}'d've"
    out.update({"maam": "ma'am", "oclock": "o'clock", "yall": "y'all", "twas": "'twas", "cant": "can't",
                "wont": "won't", "aint": "ain't", "shant": "shan't"})
    return out


_CONTRACTIONS = _contractions()


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_IN_NUMBER.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def _digits_and_articles(text: str) -> str:
    words = []
    for w in text.lower().split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The VQA / EvalAI normalisation of one answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _digits_and_articles(_punctuation(text))


def soft_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """TextVQA (and LLaVA's m4c evaluator): ``min(1, n/3)`` for the n annotators who gave the answer."""
    counts = Counter(normalize_answer(a) for a in gt_answers)
    return min(1.0, counts.get(normalize_answer(prediction), 0) / 3)


def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """The VQA metric: ``min(1, matches/3)`` against each leave-one-out set of annotators, averaged."""
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in gt_answers]
    if not gts:
        return 0.0
    accs = []
    for i in range(len(gts)):
        others = gts[:i] + gts[i + 1:]
        accs.append(min(1.0, sum(g == pred for g in others) / 3))
    return sum(accs) / len(accs)


def _answers(answers_file: str) -> dict:
    return answers_by_id(answers_file, whole=True)


def _load_json(path: str):
    return read_json(path, "annotation file")


# ---- TextVQA ------------------------------------------------------------------------------------
def textvqa_question(prompt: str) -> str:
    """The question inside LLaVA's TextVQA prompt (the first line; OCR tokens and the instruction follow)."""
    return prompt.split("\n")[0].strip()


def score_textvqa(answers_file: str, annotations: str) -> dict:
    """``annotations``: ``TextVQA_0.5.1_val.json``. Answers are matched by (image id, question), as LLaVA
    does: its TextVQA answer lines carry the image id as ``question_id``."""
    data = _load_json(annotations)
    by_key = {(a["image_id"], a["question"].lower()): a for a in data["data"]}
    total, n, missing = 0.0, 0, []
    for qid, a in _answers(answers_file).items():
        key = (qid, textvqa_question(a.get("prompt", "")).lower())
        ann = by_key.get(key)
        if ann is None:
            missing.append(key)
            continue
        total += soft_accuracy(a["text"], ann["answers"])
        n += 1
    if missing:
        raise ValueError(f"{answers_file}: {len(missing)} answers match no question of {annotations} "
                         f"(first: image {missing[0][0]!r}, question {missing[0][1]!r})")
    return {"score": 100 * total / n if n else 0.0, "questions": n}


# ---- GQA ----------------------------------------------------------------------------------------
def gqa_prediction(text: str) -> str:
    return text.rstrip().rstrip(".").lower()


def score_gqa(answers_file: str, annotations: str) -> dict:
    """``annotations``: ``testdev_balanced_questions.json`` (question id → {"answer", ...})."""
    truth = _load_json(annotations)
    answers = _answers(answers_file)
    missing = [q for q in truth if q not in answers and str(q) not in answers]
    if missing:
        raise ValueError(f"{answers_file}: no answer for {len(missing)} of {len(truth)} questions "
                         f"(first: {missing[0]})")
    right = sum(gqa_prediction(answers.get(q, answers.get(str(q)))["text"]) == t["answer"] for q, t in truth.items())
    return {"score": 100 * right / len(truth), "questions": len(truth)}


# ---- VQAv2 / VizWiz -----------------------------------------------------------------------------
def score_vqa(answers_file: str, annotations: str) -> dict:
    """Local VQA accuracy. ``annotations``: a VQA annotation file (``{"annotations": [{"question_id",
    "answers": [{"answer"}...]}]}``) or VizWiz's (a list of ``{"image", "answers"}``)."""
    data = _load_json(annotations)
    answers = _answers(answers_file)
    rows = data["annotations"] if isinstance(data, dict) else data
    total, n, missing = 0.0, 0, 0
    for row in rows:
        qid = row.get("question_id", row.get("image"))
        a = answers.get(qid)
        if a is None:
            missing += 1
            continue
        total += vqa_accuracy(a["text"], [x["answer"] for x in row["answers"]])
        n += 1
    if missing:
        raise ValueError(f"{answers_file}: no answer for {missing} of {len(rows)} annotated questions")
    return {"score": 100 * total / n if n else 0.0, "questions": n}


def vqav2_submission(answers_file: str, question_file: str, out_path: str) -> int:
    """The test-dev upload: every question of ``question_file``, unanswered ones as ""."""
    answers = _answers(answers_file)
    rows = [{"question_id": q["question_id"],
             "answer": normalize_answer(answers[q["question_id"]]["text"]) if q["question_id"] in answers else ""}
            for q in read_jsonl(question_file)]
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(rows, f)
    return len(rows)


def vizwiz_submission(answers_file: str, question_file: str, out_path: str) -> int:
    """VizWiz's upload: ``{"image", "answer"}`` per question (LLaVA's answer ids are the question ids)."""
    answers = _answers(answers_file)
    rows = []
    for q in read_jsonl(question_file):
        a = answers.get(q["question_id"])
        rows.append({"image": q["image"], "answer": normalize_answer(a["text"]) if a else ""})
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(rows, f)
    return len(rows)
