"""``llavakit predict``: answer a LLaVA-format question file, resumably.

Question lines are ``{"question_id", "image"?, "text", ...}``; answer lines are LLaVA's
``{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}``, appended and flushed batch by
batch. Run it again after a crash and it answers only what is missing (a line cut short by the crash is
dropped first). ``--num-chunks/--chunk-idx`` split the questions as LLaVA's eval scripts do, one chunk per
GPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from collections.abc import Callable

logger = logging.getLogger(__name__)


class QuestionFileError(ValueError):
    pass


def get_chunk(items: list, num_chunks: int, chunk_idx: int) -> list:
    """The original's split: ``ceil(len / n)`` items per chunk, the last one shorter."""
    if not 0 <= chunk_idx < num_chunks:
        raise ValueError(f"--chunk-idx {chunk_idx} must be in [0, {num_chunks})")
    size = math.ceil(len(items) / num_chunks)
    return items[chunk_idx * size:(chunk_idx + 1) * size]


def read_questions(path: str, image_folder: str | None) -> list[dict]:
    """Every line checked before any model is loaded: the file, the line and what to fix are named."""
    if not os.path.isfile(path):
        raise QuestionFileError(f"{path}: no such question file")
    out, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise QuestionFileError(f"{path}:{lineno}: not JSON ({e.msg})") from None
            if not isinstance(q, dict) or "question_id" not in q or not isinstance(q.get("text"), str):
                raise QuestionFileError(f"{path}:{lineno}: a question needs 'question_id' and a 'text' string")
            key = question_key(q)
            if key in seen:
                raise QuestionFileError(f"{path}:{lineno}: question {q['question_id']!r} repeats (same id and text)")
            seen.add(key)
            if q.get("image"):
                img = os.path.join(image_folder, q["image"]) if image_folder else q["image"]
                if not os.path.isfile(img):
                    raise QuestionFileError(f"{path}:{lineno}: image {img} not found (question "
                                            f"{q['question_id']!r}); check --image-folder")
                q["_image_path"] = img
            out.append(q)
    return out


def question_key(q: dict, text_field: str = "text") -> tuple:
    """What identifies a question: its id and its text (MME asks two questions under one image id). An
    answer line holds the question's text as ``prompt``."""
    qid = q["question_id"]
    return (json.dumps(qid) if isinstance(qid, (list, dict)) else qid, q.get(text_field))


def answered_ids(path: str) -> set:
    """Questions already answered (see :func:`question_key`); a last line cut short by a crash is removed
    from the file."""
    if not os.path.isfile(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    good_end = data.rfind(b"\n") + 1
    ids = set()
    for lineno, line in enumerate(data[:good_end].splitlines(), 1):
        if line.strip():
            try:
                ids.add(question_key(json.loads(line), "prompt"))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise QuestionFileError(f"{path}:{lineno}: not an answer line; give a new --answers-file "
                                        "or remove this one") from None
    if good_end < len(data):
        logger.warning("%s: dropping an incomplete last line (an interrupted run)", path)
        with open(path, "r+b") as f:
            f.truncate(good_end)
    return ids


def model_id_for(model_path: str) -> str:
    """The last path component, or ``parent_checkpoint-N`` as LLaVA's scripts name checkpoints."""
    parts = os.path.normpath(model_path).split(os.sep)
    return "_".join(parts[-2:]) if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]


def predict(predictor, questions: list[dict], answers_file: str, *, model_id: str, sampling, batch_size: int = 8,
            progress: Callable[[int, int], None] | None = None) -> int:
    """Answer ``questions`` not yet in ``answers_file``; return how many were answered now."""
    from llavakit.infer.generate import Query

    done = answered_ids(answers_file)
    todo = [q for q in questions if question_key(q) not in done]
    if done:
        logger.info("%s: %d of %d questions already answered; continuing", answers_file,
                    len(questions) - len(todo), len(questions))
    os.makedirs(os.path.dirname(os.path.abspath(answers_file)), exist_ok=True)
    with open(answers_file, "a", encoding="utf-8") as f:
        for s in range(0, len(todo), batch_size):
            batch = todo[s:s + batch_size]
            texts = predictor.generate([Query(q["text"], q.get("_image_path")) for q in batch],
                                       batch_size=batch_size, sampling=sampling)
            for q, text in zip(batch, texts):
                f.write(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": text,
                                    "answer_id": uuid.uuid4().hex, "model_id": model_id,
                                    "metadata": {}}) + "\n")
            f.flush()
            os.fsync(f.fileno())
            if progress:
                progress(min(s + batch_size, len(todo)), len(todo))
    return len(todo)


def main(args) -> int:
    from tqdm import tqdm

    from llavakit.infer.generate import Predictor, Sampling

    questions = get_chunk(read_questions(args.question_file, args.image_folder), args.num_chunks, args.chunk_idx)
    if not questions:
        logger.info("chunk %d of %d is empty; nothing to do", args.chunk_idx, args.num_chunks)
        open(args.answers_file, "a").close()
        return 0
    keys = {question_key(q) for q in questions}
    done = answered_ids(args.answers_file) & keys
    if done == keys:
        print(f"{args.answers_file}: all {len(questions)} questions already answered")
        return 0
    predictor = Predictor.from_pretrained(args.model_path, model_base=args.model_base, device=args.device,
                                          conv_mode=args.conv_mode)
    sampling = Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                        num_beams=args.num_beams)
    bar = tqdm(total=len(questions), desc="predict", unit="q")
    bar.update(len(done))

    def progress(done: int, total: int) -> None:
        bar.n = len(questions) - total + done
        bar.refresh()

    n = predict(predictor, questions, args.answers_file, model_id=args.model_id or model_id_for(args.model_path),
                sampling=sampling, batch_size=args.batch_size, progress=progress)
    bar.close()
    print(f"{n} question(s) answered → {args.answers_file}")
    return 0
