"""Token ids and labels: the original's construction, supervision exactly the answers + end token."""

import pytest

from llavakit import IGNORE_INDEX
from llavakit.data.records import Record, Turn
from llavakit.data.templates import get_template
from llavakit.data.tokenize import ConversationEncoder, SampleTooLong, SupervisionError

N = 6


def rec(*texts, images=()):
    return Record("r", list(images), [Turn("human" if i % 2 == 0 else "gpt", t) for i, t in enumerate(texts)])


def supervised_text(tok, enc):
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX])


def supervised_runs(enc):
    runs, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


def original_ids(tok, prompt, image_block):
    """The original LLaVA's tokenizer_image_token, with -200 replaced by the image block."""
    chunks = [tok(c).input_ids for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, c in enumerate(chunks):
        ids.extend(c[offset:])
        if k < len(chunks) - 1:
            ids.extend(image_block)
    return ids


@pytest.mark.parametrize("version", ["v1", "plain", "llama_2", "mpt", "qwen2", "llama3"])
def test_ids_equal_original_construction(tokenizer, version):
    enc = ConversationEncoder(tokenizer, get_template(version), N)
    r = rec("<image>\nWhat colour is the circle?", "The circle is red.", images=["a.jpg"])
    e = enc.encode(r)
    assert e.input_ids == original_ids(tokenizer, e.prompt, [enc.image_token_id] * N)
    assert e.input_ids.count(tokenizer.bos_token_id) == 1 and e.input_ids[0] == tokenizer.bos_token_id
    assert e.input_ids.count(enc.image_token_id) == N


def test_vicuna_multi_turn_labels_are_answers_plus_eos(tokenizer):
    enc = ConversationEncoder(tokenizer, get_template("v1"), N)
    e = enc.encode(rec("How many shapes are there?\n<image>", "There are three shapes.", "Is there a square?",
                       "Yes.", images=["a.jpg"]))
    runs = supervised_runs(e)
    assert [tokenizer.decode(r) for r in runs] == ["There are three shapes.</s>", "Yes.</s>"]
    assert all(r[-1] == tokenizer.eos_token_id for r in runs)
    s, t = e.image_spans[0]
    assert e.input_ids[s:t] == [enc.image_token_id] * N
    assert all(lab == IGNORE_INDEX for lab in e.labels[s:t])


def test_plain_labels_caption_and_newline_no_eos(tokenizer):
    enc = ConversationEncoder(tokenizer, get_template("plain"), N)
    e = enc.encode(rec("<image>\nDescribe the image briefly.", "A small red circle.", images=["a.jpg"]))
    assert e.input_ids[:1 + N] == [tokenizer.bos_token_id] + [enc.image_token_id] * N
    assert supervised_text(tokenizer, e) == "A small red circle.\n"
    assert tokenizer.eos_token_id not in e.input_ids


def test_text_only_record_has_no_image_tokens(tokenizer):
    enc = ConversationEncoder(tokenizer, get_template("v1"), N)
    e = enc.encode(rec("Tell me a story about a cat.", "Once upon a time a cat lived in a house."))
    assert enc.image_token_id not in e.input_ids and e.image_spans == []
    assert supervised_text(tokenizer, e) == "Once upon a time a cat lived in a house.</s>"


def test_image_at_end_is_moved_to_front(tokenizer):
    enc = ConversationEncoder(tokenizer, get_template("v1"), N)
    e = enc.encode(rec("Where is the star?\n<image>", "At the top.", images=["a.jpg"]))
    assert "USER: <image>\nWhere is the star? ASSISTANT:" in e.prompt


def test_several_images_each_get_a_block(tokenizer):
    enc = ConversationEncoder(tokenizer, get_template("v1"), N)
    e = enc.encode(rec("Compare <image> with <image> please.", "The first is red.", images=["a.jpg", "b.jpg"]))
    assert len(e.image_spans) == 2 and e.input_ids.count(enc.image_token_id) == 2 * N
    assert supervised_text(tokenizer, e) == "The first is red.</s>"


def test_im_start_end_wraps_each_block(tokenizer):
    enc = ConversationEncoder(tokenizer, get_template("v1"), N, mm_use_im_start_end=True)
    e = enc.encode(rec("<image>\nHi", "Yes.", images=["a.jpg"]))
    s, t = e.image_spans[0]
    assert tokenizer.convert_ids_to_tokens([e.input_ids[s], e.input_ids[t - 1]]) == ["<im_start>", "<im_end>"]


def test_truncation_cuts_text_never_the_image(tokenizer):
    enc = ConversationEncoder(tokenizer, get_template("v1"), N)
    e = enc.encode(rec("<image>\nWhat colour is the circle?", "The circle is red. " * 10, images=["a.jpg"]))
    cut = enc.fit(e, e.first_supervised + 3)
    assert len(cut) == e.first_supervised + 3
    assert cut.input_ids.count(enc.image_token_id) == N
    with pytest.raises(SampleTooLong, match="image block"):
        enc.fit(e, e.image_spans[0][0] + 2)
    with pytest.raises(SampleTooLong, match="every answer"):
        enc.fit(e, e.first_supervised)
    assert enc.fit(e, None) is e


def test_stop_token_must_be_one_token(tokenizer):
    from llavakit.data.templates import RoleTemplate

    t = RoleTemplate(name="x", assistant_suffix="<|end|>", stop_str="<|end|>")
    with pytest.raises(ValueError, match="does not know"):
        ConversationEncoder(tokenizer, t, N)


def test_answer_merged_with_prompt_text_is_an_error_not_a_silent_mask(tokenizer):
    from llavakit.data.templates import RoleTemplate

    # no separator between the question and the answer: the tokenizer merges them into one token
    t = RoleTemplate(name="glued", user_prefix="", assistant_prefix="", assistant_suffix="</s>", stop_str="</s>")
    enc = ConversationEncoder(tokenizer, t, N)
    with pytest.raises(SupervisionError):
        enc.encode(rec("the cir", "cle is red."))


def test_slow_tokenizer_is_rejected():
    class Slow:
        is_fast = False

    with pytest.raises(ValueError, match="fast"):
        ConversationEncoder(Slow(), get_template("v1"), N)
