"""Generation from a LLaVA model: batched single questions, and multi-turn chats with streaming.

Prompts come from the processor's chat template (the one training saved, so inference renders exactly
as training did); batches are left-padded for generation; greedy unless a temperature is given.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from llavakit.data.images import open_image


@dataclass
class Query:
    question: str
    image: str | None = None


@dataclass
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1

    def kwargs(self) -> dict:
        kw: dict = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.temperature > 0:
            kw.update(do_sample=True, temperature=self.temperature)
            if self.top_p is not None:
                kw["top_p"] = self.top_p
        else:
            kw["do_sample"] = False
        return kw


class Predictor:
    def __init__(self, model, processor, device: str | torch.device | None = None):
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.device = torch.device(device) if device else next(model.parameters()).device
        self.model.to(self.device)
        self._lock = threading.Lock()  # one generation at a time (a server's threads share the model)

    @classmethod
    def from_pretrained(cls, path: str, *, model_base: str | None = None, device: str | None = None,
                        dtype: torch.dtype | None = None, conv_mode: str | None = None) -> Predictor:
        """Any llavakit output: see :func:`llavakit.model.load.load_llava`."""
        from llavakit.model.load import load_llava

        loaded = load_llava(path, model_base=model_base, dtype=dtype, device=device, conv_mode=conv_mode)
        return cls(loaded.model, loaded.processor)

    def prompt(self, q: Query) -> str:
        return self.render([user_message(q.question, 1 if q.image else 0)])

    def render(self, messages: list[dict]) -> str:
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    # ---- batched single questions ---------------------------------------------------------------
    @torch.no_grad()
    def generate(self, queries: Sequence[Query], max_new_tokens: int = 32, batch_size: int = 16,
                 temperature: float = 0.0, sampling: Sampling | None = None) -> list[str]:
        sampling = sampling or Sampling(max_new_tokens=max_new_tokens, temperature=temperature)
        out: list[str] = [""] * len(queries)
        # batches of one modality (the processor needs every prompt of a batch to have its image)
        for group in ([i for i in range(len(queries)) if queries[i].image],
                      [i for i in range(len(queries)) if not queries[i].image]):
            for s in range(0, len(group), batch_size):
                idx = group[s:s + batch_size]
                texts = [self.prompt(queries[i]) for i in idx]
                images = [open_image(queries[i].image) for i in idx if queries[i].image] or None
                for i, text in zip(idx, self._generate(texts, images, sampling)):
                    out[i] = text
        return out

    def _inputs(self, texts: list[str], images):
        return self.processor(images=images, text=texts, padding=True, return_tensors="pt").to(self.device)

    def _generate(self, texts: list[str], images, sampling: Sampling) -> list[str]:
        inputs = self._inputs(texts, images)
        with self._lock:
            gen = self.model.generate(**inputs, **sampling.kwargs())
        new = gen[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    # ---- chats ----------------------------------------------------------------------------------
    def chat(self, messages: list[dict], images: Sequence = (), sampling: Sampling | None = None) -> str:
        return "".join(self.chat_stream(messages, images, sampling)).strip()

    def chat_stream(self, messages: list[dict], images: Sequence = (), sampling: Sampling | None = None,
                    usage: dict | None = None) -> Iterator[str]:
        """Pieces of the answer as they are generated. ``messages`` are chat-template messages whose
        ``{"type": "image"}`` parts match ``images`` (paths or PIL images) in order. When the stream ends,
        ``usage`` (if given) holds ``prompt_tokens`` and ``completion_tokens``."""
        from transformers import TextIteratorStreamer

        sampling = sampling or Sampling()
        n_parts = sum(1 for m in messages if not isinstance(m["content"], str)
                      for p in m["content"] if p.get("type") == "image")
        if n_parts != len(images):
            raise ValueError(f"the messages have {n_parts} image part(s) but {len(images)} image(s) were given")
        pil = [open_image(im) if isinstance(im, str) else im for im in images] or None
        inputs = self._inputs([self.render(messages)], pil)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []

        def work():
            try:
                with self._lock, torch.no_grad():
                    out = self.model.generate(**inputs, **sampling.kwargs(), streamer=streamer)
                if usage is not None:
                    n = inputs["input_ids"].shape[1]
                    usage.update(prompt_tokens=n, completion_tokens=out.shape[1] - n)
            except BaseException as e:  # surfaced in the caller's thread
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        yield from streamer
        thread.join()
        if errors:
            raise errors[0]


def user_message(text: str, num_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}
