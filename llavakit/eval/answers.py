"""Reading LLaVA's answer and question files (JSON Lines), shared by every benchmark scorer."""

from __future__ import annotations

import json
import os


def read_jsonl(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}: line {lineno} is not JSON: {e.msg}") from None
    return out


def answers_by_id(path: str) -> dict:
    """question_id → answer text (the last answer wins, as a resumed predict file may repeat ids)."""
    return {a["question_id"]: a["text"] for a in read_jsonl(path)}
