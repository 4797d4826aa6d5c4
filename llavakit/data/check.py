"""``llavakit data check``: validate every record, every image, and (with a tokenizer) every length.

One report object, :class:`CheckReport`, collects problems of every kind; the command prints a summary
(or ``--json``: ``{"total", "ok", "problems": [{"index", "id", "kind", "message"}], ...}``) and exits
non-zero when any problem is found.
"""

from __future__ import annotations

import json
import os
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
            if k != "per_source":
                lines.append(f"  {k}: {json.dumps(v)}")
        per = self.extra.get("per_source") or {}
        if per:
            lines.append(f"  {'source':<14}{'records':>9}{'problems':>10}{'median tok':>12}{'p99 tok':>9}"
                         f"{'truncated':>11}")
            for src, st in per.items():
                tl = st.get("token_lengths", {})
                lines.append(f"  {src:<14}{st['records']:>9}{sum(st['problems'].values()):>10}"
                             f"{tl.get('median', '-'):>12}{tl.get('p99', '-'):>9}{st.get('truncated', '-'):>11}")
        if not self.problems:
            lines.append("  no problems found")
        return "\n".join(lines)


def _check_image(args: tuple[int, str | None, str, int]) -> Problem | None:
    index, rid, path, min_size = args
    try:
        im = open_image(path)  # decodes every pixel: a truncated file fails here
    except ImageLoadError as e:
        kind = "missing_image" if "not found" in str(e) else "bad_image"
        return Problem(index, rid, kind, f"record {index} (id={rid!r}), field 'image': {e}")
    if min(im.size) < min_size:
        return Problem(index, rid, "tiny_image", f"record {index} (id={rid!r}), field 'image': {path} is "
                       f"{im.size[0]}x{im.size[1]} px, under --min_image_size {min_size}")
    return None


def source_of(images: list[str]) -> str:
    """The data source a record comes from: the first folder of its image path (coco, gqa, ocr_vqa,
    textvqa, vg, ...), or text-only."""
    if not images:
        return "text-only"
    parts = images[0].replace("\\", "/").lstrip("/").split("/")
    return parts[0] if len(parts) > 1 else "(top level)"


def check_images(images: dict[int, tuple[str, list[str]]], image_folder: str, workers: int | None = None,
                 progress: bool = False, min_size: int = 1) -> list[Problem]:
    """Decode every image (record index → (record id, image paths)), over ``workers`` processes."""
    jobs = [(i, rid, resolve_image(image_folder, p), min_size) for i, (rid, paths) in images.items() for p in paths]
    workers = workers or os.cpu_count() or 1
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc="checking images", unit="img", mininterval=1.0)
    out = []
    if workers > 1 and len(jobs) > 256:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            for p in pool.map(_check_image, jobs, chunksize=64):
                out.append(p)
                if bar:
                    bar.update()
    else:
        for job in jobs:
            out.append(_check_image(job))
            if bar:
                bar.update()
    if bar:
        bar.close()
    return [p for p in out if p is not None]


def run_check(data_path: str, image_folder: str | None = None, encoder=None,
              model_max_length: int | None = None, progress: bool = False, workers: int | None = None,
              min_image_size: int = 1, store: RecordStore | None = None) -> CheckReport:
    """Check the records of ``data_path`` (or ``store``, already read from it)."""
    if store is None:
        try:
            store = RecordStore.load(data_path)
        except RecordFileError as e:
            report = CheckReport(source=data_path)
            report.problems.append(Problem(-1, None, "unreadable_file", str(e)))
            return report
    valid, problems = validate_store(store)
    report = CheckReport(source=store.source, total=len(store), problems=list(problems))
    if len(store) == 0:
        report.problems.append(Problem(-1, None, "empty", f"{store.source}: holds no record"))
    images = {}  # each record parsed once: its id and image paths are all the checks need
    for i in valid:
        rec = parse_record(store, i)
        images[i] = (rec.id, rec.images)
    sources = {i: source_of(paths) for i, (_, paths) in images.items()}
    if image_folder is not None:
        report.problems += check_images(images, image_folder, workers=workers, progress=progress,
                                        min_size=min_image_size)
        report.extra["missing_images"] = sum(p.kind == "missing_image" for p in report.problems)
    per_source: dict[str, dict] = {}
    for src in sources.values():
        per_source.setdefault(src, {"records": 0, "problems": {}})["records"] += 1
    for p in report.problems:
        if p.index in sources:
            kinds = per_source[sources[p.index]]["problems"]
            kinds[p.kind] = kinds.get(p.kind, 0) + 1
    if encoder is not None:
        import numpy as np

        index = build_sample_index(store, valid, encoder, model_max_length, progress=progress,
                                   image_folder=image_folder)
        image_problems = {p.index for p in report.problems if p.kind in ("missing_image", "bad_image")}
        for s in index.skipped:
            if s["kind"] == "bad_image" and s["index"] in image_problems:
                continue  # (AnyRes reads image sizes: the image check above already named it)
            report.problems.append(Problem(s["index"], s["id"], s["kind"], s["message"]))
            if s["index"] in sources:
                kinds = per_source[sources[s["index"]]]["problems"]
                kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
        lengths = index.full_lengths
        if len(lengths):
            report.extra["token_lengths"] = _length_stats(lengths)
        with_images = index.image_tokens[index.has_image]
        if len(with_images):  # per sample, all its images (AnyRes: from their sizes)
            report.extra["image_tokens"] = _length_stats(with_images)
        report.extra["truncated"] = index.num_truncated
        by_src: dict[str, list[int]] = {}
        truncated: dict[str, int] = {}
        for k, ridx in enumerate(index.record_idx.tolist()):
            src = sources[ridx]
            by_src.setdefault(src, []).append(int(index.full_lengths[k]))
            truncated[src] = truncated.get(src, 0) + int(index.full_lengths[k] > index.lengths[k])
        for src, ls in by_src.items():
            per_source[src]["token_lengths"] = _length_stats(np.asarray(ls))
            per_source[src]["truncated"] = truncated[src]
    report.extra["per_source"] = dict(sorted(per_source.items()))
    report.problems.sort(key=lambda p: (p.index, p.kind))
    return report


def _length_stats(lengths) -> dict:
    import numpy as np

    return {"mean": round(float(lengths.mean()), 1), "median": int(np.median(lengths)),
            "p90": int(np.percentile(lengths, 90)), "p99": int(np.percentile(lengths, 99)), "max": int(lengths.max())}
