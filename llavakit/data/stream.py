"""Training from shards: which samples each rank and data-loader worker reads, in which order, and reading
them.

**The plan** (:class:`ShardBatchSampler`) is computed from the index alone (shard, byte offset, token
length, modality of every sample), so it costs no read and every process can compute every other's:

* each epoch the shards are shuffled (seeded by ``--seed`` and the epoch); the samples, in that shard order,
  are cut into ``world_size × workers`` contiguous, equal shares: rank ``r``'s worker ``k`` reads share
  ``r × workers + k`` — a disjoint run of a few consecutive shards, read front to back. The last
  ``samples mod (world_size × workers)`` samples of an epoch's order wait for another epoch;
* a share is read in windows of ``--shuffle_buffer`` samples (a multiple of the batch size): a window is
  shuffled, split by modality (``--group_by_modality_length``), sorted by length within each modality
  (``--group_by_length`` / ``--group_by_modality_length``) and cut into batches; batch order is shuffled
  within the window. What one modality leaves over is batched with the other's leftovers, so every window
  but a share's last gives exactly ``window / batch`` batches, every share the same count, every rank the
  same number of steps — no rank waits at an epoch's end;
* the global order deals batches to ranks round-robin (accelerate's ``BatchSamplerShard``), and within a
  rank, batch ``i`` comes from share ``i mod workers`` — the DataLoader's own round-robin over workers —
  so each worker process reads one share.

**Exact resume**: the Trainer skips the batches already trained in the epoch without loading them (the
plan is pure arithmetic); the first batch loaded after a resume reads its window from the window's first
byte (a range request), never the shard from its start. With the same world size and workers the run
continues with the samples an uninterrupted run would have seen. With another world size or number of
workers the shares are cut again: finished epochs are unaffected; in the epoch in progress the new plan
skips as many steps as were done, so some of that epoch's samples are seen twice and some not at all —
at most the number trained before the stop each (tested); every later epoch sees each sample once.

**Reading** (:class:`ShardDataset`): a batch carries its window (byte ranges, sample list); a worker reads
a window once, checks each sample's crc32, and builds the samples as :class:`LlavaDataset` does. A corrupt
sample (checksum, tar member, image) is replaced by the next sample of its modality in the window and
counted (``--max_bad_fraction``, summed over workers and ranks, as for JSON data); a missing or unreadable
shard stops the run with an error that names it.
"""

from __future__ import annotations

import io
import logging
import math
import zlib
from dataclasses import dataclass

import numpy as np

from llavakit.data.dataset import LlavaDataset
from llavakit.data.images import ImageLoadError, open_image
from llavakit.data.records import Problem, RecordStore, load_records
from llavakit.data.shards import SAMPLES, ShardSource, key_of, read_sample

logger = logging.getLogger(__name__)


def open_shards(source: ShardSource, check: bool = True) -> tuple[RecordStore, list[int], list[Problem], dict]:
    """The records beside the shards (copied from a URL once), the samples to train on (those of the
    shards a brace pattern names), and the sample table; with ``check``, every such shard is asked for."""
    local = source.local_dir()
    shards = source.selected_shards()
    if check:
        source.check_shards(shards)
    store, valid, problems = load_records(local)
    samples = dict(np.load(local / SAMPLES))
    if source.selected is not None:
        chosen = np.isin(samples["shard"], shards)
        valid = [k for k in valid if chosen[k]]
    logger.info("shards: %s, %d of %d shard(s), %d samples", source.root, len(shards), len(source.shard_names()),
                len(valid))
    return store, valid, problems, samples


@dataclass(frozen=True)
class Window:
    """A window of one share: its samples (dataset indices, in stream order) and the byte ranges that hold
    them, ``(shard number, start, end)``."""

    key: tuple
    ids: tuple[int, ...]
    ranges: tuple[tuple[int, int, int], ...]


class PlannedBatch(list):
    """A batch of dataset indices that knows its window (the DataLoader hands it to ``__getitems__``)."""

    def __init__(self, ids, window: Window):
        super().__init__(ids)
        self.window = window

    def __reduce__(self):
        return (PlannedBatch, (list(self), self.window))


class ShardBatchSampler:
    """The plan (module docstring). Yields the global sequence of :class:`PlannedBatch` es."""

    #: the batches may be of different sizes (a share's last): accelerate then deals them as they come
    batch_size = None

    def __init__(self, shard_of, offset, size, lengths, has_image, *, batch_size: int, world_size: int = 1,
                 workers: int = 0, window: int = 1000, seed: int = 0, group_by_modality: bool = False,
                 sort_by_length: bool = False, drop_last: bool = False):
        self.shard_of = np.asarray(shard_of, dtype=np.int64)
        self.offset = np.asarray(offset, dtype=np.int64)
        self.end = self.offset + np.asarray(size, dtype=np.int64)
        self.lengths = np.abs(np.asarray(lengths, dtype=np.int64))
        self.has_image = np.asarray(has_image, dtype=bool)
        self.per_batch = int(batch_size)
        self.world_size = max(1, int(world_size))
        self.workers = max(1, int(workers))
        self.readers = self.world_size * self.workers
        self.share = len(self.shard_of) // self.readers
        if self.share == 0:
            raise ValueError(f"{len(self.shard_of)} sample(s) cannot give each of {self.world_size} rank(s) × "
                             f"{self.workers} worker(s) one: use fewer ranks or --dataloader_num_workers")
        self.window = max(self.per_batch, int(window) // self.per_batch * self.per_batch)
        self.seed = int(seed)
        self.group_by_modality = group_by_modality
        self.sort_by_length = sort_by_length
        self.drop_last = drop_last
        self.share_batches = (self.share // self.per_batch if drop_last else math.ceil(self.share / self.per_batch))
        if self.share_batches == 0:
            raise ValueError(f"each reader's share ({self.share} samples) is smaller than one batch "
                             f"({self.per_batch}) and --dataloader_drop_last is set")
        self.epoch = 0

    @property
    def samples_per_epoch(self) -> int:
        return self.share * self.readers

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.share_batches * self.readers

    def order(self, epoch: int) -> np.ndarray:
        """The epoch's stream: shards in a seeded order, each shard's samples as they lie in it."""
        shards = np.unique(self.shard_of)
        rank_of = np.zeros(int(shards.max()) + 1, np.int64)
        rank_of[shards] = np.random.default_rng([self.seed, epoch, 0x5EED]).permutation(len(shards))
        return np.lexsort((self.offset, rank_of[self.shard_of]))

    def share_ids(self, epoch: int, reader: int) -> np.ndarray:
        return self.order(epoch)[reader * self.share:(reader + 1) * self.share]

    def _share_batches(self, epoch: int, reader: int, ids_all: np.ndarray):
        ids_all = ids_all[reader * self.share:(reader + 1) * self.share]
        b = self.per_batch
        n_windows = math.ceil(len(ids_all) / self.window)
        for w in range(n_windows):
            ids = ids_all[w * self.window:(w + 1) * self.window]
            rng = np.random.default_rng([self.seed, epoch, reader, w])
            mixed = ids[rng.permutation(len(ids))]
            groups = [mixed[self.has_image[mixed]], mixed[~self.has_image[mixed]]] if self.group_by_modality \
                else [mixed]
            full, rest = [], []
            for g in groups:
                if self.sort_by_length:
                    g = g[np.argsort(-self.lengths[g], kind="stable")]
                cut = len(g) // b * b
                full += [g[i:i + b] for i in range(0, cut, b)]
                rest.append(g[cut:])
            rest = np.concatenate(rest)
            tail = [rest[i:i + b] for i in range(0, len(rest), b)]
            if self.drop_last and tail and len(tail[-1]) < b:
                tail.pop()
            batches = [full[k] for k in rng.permutation(len(full))] + tail
            ranges = []
            for s in np.unique(self.shard_of[ids]):
                in_s = ids[self.shard_of[ids] == s]
                ranges.append((int(s), int(self.offset[in_s].min()), int(self.end[in_s].max())))
            window = Window((epoch, reader, w), tuple(int(i) for i in ids), tuple(ranges))
            for batch in batches:
                yield PlannedBatch(batch.tolist(), window)

    def rank_batches(self, epoch: int, rank: int, ids_all: np.ndarray | None = None):
        """Rank ``rank``'s batches in the order its DataLoader loads them: batch ``i`` from its worker
        ``i mod workers``'s share."""
        ids_all = self.order(epoch) if ids_all is None else ids_all
        shares = [self._share_batches(epoch, rank * self.workers + k, ids_all) for k in range(self.workers)]
        for i in range(self.share_batches * self.workers):
            yield next(shares[i % self.workers])

    def __iter__(self):
        """Every rank's batches, dealt round-robin (accelerate gives rank ``r`` every ``r``-th one)."""
        epoch = self.epoch
        ids_all = self.order(epoch)
        ranks = [self.rank_batches(epoch, r, ids_all) for r in range(self.world_size)]
        for _ in range(self.share_batches * self.workers):
            for batches in ranks:
                yield next(batches)


class ShardDataset(LlavaDataset):
    """:class:`LlavaDataset` whose images come out of shards, a window at a time (see the module docstring).
    ``samples``: the shard directory's sample table (per record: shard number, offset, size, crc32);
    ``window``: ``--shuffle_buffer``."""

    def __init__(self, *args, source: ShardSource, samples: dict, window: int = 1000, **kwargs):
        super().__init__(*args, **kwargs)
        self.source = source
        self.window = window
        rec = self.index.record_idx
        self.shard_of = samples["shard"][rec]
        self.offset = samples["offset"][rec]
        self.size = samples["size"][rec]
        self.crc = samples["crc"][rec]
        self.names = source.shard_names()
        self._window: Window | None = None
        self._bytes: dict[int, memoryview] = {}

    def sampler(self, batch_size: int, world_size: int, workers: int, *, seed: int, group_by_modality: bool,
                sort_by_length: bool, drop_last: bool) -> ShardBatchSampler:
        return ShardBatchSampler(self.shard_of, self.offset, self.size, self.index.lengths, self.index.has_image,
                                 batch_size=batch_size, world_size=world_size, workers=workers, window=self.window,
                                 seed=seed, group_by_modality=group_by_modality, sort_by_length=sort_by_length,
                                 drop_last=drop_last)

    def _enter(self, window: Window) -> None:
        if self._window is not None and self._window.key == window.key:
            return
        self._bytes = {}
        ids = np.asarray(window.ids, dtype=np.int64)
        for shard, start, end in window.ranges:
            data = memoryview(self.source.read_range(self.names[shard], start, end))
            for i in ids[self.shard_of[ids] == shard].tolist():
                a = int(self.offset[i]) - start
                self._bytes[i] = data[a:a + int(self.size[i])]
        self._window = window

    def __getitems__(self, batch: PlannedBatch) -> list[dict]:
        self._enter(batch.window)
        return [self[i] for i in batch]

    def open_images(self, i: int, paths: list[str]) -> list:
        """Sample ``i``'s images out of the window's bytes (its text comes from the records beside the shards,
        as its length did)."""
        shard = self.names[int(self.shard_of[i])]
        key = key_of(int(self.index.record_idx[i]))
        where = f"{self.source.url(shard)}: sample {key}"
        data = self._bytes.get(i)
        if data is None:  # only a batch's own window is held
            raise RuntimeError(f"{where} is not in the window being read; the batch sampler and the dataset "
                               "disagree")
        if zlib.crc32(data) != int(self.crc[i]):
            raise ImageLoadError(f"{where}: checksum mismatch (corrupt bytes in the shard)")
        try:
            members = read_sample(data, key)
        except Exception as e:  # a corrupt tar header: this sample only (each is cut out by its own range)
            raise ImageLoadError(f"{where}: unreadable tar member ({e})") from None
        by_number = {suffix.split(".", 1)[0]: suffix for suffix in members if suffix.startswith("img")}
        images = []
        for j in range(len(paths)):
            suffix = by_number.get(f"img{j}")
            if suffix is None:
                raise ImageLoadError(f"{where}: member {key}.img{j}.* missing")
            images.append(open_image(io.BytesIO(members[suffix]), name=f"{where} ({key}.{suffix})"))
        return images

    def fix_hint(self) -> str:
        return (f"the shards at {self.source.root} hold corrupt bytes: copy them again, or re-run "
                "`llavakit data shard` into a new folder")

    def replacement_pool(self, j: int) -> tuple[tuple[int, ...], int]:
        """A bad sample's stand-in comes from the window being read (its bytes are at hand)."""
        ids = self._window.ids if self._window is not None else (j,)
        return ids, ids.index(j) if j in ids else 0
