"""Generation from a LLaVA model: batched single questions, and multi-turn chats with streaming.

Prompts come from the processor's chat template (the one training saved, so inference renders exactly
as training did) and are tokenized as training tokenized them, chunk by chunk around each image
(:class:`llavakit.data.tokenize.PromptEncoder`); batches are left-padded for generation; greedy unless a
temperature is given.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from llavakit import IMAGE_PLACEHOLDER
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
        from llavakit.data.tokenize import PromptEncoder
        from llavakit.model.build import anyres_of, num_image_tokens_for

        self.model = model.eval()
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # prompts are tokenized as training tokenized them: chunk by chunk around each image
        cfg = model.config
        self.encoder = PromptEncoder(self.tokenizer, num_image_tokens_for(cfg.vision_config,
                                                                          cfg.vision_feature_select_strategy),
                                     anyres=anyres_of(cfg))
        if self.encoder.image_token_id != cfg.image_token_index:
            raise ValueError(f"the tokenizer's <image> id {self.encoder.image_token_id} is not the model's "
                             f"image_token_index {cfg.image_token_index}")
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
        """The generation prompt as training rendered it (the chat template without the separators that
        plain transformers' one-piece tokenization needs; ``<image>`` in place, no BOS text)."""
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.processor.chat_template,
                                                  tokenize=False, add_generation_prompt=True, llavakit_image_sep=False)
        bos = self.tokenizer.bos_token
        if bos and self.encoder.add_bos and text.startswith(bos):
            text = text[len(bos):]  # the encoder adds BOS itself, as training did
        return text

    def input_ids(self, text: str, image_sizes=None) -> list[int]:
        """``image_sizes``: the (height, width) of the text's images, which an AnyRes model needs."""
        return self.encoder.encode_prompt(text, image_sizes)

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

    def _inputs(self, texts: list[str], images) -> dict:
        """Left-padded ids (chunk-wise, as in training), attention mask and the images' pixel values (an
        AnyRes model's: every image's views, and its size)."""
        counts = [t.count(IMAGE_PLACEHOLDER) for t in texts]  # each prompt's images, in order
        n_blocks = sum(counts)
        if n_blocks != len(images or ()):
            raise ValueError(f"the prompts hold {n_blocks} image placeholder(s) but {len(images or ())} image(s) "
                             "were given")
        sizes = [(im.height, im.width) for im in images or ()]
        starts = [sum(counts[:i]) for i in range(len(counts))]
        rows = [self.input_ids(t, sizes[s:s + n]) for t, s, n in zip(texts, starts, counts)]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if images:
            anyres = self.encoder.anyres
            if anyres is not None and anyres.max_tiles is not None:  # OneVision: images grouped by prompt
                grouped = [list(images[s:s + n]) for s, n in zip(starts, counts) if n]
                processed = self.processor.image_processor(images=grouped, return_tensors="pt")
                inputs["batch_num_images"] = processed["batch_num_images"]
            else:
                processed = self.processor.image_processor(images=images, return_tensors="pt")
            inputs["pixel_values"] = processed["pixel_values"].to(self.model.dtype)
            if anyres is not None:
                inputs["image_sizes"] = processed["image_sizes"]
        return {k: v.to(self.device) for k, v in inputs.items()}

    def _generate(self, texts: list[str], images, sampling: Sampling) -> list[str]:
        inputs = self._inputs(texts, images)
        with self._lock:
            gen = self.model.generate(**inputs, **sampling.kwargs())
        new = gen[:, inputs["input_ids"].shape[1]:]
        return [t.strip() for t in self.processor.batch_decode(new, skip_special_tokens=True)]

    # ---- chats ----------------------------------------------------------------------------------
    def chat(self, messages: list[dict], images: Sequence = (), sampling: Sampling | None = None) -> str:
        return "".join(self.chat_stream(messages, images, sampling)).strip()

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config.text_config, "max_position_embeddings", None)

    def prepare(self, messages: list[dict], images: Sequence = (), sampling: Sampling | None = None
                ) -> tuple[dict, Sampling]:
        """Model inputs for a chat and the sampling settings, ``max_new_tokens`` cut to what the model's
        context has room for; a ValueError when the messages and images do not fit together or the prompt
        alone fills the context."""
        sampling = sampling or Sampling()
        n_parts = sum(1 for m in messages if not isinstance(m["content"], str)
                      for p in m["content"] if p.get("type") == "image")
        if n_parts != len(images):
            raise ValueError(f"the messages have {n_parts} image part(s) but {len(images)} image(s) were given")
        pil = [open_image(im) if isinstance(im, str) else im for im in images] or None
        inputs = self._inputs([self.render(messages)], pil)
        n, context = inputs["input_ids"].shape[1], self.context_length
        if context:
            if n >= context:
                raise ValueError(f"the prompt holds {n} tokens; the model's context is {context}")
            if n + sampling.max_new_tokens > context:
                sampling = dataclasses.replace(sampling, max_new_tokens=context - n)
        return inputs, sampling

    def chat_stream(self, messages: list[dict], images: Sequence = (), sampling: Sampling | None = None,
                    usage: dict | None = None) -> Iterator[str]:
        """Pieces of the answer as they are generated. ``messages`` are chat-template messages whose
        ``{"type": "image"}`` parts match ``images`` (paths or PIL images) in order. When the stream ends,
        ``usage`` (if given) holds ``prompt_tokens`` and ``completion_tokens``."""
        return self.stream(*self.prepare(messages, images, sampling), usage=usage)

    def stream(self, inputs: dict, sampling: Sampling, usage: dict | None = None,
               stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """Generate from :meth:`prepare`'s inputs, piece by piece; ``stop`` (checked at every new token)
        ends the generation early — a server's client that went away."""
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors: list[BaseException] = []
        extra = {"stopping_criteria": StoppingCriteriaList([_StopWhen(stop)])} if stop is not None else {}

        def work():
            try:
                with self._lock, torch.no_grad():
                    out = self.model.generate(**inputs, **sampling.kwargs(), streamer=streamer, **extra)
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


class _StopWhen:
    """A generation stopping criterion from a plain callable."""

    def __init__(self, fn: Callable[[], bool]):
        self.fn = fn

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.fn()), dtype=torch.bool, device=input_ids.device)


def user_message(text: str, num_images: int = 0) -> dict:
    return {"role": "user", "content": [{"type": "image"}] * num_images + [{"type": "text", "text": text}]}
