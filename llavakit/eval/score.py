"""``llavakit eval score``: score an existing answers file (ours or the original's) for one benchmark.

What each benchmark reads (``--question-file`` Q, ``--annotations`` P):

==============  ====================================================================================
pope            Q: the question file (``category`` = split); P: folder of ``coco_pope_<split>.json``
mme             P: folder of ground-truth ``<subtask>.txt``
scienceqa       Q: the LLaVA-format problem file (the gpt turn is the right letter)
mmbench         P: the dev TSV or a submission .xlsx with an ``answer`` column
llava-bench     the answers file(s) are GPT review files, one per judging run
textvqa         P: ``TextVQA_0.5.1_val.json``
gqa             P: ``testdev_balanced_questions.json``
vqav2, vizwiz   P: annotations for local VQA accuracy (else: ``eval run`` writes the upload file)
seed            P: ``SEED-Bench.json``
mm-vet          P: ``mm-vet.json``; judged by GPT (``--judge-*``), reviews written beside the answers
==============  ====================================================================================
"""

from __future__ import annotations

from llavakit.eval import llava_bench, mmbench, mme, mmvet, pope, scienceqa, seed, vqa
from llavakit.eval.run import BENCHMARKS as REGISTRY

BENCHMARKS = tuple(REGISTRY)  # the names, from the one registry (eval/run.py)


def score_benchmark(benchmark: str, answers_file: str | list[str], question_file: str | None = None,
                    annotations: str | None = None, judge=None) -> dict:
    files = [answers_file] if isinstance(answers_file, str) else list(answers_file)

    def need(value, flag):
        if not value:
            raise ValueError(f"--benchmark {benchmark} needs {flag}")
        return value

    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown --benchmark {benchmark!r}; choose one of: {', '.join(BENCHMARKS)}")
    if benchmark == "llava-bench":
        return llava_bench.score(files)
    if len(files) != 1:
        raise ValueError(f"--benchmark {benchmark} scores one answers file ({len(files)} given)")
    answers = files[0]
    if benchmark == "pope":
        return pope.score(answers, need(question_file, "--question-file"), need(annotations, "--annotations"))
    if benchmark == "mme":
        return mme.score(answers, need(annotations, "--annotations"))
    if benchmark == "scienceqa":
        return scienceqa.score(answers, need(question_file, "--question-file"))
    if benchmark == "mmbench":
        return mmbench.score(answers, need(annotations, "--annotations"))
    if benchmark == "textvqa":
        return vqa.score_textvqa(answers, need(annotations, "--annotations"))
    if benchmark == "gqa":
        return vqa.score_gqa(answers, need(annotations, "--annotations"))
    if benchmark in ("vqav2", "vizwiz"):
        return vqa.score_vqa(answers, need(annotations, "--annotations (annotations for local accuracy; test "
                                                        "splits are scored by the evaluation server)"))
    if benchmark == "seed":
        return seed.score_seed(answers, need(annotations, "--annotations"))
    if judge is None:
        raise ValueError("--benchmark mm-vet is judged by GPT: give --judge-model (and --judge-base-url, "
                         "OPENAI_API_KEY); for the official number upload the file `eval run` writes")
    return mmvet.judge_mmvet(answers, need(annotations, "--annotations"), answers + ".reviews.jsonl", judge)
