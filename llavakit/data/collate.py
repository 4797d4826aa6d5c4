"""Collate samples into right-padded batches that ``LlavaForConditionalGeneration`` accepts.

``attention_mask`` comes from the sample lengths (never from comparing ids to the pad id, which breaks
when pad == eos). ``pixel_values`` holds the batch's images stacked in sample order, and is absent when
no sample has one. Images arrive as uint8; with ``normalize=True`` the collator turns them into float32
(bit-identical to the processor), otherwise they stay uint8 for normalisation on the device.
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

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        n = len(features)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        for i, (f, length) in enumerate(zip(features, lengths)):
            input_ids[i, :length] = f["input_ids"]
            labels[i, :length] = f["labels"]
            attention_mask[i, :length] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        images = [f["images"] for f in features if f.get("images") is not None]
        if images:
            pixels = torch.cat(images, dim=0)
            if self.normalize:
                if self.transform is None:
                    raise ValueError("LlavaCollator needs the ImageTransform to normalise images")
                pixels = self.transform.normalize(pixels)
            batch["pixel_values"] = pixels
        return batch
