"""Batched generation from a LLaVA model: image + question in, answer text out.

Prompts come from the processor's chat template (the one training saved, so inference renders exactly
as training did); batches are left-padded for generation; greedy unless a temperature is given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llavakit.data.images import open_image


@dataclass
class Query:
    question: str
    image: str | None = None


class Predictor:
    def __init__(self, model, processor, device: str | torch.device | None = None):
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.model.to(self.device)

    @classmethod
    def from_pretrained(cls, path: str, device: str | None = None, dtype: torch.dtype | None = None) -> Predictor:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32)
        return cls(model, AutoProcessor.from_pretrained(path), device)

    def prompt(self, q: Query) -> str:
        content = ([{"type": "image"}] if q.image else []) + [{"type": "text", "text": q.question}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True)

    @torch.no_grad()
    def generate(self, queries: Sequence[Query], max_new_tokens: int = 32, batch_size: int = 16,
                 temperature: float = 0.0) -> list[str]:
        out: list[str] = [""] * len(queries)
        # batches of the same modality (the processor needs every prompt of a batch to have its image)
        order = sorted(range(len(queries)), key=lambda i: queries[i].image is None)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            groups = [[i for i in idx if queries[i].image], [i for i in idx if not queries[i].image]]
            for group in groups:
                if group:
                    for i, text in zip(group, self._batch([queries[i] for i in group], max_new_tokens,
                                                          temperature)):
                        out[i] = text
        return out

    def _batch(self, qs: list[Query], max_new_tokens: int, temperature: float) -> list[str]:
        texts = [self.prompt(q) for q in qs]
        images = [open_image(q.image) for q in qs if q.image] or None
        inputs = self.processor(images=images, text=texts, padding=True, return_tensors="pt").to(self.device)
        kw = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        gen = self.model.generate(**inputs, max_new_tokens=max_new_tokens, **kw)
        new = gen[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]
