"""Render a conversation, tokenize it, expand ``<image>`` into image-token blocks, build labels.

Token ids follow the original LLaVA's construction: the prompt is split at each ``<image>``, every text
chunk is tokenized on its own (BOS once, at the start, when the tokenizer adds one), and each placeholder
becomes a block of N image-token ids (the original spliced a single ``-200`` there instead).

Labels come from character offsets: a token is supervised when its visible characters lie in a supervised
segment of the template's rendering (a whitespace-only token: when it lies in one). A template's supervised
segment starts where its generation prompt ends, so every token the model must produce after the prompt —
vicuna_v1's lone ``▁`` before an answer that starts with a digit included — is supervised, as in the
original. The result is then verified — every answer must own at least one token and no
token may mix answer text with prompt text — and a sample that fails is a :class:`SupervisionError`, never
a silently masked sample that trains on loss 0.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import numpy as np
from tokenizers import AddedToken

from llavakit import IGNORE_INDEX, IMAGE_PLACEHOLDER
from llavakit.data.records import Record
from llavakit.data.templates import Segment, Template, place_images

IM_START = "<im_start>"
IM_END = "<im_end>"


_SPACE = re.compile(r"\s")


class SupervisionError(ValueError):
    """The supervised tokens of a sample cannot be established."""


class SampleTooLong(ValueError):
    """A sample cannot be fitted into ``model_max_length`` without cutting an image or every answer."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    #: (start, end) token positions of each image block, in order
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    prompt: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def first_supervised(self) -> int:
        for i, lab in enumerate(self.labels):
            if lab != IGNORE_INDEX:
                return i
        return len(self.labels)

    @property
    def image_end(self) -> int:
        return self.image_spans[-1][1] if self.image_spans else 0


def ensure_special_token(tokenizer, token: str = IMAGE_PLACEHOLDER) -> int:
    """Add ``token`` (by default the image token) to the tokenizer as a special token if missing; return its id."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(token)


def tokenizer_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


#: texts that follow an image in the templates' prompts (a newline, a word, punctuation); each also with a
#: leading space, which sentencepiece-style tokenizers treat differently
_SEPARATOR_PROBES = ("\nWhat colour is it?", "What", "? yes", "x y z")


def _after_image_one_piece(tokenizer, text: str, image_token: str) -> list[int] | None:
    ids = tokenizer(image_token + text, add_special_tokens=False)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    return ids[1:] if ids and ids[0] == image_id else None


def separates(tokenizer, sep: str, text: str, image_token: str = IMAGE_PLACEHOLDER) -> bool:
    """Whether ``<image>`` + ``sep`` + ``text`` tokenized in one piece gives, after the image token, the ids
    of ``text`` tokenized alone (as training tokenizes the chunk after an image)."""
    return _after_image_one_piece(tokenizer, sep + text, image_token) == \
        tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class ImageSeparator:
    """What a prompt needs after an ``<image>`` for one-piece tokenization to equal chunk-wise: ``text``
    before text that starts with anything but a space, ``before_space`` before text that starts with one
    (nothing before a special token or another image)."""

    text: str
    before_space: str


def image_text_separator(tokenizer, image_token: str = IMAGE_PLACEHOLDER) -> ImageSeparator | None:
    """The separators that make tokenizing a prompt in one piece (as plain transformers does) give the ids
    of training's chunk-wise tokenization.

    A sentencepiece-style tokenizer (Vicuna's, legacy off) starts a chunk tokenized alone with ``▁`` unless
    it starts with a space, and text after a special token without one: one piece needs ``" "`` after the
    image except before a space. Byte-level BPE needs nothing. ``None`` when no separator works for this
    tokenizer (then only chunk-wise tokenization is exact).
    """
    ensure_special_token(tokenizer, image_token)

    def find(probes) -> str | None:
        return next((sep for sep in ("", " ") if all(separates(tokenizer, sep, p, image_token) for p in probes)),
                    None)

    text, before_space = find(_SEPARATOR_PROBES), find([" " + p for p in _SEPARATOR_PROBES])
    if text is None or before_space is None:
        return None
    return ImageSeparator(text, before_space)


class PromptEncoder:
    """Token ids of a rendered prompt, built as training builds them: the text split at each ``<image>``,
    every chunk tokenized on its own, BOS once, each placeholder an image-token block.

    Inference uses it as it is, so a prompt gets the ids training gave the same text (tokenizing the prompt
    in one piece gives other ids with a sentencepiece tokenizer: one ``▁`` fewer after every image).
    """

    def __init__(self, tokenizer, num_image_tokens: int, image_token: str = IMAGE_PLACEHOLDER,
                 mm_use_im_start_end: bool = False, anyres=None):
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("llavakit needs a fast (Rust `tokenizers`) tokenizer for character offsets; "
                             f"{type(tokenizer).__name__} is not one")
        if num_image_tokens < 1:
            raise ValueError(f"num_image_tokens must be positive, got {num_image_tokens}")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_token_id = ensure_special_token(tokenizer, image_token)
        self.add_bos = tokenizer_adds_bos(tokenizer)
        #: AnyRes geometry (:class:`~llavakit.data.anyres.AnyRes`): each image's token count follows its size
        self.anyres = anyres
        self._marks = ((ensure_special_token(tokenizer, IM_START),), (ensure_special_token(tokenizer, IM_END),)) \
            if mm_use_im_start_end else ((), ())
        self.image_block = self.block(num_image_tokens)

    def block(self, n: int) -> list[int]:
        """The ids an image of ``n`` tokens becomes (between the optional start and end markers)."""
        return [*self._marks[0], *[self.image_token_id] * n, *self._marks[1]]

    def image_blocks(self, n_images: int, image_sizes=None) -> list[list[int]]:
        """The id block of each of ``n_images`` images; with AnyRes from their (height, width)."""
        if self.anyres is None:
            return [self.image_block] * n_images
        if image_sizes is None or len(image_sizes) != n_images:
            raise ValueError(f"AnyRes needs the size of each of the {n_images} images "
                             f"(got {'none' if image_sizes is None else len(image_sizes)})")
        return [self.block(self.anyres.num_tokens(int(h), int(w), n_images)) for h, w in image_sizes]

    def key(self) -> str:
        """What decides the image blocks (for caches of encoded lengths)."""
        if self.anyres is None:
            return repr(self.image_block[:2] + [len(self.image_block)])
        return f"{self.image_token_id} {self._marks} {self.anyres.describe()}"

    def tokenize_chunks(self, prompt: str, offsets: bool = False) -> tuple[list[str], list[int], dict]:
        """The text chunks between images, their character starts in ``prompt``, and their tokenization."""
        chunks = prompt.split(IMAGE_PLACEHOLDER)
        starts, p = [], 0
        for c in chunks:
            starts.append(p)
            p += len(c) + len(IMAGE_PLACEHOLDER)
        return chunks, starts, self.tokenizer(chunks, add_special_tokens=False, return_offsets_mapping=offsets)

    def encode_prompt(self, prompt: str, image_sizes=None) -> list[int]:
        """The ids of ``prompt`` (a rendered conversation or generation prompt, ``<image>`` in place;
        ``image_sizes``: each image's (height, width), which AnyRes needs)."""
        _, _, enc = self.tokenize_chunks(prompt)
        blocks = self.image_blocks(len(enc["input_ids"]) - 1, image_sizes)
        ids = [self.tokenizer.bos_token_id] if self.add_bos else []
        for k, chunk_ids in enumerate(enc["input_ids"]):
            if k:
                ids.extend(blocks[k - 1])
            ids.extend(chunk_ids)
        return ids


#: a text longer than this many times what ``model_max_length`` tokens can cover is not tokenized at all
TEXT_LIMIT_FACTOR = 4


class ConversationEncoder(PromptEncoder):
    """Turns a :class:`Record` into input ids and labels for one template and one vision tower.

    A conversation whose text is longer than ``TEXT_LIMIT_FACTOR`` × ``max_length`` (default: the
    tokenizer's stated limit, else 4096) × the longest token (in characters) is a :class:`SampleTooLong`
    before any tokenization: it holds more than ``max_length`` tokens whatever they are, and tokenizing
    megabytes of text costs gigabytes of memory.
    """

    def __init__(self, tokenizer, template: Template, num_image_tokens: int,
                 image_token: str = IMAGE_PLACEHOLDER, mm_use_im_start_end: bool = False,
                 max_length: int | None = None, anyres=None):
        super().__init__(tokenizer, num_image_tokens, image_token, mm_use_im_start_end, anyres)
        self.template = template
        self._check_stop_token()
        if max_length is None:  # the tokenizer's own limit, when it states a real one
            stated = getattr(tokenizer, "model_max_length", None) or 0
            max_length = int(stated) if 0 < stated <= 1_000_000 else 4096
        self.max_length = max_length
        longest = max(len(t) for t in tokenizer.get_vocab())
        self.char_limit = TEXT_LIMIT_FACTOR * max_length * longest

    def _check_stop_token(self) -> None:
        stop = self.template.stop_str
        if not stop:
            return
        ids = self.tokenizer(stop, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(
                f"template {self.template.name!r} ends each answer with {stop!r}, which this tokenizer does not "
                f"know as one token (it splits into {len(ids)}); pick the --version that matches the model")

    def render(self, record: Record) -> list[Segment]:
        turns = place_images(record.turns, len(record.images))
        return self.template.render(turns)

    def encode(self, record: Record, image_sizes=None) -> Encoded:
        """Ids and labels of ``record``; ``image_sizes`` (each image's height, width) for AnyRes."""
        segments = self.render(record)
        prompt = "".join(s.text for s in segments)
        if len(prompt) > self.char_limit:
            raise SampleTooLong(f"{len(prompt):,} characters of text, far more than {self.max_length} tokens "
                                "(--model_max_length) can hold; not tokenized")
        sup = np.zeros(len(prompt) + 1, dtype=bool)
        seg_bounds: list[tuple[int, int]] = []
        pos = 0
        for s in segments:
            if s.supervised:
                sup[pos:pos + len(s.text)] = True
                seg_bounds.append((pos, pos + len(s.text)))
            pos += len(s.text)
        nonspace = np.ones(len(prompt) + 1, dtype=bool)
        nonspace[-1] = False
        nonspace[[m.start() for m in _SPACE.finditer(prompt)]] = False
        # per-token counts over character spans, from prefix sums (no per-character Python work)
        cs_sup = np.concatenate([[0], np.cumsum(sup)])
        cs_ns = np.concatenate([[0], np.cumsum(nonspace)])
        cs_sns = np.concatenate([[0], np.cumsum(sup & nonspace)])

        chunks, starts, enc = self.tokenize_chunks(prompt, offsets=True)
        blocks = self.image_blocks(len(chunks) - 1, image_sizes)

        ids: list[int] = []
        labels: list[int] = []
        spans: list[tuple[int, int]] = []
        token_chars: list[tuple[int, int]] = []
        if self.add_bos:
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE_INDEX)
        for k, (chunk_ids, offsets) in enumerate(zip(enc["input_ids"], enc["offset_mapping"])):
            if chunk_ids:
                off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2) + starts[k]
                a, b = off[:, 0], off[:, 1]
                n_sup = cs_sup[b] - cs_sup[a]
                n_ns = cs_ns[b] - cs_ns[a]
                n_sns = cs_sns[b] - cs_sns[a]
                empty = b <= a
                # a token with visible characters is supervised by them; a whitespace-only token (the lone
                # "▁" of a Llama tokenizer before a digit) by the segment it lies in
                is_sup = np.where(empty, sup[np.minimum(a, len(sup) - 1)],
                                  np.where(n_ns > 0, n_sns > 0, n_sup > 0))
                mixed = ~empty & (n_sup > 0) & (n_ns > 0) & (n_sns > 0) & (n_sns != n_ns)
                if mixed.any():
                    j = int(np.flatnonzero(mixed)[0])
                    raise SupervisionError(
                        f"token {self.tokenizer.convert_ids_to_tokens(chunk_ids[j])!r} spans answer and prompt "
                        f"text ({prompt[a[j]:b[j]]!r}); the template/tokenizer pair cannot separate them")
                ids.extend(chunk_ids)
                labels.extend(np.where(is_sup, np.asarray(chunk_ids), IGNORE_INDEX).tolist())
                token_chars.extend(zip(a.tolist(), b.tolist()))
            if k < len(chunks) - 1:
                block = blocks[k]
                spans.append((len(ids), len(ids) + len(block)))
                ids.extend(block)
                labels.extend([IGNORE_INDEX] * len(block))
                token_chars.extend([(-1, -1)] * len(block))

        self._verify(prompt, seg_bounds, labels, token_chars, nonspace)
        return Encoded(ids, labels, spans, prompt)

    @staticmethod
    def _verify(prompt: str, seg_bounds, labels, token_chars, nonspace) -> None:
        if not seg_bounds:
            raise SupervisionError("the rendered conversation has no answer to supervise")
        sup_chars = [tc for tc, lab in zip(token_chars, labels) if lab != IGNORE_INDEX]
        for a, b in seg_bounds:
            if not nonspace[a:b].any():
                continue
            if not any(s < b and e > a for s, e in sup_chars):
                raise SupervisionError(f"the answer {prompt[a:b][:60]!r} got no supervised token")

    def fit(self, encoded: Encoded, max_length: int | None) -> Encoded:
        """Truncate to ``max_length`` — text only; raise :class:`SampleTooLong` when that is impossible."""
        if max_length is None or len(encoded) <= max_length:
            return encoded
        if encoded.image_end > max_length:
            raise SampleTooLong(f"{len(encoded)} tokens; the image block ends at token {encoded.image_end}, "
                                f"past --model_max_length {max_length}")
        if encoded.first_supervised >= max_length:
            raise SampleTooLong(f"{len(encoded)} tokens; every answer starts past --model_max_length {max_length}")
        return Encoded(encoded.input_ids[:max_length], encoded.labels[:max_length], encoded.image_spans,
                       encoded.prompt)


class TokenizerLoadError(ValueError):
    """A tokenizer cannot be read; the message names the directory and what is missing."""


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A fast tokenizer from a directory or hub name (also the tokenizer inside a LLaVA checkpoint).

    A directory with only ``tokenizer.model`` (Vicuna, the original LLaVA checkpoints) is converted by
    transformers, which needs ``sentencepiece``; every failure is one :class:`TokenizerLoadError` sentence.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, use_fast=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, TypeError, KeyError) as e:
        raise TokenizerLoadError(_tokenizer_problem(name_or_path, e)) from None
    if not getattr(tok, "is_fast", False):
        raise TokenizerLoadError(f"{name_or_path}: no fast tokenizer (tokenizer.json) could be built; "
                                 "llavakit needs one")
    return tok


def looks_local(name_or_path: str) -> bool:
    """A path on this machine rather than a hub repository id (``owner/name``)."""
    return (os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~"))
            or name_or_path.count("/") > 1 or "\\" in name_or_path)


def _tokenizer_problem(name_or_path: str, error: BaseException) -> str:
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if not os.path.isdir(name_or_path):
        if looks_local(name_or_path):
            return f"{name_or_path}: no such tokenizer directory"
        return f"{name_or_path}: cannot load its tokenizer from the hub or the local cache ({first_line})"
    files = set(os.listdir(name_or_path))
    if "tokenizer.json" not in files and "tokenizer.model" in files and not _has_sentencepiece():
        return (f"{name_or_path}: its tokenizer is a sentencepiece tokenizer.model (no tokenizer.json); reading it "
                "needs the sentencepiece package: pip install sentencepiece protobuf")
    if not files & {"tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json"}:
        return (f"{name_or_path}: no tokenizer files (tokenizer.json, or tokenizer.model with "
                "tokenizer_config.json)")
    return f"{name_or_path}: cannot load its tokenizer ({first_line})"


def _has_sentencepiece() -> bool:
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        return False
    return True
