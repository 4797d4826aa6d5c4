"""Keep the vision tower and projector in every training step's graph.

A micro-batch without images skips the vision tower and projector. Under DDP that leaves trainable
projector parameters without gradients ("unused parameters" errors); under ZeRO-3 the rank that skips
them issues different all-gathers than its peers and the run hangs (LLaVA #699). The fix here runs one
dummy image through the vision tower and projector *at the point in the forward where real images would
go* (right after the token embedding), and adds it times zero to the embeddings: the same modules run
in the same order on every rank, and the loss is unchanged.
"""

from __future__ import annotations

import torch


class VisionInGraph:
    """Forward hooks that add a zero-weighted dummy image path to text-only training forwards."""

    def __init__(self, model):
        self.model = model
        self._text_only = False
        inner = model.model
        vcfg = model.config.vision_config
        self.image_shape = (1, getattr(vcfg, "num_channels", 3), vcfg.image_size, vcfg.image_size)
        self.handles = [
            model.register_forward_pre_hook(self._pre, with_kwargs=True),
            inner.get_input_embeddings().register_forward_hook(self._after_embed),
        ]

    def _pre(self, module, args, kwargs):
        self._text_only = kwargs.get("pixel_values") is None

    def _after_embed(self, module, args, output):
        if not (self._text_only and self.model.training and torch.is_grad_enabled()):
            return output
        self._text_only = False
        inner = self.model.model
        dtype = next(inner.vision_tower.parameters()).dtype
        dummy = torch.zeros(self.image_shape, dtype=dtype, device=output.device)
        feats = inner.get_image_features(pixel_values=dummy)
        feats = getattr(feats, "pooler_output", feats)
        if isinstance(feats, (list, tuple)):
            feats = torch.cat([f.reshape(-1) for f in feats])
        return output + 0.0 * feats.sum().to(output.dtype)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
