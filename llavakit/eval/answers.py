"""Reading LLaVA's answer, question and annotation files, shared by every benchmark scorer.

Every reader refuses what is not its format with the file and line at fault — a scorer never counts a line
it cannot read as a wrong (or a right) answer.
"""

from __future__ import annotations

import json
import os
from typing import Any

ANSWER_KEYS = ("question_id", "text")


def _need_file(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"{path}: a directory, where a file is expected")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")


def read_json(path: str, what: str = "JSON file") -> Any:
    """A whole-file JSON document (an annotation file)."""
    _need_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a {what} (not JSON: {e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a {what} (not UTF-8 text)") from None


def read_jsonl(path: str, required: tuple[str, ...] = (), kind: str = "JSON Lines file") -> list[dict]:
    """One JSON object per line; each must hold the ``required`` keys."""
    _need_file(path)
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {lineno} is not JSON ({e.msg}); not {kind}") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}: line {lineno} is a JSON {type(row).__name__}, not an object; "
                                     f"not {kind}")
                missing = [k for k in required if k not in row]
                if missing:
                    raise ValueError(f"{path}: line {lineno} has no {', '.join(repr(k) for k in missing)}; not {kind} "
                                     f"(each line needs {', '.join(required)})")
                out.append(row)
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text; not {kind}") from None
    return out


def read_answers(path: str) -> list[dict]:
    """An answers file: ``{"question_id", "text", ...}`` per line (``llavakit predict``, the original's)."""
    rows = read_jsonl(path, ANSWER_KEYS, "an answers file")
    for lineno, a in enumerate(rows, 1):
        if not isinstance(a["text"], str):
            raise ValueError(f"{path}: answer {lineno} (question_id {a['question_id']!r}): 'text' is "
                             f"{type(a['text']).__name__}, not a string")
    return rows


class ById(dict):
    """question_id → value, where an id written as a string matches the same id written as a number."""

    @staticmethod
    def norm(key) -> str:
        return str(key)

    def __init__(self, pairs=()):
        super().__init__((self.norm(k), v) for k, v in pairs)

    def __contains__(self, key) -> bool:
        return super().__contains__(self.norm(key))

    def __getitem__(self, key):
        return super().__getitem__(self.norm(key))

    def get(self, key, default=None):
        return super().get(self.norm(key), default)


def answers_by_id(path: str, whole: bool = False) -> ById:
    """question_id → answer text (the whole line with ``whole``); the last answer wins, as a resumed
    predict file may repeat ids."""
    return ById((a["question_id"], a if whole else a["text"]) for a in read_answers(path))
