"""``llavakit data check``: validate every record, every image, and (with a tokenizer) every length.

One report object, :class:`CheckReport`, collects problems of every kind; the command prints a summary
(or ``--json``: ``{"total", "ok", "problems": [{"index", "id", "kind", "message"}], ...}``) and exits
non-zero when any problem is found.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llavakit.data.dataset import build_sample_index, resolve_image
from llavakit.data.images import ImageLoadError, open_image
from llavakit.data.records import Problem, RecordFileError, RecordStore, parse_record, validate_store


@dataclass
class CheckReport:
    source: str
    total: int = 0
    problems: list[Problem] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    @property
    def bad_indices(self) -> set[int]:
        return {p.index for p in self.problems}

    @property
    def ok(self) -> int:
        return self.total - len({p.index for p in self.problems if p.index >= 0})

    def to_dict(self) -> dict:
        return {"source": self.source, "total": self.total, "ok": self.ok,
                "problems": [{"index": p.index, "id": p.id, "kind": p.kind, "message": p.message}
                             for p in self.problems], **self.extra}

    def summary(self, examples: int = 3) -> str:
        lines = [f"{self.source}: {self.total} records, {self.ok} ok"]
        by_kind: dict[str, list[Problem]] = {}
        for p in self.problems:
            by_kind.setdefault(p.kind, []).append(p)
        for kind, probs in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {kind}: {len(probs)}")
            lines += [f"    {p.message}" for p in probs[:examples]]
        for k, v in self.extra.items():
            lines.append(f"  {k}: {json.dumps(v)}")
        if not self.problems:
            lines.append("  no problems found")
        return "\n".join(lines)


def _check_image(args: tuple[int, str | None, str]) -> Problem | None:
    index, rid, path = args
    try:
        open_image(path)
    except ImageLoadError as e:
        kind = "missing_image" if "not found" in str(e) else "bad_image"
        return Problem(index, rid, kind, f"record {index} (id={rid!r}), field 'image': {e}")
    return None


def check_images(store: RecordStore, indices: list[int], image_folder: str, workers: int | None = None,
                 progress: bool = False) -> list[Problem]:
    jobs = []
    for i in indices:
        rec = parse_record(store, i)
        for p in rec.images:
            jobs.append((i, rec.id, resolve_image(image_folder, p)))
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(_check_image, jobs, chunksize=64)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(jobs), desc="checking images", unit="img", mininterval=1.0)
        return [p for p in results if p is not None]


def run_check(data_path: str, image_folder: str | None = None, encoder=None,
              model_max_length: int | None = None, progress: bool = False) -> CheckReport:
    try:
        store = RecordStore.load(data_path)
    except RecordFileError as e:
        report = CheckReport(source=data_path)
        report.problems.append(Problem(-1, None, "unreadable_file", str(e)))
        return report
    valid, problems = validate_store(store)
    report = CheckReport(source=store.source, total=len(store), problems=list(problems))
    if image_folder is not None:
        report.problems += check_images(store, valid, image_folder, progress=progress)
    if encoder is not None:
        index = build_sample_index(store, valid, encoder, model_max_length, progress=progress)
        for s in index.skipped:
            report.problems.append(Problem(s["index"], s["id"], s["kind"], s["message"]))
        lengths = index.full_lengths
        if len(lengths):
            import numpy as np

            report.extra["token_lengths"] = {
                "mean": round(float(lengths.mean()), 1), "median": int(np.median(lengths)),
                "p90": int(np.percentile(lengths, 90)), "p99": int(np.percentile(lengths, 99)),
                "max": int(lengths.max())}
        report.extra["truncated"] = index.num_truncated
    report.problems.sort(key=lambda p: (p.index, p.kind))
    return report
