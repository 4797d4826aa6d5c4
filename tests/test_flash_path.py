"""Packing under FlashAttention, on the CPU: transformers' FlashAttention path with a reference kernel
(``flash_reference.py``). Packed batches hand the kernel their sequence boundaries, so samples never attend
to each other — in one row or several, with the dummy image block of a text-only micro-batch — and no
layer infers the boundaries from the positions."""

import pytest
import torch

from llavakit.data.collate import LlavaCollator, flash_varlen_kwargs, pack_rows
from llavakit.train.entry import run

from . import flash_reference
from .conftest import stage2_flags, training_logs


@pytest.fixture(scope="module")
def flash():
    return flash_reference.install()


@pytest.fixture
def no_position_inference(monkeypatch):
    """Fail if transformers has to work out the sequence boundaries from position_ids (a host sync per layer)."""
    import transformers.modeling_flash_attention_utils as fa

    def refuse(*a, **k):
        raise AssertionError("FlashAttention inferred the sequence boundaries from position_ids")

    monkeypatch.setattr(fa, "prepare_fa_kwargs_from_position_ids", refuse)
    flash_reference.calls.update(varlen=0, dense=0)


@pytest.fixture(scope="module")
def models(backbones, train_data, flash):
    from llavakit.data.dataset import LlavaDataset, build_sample_index
    from llavakit.data.images import ImageTransform
    from llavakit.data.records import load_records
    from llavakit.data.templates import get_template
    from llavakit.data.tokenize import ConversationEncoder
    from llavakit.model.build import assemble

    ref = assemble(backbones["llm"], backbones["clip"], attn_implementation="sdpa")
    fl = assemble(backbones["llm"], backbones["clip"], attn_implementation=flash)
    fl.model.load_state_dict(ref.model.state_dict())  # the same weights (the projector is new in each)
    store, valid, _ = load_records(train_data["instruct"])
    enc = ConversationEncoder(ref.tokenizer, get_template("v1"), ref.num_image_tokens)
    index = build_sample_index(store, valid, enc, 512)
    transform = ImageTransform.from_processor(ref.image_processor, "pad")
    ds = LlavaDataset(store, index, enc, transform, train_data["images"], 512)
    samples = [ds[i] for i in (0, 3, 1, 2, 7)]  # images and text-only (record 3 is text-only), mixed lengths
    for m in (ref.model, fl.model):
        m.eval().config.use_cache = False
    return ref.model, fl.model, samples, transform, ref.tokenizer.pad_token_id


def test_only_the_language_model_uses_flash_attention(models, flash):
    _, fl, *_ = models
    assert fl.config.text_config._attn_implementation == flash
    assert fl.model.vision_tower.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("capacity", [None, 120])
def test_flash_packed_logits_equal_padded(models, capacity, no_position_inference):
    ref, fl, samples, transform, pad = models
    padded = LlavaCollator(pad, transform)(samples)
    packed = LlavaCollator(pad, transform, packing=True, packing_max_length=capacity)(samples)
    rows = pack_rows([len(s["input_ids"]) for s in samples], capacity)
    assert len(packed["seq_lengths"]) == len(rows) == (1 if capacity is None else packed["input_ids"].shape[0])
    for batch in (padded, packed):
        for k in ("num_real_tokens", "num_samples"):
            batch.pop(k)
    varlen = flash_varlen_kwargs(packed.pop("seq_lengths"), "cpu")
    with torch.no_grad():
        a = ref(**padded)
        b = fl(**packed, **varlen)
    assert flash_reference.calls["varlen"] > 0 and flash_reference.calls["dense"] == 0
    assert abs(float(a.loss) - float(b.loss)) < 1e-5
    for r, row in enumerate(rows):
        pos = 0
        for i in row:
            n = len(samples[i]["input_ids"])
            assert torch.allclose(a.logits[i, :n], b.logits[r, pos:pos + n], atol=1e-4), (i, r)
            pos += n


@pytest.mark.parametrize("rows_of", [None, 200])
def test_flash_packed_training_matches_padded(backbones, train_data, stage1, tmp_path, flash, rows_of,
                                              no_position_inference):
    """Stage 2, modality-grouped batches of 2 (so some micro-batches are text-only and carry the dummy image
    block): packed under FlashAttention, in one row or rows of at most 200 tokens, gives the padded losses."""
    common = dict(max_steps=6, logging_steps=1, group_by_modality_length="True", per_device_train_batch_size=2,
                  save_strategy="no")
    projector = stage1["out"] / "mm_projector.bin"
    run(stage2_flags(backbones, train_data, tmp_path / "padded", projector, attn_implementation="sdpa",
                     model_max_length=rows_of or 2048, **common))
    extra = {"packing_max_length": rows_of, "model_max_length": rows_of} if rows_of else {}
    run(stage2_flags(backbones, train_data, tmp_path / "packed", projector, attn_implementation=flash,
                     packing="True", **extra, **common))
    assert flash_reference.calls["varlen"] > 0 and flash_reference.calls["dense"] == 0
    a, b = training_logs(tmp_path / "padded"), training_logs(tmp_path / "packed")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)
