"""Scorers: LLaVA-1.5's parsing rules on literal cases, and the published numbers from the official
LLaVA-v1.5-13B answers (../shared/reference/eval; skipped where it is absent)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llavakit.eval import mme, pope, scienceqa

REF = Path(__file__).resolve().parents[2] / "shared" / "reference" / "eval"
needs_ref = pytest.mark.skipif(not REF.is_dir(), reason=f"reference data not found at {REF}")


@pytest.mark.parametrize("text,expected", [
    ("Yes", "yes"), ("No", "no"), ("No, there is not.", "no"), ("There is not a dog.", "no"),
    ("Yes. There is no doubt.", "yes"), ("yes, no doubt", "no"), ("Nope", "yes"), ("", "yes")])
def test_pope_yes_no_rule(text, expected):
    assert pope.parse_yes_no(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("B", "B"), ("C. apostrophe", "C"), ("I think. The answer is D.", "D"),
    ("The answer is A. The answer is B.", None), ("b", None), ("F", None), ("A.", None)])
def test_scienceqa_letter_rule(text, expected):
    assert scienceqa.parse_letter(text) == expected


@pytest.mark.parametrize("text,expected", [("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"),
                                           ("Not really", "no"), ("Maybe", "other"), (" NO ", "no")])
def test_mme_yes_no_rule(text, expected):
    assert mme.parse_yes_no(text) == expected


def test_pope_metrics_on_a_literal_case():
    m = pope.split_metrics(["yes", "yes", "no", "no"], ["yes", "no", "no", "yes"])
    assert m == {"accuracy": 0.5, "precision": 0.5, "recall": 0.5, "f1": 0.5, "yes_ratio": 0.5, "questions": 4}


def _cli(*args):
    r = subprocess.run([sys.executable, "-m", "llavakit", "eval", "score", *args, "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@needs_ref
def test_pope_reproduces_published_score():
    d = REF / "pope"
    s = _cli("--benchmark", "pope", "--answers-file", str(d / "answers-llava-v1.5-13b.jsonl"),
             "--question-file", str(d / "llava_pope_test.jsonl"), "--annotations", str(d))
    assert abs(s["score"] - 85.95) < 0.01


@needs_ref
def test_mme_reproduces_published_score():
    d = REF / "mme"
    s = _cli("--benchmark", "mme", "--answers-file", str(d / "answers-llava-v1.5-13b.jsonl"),
             "--annotations", str(d / "ground_truth"))
    assert abs(s["score"] - 1531.32) < 0.01 and abs(s["cognition"] - 295.36) < 0.01


@needs_ref
def test_scienceqa_reproduces_published_score():
    d = REF / "scienceqa"
    s = _cli("--benchmark", "scienceqa", "--answers-file", str(d / "answers-llava-v1.5-13b.jsonl"),
             "--question-file", str(d / "llava_test_CQM-A.json"))
    assert abs(s["score"] - 71.64) < 0.01 and abs(s["all_accuracy"] - 74.39) < 0.01


def test_missing_inputs_are_clear_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llavakit", "eval", "score", "--benchmark", "pope",
                        "--answers-file", str(tmp_path / "a.jsonl")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "needs --question-file" in r.stderr
