"""Honest small "pretrained" backbones for the demo, made on the spot with no hub.

* a Llama-style language model pretrained (next-token prediction) on the demo's text, in which a description
  of each scene (one word per quadrant) stands where the image's tokens will stand — it learns to read such a
  prefix, as a real LLM reads text, so that stage 1 has something to align the image to;
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


def pretrain_language_model(tokenizer, examples: list[tuple[dict, list[str]]], out: str | Path, *, hidden: int,
                            layers: int, steps: int, image_tokens: int, template: str = "plain", batch: int = 32,
                            lr: float = 3e-3, seed: int = 0, parts: dict[str, tuple[str, ...]] | None = None,
                            progress: Callable[[int, int, float], None] | None = None) -> list[float]:
    """Train a small Llama on the demo's texts about images, each image replaced by a description of it.

    ``examples`` are (record, description): a record in LLaVA's format with one image, rendered in
    ``template``, and its description — ``image_tokens`` words (one token each), put where the image's tokens
    will be. The model learns to read such a prefix as a real LLM reads text; stage 1 then teaches the
    projector to write what the model already reads. Supervised: the assistant's turns (the template's labels).
    Each step takes ``batch`` texts at random, packed into rows. The tokenizer is saved as it
    came (no image token), with the model.

    ``parts`` (description word → the names of its parts, e.g. place, size, colour, shape) composes each such
    word's input embedding from its parts' during training, as a real LLM composes a phrase from its words:
    one learned vector per part name, a word's embedding their sum (scaled by 1/sqrt of their number). What
    is learned about "circle" is then learned for every word with a circle in it. The composed embeddings
    are written into the embedding matrix at the end, so the saved model is a plain Llama.
    """
    import copy

    from llavakit.data.collate import LlavaCollator
    from llavakit.data.records import InvalidRecordsError, check_record
    from llavakit.data.templates import get_template
    from llavakit.data.tokenize import ConversationEncoder
    from llavakit.model.build import prepare_tokenizer

    model = new_llama(tokenizer, hidden, layers, max(1, hidden // 32), hidden * 3, max_positions=1024, seed=seed)
    tok = copy.deepcopy(tokenizer)
    prepare_tokenizer(tok)
    image_id = tok.convert_tokens_to_ids("<image>")
    encoder = ConversationEncoder(tok, get_template(template), image_tokens)
    rows: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i, (raw, description) in enumerate(examples):
        record, problems = check_record(raw, i, "demo conversations")
        if record is None:
            raise InvalidRecordsError("demo conversations", problems)
        enc = encoder.encode(record)
        ids = torch.tensor(enc.input_ids)
        where = (ids == image_id).nonzero().flatten()
        words = tokenizer.convert_tokens_to_ids(description)
        if len(where) != len(words) or tokenizer.unk_token_id in words:
            raise ValueError(f"demo conversation {i}: {len(where)} image positions for the description "
                             f"{description} (each word must be one token of the tokenizer)")
        ids[where] = torch.tensor(words, dtype=torch.long)
        rows.append((ids, torch.tensor(enc.labels)))
    gen = torch.Generator().manual_seed(seed)
    # most texts are short and a few long: a batch padded to its longest would be mostly padding, so the texts
    # go into rows as training packs them (positions restart per text: no text sees another, nor predicts its
    # first token from the one before)
    pack = LlavaCollator(pad_token_id=0, packing=True, packing_max_length=max(128, max(len(r[0]) for r in rows)))
    composed = _Composed(tokenizer, parts, model.config.hidden_size, model.config.initializer_range, seed) \
        if parts else None
    params = [*model.parameters(), *(composed.parameters() if composed else ())]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    losses = []
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * _cosine(step, steps, max(1, steps // 20))
        picked = pack([{"input_ids": rows[k][0], "labels": rows[k][1]}
                       for k in torch.randint(0, len(rows), (batch,), generator=gen).tolist()])
        ids = picked["input_ids"]
        embeds = model.get_input_embeddings()(ids)
        if composed is not None:
            embeds = composed(ids, embeds)
        loss = model(inputs_embeds=embeds, position_ids=picked["position_ids"], labels=picked["labels"],
                     use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if progress:
            progress(step, steps, losses[-1])
    if composed is not None:
        composed.write_into(model.get_input_embeddings())
    save_llama(model, tokenizer, out)
    return losses


class _Composed(torch.nn.Module):
    """Input embeddings of some words composed from their parts' (see ``pretrain_language_model``)."""

    def __init__(self, tokenizer, parts: dict[str, tuple[str, ...]], hidden: int, std: float, seed: int):
        super().__init__()
        names = sorted({n for ps in parts.values() for n in ps})
        ids = tokenizer.convert_tokens_to_ids(list(parts))
        if tokenizer.unk_token_id in ids:
            raise ValueError("every composed word must be one token of the tokenizer")
        weights = torch.zeros(len(parts), len(names))
        for row, ps in enumerate(parts.values()):
            for n in ps:
                weights[row, names.index(n)] = 1 / math.sqrt(len(ps))
        self.register_buffer("weights", weights)  # word × part
        self.register_buffer("word_ids", torch.tensor(ids))
        row_of = torch.full((len(tokenizer),), -1, dtype=torch.long)
        row_of[self.word_ids] = torch.arange(len(ids))
        self.register_buffer("row_of", row_of)  # token id → its row in `weights`, -1 for other tokens
        gen = torch.Generator().manual_seed(seed + 1)
        self.part = torch.nn.Parameter(torch.randn(len(names), hidden, generator=gen) * std)

    def table(self) -> torch.Tensor:
        return self.weights @ self.part

    def forward(self, ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        rows = self.row_of[ids]
        where = rows >= 0
        # a one-hot product, not an indexed write: the backward of indexing adds into rows from parallel
        # threads in no fixed order on a CPU (runs then differ in the last bits); a product's does not
        picks = torch.nn.functional.one_hot(rows.clamp(min=0), len(self.word_ids)).to(embeds.dtype)
        return torch.where(where[..., None], picks @ self.table(), embeds)

    @torch.no_grad()
    def write_into(self, embedding: torch.nn.Embedding) -> None:
        embedding.weight[self.word_ids] = self.table().to(embedding.weight.dtype)


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
