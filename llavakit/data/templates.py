"""Conversation templates: one abstraction, many instances, selected by ``--version`` as in the original.

A template renders a conversation into :class:`Segment` s — pieces of text, each marked supervised or
not. The prompt is their concatenation; labels come from the characters of the supervised segments (see
``tokenize.py``), so they cannot drift with tokenizer quirks. ``<image>`` stays in the text as the
placeholder where each image block goes.

Instances: ``plain`` (stage 1), ``vicuna_v1`` / ``v1`` (stage 2 default), ``llama_2``, ``mpt`` (ChatML as
the original writes it), ``qwen2`` (ChatML), ``llama3``, and ``chat_template`` (the tokenizer's own Jinja
template).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from llavakit import IMAGE_PLACEHOLDER
from llavakit.data.records import GPT, HUMAN, Turn

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAVA_LLAMA_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
MPT_SYSTEM = ("A conversation between a user and an LLM-based AI assistant. "
              "The assistant gives helpful and honest answers.")


class TemplateError(ValueError):
    """A conversation cannot be rendered with this template."""


@dataclass(frozen=True)
class Segment:
    text: str
    supervised: bool = False


def place_images(turns: list[Turn], num_images: int) -> list[Turn]:
    """The original's placement: with one image, ``<image>`` moves to the front of its turn, then ``\\n``.

    Several images keep their positions (their order in the text is the order of the image list).
    """
    if num_images != 1:
        return turns
    out = []
    for t in turns:
        if IMAGE_PLACEHOLDER in t.text:
            rest = t.text.replace(IMAGE_PLACEHOLDER, "").strip()
            out.append(Turn(t.role, (IMAGE_PLACEHOLDER + "\n" + rest).strip()))
        else:
            out.append(t)
    return out


def _pairs(turns: list[Turn]) -> list[tuple[str, str | None]]:
    pairs: list[tuple[str, str | None]] = []
    for k in range(0, len(turns), 2):
        if turns[k].role != HUMAN or (k + 1 < len(turns) and turns[k + 1].role != GPT):
            raise TemplateError("turns must alternate human, gpt")
        pairs.append((turns[k].text, turns[k + 1].text if k + 1 < len(turns) else None))
    return pairs


class Template:
    """Base: render a conversation to segments; render a generation prompt."""

    name: str = ""
    #: the string that ends an assistant turn (stop string for generation), if any
    stop_str: str | None = None

    def render(self, turns: list[Turn]) -> list[Segment]:
        raise NotImplementedError

    def generation_prompt(self, turns: list[Turn]) -> str:
        """The prompt for generating the next answer; ``turns`` ends with a human turn."""
        raise NotImplementedError

    def to_jinja(self) -> str:
        """A Jinja chat template that renders as this template does (for the saved tokenizer/processor).

        Message content may be a string (with ``<image>`` inside) or a list of ``{"type": "image"}`` /
        ``{"type": "text", "text": ...}`` parts; image parts go first, each as ``<image>\n``.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class PlainTemplate(Template):
    """Stage 1: the human turn becomes just the image(s); supervised = caption + ``\\n`` (no EOS)."""

    name: str = "plain"
    sep: str = "\n"
    stop_str: str | None = None

    def render(self, turns: list[Turn]) -> list[Segment]:
        if len(turns) != 2:
            raise TemplateError(f"the 'plain' template takes exactly one human/gpt pair, got {len(turns)} turns")
        n = turns[0].text.count(IMAGE_PLACEHOLDER)
        return [Segment(IMAGE_PLACEHOLDER * n), Segment(turns[1].text + self.sep, True)]

    def generation_prompt(self, turns: list[Turn]) -> str:
        return IMAGE_PLACEHOLDER * turns[-1].text.count(IMAGE_PLACEHOLDER)

    def to_jinja(self) -> str:
        return ("{% for message in messages %}{% if message['role'] == 'user' %}"
                "{% if message['content'] is string %}{{ '<image>' * (message['content'].count('<image>')) }}"
                "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>' }}"
                "{% endif %}{% endfor %}{% endif %}"
                "{% elif message['role'] == 'assistant' %}" + _jinja_content() + _lit(self.sep) +
                "{% endif %}{% endfor %}")


@dataclass(frozen=True)
class RoleTemplate(Template):
    """A chat format described by the strings around each turn.

    ``head + [first_]user_prefix + q + user_suffix + assistant_prefix + (a + assistant_suffix)* + turn_sep``
    for each pair, where ``(...)*`` is supervised. ``{system}`` in ``head`` / ``first_user_prefix`` is
    replaced by the system message.
    """

    name: str = ""
    system: str = ""
    head: str = ""
    first_user_prefix: str | None = None
    user_prefix: str = ""
    user_suffix: str = ""
    assistant_prefix: str = ""
    assistant_suffix: str = ""
    turn_sep: str = ""
    generation_prefix: str | None = None
    stop_str: str | None = None

    def _user(self, k: int, q: str) -> str:
        prefix = self.first_user_prefix if (k == 0 and self.first_user_prefix is not None) else self.user_prefix
        return prefix.replace("{system}", self.system) + q + self.user_suffix

    @property
    def _generation_prefix(self) -> str:
        return self.generation_prefix if self.generation_prefix is not None else self.assistant_prefix

    def render(self, turns: list[Turn]) -> list[Segment]:
        # the prompt part of each turn ends where a generation prompt ends: whatever the model has to produce
        # after it (vicuna_v1's space after "ASSISTANT:", a lone "▁" before a digit) is supervised
        gen = self._generation_prefix
        if not self.assistant_prefix.startswith(gen):
            raise TemplateError(f"template {self.name!r}: the generation prefix {gen!r} must begin the assistant "
                                f"prefix {self.assistant_prefix!r}")
        segs = [Segment(self.head.replace("{system}", self.system))] if self.head else []
        for k, (q, a) in enumerate(_pairs(turns)):
            if a is None:
                raise TemplateError("the conversation ends with a human turn; training needs an answer")
            segs.append(Segment(self._user(k, q) + gen))
            segs.append(Segment(self.assistant_prefix[len(gen):] + a + self.assistant_suffix, True))
            if self.turn_sep:
                segs.append(Segment(self.turn_sep))
        return segs

    def generation_prompt(self, turns: list[Turn]) -> str:
        pairs = _pairs(turns)
        if pairs[-1][1] is not None:
            raise TemplateError("a generation prompt needs a conversation that ends with a human turn")
        out = self.head.replace("{system}", self.system)
        for k, (q, a) in enumerate(pairs):
            out += self._user(k, q)
            if a is None:
                out += self._generation_prefix
            else:
                out += self.assistant_prefix + a + self.assistant_suffix + self.turn_sep
        return out

    def to_jinja(self) -> str:
        gen = self._generation_prefix
        user = _lit(self.user_prefix)
        if self.first_user_prefix is not None:
            user = ("{% if loop.index0 == first_user %}" + _with_system(self.first_user_prefix) + "{% else %}"
                    + user + "{% endif %}")
        return (
            "{% set system = " + _py(self.system) + " %}{% set first_user = 0 %}"
            "{% if messages and messages[0]['role'] == 'system' %}"
            "{% set system = messages[0]['content'] if messages[0]['content'] is string "
            "else messages[0]['content'][0]['text'] %}{% set first_user = 1 %}{% endif %}"
            + _with_system(self.head) +
            "{% for message in messages %}{% if message['role'] == 'user' %}" + user + _jinja_content()
            + _lit(self.user_suffix) +
            "{% elif message['role'] == 'assistant' %}" + _lit(self.assistant_prefix) + _jinja_content()
            + _lit(self.assistant_suffix) + _lit(self.turn_sep) +
            "{% endif %}{% endfor %}{% if add_generation_prompt %}" + _lit(gen) + "{% endif %}"
        )


def _py(s: str) -> str:
    return json.dumps(s)


def _lit(s: str) -> str:
    return "{{ " + _py(s) + " }}" if s else ""


def _with_system(s: str) -> str:
    """A literal that may hold ``{system}``, as Jinja: the placeholder becomes the ``system`` variable."""
    before, found, after = s.partition("{system}")
    return _lit(before) + ("{{ system }}" if found else "") + _lit(after)


def _jinja_content() -> str:
    """Message content as text: a string as is; parts → each image as ``<image>\n``, then the text."""
    return ("{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}"
            "{% endfor %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
            "{% endif %}{% endfor %}{% endif %}")


VICUNA_V1 = RoleTemplate(
    name="vicuna_v1", system=VICUNA_SYSTEM, head="{system} ", user_prefix="USER: ", user_suffix=" ",
    assistant_prefix="ASSISTANT: ", assistant_suffix="</s>", generation_prefix="ASSISTANT:", stop_str="</s>",
)
LLAMA_2 = RoleTemplate(
    name="llama_2", system=LLAVA_LLAMA_SYSTEM, first_user_prefix="[INST] <<SYS>>\n{system}\n<</SYS>>\n\n",
    user_prefix="<s>[INST] ", user_suffix=" [/INST]", assistant_prefix=" ", assistant_suffix=" </s>",
    generation_prefix="", stop_str="</s>",
)
MPT = RoleTemplate(
    name="mpt", system=MPT_SYSTEM, head="<|im_start|>system\n{system}<|im_end|>",
    user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>", assistant_prefix="<|im_start|>assistant\n",
    assistant_suffix="<|im_end|>", stop_str="<|im_end|>",
)
QWEN2 = RoleTemplate(
    name="qwen2", system="You are a helpful assistant.", head="<|im_start|>system\n{system}<|im_end|>\n",
    user_prefix="<|im_start|>user\n", user_suffix="<|im_end|>\n", assistant_prefix="<|im_start|>assistant\n",
    assistant_suffix="<|im_end|>", turn_sep="\n", stop_str="<|im_end|>",
)
LLAMA3 = RoleTemplate(
    name="llama3", system=LLAVA_LLAMA_SYSTEM,
    head="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user_prefix="<|start_header_id|>user<|end_header_id|>\n\n", user_suffix="<|eot_id|>",
    assistant_prefix="<|start_header_id|>assistant<|end_header_id|>\n\n", assistant_suffix="<|eot_id|>",
    stop_str="<|eot_id|>",
)


class HFChatTemplate(Template):
    """The tokenizer's own Jinja chat template.

    Supervised spans are found by rendering growing prefixes of the conversation: the text a template adds
    for an assistant message (after the generation prompt) is that answer. A template whose renderings are
    not prefixes of each other is rejected rather than guessed at.
    """

    name = "chat_template"

    def __init__(self, tokenizer):
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("--version chat_template: the tokenizer has no chat_template; "
                                "choose another --version (e.g. vicuna_v1, qwen2, llama3)")
        self.tokenizer = tokenizer
        self.stop_str = tokenizer.eos_token
        self._bos = tokenizer.bos_token or None

    def _apply(self, turns: list[Turn], add_generation_prompt: bool) -> str:
        msgs = [{"role": "user" if t.role == HUMAN else "assistant", "content": t.text} for t in turns]
        text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt)
        # the tokenizer adds BOS itself when encoding; do not let the template add a second one
        if self._bos and text.startswith(self._bos):
            text = text[len(self._bos):]
        return text

    def render(self, turns: list[Turn]) -> list[Segment]:
        _pairs(turns)
        segs: list[Segment] = []
        done = ""
        for k in range(1, len(turns), 2):
            prompt = self._apply(turns[:k], add_generation_prompt=True)
            full = self._apply(turns[: k + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise TemplateError("the tokenizer's chat_template does not render conversations as growing "
                                    "prefixes, so answers cannot be located; use a named --version")
            answer = full[len(prompt):]
            body = answer.rstrip()
            segs += [Segment(prompt[len(done):]), Segment(body, True)]
            if answer[len(body):]:
                segs.append(Segment(answer[len(body):]))
            done = full
        return [s for s in segs if s.text]

    def generation_prompt(self, turns: list[Turn]) -> str:
        return self._apply(turns, add_generation_prompt=True)

    def to_jinja(self) -> str:
        return self.tokenizer.chat_template


TEMPLATES: dict[str, Template] = {
    "plain": PlainTemplate(),
    "vicuna_v1": VICUNA_V1,
    "llama_2": LLAMA_2,
    "mpt": MPT,
    "qwen2": QWEN2,
    "chatml": QWEN2,
    "llama3": LLAMA3,
}
ALIASES = {"v1": "vicuna_v1", "llava_v1": "vicuna_v1", "vicuna": "vicuna_v1", "llava_llama_2": "llama_2",
           "v0_plain": "plain", "llava_llama_3": "llama3", "qwen_2": "qwen2"}
TEMPLATE_NAMES = sorted([*TEMPLATES, *ALIASES, "chat_template"])


def get_template(version: str, tokenizer=None) -> Template:
    """The template named by ``--version`` (the original's names are accepted)."""
    name = ALIASES.get(version, version)
    if name == "chat_template":
        if tokenizer is None:
            raise TemplateError("--version chat_template needs a tokenizer")
        return HFChatTemplate(tokenizer)
    if name not in TEMPLATES:
        raise TemplateError(f"unknown --version {version!r}; choose one of: {', '.join(TEMPLATE_NAMES)}")
    return TEMPLATES[name]
