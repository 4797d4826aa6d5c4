"""Keep the vision tower and projector in every training step's graph.

A micro-batch without images skips the vision tower and projector. Under DDP that leaves trainable
projector parameters without gradients ("unused parameters" errors, or a hang); under ZeRO-3 the rank
that skips them issues different all-gathers than its peers and the run hangs (LLaVA #699).

The fix makes a text-only micro-batch take the very same path as an image batch: one dummy image
(zeros) is added, and its image-token block is appended to the first row *in the padding area* —
attention mask 0 (or, packed, a position run of its own), labels -100, after every real token. Causal attention means no real token can see it
and the loss ignores it, so the loss is unchanged; but the vision tower and projector run, in the same
order as on every other rank, and the projector receives its (zero) gradient.
"""

from __future__ import annotations

import torch

from llavakit import IGNORE_INDEX


def add_dummy_image(inputs: dict, image_token_id: int, num_image_tokens: int, image_shape: tuple[int, ...],
                    pad_token_id: int, dtype: torch.dtype, views: int = 1,
                    image_size: tuple[int, int] | None = None, count_images: bool = False) -> dict:
    """Return ``inputs`` with a loss-neutral dummy image when it has none (see the module docstring).

    ``image_shape`` is one view's (channels, height, width); an AnyRes model's dummy image has ``views``
    views (base and tiles) and ``image_size``, from which the model derives them; ``count_images`` adds
    OneVision's ``batch_num_images`` (one image, in one sample)."""
    if inputs.get("pixel_values") is not None:
        return inputs
    ids = inputs["input_ids"]
    n, width = ids.shape
    out = dict(inputs)
    extra_ids = torch.full((n, num_image_tokens), pad_token_id, dtype=ids.dtype, device=ids.device)
    extra_ids[0] = image_token_id
    out["input_ids"] = torch.cat([ids, extra_ids], dim=1)
    if "attention_mask" in inputs:
        mask = inputs["attention_mask"]
        out["attention_mask"] = torch.cat([mask, torch.zeros((n, num_image_tokens), dtype=mask.dtype,
                                                             device=mask.device)], dim=1)
    if "position_ids" in inputs:  # packed: the dummy block is a sequence of its own
        pos = inputs["position_ids"]
        extra = torch.arange(num_image_tokens, dtype=pos.dtype, device=pos.device).expand(n, -1)
        out["position_ids"] = torch.cat([pos, extra], dim=1)
        if "seq_lengths" in inputs:
            out["seq_lengths"] = [[*row, num_image_tokens] for row in inputs["seq_lengths"]]
    if "labels" in inputs:
        labels = inputs["labels"]
        out["labels"] = torch.cat([labels, torch.full((n, num_image_tokens), IGNORE_INDEX, dtype=labels.dtype,
                                                      device=labels.device)], dim=1)
    out["pixel_values"] = torch.zeros((views, *image_shape), dtype=dtype, device=ids.device)
    if image_size is not None:
        out["image_sizes"] = torch.tensor([image_size], dtype=torch.long, device=ids.device)
    if count_images:
        out["batch_num_images"] = torch.ones(1, dtype=torch.long, device=ids.device)
    return out
