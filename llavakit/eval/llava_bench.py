"""LLaVA-Bench (in the wild): GPT-judged answers, scored relative to the reference answers.

A judge sees the image's description, the question, the reference answer (Assistant 1) and the model's
answer (Assistant 2) and gives each a score from 1 to 10 on the first line of its review. The relative
score of one review run is ``100 · mean(model) / mean(reference)`` over all questions, with both means
rounded to three decimals and the ratio to one, as LLaVA's summary prints it; the headline number is the
mean over the review runs (LLaVA-v1.5-13B: 72.8, 72.7, 72.1 → 72.53).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

from llavakit.eval.answers import read_jsonl

JUDGE_SYSTEM = "You are a careful and impartial judge of answers to questions about images."
CATEGORY_FOCUS = {
    "conv": "This is a conversational question about the image.",
    "detail": "This asks for a detailed description of the image.",
    "complex": "This question needs reasoning about the image.",
}
JUDGE_INSTRUCTION = (
    "You cannot see the image; the description above (captions and object boxes) tells you what it shows. "
    "{focus} Judge how well each of the two assistants answers the question: helpfulness, relevance, "
    "accuracy and level of detail. Give each assistant an overall score from 1 to 10, higher is better. "
    "On the first line write only the two scores, for Assistant 1 and Assistant 2, separated by a space. "
    "From the second line on, explain your judgement without letting the order of the answers sway it."
)


def parse_scores(review: str) -> list[float]:
    """The two scores on the review's first line; ``[-1, -1]`` when it does not hold exactly two numbers."""
    first = review.strip().split("\n")[0].replace(",", " ")
    parts = first.split()
    try:
        if len(parts) == 2:
            return [float(parts[0]), float(parts[1])]
    except ValueError:
        pass
    return [-1.0, -1.0]


def relative_scores(review_file: str) -> dict:
    """One review run: relative score overall and per category (and the two means ×10)."""
    per: dict[str, list] = defaultdict(list)
    for lineno, r in enumerate(read_jsonl(review_file, kind="a GPT review file"), 1):
        if "tuple" not in r and "content" not in r:
            raise ValueError(f"{review_file}: line {lineno} has neither 'tuple' nor 'content': not a GPT review "
                             "file (llava-bench scores the reviews `eval run --judge-model` writes, not answers)")
        pair = r.get("tuple") or parse_scores(r.get("content", ""))
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, (int, float)) for x in pair)):
            raise ValueError(f"{review_file}: line {lineno}: 'tuple' must be two scores, got {pair!r}")
        if "category" in r:
            per[r["category"]].append(pair)
        per["all"].append(pair)
    if not per["all"]:
        raise ValueError(f"{review_file}: no reviews")
    out = {}
    for cat, pairs in sorted(per.items()):
        ref = round(sum(p[0] for p in pairs) / len(pairs), 3)
        model = round(sum(p[1] for p in pairs) / len(pairs), 3)
        out[cat] = {"relative": round(model / ref * 100, 1) if ref else 0.0, "reference": round(ref * 10, 1),
                    "model": round(model * 10, 1), "questions": len(pairs)}
    return out


def score(review_files: list[str]) -> dict:
    runs = {os.path.basename(f): relative_scores(f) for f in review_files}
    overall = [r["all"]["relative"] for r in runs.values()]
    return {"score": sum(overall) / len(overall), "runs": runs}


def judge(question_file: str, context_file: str, reference_file: str, answers_file: str, review_file: str,
          client) -> str:
    """Write GPT reviews (one line per question, resumable) for ``answers_file`` against the reference."""
    questions = read_jsonl(question_file)
    contexts = {c["image"]: c for c in read_jsonl(context_file)}
    references = {a["question_id"]: a for a in read_jsonl(reference_file)}
    answers = {a["question_id"]: a for a in read_jsonl(answers_file)}
    done = {r["question_id"] for r in read_jsonl(review_file)} if os.path.isfile(review_file) else set()
    with open(review_file, "a", encoding="utf-8") as f:
        for i, q in enumerate(questions):
            qid = q["question_id"]
            if qid in done:
                continue
            if qid not in answers or qid not in references:
                raise ValueError(f"question {qid}: no {'model' if qid not in answers else 'reference'} answer")
            ctx = contexts.get(q["image"], {})
            description = "\n".join(x for x in (ctx.get("caption", ""), "\n".join(ctx.get("instances", [])))
                                    if x) if ctx else ""
            category = q.get("category", "conv")
            user = (f"[Image description]\n{description}\n\n[Question]\n{q['text']}\n\n"
                    f"[Assistant 1]\n{references[qid]['text']}\n[End of Assistant 1]\n\n"
                    f"[Assistant 2]\n{answers[qid]['text']}\n[End of Assistant 2]\n\n"
                    f"[Task]\n{JUDGE_INSTRUCTION.format(focus=CATEGORY_FOCUS.get(category, ''))}")
            content = client.complete(JUDGE_SYSTEM, user)
            f.write(json.dumps({"id": i + 1, "question_id": qid, "answer1_id": references[qid].get("answer_id"),
                                "answer2_id": answers[qid].get("answer_id"), "category": f"llava_bench_{category}",
                                "content": content, "tuple": parse_scores(content)}) + "\n")
            f.flush()
    return review_file
