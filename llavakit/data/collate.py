"""Collate samples into batches that ``LlavaForConditionalGeneration`` accepts: padded, or packed.

Padded (the original's way): one row per sample, right-padded to the longest; ``attention_mask`` comes
from the sample lengths (never from comparing ids to the pad id, which breaks when pad == eos).

Packed (``--packing``): the same samples, concatenated into as few rows as fit ``packing_max_length``
tokens (one row when it is None), with ``position_ids`` restarting at 0 for every sample and no attention
mask — which makes the attention block-diagonal (SDPA / eager build the block mask from the positions when
the model runs without a cache). Packed batches also carry ``seq_lengths``, every row's sequence lengths
(samples, then the row's padding as one more), as host-side ints; under a varlen kernel (FlashAttention,
``torch_varlen``) they become its ``cu_seq_lens`` (:func:`varlen_kwargs`), so it attends per sample in any
number of rows and no layer has to infer the boundaries from the positions. The first label of every sample is
ignored, so no sample is trained to predict its first token from the previous sample. The same samples
per step, the same supervised tokens: only the padding goes.

``pixel_values`` holds the images stacked in the order their samples appear in the rows, and is absent
when no sample has one; with AnyRes it holds every image's views (base view, then tiles) in one stack —
the vision tower runs the tiles of a whole micro-batch as one batch — and ``image_sizes`` each image's
(height, width), from which the model splits them again. Images arrive as uint8; with ``normalize=True``
the collator turns them into float32 (bit-identical to the processor), otherwise they stay uint8 for
normalisation on the device.
Every batch carries ``num_real_tokens`` (the tokens that are not padding) and ``num_samples`` for
throughput accounting, as plain ints (they stay on the host, so counting them never waits for the GPU),
and ``replaced``, the bad samples its samples stand in for (from whichever worker process loaded them);
the trainer removes them before the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llavakit import IGNORE_INDEX
from llavakit.data.images import ImageTransform


@dataclass
class LlavaCollator:
    pad_token_id: int
    transform: ImageTransform | None = None
    normalize: bool = True
    pad_to_multiple_of: int | None = None

    packing: bool = False
    packing_max_length: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor | int]:
        if self.packing:
            return self._packed(features)
        return self._padded(features)

    def _images(self, batch: dict, features: list[dict]) -> dict:
        images = [f["images"] for f in features if f.get("images") is not None]
        if images:
            pixels = torch.cat(images, dim=0)
            if self.normalize:
                if self.transform is None:
                    raise ValueError("LlavaCollator needs the ImageTransform to normalise images")
                pixels = self.transform.normalize(pixels)
            batch["pixel_values"] = pixels
            sizes = [f["image_sizes"] for f in features if f.get("image_sizes") is not None]
            if sizes:  # AnyRes: the views of all images in one batch for the tower, and each image's size
                batch["image_sizes"] = torch.cat(sizes, dim=0)
                if self.transform is not None and self.transform.anyres.max_tiles is not None:
                    # OneVision: a sample's images are tiled only when it holds one
                    batch["batch_num_images"] = torch.tensor([len(s) for s in sizes], dtype=torch.long)
        return batch

    def _canvas(self, rows: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """All-padding ``input_ids`` and all-ignored ``labels``, ``width`` rounded up to the multiple."""
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        return (torch.full((rows, width), self.pad_token_id, dtype=torch.long),
                torch.full((rows, width), IGNORE_INDEX, dtype=torch.long))

    def _packed(self, features: list[dict]) -> dict[str, torch.Tensor | int]:
        lengths = [len(f["input_ids"]) for f in features]
        rows = pack_rows(lengths, self.packing_max_length)
        input_ids, labels = self._canvas(len(rows), max(sum(lengths[i] for i in row) for row in rows))
        width = input_ids.shape[1]
        position_ids = torch.zeros_like(input_ids)
        seq_lengths = []
        for r, row in enumerate(rows):
            pos = 0
            for i in row:
                length = lengths[i]
                input_ids[r, pos:pos + length] = features[i]["input_ids"]
                labels[r, pos:pos + length] = features[i]["labels"]
                labels[r, pos] = IGNORE_INDEX
                position_ids[r, pos:pos + length] = torch.arange(length)
                pos += length
            position_ids[r, pos:] = torch.arange(width - pos)  # the padding is a sequence of its own
            seq_lengths.append([lengths[i] for i in row] + ([width - pos] if width > pos else []))
        batch = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_lengths": seq_lengths,
                 "num_real_tokens": sum(lengths), "num_samples": len(features), "replaced": _replaced(features)}
        return self._images(batch, [features[i] for row in rows for i in row])

    def _padded(self, features: list[dict]) -> dict[str, torch.Tensor | int]:
        lengths = [len(f["input_ids"]) for f in features]
        n = len(features)
        input_ids, labels = self._canvas(n, max(lengths))
        attention_mask = torch.zeros_like(input_ids)
        for i, (f, length) in enumerate(zip(features, lengths)):
            input_ids[i, :length] = f["input_ids"]
            labels[i, :length] = f["labels"]
            attention_mask[i, :length] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
                 "num_real_tokens": sum(lengths), "num_samples": n, "replaced": _replaced(features)}
        return self._images(batch, features)


def _replaced(features: list[dict]) -> list[dict]:
    """The bad samples the batch's samples stand in for (index, id, reason), as the dataset reported them."""
    return [r for f in features for r in f.get("replaced", ())]


def pack_rows(lengths: list[int], capacity: int | None) -> list[list[int]]:
    """Sample indices per row: all in one row (in order) without a capacity; else first-fit decreasing."""
    if capacity is None or sum(lengths) <= capacity:
        return [list(range(len(lengths)))]
    rows: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, load in enumerate(loads):
            if load + lengths[i] <= capacity:
                rows[r].append(i)
                loads[r] += lengths[i]
                break
        else:
            rows.append([i])
            loads.append(lengths[i])
    return rows


def varlen_kwargs(seq_lengths: list[list[int]], device) -> dict:
    """A varlen kernel's arguments for a packed batch: the sequence boundaries over its rows laid end to
    end (transformers flattens the rows the same way), built on the host; one small copy to the device."""
    flat = [n for row in seq_lengths for n in row]
    cu = torch.zeros(len(flat) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(flat, dtype=torch.int32), 0)
    cu = cu.to(device, non_blocking=True)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": max(flat), "max_length_k": max(flat)}


def scored_logits_kwargs(labels: torch.Tensor) -> dict:
    """Logits only where a supervised token is predicted: the positions (shared by the batch's rows) whose
    next label is supervised in some row, as transformers' ``logits_to_keep``, with the matching
    ``shift_labels`` for its causal-LM loss. The loss is the same sum over the same (logit, target) pairs;
    what goes is the language-model head, the fp32 upcast and the softmax over image and prompt positions —
    in stage 1, 576 image tokens against ~60 caption tokens a sample."""
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    keep = (shifted != IGNORE_INDEX).any(0).nonzero().squeeze(1)
    return {"logits_to_keep": keep, "shift_labels": shifted[:, keep]}
