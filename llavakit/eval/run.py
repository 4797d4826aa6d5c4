"""``llavakit eval run``: questions with LLaVA-1.5's prompts → ``predict`` (resumable) → score, per benchmark.

``--data-root`` follows the original's ``playground/data/eval`` layout (below); what is missing is named
with where it comes from. For each benchmark ``O/B/answers.jsonl`` and ``O/B/scores.json`` are written
(and the upload file, for benchmarks scored by an evaluation server); a summary table ends the run.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from llavakit.eval.answers import read_jsonl

logger = logging.getLogger(__name__)

SHORT = 128  # LLaVA-1.5's short-answer benchmarks (greedy; answers are a word or a letter)
LONG = 1024  # open answers (LLaVA-Bench, MM-Vet)
LETTER_PROMPT = "Answer with the option's letter from the given choices directly."


@dataclass
class Benchmark:
    name: str
    questions: str  # relative to --data-root
    images: str | None
    source: str  # where the files come from, for the error message
    annotations: str | None = None
    max_new_tokens: int = SHORT
    extra: dict = field(default_factory=dict)


BENCHMARKS = {
    "pope": Benchmark("pope", "pope/llava_pope_test.jsonl", "pope/val2014",
                      "LLaVA's eval bundle (pope/) + COCO val2014 images + POPE's output/coco/*.json", "pope/coco"),
    "mme": Benchmark("mme", "MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version",
                     "LLaVA's eval bundle (MME/) + the MME benchmark images and eval_tool from its authors",
                     "MME/eval_tool/Your_Results"),
    "scienceqa": Benchmark("scienceqa", "scienceqa/llava_test_CQM-A.json", "scienceqa/images/test",
                           "LLaVA's eval bundle (scienceqa/) + ScienceQA's test images"),
    "mmbench": Benchmark("mmbench", "mmbench/mmbench_dev_20230712.tsv", None,
                         "MMBench's dev TSV (mmbench_dev_20230712.tsv, images inside)",
                         "mmbench/mmbench_dev_20230712.tsv"),
    "llava-bench": Benchmark("llava-bench", "llava-bench-in-the-wild/questions.jsonl",
                             "llava-bench-in-the-wild/images",
                             "the hub dataset liuhaotian/llava-bench-in-the-wild", max_new_tokens=LONG,
                             extra={"context": "llava-bench-in-the-wild/context.jsonl",
                                    "reference": "llava-bench-in-the-wild/answers_gpt4.jsonl"}),
    "textvqa": Benchmark("textvqa", "textvqa/llava_textvqa_val_v051_ocr.jsonl", "textvqa/train_images",
                         "LLaVA's eval bundle (textvqa/) + TextVQA 0.5.1 val annotations and train_val images",
                         "textvqa/TextVQA_0.5.1_val.json"),
    "gqa": Benchmark("gqa", "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/data/images",
                     "LLaVA's eval bundle (gqa/) + GQA images and testdev_balanced_questions.json",
                     "gqa/data/testdev_balanced_questions.json"),
    "vqav2": Benchmark("vqav2", "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015",
                       "LLaVA's eval bundle (vqav2/) + COCO test2015 images",
                       extra={"all_questions": "vqav2/llava_vqav2_mscoco_test2015.jsonl"}),
    "vizwiz": Benchmark("vizwiz", "vizwiz/llava_test.jsonl", "vizwiz/test",
                        "LLaVA's eval bundle (vizwiz/) + VizWiz test images"),
    "seed": Benchmark("seed", "seed_bench/llava-seed-bench.jsonl", "seed_bench",
                      "LLaVA's eval bundle (seed_bench/) + SEED-Bench images and SEED-Bench.json",
                      "seed_bench/SEED-Bench.json"),
    "mm-vet": Benchmark("mm-vet", "mm-vet/llava-mm-vet.jsonl", "mm-vet/images",
                        "LLaVA's eval bundle (mm-vet/) + MM-Vet images", "mm-vet/mm-vet.json", max_new_tokens=LONG),
}


class MissingData(FileNotFoundError):
    pass


def _need(root: str, rel: str, bench: Benchmark) -> str:
    path = os.path.join(root, rel)
    if not os.path.exists(path):
        raise MissingData(f"{bench.name}: {path} not found (from {bench.source}; --data-root follows LLaVA's "
                          "playground/data/eval layout)")
    return path


# ---- questions ----------------------------------------------------------------------------------
def _jsonl_questions(bench: Benchmark, root: str, out_dir: str) -> list[dict]:
    images = _need(root, bench.images, bench) if bench.images else None
    out = []
    for q in read_jsonl(_need(root, bench.questions, bench)):
        item = {"question_id": q["question_id"], "text": q["text"]}
        if q.get("image"):
            item["_image_path"] = os.path.join(images, q["image"]) if images else q["image"]
        out.append(item)
    return out


def _scienceqa_questions(bench: Benchmark, root: str, out_dir: str) -> list[dict]:
    with open(_need(root, bench.questions, bench), encoding="utf-8") as f:
        problems = json.load(f)
    images = os.path.join(root, bench.images)
    out = []
    for p in problems:
        text = p["conversations"][0]["value"].replace("<image>", "").strip()
        item = {"question_id": p["id"], "text": f"{text}\n{LETTER_PROMPT}"}
        if p.get("image"):
            item["_image_path"] = os.path.join(images, p["image"])
        out.append(item)
    return out


def _mmbench_questions(bench: Benchmark, root: str, out_dir: str) -> list[dict]:
    from llavakit.eval.mmbench import build_prompt, read_table

    rows = read_table(_need(root, bench.questions, bench))
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    out = []
    for row in rows:
        idx = int(row["index"])
        path = os.path.join(image_dir, f"{idx}.jpg")
        if not os.path.isfile(path):
            with open(path + ".tmp", "wb") as f:
                f.write(base64.b64decode(row["image"]))
            os.replace(path + ".tmp", path)
        out.append({"question_id": idx, "text": build_prompt(row), "_image_path": path})
    return out


BUILDERS: dict[str, Callable] = {"scienceqa": _scienceqa_questions, "mmbench": _mmbench_questions}


def build_questions(name: str, root: str, out_dir: str) -> list[dict]:
    bench = BENCHMARKS[name]
    questions = BUILDERS.get(name, _jsonl_questions)(bench, root, out_dir)
    missing = [q["_image_path"] for q in questions if q.get("_image_path") and not os.path.isfile(q["_image_path"])]
    if missing:
        raise MissingData(f"{name}: {len(missing)} of {len(questions)} images not found (first: {missing[0]}; "
                          f"from {bench.source})")
    return questions


# ---- scoring ------------------------------------------------------------------------------------
def score_run(name: str, root: str, out_dir: str, answers: str, judge=None) -> dict:
    from llavakit.eval import llava_bench, mmvet, vqa
    from llavakit.eval.score import score_benchmark

    bench = BENCHMARKS[name]
    if name == "pope":
        return score_benchmark(name, answers, _need(root, bench.questions, bench), _need(root, bench.annotations,
                                                                                          bench))
    if name == "scienceqa":
        return score_benchmark(name, answers, _need(root, bench.questions, bench))
    if name == "vqav2":
        qfile = os.path.join(root, bench.extra["all_questions"])
        qfile = qfile if os.path.isfile(qfile) else _need(root, bench.questions, bench)
        upload = os.path.join(out_dir, "vqav2_test-dev_upload.json")
        n = vqa.vqav2_submission(answers, qfile, upload)
        return {"score": None, "upload": upload, "questions": n, "note": "scored by the VQAv2 evaluation server"}
    if name == "vizwiz":
        upload = os.path.join(out_dir, "vizwiz_test_upload.json")
        n = vqa.vizwiz_submission(answers, _need(root, bench.questions, bench), upload)
        return {"score": None, "upload": upload, "questions": n, "note": "scored by the VizWiz evaluation server"}
    if name == "mm-vet":
        upload = os.path.join(out_dir, "mm-vet_upload.json")
        mmvet.mmvet_submission(answers, upload)
        if judge is None or not os.path.isfile(os.path.join(root, bench.annotations)):
            return {"score": None, "upload": upload, "note": "official score: MM-Vet's evaluator; a local GPT "
                    "estimate needs --judge-model and mm-vet/mm-vet.json"}
        return {**mmvet.judge_mmvet(answers, os.path.join(root, bench.annotations),
                                  os.path.join(out_dir, "reviews.jsonl"), judge), "upload": upload}
    if name == "llava-bench":
        if judge is None:
            return {"score": None, "note": "judged by GPT: give --judge-model (and --judge-base-url)"}
        review = os.path.join(out_dir, "reviews.jsonl")
        llava_bench.judge(_need(root, bench.questions, bench), _need(root, bench.extra["context"], bench),
                          _need(root, bench.extra["reference"], bench), answers, review, judge)
        return llava_bench.score([review])
    return score_benchmark(name, answers, annotations=_need(root, bench.annotations, bench), judge=judge)


# ---- the command --------------------------------------------------------------------------------
def run(benchmarks: list[str], predictor, data_root: str, output_dir: str, *, model_id: str, batch_size: int = 8,
        max_new_tokens: int | None = None, judge=None, progress: bool = True) -> dict:
    from llavakit.infer.generate import Sampling
    from llavakit.infer.predict import predict

    results = {}
    for name in benchmarks:
        out_dir = os.path.join(output_dir, name)
        os.makedirs(out_dir, exist_ok=True)
        questions = build_questions(name, data_root, out_dir)
        answers = os.path.join(out_dir, "answers.jsonl")
        bench = BENCHMARKS[name]
        logger.info("%s: %d questions", name, len(questions))
        bar = _bar(name, len(questions)) if progress else None
        predict(predictor, questions, answers, model_id=model_id, batch_size=batch_size,
                sampling=Sampling(max_new_tokens=max_new_tokens or bench.max_new_tokens),
                progress=(lambda d, t, b=bar: b.update(d - b.n)) if bar else None)
        if bar:
            bar.close()
        result = score_run(name, data_root, out_dir, answers, judge)
        with open(os.path.join(out_dir, "scores.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        results[name] = result
    return results


def _bar(name: str, total: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=name, unit="q")


def summary_table(results: dict) -> str:
    lines = [f"{'benchmark':<14}{'score':>10}  notes", "-" * 60]
    for name, r in results.items():
        score = "-" if r.get("score") is None else f"{r['score']:.2f}"
        note = r.get("note") or (f"upload: {r['upload']}" if r.get("upload") else "")
        lines.append(f"{name:<14}{score:>10}  {note}")
    return "\n".join(lines)


def main(args) -> int:
    from llavakit.infer.generate import Predictor
    from llavakit.infer.predict import model_id_for

    names = [b for item in args.benchmark for b in item.split(",") if b]
    unknown = [b for b in names if b not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    for name in names:  # every input checked before the model loads
        bench = BENCHMARKS[name]
        _need(args.data_root, bench.questions, bench)
    judge = judge_from_args(args)
    predictor = Predictor.from_pretrained(args.model_path, model_base=args.model_base, device=args.device,
                                          conv_mode=args.conv_mode)
    results = run(names, predictor, args.data_root, args.output_dir,
                  model_id=args.model_id or model_id_for(args.model_path), batch_size=args.batch_size,
                  max_new_tokens=args.max_new_tokens, judge=judge)
    print(summary_table(results))
    return 0


def judge_from_args(args):
    if not getattr(args, "judge_model", None):
        return None
    from llavakit.eval.judge import JudgeClient

    return JudgeClient(base_url=args.judge_base_url, model=args.judge_model)
