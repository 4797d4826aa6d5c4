"""The LLaVA JSON record: read, store compactly, parse and validate.

A record is ``{"id", "image"?, "conversations": [{"from": "human"|"gpt", "value"}, ...]}``; ``image`` is
one path (relative to the image folder, or absolute) or a list of paths, one per ``<image>`` placeholder.

Records are kept in a :class:`RecordStore`: every record re-serialised as compact JSON into one byte
buffer plus an offsets array. Two numpy arrays instead of hundreds of thousands of Python dicts, so
dataloader workers share the pages after ``fork`` instead of copying them, and the store can be written
to disk and memory-mapped back (``RecordStore.save`` / ``RecordStore.open``).

Every problem found is a :class:`Problem` that names the file, the record index and id, and the field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llavakit import IMAGE_PLACEHOLDER

HUMAN = "human"
GPT = "gpt"
ROLE_ALIASES = {"human": HUMAN, "user": HUMAN, "gpt": GPT, "assistant": GPT}

#: problem kinds that do not stop training (``data check`` still reports them and exits non-zero)
WARNING_KINDS = frozenset({"duplicate_id"})


class RecordFileError(ValueError):
    """The record file as a whole cannot be read (missing, invalid UTF-8, invalid JSON, wrong shape)."""


class InvalidRecordsError(ValueError):
    """Some records are invalid; ``problems`` lists them all."""

    def __init__(self, source: str, problems: list[Problem]):
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        lines = [p.message for p in errors[:10]]
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        super().__init__(
            f"{source}: {len(errors)} invalid record(s):\n  " + "\n  ".join(lines) + more +
            f"\nRun `llavakit data check --data_path {source}` for the full report."
        )


@dataclass
class Problem:
    """One thing wrong with one record (or with the file, when ``index`` is -1)."""

    index: int
    id: str | None
    kind: str
    message: str
    severity: str = "error"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Turn:
    role: str  # HUMAN or GPT
    text: str


@dataclass
class Record:
    """A parsed, validated record."""

    id: str
    images: list[str] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    @property
    def has_image(self) -> bool:
        return bool(self.images)


# --------------------------------------------------------------------------------------------------
# Reading files


def _line_col(data: bytes, pos: int) -> tuple[int, int]:
    line = data.count(b"\n", 0, pos) + 1
    col = pos - (data.rfind(b"\n", 0, pos) + 1) + 1
    return line, col


def _decode(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line, col = _line_col(data, e.start)
        raise RecordFileError(
            f"{path}: invalid UTF-8 at byte {e.start} (line {line}, column {col}): {e.reason}. "
            "Re-encode the file as UTF-8."
        ) from None


def iter_raw_records(path: str | os.PathLike) -> Iterator[Any]:
    """Yield the raw (unvalidated) records of a JSON list or JSON Lines file, in file order."""
    path = str(path)
    if not os.path.isfile(path):
        raise RecordFileError(f"{path}: no such record file (--data_path)")
    with open(path, "rb") as f:
        data = f.read()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    text = _decode(path, data)
    stripped = text.lstrip()
    if not stripped:
        raise RecordFileError(f"{path}: the file is empty; expected a JSON list of records or JSON Lines")
    if stripped[0] == "[":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordFileError(
                f"{path}: invalid JSON at line {e.lineno}, column {e.colno} (char {e.pos}): {e.msg}"
            ) from None
        yield from records
        return
    if stripped[0] != "{":
        raise RecordFileError(f"{path}: expected a JSON list of records or JSON Lines (one object per line)")
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordFileError(
                f"{path}: invalid JSON on line {lineno}, column {e.colno}: {e.msg}. "
                "In JSON Lines every line must be one complete record."
            ) from None


class FileBuffer:
    """A record buffer left on disk: each record is one ``pread`` (no mapping, so a data-loader worker's
    memory does not grow with what it has read; the page cache is shared by all processes)."""

    def __init__(self, path: str | os.PathLike, size: int):
        self.path = str(path)
        self.size = size
        self._fd: int | None = None
        self._pid: int | None = None

    def read(self, start: int, end: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():  # a forked worker opens its own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, end - start, start)

    def tofile(self, path) -> None:
        import shutil

        shutil.copyfile(self.path, path)

    def __getstate__(self):  # picklable for spawned workers: the descriptor is reopened there
        return {"path": self.path, "size": self.size, "_fd": None, "_pid": None}


class RecordStore:
    """Records as compact JSON in one byte buffer + int64 offsets: in memory (from a JSON file) or left on
    disk (a converted directory, read record by record)."""

    BUFFER = "records.bin"
    OFFSETS = "offsets.npy"
    META = "meta.json"

    def __init__(self, buffer: np.ndarray, offsets: np.ndarray, source: str):
        self.buffer = buffer
        self.offsets = offsets
        self.source = source

    @classmethod
    def from_raw(cls, raws: Iterable[Any], source: str) -> RecordStore:
        chunks: list[bytes] = []
        offsets = [0]
        total = 0
        for raw in raws:
            b = json.dumps(raw, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            chunks.append(b)
            total += len(b)
            offsets.append(total)
        buf = np.frombuffer(b"".join(chunks), dtype=np.uint8) if total else np.zeros(0, np.uint8)
        return cls(buf, np.asarray(offsets, dtype=np.int64), source)

    @classmethod
    def load(cls, path: str | os.PathLike) -> RecordStore:
        """Open a JSON / JSON Lines file, or a directory written by :meth:`save` (memory-mapped)."""
        if os.path.isdir(path):
            return cls.open(path)
        return cls.from_raw(iter_raw_records(path), str(path))

    def save(self, directory: str | os.PathLike) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.buffer.tofile(d / self.BUFFER)
        np.save(d / self.OFFSETS, self.offsets)
        (d / self.META).write_text(json.dumps({"format": "llavakit-records-v1", "source": self.source,
                                               "num_records": len(self)}))

    @classmethod
    def open(cls, directory: str | os.PathLike) -> RecordStore:
        d = Path(directory)
        if not (d / cls.META).is_file():
            raise RecordFileError(f"{d}: not a converted record directory (no {cls.META}); "
                                  "pass a .json/.jsonl file or run `llavakit data convert`")
        offsets = np.load(d / cls.OFFSETS, mmap_mode="r")
        size = int(offsets[-1])
        offsets = np.ascontiguousarray(offsets)  # 8 bytes per record, read on every access
        buf = FileBuffer(d / cls.BUFFER, size) if size else np.zeros(0, np.uint8)
        return cls(buf, offsets, str(d))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def record_bytes(self, i: int) -> bytes:
        """Record ``i`` as stored: compact UTF-8 JSON."""
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        if isinstance(self.buffer, FileBuffer):
            return self.buffer.read(start, end)
        return self.buffer[start:end].tobytes()

    def raw(self, i: int) -> Any:
        return json.loads(self.record_bytes(i))

    def subset(self, indices: Iterable[int], source: str) -> RecordStore:
        """A store of the records at ``indices``, in that order (their bytes copied, not re-serialised)."""
        chunks = [self.record_bytes(i) for i in indices]
        offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
        np.cumsum([len(c) for c in chunks], out=offsets[1:])
        buf = np.frombuffer(b"".join(chunks), dtype=np.uint8) if chunks else np.zeros(0, np.uint8)
        return RecordStore(buf, offsets, source)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)):
            yield self.raw(i)


# --------------------------------------------------------------------------------------------------
# Parsing and validation


def _record_id(raw: Any) -> str | None:
    if isinstance(raw, dict) and isinstance(raw.get("id"), (str, int)) and not isinstance(raw.get("id"), bool):
        return str(raw["id"])
    return None


def check_record(raw: Any, index: int, source: str) -> tuple[Record | None, list[Problem]]:
    """Parse one raw record; return it (or None) and every problem found in it."""
    rid = _record_id(raw)
    problems: list[Problem] = []

    def bad(kind: str, fld: str, what: str) -> None:
        where = f"{source}: record {index} (id={rid!r})" + (f", field '{fld}'" if fld else "")
        problems.append(Problem(index, rid, kind, f"{where}: {what}"))

    if not isinstance(raw, dict):
        bad("wrong_type", "", f"expected a JSON object, got {type(raw).__name__}")
        return None, problems
    if "id" not in raw:
        bad("missing_field", "id", "missing; every record needs a unique 'id'")
    elif rid is None:
        bad("wrong_type", "id", f"expected a string or integer, got {type(raw['id']).__name__}")

    images: list[str] = []
    img = raw.get("image")
    if img is None:
        pass
    elif isinstance(img, str):
        if img.strip():
            images = [img]
        else:
            bad("wrong_type", "image", "is an empty string; give an image path or drop the field")
    elif isinstance(img, list) and all(isinstance(x, str) and x.strip() for x in img):
        images = list(img)
    else:
        bad("wrong_type", "image", "expected a path string or a list of non-empty path strings")

    convs = raw.get("conversations")
    turns: list[Turn] = []
    if convs is None:
        bad("missing_field", "conversations", "missing; expected a list of {'from', 'value'} turns")
    elif not isinstance(convs, list):
        bad("wrong_type", "conversations", f"expected a list, got {type(convs).__name__}")
    elif not convs:
        bad("empty_conversations", "conversations", "is empty; a record needs at least one human/gpt pair")
    else:
        for t, turn in enumerate(convs):
            fld = f"conversations[{t}]"
            if not isinstance(turn, dict):
                bad("wrong_type", fld, f"expected an object with 'from' and 'value', got {type(turn).__name__}")
                continue
            role_raw, value = turn.get("from"), turn.get("value")
            role = ROLE_ALIASES.get(role_raw) if isinstance(role_raw, str) else None
            if role is None:
                bad("bad_role", f"{fld}.from",
                    f"unknown role {role_raw!r}; expected 'human'/'user' or 'gpt'/'assistant'")
                continue
            if not isinstance(value, str):
                bad("wrong_type", f"{fld}.value", f"expected a string, got {type(value).__name__}")
                continue
            expected = HUMAN if t % 2 == 0 else GPT
            if role != expected:
                bad("role_order", f"{fld}.from",
                    f"is {role_raw!r} but turns must alternate human, gpt, human, ...; "
                    f"turn {t} should be {'human' if expected == HUMAN else 'gpt'}")
            if role == GPT and not value.strip():
                bad("empty_answer", f"{fld}.value", "the answer is empty; there is nothing to train on")
            turns.append(Turn(role, value))
        if len(convs) % 2 == 1 and not any(p.kind == "role_order" for p in problems):
            bad("role_order", "conversations", "ends with a human turn that has no gpt answer")

    n_placeholders = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns)
    if img is not None or n_placeholders:
        if not images and n_placeholders and img is None:
            bad("unexpected_image_token", "conversations",
                f"contains {n_placeholders} '{IMAGE_PLACEHOLDER}' but the record has no 'image'; "
                f"add the image path or remove the placeholder")
        elif images and n_placeholders != len(images):
            bad("image_count_mismatch", "conversations",
                f"has {n_placeholders} '{IMAGE_PLACEHOLDER}' placeholder(s) for {len(images)} image(s); "
                "each image needs exactly one placeholder")
        elif images:
            in_gpt = sum(t.text.count(IMAGE_PLACEHOLDER) for t in turns if t.role == GPT)
            if in_gpt:
                bad("image_count_mismatch", "conversations",
                    f"has '{IMAGE_PLACEHOLDER}' in a gpt turn; images belong in human turns")

    if problems:
        return None, problems
    return Record(id=rid or str(index), images=images, turns=turns), problems


def validate_store(store: RecordStore) -> tuple[list[int], list[Problem]]:
    """Validate every record. Returns the indices of valid records and all problems found."""
    valid: list[int] = []
    problems: list[Problem] = []
    first_seen: dict[str, int] = {}
    for i in range(len(store)):
        raw = store.raw(i)
        rec, probs = check_record(raw, i, store.source)
        problems.extend(probs)
        rid = _record_id(raw)
        if rid is not None:
            if rid in first_seen:
                problems.append(Problem(
                    i, rid, "duplicate_id",
                    f"{store.source}: record {i} (id={rid!r}), field 'id': duplicate of record {first_seen[rid]}; "
                    "ids should be unique (reports and resumable predictions use them)", "warning"))
            else:
                first_seen[rid] = i
        if rec is not None:
            valid.append(i)
    return valid, problems


VALID = "valid.npy"
PROBLEMS = "problems.jsonl"


def convert_records(path: str | os.PathLike, directory: str | os.PathLike) -> tuple[RecordStore, list[int],
                                                                                   list[Problem]]:
    """Write ``path`` as a memory-mappable record directory, validated once: the valid indices and the
    problems are stored beside the records, so opening it needs no pass over the records."""
    store = RecordStore.load(path)
    valid, problems = validate_store(store)
    d = Path(directory)
    store.save(d)
    np.save(d / VALID, np.asarray(valid, dtype=np.int64))
    with open(d / PROBLEMS, "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps(p.to_dict()) + "\n")
    meta = json.loads((d / RecordStore.META).read_text())
    (d / RecordStore.META).write_text(json.dumps({**meta, "validated": True, "valid": len(valid),
                                                  "problems": len(problems)}))
    return RecordStore.open(d), valid, problems


def _stored_validation(store: RecordStore) -> tuple[list[int], list[Problem]] | None:
    d = Path(store.source)
    if not (d.is_dir() and (d / VALID).is_file() and (d / PROBLEMS).is_file()):
        return None
    valid = np.load(d / VALID).tolist()
    problems = []
    with open(d / PROBLEMS, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                x = json.loads(line)
                problems.append(Problem(x["index"], x.get("id"), x["kind"], x["message"],
                                        x.get("severity", "error")))
    return valid, problems


def load_records(path: str | os.PathLike, strict: bool = True) -> tuple[RecordStore, list[int], list[Problem]]:
    """Read and validate a record file (a converted directory carries its validation). With ``strict``,
    any error-level problem raises."""
    store = RecordStore.load(path)
    stored = _stored_validation(store)
    valid, problems = stored if stored is not None else validate_store(store)
    if strict and any(p.severity == "error" for p in problems):
        raise InvalidRecordsError(store.source, problems)
    return store, valid, problems


def parse_record(store: RecordStore, i: int) -> Record:
    """Parse record ``i`` of a store that was validated before."""
    rec, problems = check_record(store.raw(i), i, store.source)
    if rec is None:
        raise InvalidRecordsError(store.source, problems)
    return rec
