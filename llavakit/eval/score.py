"""``llavakit eval score``: score an existing answers file (ours or the original's) for one benchmark."""

from __future__ import annotations

from llavakit.eval import mme, pope, scienceqa

BENCHMARKS = ("pope", "mme", "scienceqa")


def score_benchmark(benchmark: str, answers_file: str, question_file: str | None = None,
                    annotations: str | None = None) -> dict:
    def need(value, flag):
        if not value:
            raise ValueError(f"--benchmark {benchmark} needs {flag}")
        return value

    if benchmark == "pope":
        return pope.score(answers_file, need(question_file, "--question-file"), need(annotations, "--annotations"))
    if benchmark == "mme":
        return mme.score(answers_file, need(annotations, "--annotations"))
    if benchmark == "scienceqa":
        return scienceqa.score(answers_file, need(question_file, "--question-file"))
    raise ValueError(f"unknown --benchmark {benchmark!r}; scorers available: {', '.join(BENCHMARKS)}")
