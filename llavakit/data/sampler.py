"""Length-grouped batch samplers, with the original's modality grouping.

Yields per-device batches (lists of dataset indices). Per epoch every index appears exactly once. With
``group_by_modality`` image and text-only samples never share a batch. Samples are shuffled (seeded by
``seed`` and the epoch), cut into megabatches of ``batch_size × world_size × grad_accum`` samples, sorted
by length within each megabatch and cut into batches — so the batches of one optimizer step have similar
lengths across ranks. Megabatches are then shuffled, and the megabatch holding the most expensive batch
goes first, with that batch first, so an out-of-memory shows at step 0 rather than hours in.

``window_steps`` (``--length_group_steps``) widens a megabatch to that many optimizer steps' samples: on
one device the original's megabatch is a single batch, so sorting it leaves the padding as it was; sorted
over a window of steps, each batch holds samples of similar length. The window's steps are shuffled
(each step's batches stay together), so lengths are not visited longest-first within it.

Consecutive batches are dealt to ranks round-robin (batch ``k`` to rank ``k % world_size``), as
accelerate does with a batch sampler. A modality's batches that do not fill a whole optimizer step come
after every whole step (so each step's batches stay together across ranks), and its last, partial batch,
which keeps its modality, comes last.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    def __init__(self, lengths, batch_size: int, world_size: int = 1, grad_accum: int = 1,
                 group_by_modality: bool = False, has_image=None, seed: int = 0, drop_last: bool = False,
                 window_steps: int = 1):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        if window_steps < 1:
            raise ValueError(f"--length_group_steps must be >= 1, got {window_steps}")
        self.lengths = np.abs(np.asarray(lengths, dtype=np.int64))
        if has_image is None:
            has_image = np.asarray(lengths) > 0 if group_by_modality else np.ones(len(self.lengths), bool)
        self.has_image = np.asarray(has_image, dtype=bool)
        self.batch_size = batch_size
        self.step_batches = max(1, world_size) * max(1, grad_accum)  # the batches of one optimizer step
        self.megabatch = batch_size * self.step_batches * window_steps
        self.group_by_modality = group_by_modality
        self.seed = seed
        self.epoch = 0
        self.drop_last = drop_last
        self._cached: tuple[int, list[list[int]]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _groups(self) -> list[np.ndarray]:
        if not self.group_by_modality:
            return [np.arange(len(self.lengths))]
        return [np.flatnonzero(self.has_image), np.flatnonzero(~self.has_image)]

    def batches(self) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == self.epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, self.epoch])
        megabatches: list[list[np.ndarray]] = []
        partial: list[np.ndarray] = []
        short: list[list[np.ndarray]] = []
        for group in self._groups():
            if len(group) == 0:
                continue
            perm = group[rng.permutation(len(group))]
            for s in range(0, len(perm), self.megabatch):
                mb = perm[s:s + self.megabatch]
                mb = mb[np.argsort(-self.lengths[mb], kind="stable")]
                full = [mb[b:b + self.batch_size] for b in range(0, len(mb), self.batch_size)]
                if len(full[-1]) < self.batch_size:
                    partial.append(full.pop())
                whole = len(full) - len(full) % self.step_batches
                if full[whole:]:  # a modality's last batches short of a whole step: last, so that every
                    short.append(full[whole:])  # step before them has its batches together
                    full = full[:whole]
                if len(full) > self.step_batches:  # a window of several steps: shuffle its steps
                    steps = [full[b:b + self.step_batches] for b in range(0, len(full), self.step_batches)]
                    full = [batch for k in rng.permutation(len(steps)) for batch in steps[k]]
                if full:
                    megabatches.append(full)
        order = rng.permutation(len(megabatches))
        megabatches = [megabatches[i] for i in order]
        if megabatches:
            cost = [max(len(b) * int(self.lengths[b].max()) for b in mb) for mb in megabatches]
            first = int(np.argmax(cost))
            megabatches.insert(0, megabatches.pop(first))
            mb0 = megabatches[0]
            k = int(np.argmax([len(b) * int(self.lengths[b].max()) for b in mb0]))
            first_step = k - k % self.step_batches  # that batch's step goes first, with that batch first
            step = mb0[first_step:first_step + self.step_batches]
            step.insert(0, step.pop(k - first_step))
            megabatches[0] = step + mb0[:first_step] + mb0[first_step + self.step_batches:]
        out = [b.tolist() for mb in megabatches + short for b in mb]
        if not self.drop_last:
            out += [b.tolist() for b in partial]
        self._cached = (self.epoch, out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()

    def __len__(self) -> int:
        return len(self.batches())
