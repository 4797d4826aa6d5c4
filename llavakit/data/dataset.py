"""The training dataset: validated records → (input_ids, labels, uint8 images) samples.

Before training, every record is encoded once to learn its exact length after image expansion
(:func:`build_sample_index`, cached on disk). Samples whose image block or every answer would be cut by
``model_max_length``, and samples whose supervision cannot be established, are skipped *there*, counted
and reported — they never reach the model, so no rank waits on another over one.

At train time a missing or undecodable image does not kill the run: the sample is replaced by the next
sample of the same modality (deterministic) and written with its id and reason to the report file. The
replacement travels in the sample (``replaced``), so the trainer counts it whichever worker process loaded
it; past ``max_bad_fraction`` of the samples seen (:class:`BadSampleGuard`, counts summed over ranks) the
run stops with :class:`DataQualityError`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from llavakit.data.images import ImageLoadError, ImageTransform, image_size, open_image
from llavakit.data.records import RecordStore, parse_record
from llavakit.data.templates import TemplateError
from llavakit.data.tokenize import ConversationEncoder, SampleTooLong, SupervisionError

logger = logging.getLogger(__name__)


class DataQualityError(RuntimeError):
    """Too many samples failed to load during training."""


@dataclass
class SampleIndex:
    """The records that train, with their exact (post-truncation) lengths, and those skipped."""

    record_idx: np.ndarray
    lengths: np.ndarray
    has_image: np.ndarray
    full_lengths: np.ndarray
    skipped: list[dict] = field(default_factory=list)
    #: image tokens of each sample (all its images; with AnyRes they follow the images' sizes)
    image_tokens: np.ndarray | None = None

    @property
    def num_truncated(self) -> int:
        return int((self.full_lengths > self.lengths).sum())

    def modality_lengths(self) -> np.ndarray:
        """Positive for samples with images, negative for text-only (the original's convention)."""
        return np.where(self.has_image, self.lengths, -self.lengths)


def _content_id(src: Path) -> str | None:
    """A record directory's own fingerprint (shard directories carry one), the same in every copy of it."""
    try:
        return json.loads((src / RecordStore.META).read_text()).get("content_id") if src.is_dir() else None
    except (OSError, ValueError):
        return None


def _cache_key(store: RecordStore, encoder: ConversationEncoder, image_folder: str | None = None) -> str:
    h = hashlib.sha256()
    src = Path(store.source)
    content = _content_id(src)
    if content:
        h.update(content.encode())
    else:  # a file or converted directory: its path, size and time stand for its content
        st = src.stat() if src.exists() else None
        target = src / RecordStore.OFFSETS if src.is_dir() else src
        st = target.stat() if target.exists() else st
        h.update(json.dumps([str(src.resolve()), len(store), st.st_size if st else 0,
                             st.st_mtime_ns if st else 0]).encode())
    h.update(encoder.template.name.encode())
    h.update(encoder.key().encode())
    if encoder.anyres is not None:  # the lengths depend on the image files' sizes
        h.update(str(Path(image_folder).resolve() if image_folder else "").encode())
    h.update(str(encoder.add_bos).encode())
    h.update(str(encoder.char_limit).encode())
    h.update(encoder.tokenizer.backend_tokenizer.to_str().encode())
    return h.hexdigest()[:32]


def default_cache_dir() -> Path:
    return Path(os.environ.get("LLAVAKIT_CACHE", Path.home() / ".cache" / "llavakit"))


def encode_lengths(store: RecordStore, valid: list[int], encoder: ConversationEncoder,
                   cache_dir: str | os.PathLike | None = None, progress: bool = False,
                   image_folder: str | None = None,
                   image_sizes: Callable[[int], list[tuple[int, int]]] | None = None) -> dict[str, np.ndarray]:
    """Encode every valid record once: full length, image-block end, first supervised position.

    ``status`` is 0 for encodable records, 1 for records whose supervision cannot be established, 2 for
    records whose text is too long to tokenize, 3 for records with an image whose size cannot be read (AnyRes:
    its token count follows its size: ``image_sizes(record index)`` where the sizes are known, as for shards,
    else read from the file's header under ``image_folder``); their message is in ``errors``. Cached under
    ``cache_dir`` keyed by the file, tokenizer and template (and, with AnyRes, the image folder).
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = _cache_key(store, encoder, image_folder if image_sizes is None else None)
    path = cache / "lengths" / f"{key}.npz"
    valid_arr = np.asarray(valid, dtype=np.int64)
    # a converted record directory may carry its lengths (``llavakit data convert --tokenizer``)
    candidates = [path] + ([Path(store.source) / "lengths" / f"{key}.npz"] if Path(store.source).is_dir() else [])
    for cand in candidates:
        if cand.is_file():
            try:
                data = dict(np.load(cand, allow_pickle=False))
                if np.array_equal(data["record_idx"], valid_arr) and "image_tokens" in data:
                    return data
            except (OSError, ValueError, KeyError):
                logger.warning("ignoring unreadable length cache %s", cand)
    n = len(valid)
    full = np.zeros(n, np.int64)
    image_end = np.zeros(n, np.int64)
    first_sup = np.zeros(n, np.int64)
    image_tokens = np.zeros(n, np.int64)
    has_image = np.zeros(n, bool)
    status = np.zeros(n, np.int8)
    errors: list[str] = []
    it = range(n)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="tokenizing records", unit="rec", mininterval=1.0)
    for k in it:
        rec = parse_record(store, valid[k])
        has_image[k] = rec.has_image
        try:
            sizes = None
            if encoder.anyres is not None:
                sizes = image_sizes(valid[k]) if image_sizes is not None else \
                    [image_size(resolve_image(image_folder, p)) for p in rec.images]
            enc = encoder.encode(rec, sizes)
        except ImageLoadError as e:
            status[k] = 3
            errors.append(f"{k}\t{e}")
            continue
        except (SupervisionError, TemplateError) as e:
            status[k] = 1
            errors.append(f"{k}\t{e}")
            continue
        except SampleTooLong as e:  # text too long to be worth tokenizing
            status[k] = 2
            errors.append(f"{k}\t{e}")
            continue
        full[k], image_end[k], first_sup[k] = len(enc), enc.image_end, enc.first_supervised
        image_tokens[k] = sum(b - a for a, b in enc.image_spans)
    data = {"record_idx": valid_arr, "full": full, "image_end": image_end, "first_sup": first_sup,
            "image_tokens": image_tokens, "has_image": has_image, "status": status,
            "errors": np.asarray(errors, dtype=str)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
        np.savez(tmp, **data)
        os.replace(tmp, path)
    except OSError as e:
        logger.warning("could not write the length cache %s: %s", path, e)
    return data


def build_sample_index(store: RecordStore, valid: list[int], encoder: ConversationEncoder,
                       model_max_length: int | None, cache_dir: str | os.PathLike | None = None,
                       progress: bool = False, image_folder: str | None = None,
                       image_sizes: Callable[[int], list[tuple[int, int]]] | None = None) -> SampleIndex:
    """Decide which records train and how long each is after truncation; report the rest."""
    data = encode_lengths(store, valid, encoder, cache_dir, progress, image_folder, image_sizes)
    errors = {int(line.split("\t", 1)[0]): line.split("\t", 1)[1] for line in data["errors"].tolist()}
    keep, lengths, skipped = [], [], []
    for k, ridx in enumerate(data["record_idx"].tolist()):
        rid = str(store.raw(ridx).get("id", ridx))
        where = f"{store.source}: record {ridx} (id={rid!r})"
        if data["status"][k]:
            kind = {1: "no_supervision", 2: "too_long", 3: "bad_image"}[int(data["status"][k])]
            skipped.append({"index": ridx, "id": rid, "kind": kind,
                            "message": f"{where}: {errors.get(k, 'supervision cannot be established')}"})
            continue
        full = int(data["full"][k])
        if model_max_length is not None and full > model_max_length:
            if data["image_end"][k] > model_max_length:
                skipped.append({"index": ridx, "id": rid, "kind": "too_long",
                                "message": f"{where}: {full} tokens; the image block would be cut by "
                                           f"--model_max_length {model_max_length}"})
                continue
            if data["first_sup"][k] >= model_max_length:
                skipped.append({"index": ridx, "id": rid, "kind": "too_long",
                                "message": f"{where}: {full} tokens; every answer would be cut by "
                                           f"--model_max_length {model_max_length}"})
                continue
        keep.append(k)
        lengths.append(min(full, model_max_length) if model_max_length else full)
    keep_arr = np.asarray(keep, dtype=np.int64)
    return SampleIndex(
        record_idx=data["record_idx"][keep_arr] if len(keep) else np.zeros(0, np.int64),
        lengths=np.asarray(lengths, dtype=np.int64),
        has_image=data["has_image"][keep_arr] if len(keep) else np.zeros(0, bool),
        full_lengths=data["full"][keep_arr] if len(keep) else np.zeros(0, np.int64),
        skipped=skipped,
        image_tokens=data["image_tokens"][keep_arr] if len(keep) else np.zeros(0, np.int64),
    )


def resolve_image(image_folder: str | None, path: str) -> str:
    if os.path.isabs(path) or not image_folder:
        return path
    return os.path.join(image_folder, path)


class LlavaDataset(Dataset):
    """One sample per kept record: ``input_ids``, ``labels`` (LongTensors) and ``images`` (uint8 views, or
    None); with AnyRes also ``image_sizes`` (each image's height and width)."""

    def __init__(self, store: RecordStore, index: SampleIndex, encoder: ConversationEncoder,
                 transform: ImageTransform, image_folder: str | None = None,
                 model_max_length: int | None = None, report_path: str | os.PathLike | None = None):
        self.store = store
        self.index = index
        self.encoder = encoder
        self.transform = transform
        self.image_folder = image_folder
        self.model_max_length = model_max_length
        self.report_path = str(report_path) if report_path else None

    def __len__(self) -> int:
        return len(self.index.record_idx)

    @property
    def lengths(self) -> np.ndarray:
        return self.index.lengths

    @property
    def modality_lengths(self) -> np.ndarray:
        return self.index.modality_lengths()

    def load(self, i: int) -> dict:
        """Build sample ``i``; raises :class:`ImageLoadError` when one of its images fails."""
        rec = parse_record(self.store, int(self.index.record_idx[i]))
        decoded = self.open_images(i, rec.images) if rec.images else []
        sizes = [(im.height, im.width) for im in decoded]
        enc = self.encoder.fit(self.encoder.encode(rec, sizes if self.encoder.anyres is not None else None),
                               self.model_max_length)
        sample = {"input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
                  "labels": torch.tensor(enc.labels, dtype=torch.long), "images": None, "id": rec.id}
        if decoded:  # every view of every image, in order: (views, 3, H, W) uint8
            sample["images"] = torch.from_numpy(np.concatenate([self.transform.views(im, len(decoded))
                                                                for im in decoded]))
            if self.transform.anyres is not None:
                sample["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
        return sample

    def open_images(self, i: int, paths: list[str]) -> list:
        """Sample ``i``'s images (its record's ``paths``), decoded."""
        return [open_image(resolve_image(self.image_folder, p)) for p in paths]

    def __getitem__(self, i: int) -> dict:
        """Sample ``i``, or the next loadable one of its modality; the sample records which ones it replaced
        (``replaced``: index, id, reason) so that the count reaches the trainer from any worker process."""
        n = len(self)
        j = i
        replaced: list[dict] = []
        for _ in range(min(n, 64)):
            try:
                sample = self.load(j)
                sample["replaced"] = replaced
                return sample
            except (ImageLoadError, SampleTooLong) as e:
                replaced.append(self._report_bad(j, e))
                j = self._replacement(j)
        raise DataQualityError(f"{self.store.source}: 64 samples in a row failed to load near index {i} (the "
                               f"last: {replaced[-1]['reason']}); {self.fix_hint()}")

    def fix_hint(self) -> str:
        return f"check --image_folder ({self.image_folder}) with `llavakit data check`"

    def replacement_pool(self, j: int) -> tuple[Sequence[int], int]:
        """Where a bad sample ``j`` finds its stand-in: a sequence of samples and ``j``'s place in it (here
        the whole dataset)."""
        return range(len(self)), j

    def _replacement(self, j: int) -> int:
        """The next sample of the same modality in the pool, wrapping around (deterministic)."""
        pool, pos = self.replacement_pool(j)
        has = self.index.has_image
        n = len(pool)
        for step in range(1, n):
            k = pool[(pos + step) % n]
            if has[k] == has[j]:
                return k
        return pool[(pos + 1) % n]

    def _report_bad(self, j: int, err: Exception) -> dict:
        ridx = int(self.index.record_idx[j])
        rid = str(self.store.raw(ridx).get("id", ridx))
        logger.warning("sample %s (record %d) replaced: %s", rid, ridx, err)
        entry = {"index": ridx, "id": rid, "reason": str(err)}
        if self.report_path:
            with open(self.report_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        return entry


@dataclass
class BadSampleGuard:
    """Stops a run whose images fail too often: past ``max_fraction`` of the samples seen (once
    ``min_seen`` were), or of the whole dataset. Fed with counts that travelled in the batches, summed over
    ranks, so every rank decides alike."""

    max_fraction: float
    total: int
    report_path: str | None = None
    min_seen: int = 100

    def check(self, seen: int, bad: int, last: dict | None = None) -> None:
        over_seen = seen >= self.min_seen and bad > self.max_fraction * seen
        over_total = bad > max(1.0, self.max_fraction * self.total)
        if over_seen or over_total:
            what = f"; the last: record {last['index']} (id={last['id']!r}): {last['reason']}" if last else ""
            raise DataQualityError(
                f"{bad} of {seen} samples seen failed to load (more than {self.max_fraction:.1%}){what}. "
                f"See {self.report_path or 'the log'}; fix the images or run `llavakit data check`.")
