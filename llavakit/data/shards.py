"""WebDataset shards: ``llavakit data shard`` writes them; training reads them from a local folder, a brace
pattern or an fsspec URL (``s3://``, ``gs://``, ``https://``).

A shard directory::

    index.json          {"format": "llavakit-shards", "samples", "shards": [{"name", "samples", "bytes", "sha256"}],
                         "content_id", "lengths": [...]} — written last: a directory without it is unfinished
    shard-000000.tar    WebDataset members per sample: <key>.json (the record), <key>.img0.<ext>, <key>.img1.<ext>,
                        ... (the image files' own bytes, not re-encoded); <key> is the sample's number, 9 digits
    samples.npz         per sample: shard, offset and size of its members in the tar, crc32 of those bytes;
                        its images' (height, width) from their headers (``image_start``, ``image_hw``: AnyRes
                        token counts without a shard read)
    records.bin, offsets.npy, meta.json, valid.npy, problems.jsonl
                        the written records as a converted record directory: training learns every sample's
                        token length (and skips what is too long) without reading a shard
    lengths/<key>.npz   token lengths (``--tokenizer``), found by training with the same tokenizer and template
    rejected.jsonl      the records ``data check`` found bad, not written

The tar format and its member parsing are WebDataset's (``webdataset.TarWriter``,
``webdataset.tariterators``); remote bytes come through fsspec as byte ranges, so a reader starts anywhere
in a shard without reading what comes before (``samples.npz`` says where). Which samples a rank and worker
read, in which order, is planned in :mod:`llavakit.data.stream`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llavakit.data.images import ImageLoadError, image_size

logger = logging.getLogger(__name__)

INDEX = "index.json"
SAMPLES = "samples.npz"
REJECTED = "rejected.jsonl"
FORMAT = "llavakit-shards"
PARTIAL = ".partial"  # an interrupted `data shard`: the plan and the shards finished so far


class ShardError(RuntimeError):
    """A shard directory or one of its shards is missing, incomplete or cannot be read."""


def key_of(k: int) -> str:
    return f"{k:09d}"


def shard_name(s: int) -> str:
    return f"shard-{s:06d}.tar"


def parse_size(text: str | int) -> int:
    """``1GB``, ``500MB``, ``64KiB``, ``1000000`` → bytes."""
    if isinstance(text, int):
        return text
    t = text.strip().upper().replace(" ", "")
    units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    for u, m in units.items():
        if t.endswith(u):
            try:
                return int(float(t[: -len(u)]) * m)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise ValueError(f"--shard-size {text!r}: use bytes or a unit, e.g. 1GB, 500MB, 64MiB") from None


# --------------------------------------------------------------------------------------------------
# Writing


@dataclass
class ShardReport:
    output: str
    records: int = 0
    written: int = 0
    rejected: list = field(default_factory=list)
    shards: int = 0
    shards_reused: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        lines = [f"{self.output}: {self.written} of {self.records} records written in {self.shards} shard(s) "
                 f"({self.bytes / 1e6:.1f} MB, {self.seconds:.1f} s)"]
        if self.shards_reused:
            lines.append(f"  {self.shards_reused} shard(s) kept from an interrupted run")
        if self.rejected:
            lines.append(f"  {len(self.rejected)} record(s) rejected (listed in {os.path.join(self.output, REJECTED)}):")
            lines += [f"    {p['message']}" for p in self.rejected[:5]]
        return "\n".join(lines)


def _write_shard(job: dict) -> dict:
    """Write one shard (in a pool process): members through WebDataset's TarWriter, then where each sample
    lies in the file, its crc32 and the file's sha256."""
    import webdataset as wds

    out = Path(job["dir"])
    final = out / job["name"]
    tmp = out / (job["name"] + ".tmp")
    sizes: dict[int, list[list[int]]] = {}  # each sample's images' (height, width), from their headers
    with open(tmp, "wb") as f:
        writer = wds.TarWriter(f, encoder=False, mtime=0, user="llavakit", group="llavakit")
        for k, record, paths in job["samples"]:
            sample = {"__key__": key_of(k), "json": record}
            for j, p in enumerate(paths):
                ext = os.path.splitext(p)[1].lower() or ".img"
                try:
                    with open(p, "rb") as img:
                        sample[f"img{j}{ext}"] = img.read()
                    sizes.setdefault(k, []).append(list(image_size(io.BytesIO(sample[f"img{j}{ext}"]), p)))
                except (OSError, ImageLoadError) as e:
                    raise ShardError(f"sample {k}: image {p} cannot be read ({e}); it was readable when checked — "
                                     "re-run the command") from None
            writer.write(sample)
        writer.close()
    spans: dict[str, list[int]] = {}
    with tarfile.open(tmp) as t:
        for m in t.getmembers():
            key = m.name.split(".", 1)[0]
            end = m.offset_data + (m.size + 511) // 512 * 512
            span = spans.setdefault(key, [m.offset, end])
            span[0], span[1] = min(span[0], m.offset), max(span[1], end)
    rows = []
    digest = hashlib.sha256()
    with open(tmp, "rb") as f:  # one sample in memory at a time, not the shard
        for k, _, _ in job["samples"]:
            start, end = spans[key_of(k)]
            f.seek(start)
            rows.append((k, start, end - start, zlib.crc32(f.read(end - start))))
        f.seek(0)
        while chunk := f.read(1 << 22):
            digest.update(chunk)
        size = f.tell()
    entry = {"name": job["name"], "samples": len(rows), "bytes": size, "sha256": digest.hexdigest(), "rows": rows,
             "image_sizes": {str(k): v for k, v in sizes.items()}}
    os.replace(tmp, final)
    (out / PARTIAL / (job["name"] + ".json")).write_text(json.dumps(entry))
    return entry


def _fingerprint(records: list[bytes], paths: list[list[str]], stats: list[list[tuple]], shard_bytes: int) -> str:
    """What the shards are made of: the records, their images' paths, sizes and times, the shard size."""
    h = hashlib.sha256()
    h.update(f"{FORMAT}-1 {shard_bytes}".encode())
    for record, ps, ss in zip(records, paths, stats):
        h.update(record)
        h.update(json.dumps([ps, ss], ensure_ascii=False).encode())
    return h.hexdigest()


def write_shards(data_path: str, image_folder: str | None, output: str, shard_bytes: int = 10**9,
                 workers: int | None = None, encoder=None, progress: bool = False) -> ShardReport:
    """Validate ``data_path`` with every ``data check`` rule, then write the good records and their images
    as tar shards of about ``shard_bytes``. Resumable: re-run the same command after an interruption and
    the finished shards are kept (the inputs are fingerprinted; changed inputs start over)."""
    from llavakit.data.check import run_check
    from llavakit.data.dataset import resolve_image
    from llavakit.data.records import PROBLEMS, VALID, RecordStore, parse_record

    t0 = time.time()
    out = Path(output)
    report = ShardReport(output=str(out))
    store = RecordStore.load(data_path)  # an unreadable file raises RecordFileError, naming it
    check = run_check(data_path, image_folder or "", encoder=encoder, progress=progress, workers=workers,
                      store=store)
    bad = {p.index for p in check.problems if p.severity == "error" and p.index >= 0}
    report.records = len(store)
    report.rejected = [{**p.to_dict(), "message": p.message if p.message.startswith(str(data_path))
                        else f"{data_path}: {p.message}"}
                       for p in check.problems if p.severity == "error" and p.index >= 0]
    keep = [i for i in range(len(store)) if i not in bad]
    # the records as the record directory beside the shards holds them (sample k = record keep[k])
    kept = store.subset(keep, str(data_path))
    raws = [kept.record_bytes(k) for k in range(len(keep))]
    paths = [[resolve_image(image_folder, p) for p in parse_record(store, i).images] for i in keep]
    stats = [[(st.st_size, st.st_mtime_ns) for st in map(os.stat, ps)] for ps in paths]
    fingerprint = _fingerprint(raws, paths, stats, shard_bytes)

    if (out / INDEX).is_file():
        index = json.loads((out / INDEX).read_text())
        if index.get("content_id") == fingerprint:
            report.written, report.shards = index["samples"], len(index["shards"])
            report.shards_reused, report.bytes = report.shards, sum(s["bytes"] for s in index["shards"])
            report.seconds = time.time() - t0
            return report
        raise ShardError(f"{out} already holds other shards (written from other records, images or --shard-size); "
                         "choose another --output or remove it")
    partial = out / PARTIAL
    plan_file = partial / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()).get("fingerprint") != fingerprint:
        logger.warning("%s: the records or images changed since the interrupted run; starting over", out)
        shutil.rmtree(partial)
        for f in out.glob("shard-*.tar*"):
            f.unlink()
    partial.mkdir(parents=True, exist_ok=True)
    plan_file.write_text(json.dumps({"fingerprint": fingerprint, "data_path": str(data_path)}))

    # shards of about shard_bytes: a tar member is a 512-byte header and its data padded to 512 bytes
    jobs: list[dict] = []
    current: list = []
    size = 0
    for k, (raw, ps, ss) in enumerate(zip(raws, paths, stats)):
        cost = sum(512 + (n + 511) // 512 * 512 for n in [len(raw), *(st[0] for st in ss)])
        if current and size + cost > shard_bytes:
            jobs.append({"dir": str(out), "name": shard_name(len(jobs)), "samples": current})
            current, size = [], 0
        current.append((k, raw, ps))
        size += cost
    if current:
        jobs.append({"dir": str(out), "name": shard_name(len(jobs)), "samples": current})

    # the records beside the shards, a converted record directory; their warnings (duplicate ids) keep
    # their new index
    kept.save(out)
    np.save(out / VALID, np.arange(len(keep), dtype=np.int64))
    new_index = {i: k for k, i in enumerate(keep)}
    warnings = [p for p in check.problems if p.index in new_index and p.severity != "error"]
    with open(out / PROBLEMS, "w", encoding="utf-8") as f:
        for p in warnings:
            f.write(json.dumps({**p.to_dict(), "index": new_index[p.index]}) + "\n")
    meta = json.loads((out / RecordStore.META).read_text())
    (out / RecordStore.META).write_text(json.dumps({**meta, "validated": True, "valid": len(keep),
                                                    "problems": len(warnings), "content_id": fingerprint}))
    with open(out / REJECTED, "w", encoding="utf-8") as f:
        for p in report.rejected:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")

    entries: dict[str, dict] = {}
    todo = []
    for job in jobs:
        done = partial / (job["name"] + ".json")
        if done.is_file() and (out / job["name"]).is_file():
            entry = json.loads(done.read_text())
            if entry["bytes"] == (out / job["name"]).stat().st_size:
                entries[job["name"]] = entry
                continue
        todo.append(job)
    report.shards_reused = len(entries)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(keep), initial=sum(e["samples"] for e in entries.values()), desc="writing shards",
                   unit="sample", mininterval=1.0)
    workers = max(1, min(workers or os.cpu_count() or 1, len(todo)))
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(workers) as pool:
            for entry in pool.map(_write_shard, todo):
                entries[entry["name"]] = entry
                if bar:
                    bar.update(entry["samples"])
    else:
        for job in todo:
            entry = _write_shard(job)
            entries[entry["name"]] = entry
            if bar:
                bar.update(entry["samples"])
    if bar:
        bar.close()

    rows = sorted((r[0], s, r[1], r[2], r[3]) for s, job in enumerate(jobs) for r in entries[job["name"]]["rows"])
    arr = np.asarray(rows, dtype=np.int64).reshape(-1, 5)
    per_sample = {int(k): v for e in entries.values() for k, v in e.get("image_sizes", {}).items()}
    counts = np.asarray([len(per_sample.get(k, ())) for k in range(len(keep))], dtype=np.int64)
    image_start = np.concatenate([[0], np.cumsum(counts)])
    image_hw = np.asarray([hw for k in range(len(keep)) for hw in per_sample.get(k, ())], dtype=np.int32).reshape(-1, 2)
    np.savez(out / SAMPLES, shard=arr[:, 1].astype(np.int32), offset=arr[:, 2], size=arr[:, 3],
             crc=arr[:, 4].astype(np.uint32), image_start=image_start, image_hw=image_hw)
    lengths = []
    if encoder is not None:
        from llavakit.data.dataset import encode_lengths

        encode_lengths(RecordStore.open(out), list(range(len(keep))), encoder, cache_dir=out, progress=progress,
                       image_sizes=sample_image_sizes({"image_start": image_start, "image_hw": image_hw}))
        lengths = sorted(str(p.relative_to(out)) for p in (out / "lengths").glob("*.npz"))
    index = {"format": FORMAT, "version": 1, "samples": len(keep), "content_id": fingerprint,
             "shards": [{k: entries[j["name"]][k] for k in ("name", "samples", "bytes", "sha256")} for j in jobs],
             "lengths": lengths, "source": str(data_path), "image_folder": image_folder}
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / INDEX)
    shutil.rmtree(partial, ignore_errors=True)
    report.written, report.shards = len(keep), len(jobs)
    report.bytes = sum(s["bytes"] for s in index["shards"])
    report.seconds = time.time() - t0
    return report


# --------------------------------------------------------------------------------------------------
# Reading


def sample_image_sizes(samples: dict, where: str = "the shards"):
    """Sample k → its images' (height, width), as ``data shard`` recorded them in ``samples.npz``."""
    if "image_hw" not in samples:
        raise ShardError(f"{where}: samples.npz records no image sizes (written by an older llavakit); AnyRes "
                         "needs them: run `llavakit data shard` again")
    start, hw = samples["image_start"], samples["image_hw"]
    return lambda k: [tuple(int(x) for x in row) for row in hw[start[k]:start[k + 1]]]


def is_shard_source(data_path: str) -> bool:
    """A shard directory (holds ``index.json``), a brace pattern or ``.tar`` path, or a URL."""
    p = str(data_path)
    if "://" in p:
        return True
    if p.endswith(".tar") or ("{" in p and ".tar" in p):
        return True
    return os.path.isdir(p) and os.path.isfile(os.path.join(p, INDEX))


#: the small files a reader needs before the first shard: index, sample table, records
META_FILES = (INDEX, SAMPLES, "records.bin", "offsets.npy", "meta.json", "valid.npy", "problems.jsonl")


class ShardSource:
    """Where shards are and how to read byte ranges of them, with a timeout and retries.

    ``data_path``: a directory or URL holding ``index.json`` (or that file itself), or a brace pattern /
    single ``.tar`` among them (``shards/shard-{000000..000099}.tar``) to train on those shards only.
    """

    def __init__(self, data_path: str, timeout: float = 60.0, retries: int = 3):
        self.spec = str(data_path)
        self.timeout = float(timeout)
        self.retries = int(retries)
        spec = self.spec
        self.selected: list[str] | None = None
        if spec.endswith(INDEX):
            root = spec[: -len(INDEX)]
        elif spec.endswith(".tar") or ("{" in spec and ".tar" in spec):
            import braceexpand

            root, _, pattern = spec.rpartition("/")
            self.selected = [os.path.basename(p) for p in braceexpand.braceexpand(pattern)]
        else:
            root = spec
        self.root = root.rstrip("/") or "."
        self._fs = None
        self._pid = None
        self._index: dict | None = None

    # ---- file system ----------------------------------------------------------------------------
    def __getstate__(self):  # a data-loader worker opens its own connection pool
        return {**self.__dict__, "_fs": None, "_pid": None}

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            protocol = self.root.split("://", 1)[0] if "://" in self.root else "file"
            options = {}
            if protocol in ("http", "https"):
                import aiohttp

                # a stalled read fails after `timeout` seconds without a byte, then is retried
                options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(
                    total=None, sock_connect=self.timeout, sock_read=self.timeout)}
            try:
                self._fs, self._root_path = fsspec.core.url_to_fs(self.root, **options)
            except (ImportError, ValueError) as e:  # e.g. s3:// without s3fs: fsspec names the package
                raise ShardError(f"{self.root}: cannot open {protocol}:// ({e})") from None
            self._pid = os.getpid()
        return self._fs

    @property
    def is_local(self) -> bool:
        return "://" not in self.root or self.root.startswith("file://")

    def url(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _path(self, name: str) -> str:
        fs = self.fs
        return fs.sep.join([self._root_path.rstrip("/"), name]) if self._root_path else name

    def _retry(self, what: str, fn):
        delay = 1.0
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise ShardError(f"{what}: not found") from None
            except ShardError:
                raise
            except Exception as e:  # timeouts, resets, server errors: the storage's, retried
                if attempt == self.retries:
                    raise ShardError(f"{what}: failed {self.retries + 1} times (last: {type(e).__name__}: {e}); "
                                     "check the storage, or raise --shard_timeout / --shard_retries") from None
                logger.warning("%s: %s: %s; retrying in %.0f s", what, type(e).__name__, e, delay)
                time.sleep(delay)
                delay *= 2

    def read_range(self, name: str, start: int, end: int) -> bytes:
        what = f"{self.url(name)} (bytes {start}-{end})"
        data = self._retry(what, lambda: self.fs.cat_file(self._path(name), start=start, end=end))
        if len(data) != end - start:
            raise ShardError(f"{what}: got {len(data)} bytes instead of {end - start} (a truncated shard, or a "
                             "server without HTTP range requests)")
        return data

    def read_file(self, name: str) -> bytes:
        return self._retry(self.url(name), lambda: self.fs.cat_file(self._path(name)))

    # ---- index ----------------------------------------------------------------------------------
    @property
    def index(self) -> dict:
        if self._index is None:
            raw = self.read_file(INDEX)
            try:
                index = json.loads(raw)
            except ValueError:
                raise ShardError(f"{self.url(INDEX)}: not JSON; is this a `llavakit data shard` output?") from None
            if index.get("format") != FORMAT:
                raise ShardError(f"{self.url(INDEX)}: not a llavakit shard index (format {index.get('format')!r})")
            self._index = index
        return self._index

    def shard_names(self) -> list[str]:
        return [s["name"] for s in self.index["shards"]]

    def selected_shards(self) -> list[int]:
        """Numbers of the shards to train on: all, or those the brace pattern names (each must exist)."""
        names = self.shard_names()
        if self.selected is None:
            return list(range(len(names)))
        pos = {n: i for i, n in enumerate(names)}
        unknown = [n for n in self.selected if n not in pos]
        if unknown:
            raise ShardError(f"{self.spec}: {len(unknown)} shard(s) not in {self.url(INDEX)}: {', '.join(unknown[:5])}"
                             f" (it lists {names[0]} .. {names[-1]})")
        return sorted(pos[n] for n in self.selected)

    def check_shards(self, shards: list[int]) -> None:
        """Every shard to train on exists with the size the index says; else one error naming them all."""
        entries = [self.index["shards"][s] for s in shards]

        def probe(e: dict) -> str | None:
            try:
                size = self._retry(self.url(e["name"]), lambda: self.fs.info(self._path(e["name"]))["size"])
            except ShardError as err:
                return str(err)
            if size != e["bytes"]:
                return f"{self.url(e['name'])}: {size} bytes, the index says {e['bytes']} (truncated or replaced)"
            return None

        if self.is_local:
            problems = [probe(e) for e in entries]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(16) as pool:
                problems = list(pool.map(probe, entries))
        problems = [p for p in problems if p]
        if problems:
            raise ShardError(f"{len(problems)} of {len(entries)} shard(s) missing or unreadable:\n  " +
                             "\n  ".join(problems[:10]) + ("\n  ..." if len(problems) > 10 else "") +
                             "\nRe-run `llavakit data shard` (it resumes) or copy the shards again.")

    def local_dir(self, cache_dir: str | os.PathLike | None = None) -> Path:
        """The record directory beside the shards: the folder itself, or for a URL a copy of its small files
        (index, sample table, records, token lengths) under the cache, refreshed when the index changes."""
        if self.is_local:
            root = Path(self.root[len("file://"):] if self.root.startswith("file://") else self.root)
            if not (root / INDEX).is_file():
                raise ShardError(f"{root}: no {INDEX}; write shards with `llavakit data shard` (an unfinished run "
                                 "leaves none: run it again to finish)")
            missing = [f for f in META_FILES if not (root / f).is_file()]
            if missing:
                raise ShardError(f"{root}: {', '.join(missing)} missing beside {INDEX}; copy the whole directory")
            return root
        from llavakit.data.dataset import default_cache_dir

        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        index_bytes = json.dumps(self.index, sort_keys=True).encode()
        d = cache / "shards" / hashlib.sha256(self.root.encode()).hexdigest()[:16]
        stamp = d / ".index.sha256"
        digest = hashlib.sha256(index_bytes).hexdigest()
        if stamp.is_file() and stamp.read_text() == digest:
            return d
        d.mkdir(parents=True, exist_ok=True)
        for name in [*META_FILES, *self.index.get("lengths", [])]:
            target = d / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(self.read_file(name))
            os.replace(tmp, target)
        stamp.write_text(digest)
        return d


def read_sample(data: bytes | memoryview, key: str) -> dict[str, bytes]:
    """The members of one sample (its bytes cut out of a shard) → {"json": ..., "img0.jpg": ...}, through
    WebDataset's tar iterator."""
    from webdataset.tariterators import tar_file_iterator

    members = {}
    for m in tar_file_iterator(io.BytesIO(bytes(data))):
        k, _, suffix = m["fname"].partition(".")
        if k != key:
            raise ValueError(f"member {m['fname']} where sample {key} was expected")
        members[suffix] = m["data"]
    return members
