"""Honest small "pretrained" backbones for the demo, made on the spot with no hub.

* a Llama-style language model pretrained (next-token prediction) on the demo's text;
* a CLIP model (vision + text towers) trained contrastively on the demo's image–caption pairs, saved as a
  full CLIP checkpoint — so ``--vision_tower`` loads its vision half exactly as it loads
  ``openai/clip-vit-large-patch14-336``.

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

logger = logging.getLogger(__name__)


def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain_language_model(tokenizer, texts: list[str], out: str | Path, *, hidden: int, layers: int,
                            steps: int, seq_len: int = 64, batch: int = 32, lr: float = 3e-3, seed: int = 0,
                            progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Train a small Llama on ``texts`` (packed into ``seq_len`` chunks); save it with its tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 32),
                      intermediate_size=hidden * 3, max_position_embeddings=1024,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
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
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return losses


def pretrain_clip(tokenizer, images: list[np.ndarray], captions: list[str], out: str | Path, *, image_size: int,
                  patch_size: int, hidden: int, layers: int, steps: int, batch: int = 64, lr: float = 2e-3,
                  seed: int = 0, progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Contrastive image–caption training of a small CLIP; ``images`` are normalised (3, H, W) arrays."""
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(seed)
    text_cfg = {"vocab_size": len(tokenizer), "hidden_size": hidden, "num_hidden_layers": 2,
                "num_attention_heads": max(1, hidden // 32), "intermediate_size": hidden * 2,
                "max_position_embeddings": 64, "eos_token_id": tokenizer.eos_token_id,
                "bos_token_id": tokenizer.bos_token_id, "pad_token_id": 0}
    vision_cfg = {"image_size": image_size, "patch_size": patch_size, "hidden_size": hidden,
                  "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 32),
                  "intermediate_size": hidden * 2}
    model = CLIPModel(CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=hidden))
    tok = [tokenizer(c)["input_ids"][:63] + [tokenizer.eos_token_id] for c in captions]
    width = max(len(t) for t in tok)
    ids = torch.zeros((len(tok), width), dtype=torch.long)
    mask = torch.zeros((len(tok), width), dtype=torch.long)
    for i, t in enumerate(tok):
        ids[i, : len(t)] = torch.tensor(t)
        mask[i, : len(t)] = 1
    pixels = torch.from_numpy(np.stack(images))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    rng = random.Random(seed)
    losses = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, max(1, steps // 20))
        idx = rng.sample(range(len(tok)), min(batch, len(tok)))
        out_ = model(input_ids=ids[idx], attention_mask=mask[idx], pixel_values=pixels[idx], return_loss=True)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(out_.loss.detach()))
        if progress:
            progress(step, steps, losses[-1])
    model.save_pretrained(str(out))
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(str(out))
    return losses
