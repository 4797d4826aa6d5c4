"""Template renderings against literal expected strings (the original's prompt text)."""

import pytest

from llavakit.data.records import Turn
from llavakit.data.templates import (
    LLAVA_LLAMA_SYSTEM,
    VICUNA_SYSTEM,
    TemplateError,
    get_template,
    place_images,
)


def turns(*texts):
    return [Turn("human" if i % 2 == 0 else "gpt", t) for i, t in enumerate(texts)]


def render(version, ts, n_images=1, tokenizer=None):
    segs = get_template(version, tokenizer).render(place_images(ts, n_images))
    return "".join(s.text for s in segs), "".join(s.text for s in segs if s.supervised)


def test_vicuna_v1_exact_text_and_image_moved_to_front():
    text, sup = render("v1", turns("What is this?\n<image>", "A cat.", "Colour?", "Black."))
    assert text == (f"{VICUNA_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A cat.</s>"
                    "USER: Colour? ASSISTANT: Black.</s>")
    # supervised from where the generation prompt ("... ASSISTANT:") ends: the space is the model's to write
    assert sup == " A cat.</s> Black.</s>"


def test_vicuna_generation_prompt_matches_original():
    t = get_template("vicuna_v1")
    assert t.generation_prompt(turns("<image>\nHi")) == f"{VICUNA_SYSTEM} USER: <image>\nHi ASSISTANT:"


def test_plain_is_image_then_caption_newline():
    text, sup = render("plain", turns("<image>\nDescribe the image.", "A red circle."))
    assert text == "<image>A red circle.\n"
    assert sup == "A red circle.\n"


def test_plain_rejects_multi_turn():
    with pytest.raises(TemplateError, match="exactly one"):
        render("plain", turns("<image>", "a", "b", "c"))


def test_llama_2_exact():
    text, sup = render("llama_2", turns("<image>\nQ1", "A1", "Q2", "A2"))
    assert text == (f"[INST] <<SYS>>\n{LLAVA_LLAMA_SYSTEM}\n<</SYS>>\n\n<image>\nQ1 [/INST] A1 </s>"
                    "<s>[INST] Q2 [/INST] A2 </s>")
    assert sup == " A1 </s> A2 </s>"


def test_mpt_exact():
    text, sup = render("mpt", turns("Q1", "A1"), 0)
    assert text == ("<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. The assistant "
                    "gives helpful and honest answers.<|im_end|><|im_start|>user\nQ1<|im_end|>"
                    "<|im_start|>assistant\nA1<|im_end|>")
    assert sup == "A1<|im_end|>"


def test_qwen2_exact():
    text, sup = render("qwen2", turns("Q1", "A1", "Q2", "A2"), 0)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                    "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
                    "<|im_start|>assistant\nA2<|im_end|>\n")
    assert sup == "A1<|im_end|>A2<|im_end|>"


def test_llama3_exact():
    text, sup = render("llama3", turns("Q1", "A1"), 0)
    assert text == (f"<|start_header_id|>system<|end_header_id|>\n\n{LLAVA_LLAMA_SYSTEM}<|eot_id|>"
                    "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>")
    assert sup == "A1<|eot_id|>"


def test_multiple_images_keep_their_positions():
    ts = turns("First <image> then <image> compare.", "Same.")
    assert place_images(ts, 2)[0].text == "First <image> then <image> compare."


def test_unknown_version_lists_choices():
    with pytest.raises(TemplateError, match="vicuna_v1"):
        get_template("nope")


def test_chat_template_from_tokenizer(tokenizer):
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    text, sup = render("chat_template", turns("<image>\nQ1", "A1", "Q2", "A2"), 1, tokenizer)
    assert text == ("<|im_start|>user\n<image>\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
                    "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n")
    assert sup == "A1<|im_end|>A2<|im_end|>"


def test_chat_template_missing_is_clear_error(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="no chat_template"):
        get_template("chat_template", tokenizer)
