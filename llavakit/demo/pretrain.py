"""Honest small "pretrained" backbones for the demo, made on the spot with no hub.

* a Llama-style language model pretrained (next-token prediction) on the demo's text — a chat model, as
  Vicuna is, when that text is conversations in its template;
* a CLIP vision tower trained on the demo images to tell what is in each part of the image (supervised,
  from the scenes' ground truth), saved like ``openai/clip-vit-*`` so that ``--vision_tower`` loads it
  through the same ``from_pretrained`` path.

Both are saved with ``save_pretrained``. Plain PyTorch loops: these are the stand-ins for Vicuna and
CLIP, not part of llavakit's training recipe.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from llavakit.demo.backbones import new_clip_vision, new_llama, save_clip_vision, save_llama

logger = logging.getLogger(__name__)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_language_model(tokenizer, texts: list[str], out: str | Path, *, hidden: int, layers: int,
                            steps: int, seq_len: int = 64, batch: int = 32, lr: float = 3e-3, seed: int = 0,
                            progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Train a small Llama on ``texts`` (packed into ``seq_len`` chunks); save it with its tokenizer."""
    model = new_llama(tokenizer, hidden, layers, max(1, hidden // 32), hidden * 3, max_positions=1024, seed=seed)
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    data = torch.tensor(ids[: len(ids) // seq_len * seq_len]).view(-1, seq_len)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, max(1, steps // 20))
        rows = data[torch.randint(0, len(data), (batch,), generator=gen)]
        loss = model(input_ids=rows, labels=rows).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if progress:
            progress(step, steps, losses[-1])
    save_llama(model, tokenizer, out)
    return losses


def pretrain_vision(images: list[np.ndarray], quadrant_labels: np.ndarray, out: str | Path, *, image_size: int,
                    patch_size: int, hidden: int, layers: int, steps: int, num_classes: tuple[int, ...],
                    batch: int = 64, lr: float = 2e-3, logit_scale: float = 5.0, seed: int = 0,
                    progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Supervised pretraining of a small CLIP vision tower on the demo images.

    For each image quadrant, linear heads read the mean of the quadrant's patch features at the layer LLaVA
    uses (the second to last) and predict what is there (one label per attribute in ``quadrant_labels``,
    shape ``(N, 4, A)``, with ``num_classes[a]`` classes for attribute ``a``). Logits are cosines times a
    fixed ``logit_scale``, as CLIP's are: a head cannot read an attribute from a faint direction through
    large weights, so every attribute keeps a real share of the features (measured: shape's share of the
    patch-feature variance 18% with plain linear heads, 24% with these). The heads are thrown away; the
    tower is saved with its image-processor config, like ``openai/clip-vit-*``.
    """
    model = new_clip_vision(image_size, patch_size, hidden, layers, max(1, hidden // 32), hidden * 2, seed=seed)
    heads = torch.nn.ModuleList(torch.nn.Linear(hidden, k, bias=False) for k in num_classes)
    grid = image_size // patch_size
    half = grid // 2
    quadrants = []  # patch indices of each quadrant, in PLACES order (top left, top right, bottom left, ...)
    for row in (0, 1):
        for col in (0, 1):
            quadrants.append([r * grid + c for r in range(row * half, (row + 1) * half)
                              for c in range(col * half, (col + 1) * half)])
    pixels = torch.from_numpy(np.stack(images))
    labels = torch.from_numpy(quadrant_labels).long()
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    rng = random.Random(seed)
    losses = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, max(1, steps // 20))
        idx = rng.sample(range(len(pixels)), min(batch, len(pixels)))
        feats = model(pixels[idx], output_hidden_states=True).hidden_states[-2][:, 1:]  # CLS dropped
        loss = 0.0
        for q, patches in enumerate(quadrants):
            pooled = torch.nn.functional.normalize(feats[:, patches].mean(1), dim=-1)
            for a, head in enumerate(heads):
                logits = logit_scale * pooled @ torch.nn.functional.normalize(head.weight, dim=-1).T
                loss = loss + torch.nn.functional.cross_entropy(logits, labels[idx, q, a])
        loss = loss / (len(quadrants) * len(heads))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if progress:
            progress(step, steps, losses[-1])
    save_clip_vision(model, out)
    return losses
