"""A collated batch → the model's inputs and the batch's counts, as one pure function.

The collator puts host-side bookkeeping into every batch (``num_real_tokens``, ``num_samples``, the
``replaced`` bad samples, packed rows' ``seq_lengths``) and leaves images as uint8. :func:`prepare_batch`
takes that off, normalises the pixels on the device, adds the loss-neutral dummy image of a text-only
training micro-batch (``dummy_image.py``), asks for logits only where a token is supervised, and hands a
varlen kernel its sequence boundaries — returning what the model's forward takes and a
:class:`BatchCounts` for the trainer to add up. It changes nothing outside the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llavakit.data.collate import scored_logits_kwargs, varlen_kwargs
from llavakit.train.dummy_image import add_dummy_image


@dataclass
class BatchCounts:
    samples: int
    real_tokens: int
    positions: int  # every position the model runs, padding included
    images: int
    replaced: list[dict] = field(default_factory=list)  # the bad samples the batch's samples stand in for


@dataclass
class BatchPlan:
    """What :func:`prepare_batch` needs to know of the model and the run (fixed for a run)."""

    normalize: object  # ImageTransform.normalize: uint8 pixels → the processor's floats
    pixel_dtype: torch.dtype  # the vision tower's
    dummy: dict  # add_dummy_image's keyword arguments (image token id, count, shape, pad id)
    varlen: bool  # a varlen attention kernel takes the packed rows' boundaries


def prepare_batch(batch: dict, plan: BatchPlan, training: bool) -> tuple[dict, BatchCounts]:
    inputs = dict(batch)
    real = inputs.pop("num_real_tokens", None)
    num_samples = inputs.pop("num_samples", None)
    replaced = list(inputs.pop("replaced", None) or [])
    ids = inputs["input_ids"]
    if real is None:
        real = int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else int(ids.numel())
    pixels = inputs.get("pixel_values")
    counts = BatchCounts(samples=int(num_samples) if num_samples is not None else int(ids.shape[0]),
                         real_tokens=int(real), positions=int(ids.numel()),
                         images=(len(inputs["image_sizes"]) if inputs.get("image_sizes") is not None
                                 else int(pixels.shape[0]) if pixels is not None else 0), replaced=replaced)
    if pixels is not None and pixels.dtype == torch.uint8:  # normalised here, on the device
        inputs["pixel_values"] = plan.normalize(pixels).to(plan.pixel_dtype)
    if training:
        inputs = add_dummy_image(inputs, dtype=plan.pixel_dtype, **plan.dummy)
        if inputs.get("labels") is not None:
            inputs.update(scored_logits_kwargs(inputs["labels"]))
    seq_lengths = inputs.pop("seq_lengths", None)
    if seq_lengths is not None and plan.varlen:
        inputs.update(varlen_kwargs(seq_lengths, inputs["input_ids"].device))
    return inputs, counts
