"""One tokenization from training to inference, and labels as the original's, on a Vicuna-style
sentencepiece tokenizer (``tokenizer.model`` only, legacy off) as well as the test suite's BPE tokenizer.

* The ids llavakit's inference builds for a prompt, and the ids plain transformers builds
  (``AutoProcessor`` + the saved chat template), are the ids training built for the same conversation up to
  the answer — for every template, image first, image last, several images, multi-turn, text-only.
* The labels of ``plain`` and ``vicuna_v1`` are the original's, computed here by the original's own rule
  (per-round token counts, not character offsets).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llavakit import IGNORE_INDEX
from llavakit.data.records import Record, Turn
from llavakit.data.templates import VICUNA_SYSTEM, get_template, place_images
from llavakit.data.tokenize import ConversationEncoder

CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
N = 4  # image tokens: 28 px / patch 14

#: name → (turns, number of images); answers start with digits, capitals, punctuation and non-Latin text
CONVERSATIONS = {
    "image_first": (["<image>\nHow many shapes are there?", "3 shapes."], 1),
    "image_last": (["What colour is the circle?\n<image>", "Red, like a cherry."], 1),
    "multi_turn": (["<image>\nHow many shapes are there?", "There are 3.", "Is there a square?",
                    "(yes) one square.", "And the star?", "日本 star at the top."], 1),
    "two_images": (["Compare <image> and <image>", "\"The first\" is red."], 2),
    "adjacent_images": (["<image><image>\nWhich is larger?", "2nd."], 2),
    "image_ends_question": (["Which is larger, <image> or <image>", "- The second."], 2),
    "text_only": (["Tell me a story about a cat.", "Once upon a time.", "Another?", "42 cats."], 0),
}
TEMPLATES = ["vicuna_v1", "llama_2", "mpt", "qwen2", "llama3"]


def record(turns: list[str], n_images: int) -> Record:
    return Record("r", [f"{i}.jpg" for i in range(n_images)],
                  [Turn("human" if i % 2 == 0 else "gpt", t) for i, t in enumerate(turns)])


@pytest.fixture(scope="module", params=["sentencepiece", "bpe"])
def tok(request, hub, tokenizer_dir):
    from transformers import AutoTokenizer

    from llavakit.model.build import prepare_tokenizer

    path = hub["vicuna"]["dir"] if request.param == "sentencepiece" else tokenizer_dir
    t = AutoTokenizer.from_pretrained(path)
    if request.param == "sentencepiece":  # Vicuna has none of the chat formats' tokens: add them
        t.add_special_tokens({"extra_special_tokens": CHAT_SPECIALS})
    prepare_tokenizer(t)
    return t


@pytest.fixture(scope="module")
def tiny_model(tok):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vcfg = CLIPVisionConfig(image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32)
    tcfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=32)
    return LlavaForConditionalGeneration(LlavaConfig(text_config=tcfg, vision_config=vcfg,
                                                     image_token_index=tok.convert_tokens_to_ids("<image>"),
                                                     image_seq_length=N)).eval()


def predictor_for(tok, model, version):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from llavakit.infer.generate import Predictor
    from llavakit.model.processing import build_processor, chat_template_for

    ip = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = build_processor(tok, ip, model.config.vision_config, "default",
                                chat_template_for(get_template(version, tok), tok))
    return Predictor(model, processor, device="cpu")


def prompt_and_expected(tok, version, turns, n_images):
    """Messages up to the last question, and training's ids for the whole conversation cut where the last
    answer's supervision starts."""
    enc = ConversationEncoder(tok, get_template(version, tok), N)
    e = enc.encode(record(turns, n_images))
    starts = [i for i in range(len(e.labels)) if e.labels[i] != IGNORE_INDEX and
              (i == 0 or e.labels[i - 1] == IGNORE_INDEX)]
    placed = place_images(record(turns, n_images).turns, n_images)
    messages = [{"role": "user" if t.role == "human" else "assistant", "content": t.text} for t in placed[:-1]]
    return messages, e.input_ids[:starts[-1]]


def images(n):
    return [Image.new("RGB", (40 + 8 * i, 30), (200, 30 * i, 40)) for i in range(n)]


@pytest.mark.parametrize("version", TEMPLATES)
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_inference_ids_are_training_ids(tok, tiny_model, version, name):
    turns, n_images = CONVERSATIONS[name]
    messages, expected = prompt_and_expected(tok, version, turns, n_images)
    pred = predictor_for(tok, tiny_model, version)

    # llavakit's inference (predict, chat, serve, eval run, the demo all build ids here)
    ours = pred._inputs([pred.render(messages)], images(n_images))["input_ids"][0].tolist()
    assert ours == expected

    # plain transformers: the saved chat template rendered and tokenized in one piece by the processor
    text = pred.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    plain = pred.processor(text=[text], images=images(n_images) or None)["input_ids"][0]
    assert list(plain) == expected


@pytest.mark.parametrize("version", TEMPLATES)
def test_image_parts_render_as_training_places_the_image(tok, tiny_model, version):
    """``{"type": "image"}`` parts (how chat, serve and plain transformers users pass images)."""
    from llavakit.infer.generate import user_message

    messages, expected = prompt_and_expected(tok, version, ["<image>\nWhat colour is the circle?", "3."], 1)
    parts = [user_message("What colour is the circle?", 1)]
    pred = predictor_for(tok, tiny_model, version)
    assert pred._inputs([pred.render(parts)], images(1))["input_ids"][0].tolist() == expected
    text = pred.processor.apply_chat_template(parts, add_generation_prompt=True, tokenize=False)
    assert list(pred.processor(text=[text], images=images(1))["input_ids"][0]) == expected


def test_plain_template_prompt_is_bos_and_the_image(tok, tiny_model):
    messages, expected = prompt_and_expected(tok, "plain", ["<image>\nDescribe.", "3 red circles."], 1)
    pred = predictor_for(tok, tiny_model, "plain")
    assert pred._inputs([pred.render(messages)], images(1))["input_ids"][0].tolist() == expected
    assert expected == [tok.bos_token_id] + [tok.convert_tokens_to_ids("<image>")] * N


def test_sentencepiece_tokenizer_needs_a_space_after_the_image(hub):
    """What the saved chat template writes, and why: chunk-wise, Vicuna's tokenizer starts the text after an
    image with ▁; in one piece it does not."""
    from transformers import AutoTokenizer

    from llavakit.data.tokenize import ensure_special_token, image_text_separator

    t = AutoTokenizer.from_pretrained(hub["vicuna"]["dir"])
    ensure_special_token(t)
    after = t("\nWhat", add_special_tokens=False)["input_ids"]
    assert t.convert_ids_to_tokens(after)[:2] == ["▁", "<0x0A>"]
    one_piece = t("<image>\nWhat", add_special_tokens=False)["input_ids"][1:]
    assert one_piece == after[1:]  # one token fewer: the reason for the separator
    sep = image_text_separator(t)
    assert (sep.text, sep.before_space) == (" ", "")


# ---- labels as the original's ---------------------------------------------------------------------
def original_tokens(tok, text: str) -> list[int]:
    """The original's tokenizer_image_token: chunks around <image> tokenized alone, BOS once, one -200."""
    chunks = [tok(c)["input_ids"] for c in text.split("<image>")]
    ids = [tok.bos_token_id]
    for k, c in enumerate(chunks):
        if k:
            ids.append(-200)
        ids.extend(c[1:] if c and c[0] == tok.bos_token_id else c)
    return ids


def original_vicuna_labels(tok, turns: list[str]) -> tuple[list[int], list[int]]:
    """The original's v1 preprocessing rule, from its description: the conversation is split into rounds at
    "</s>"; each round masks the tokens of "...ASSISTANT: " less two (BOS and the trailing "▁"), then moves on
    by the round's token count; after the first round both counts drop by one when the tokenizer is not
    legacy (the round no longer starts with BOS ▁ after "</s>"). Returns (ids, labels) with one -200."""
    conversation = VICUNA_SYSTEM + " "
    for i in range(0, len(turns), 2):
        conversation += f"USER: {turns[i]} ASSISTANT: {turns[i + 1]}</s>"
    ids = original_tokens(tok, conversation)
    labels = list(ids)
    cur = 1
    labels[0] = IGNORE_INDEX
    for i, rou in enumerate(conversation.split("</s>")):
        if rou == "":
            break
        before, _, _ = rou.partition("ASSISTANT: ")
        round_len = len(original_tokens(tok, rou))
        instruction_len = len(original_tokens(tok, before + "ASSISTANT: ")) - 2
        if i != 0:  # Vicuna's tokenizer is not legacy
            round_len -= 1
            instruction_len -= 1
        labels[cur:cur + instruction_len] = [IGNORE_INDEX] * instruction_len
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * (len(labels) - cur)
    assert cur == len(ids), "the rule's token counts do not add up (the original warns of a mismatch)"
    return ids, labels


def expand(ids: list[int], labels: list[int], image_id: int) -> tuple[list[int], list[int]]:
    out_ids, out_labels = [], []
    for t, lab in zip(ids, labels):
        if t == -200:
            out_ids += [image_id] * N
            out_labels += [IGNORE_INDEX] * N
        else:
            out_ids.append(t)
            out_labels.append(lab)
    return out_ids, out_labels


VICUNA_CASES = [
    ["<image>\nHow many shapes are there?", "3"],
    ["<image>\nHow many shapes are there?", "There are 3 shapes."],
    ["<image>\nWhat colour is it?", "Red.", "How many?", "12 of them.", "Where?", "(at the top)"],
    ["<image>\nName it in Japanese.", "日本", "Say it again.", "¿Qué? 日本."],
    ["<image>\nWhat is it?", "\"A star\" at the top.", "Yes?", "- yes"],
    ["Tell me a story about a cat.", "Once upon a time.", "Count to three.", "1 2 3"],
]


@pytest.fixture(scope="module")
def vicuna_tok(hub):
    from transformers import AutoTokenizer

    from llavakit.model.build import prepare_tokenizer

    t = AutoTokenizer.from_pretrained(hub["vicuna"]["dir"])
    prepare_tokenizer(t)
    return t


@pytest.mark.parametrize("turns", VICUNA_CASES, ids=[c[1][:8] for c in VICUNA_CASES])
def test_vicuna_v1_labels_are_the_originals(vicuna_tok, turns):
    n_images = sum(t.count("<image>") for t in turns)
    enc = ConversationEncoder(vicuna_tok, get_template("vicuna_v1"), N)
    e = enc.encode(record(turns, n_images))
    ids, labels = expand(*original_vicuna_labels(vicuna_tok, turns), enc.image_token_id)
    assert e.input_ids == ids
    assert e.labels == labels


def test_a_lone_space_token_before_a_digit_is_supervised(vicuna_tok):
    enc = ConversationEncoder(vicuna_tok, get_template("vicuna_v1"), N)
    e = enc.encode(record(["<image>\nHow many?", "3"], 1))
    sup = vicuna_tok.convert_ids_to_tokens([t for t, lab in zip(e.input_ids, e.labels) if lab != IGNORE_INDEX])
    assert sup == ["▁", "3", "</s>"]


@pytest.mark.parametrize("caption", ["A small red circle.", "3 red circles.", "日本 circle.", "(red) circle"])
def test_plain_labels_are_the_originals(vicuna_tok, caption):
    enc = ConversationEncoder(vicuna_tok, get_template("plain"), N)
    e = enc.encode(record(["<image>\nDescribe the image briefly.", caption], 1))
    # the original: "<image>" + caption + "\n", the first two tokens (BOS, image) masked
    ids = original_tokens(vicuna_tok, "<image>" + caption + "\n")
    labels = [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]
    assert (e.input_ids, e.labels) == expand(ids, labels, enc.image_token_id)


def test_generation_starts_where_supervision_starts(vicuna_tok):
    """Greedy decoding after the prompt must produce exactly the supervised tokens: the prompt ends where the
    labels begin, for every round."""
    enc = ConversationEncoder(vicuna_tok, get_template("vicuna_v1"), N)
    turns = VICUNA_CASES[2]
    e = enc.encode(record(turns, 1))
    for k in range(1, len(turns), 2):
        prompt = get_template("vicuna_v1").generation_prompt(place_images(record(turns[:k], 1).turns, 1))
        ids = enc.encode_prompt(prompt)
        assert e.input_ids[:len(ids)] == ids
        assert e.labels[len(ids) - 1] == IGNORE_INDEX and e.labels[len(ids)] != IGNORE_INDEX
        assert torch.tensor(e.labels[:len(ids)]).eq(IGNORE_INDEX).sum() > 0


CHATML_JINJA = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}{% if m['content'] is string %}"
                "{{ m['content'] }}{% else %}{% for p in m['content'] %}{% if p['type'] == 'image' %}"
                "{{ '<image>\\n' }}{% endif %}{% endfor %}{% for p in m['content'] %}{% if p['type'] == 'text' %}"
                "{{ p['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.mark.parametrize("name", ["image_first", "multi_turn", "two_images", "text_only"])
def test_the_tokenizers_own_chat_template_through_llavakit(tok, tiny_model, name):
    """``--version chat_template``: the tokenizer's own template, saved wrapped with the separator: llavakit's
    inference and plain transformers both build training's ids."""
    eos = tok.eos_token
    tok.chat_template, tok.eos_token = CHATML_JINJA, "<|im_end|>"  # the template's end of turn
    try:
        turns, n_images = CONVERSATIONS[name]
        messages, expected = prompt_and_expected(tok, "chat_template", turns, n_images)
        pred = predictor_for(tok, tiny_model, "chat_template")
        assert pred._inputs([pred.render(messages)], images(n_images))["input_ids"][0].tolist() == expected
        text = pred.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert list(pred.processor(text=[text], images=images(n_images) or None)["input_ids"][0]) == expected
    finally:
        tok.chat_template, tok.eos_token = None, eos
