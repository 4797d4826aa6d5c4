"""Packing under FlashAttention, on the CPU, for both ways llavakit runs it: transformers' FlashAttention
path with a reference kernel standing in for flash-attn's (``flash_reference.py``), and llavakit's
``torch_varlen`` (PyTorch's varlen kernel on GPUs, one SDPA call per sample here). Packed batches hand the
kernel their sequence boundaries, so samples never attend to each other — in one row or several, with the
dummy image block of a text-only micro-batch — and no layer infers the boundaries from the positions."""

import pytest
import torch

from llavakit.data.collate import LlavaCollator, pack_rows, varlen_kwargs
from llavakit.train.entry import run

from . import flash_reference
from .conftest import instruct_samples, stage2_config, stage2_flags, training_logs


@pytest.fixture(scope="module", params=["flash_reference", "torch_varlen"])
def flash(request):
    if request.param == "torch_varlen":
        from llavakit.model.attention import register

        return register()
    try:
        return flash_reference.install()
    except NotImplementedError as e:  # a newer transformers moved the internals the stand-in fills in
        pytest.skip(f"reference FlashAttention kernel: {e}")


@pytest.fixture
def no_position_inference(monkeypatch, flash):
    """Fail if transformers has to work out the sequence boundaries from position_ids (a host sync per layer);
    count the varlen kernel's calls and any dense (whole-row) ones in ``flash_reference.calls``."""
    import transformers.modeling_flash_attention_utils as fa

    from llavakit.model import attention

    def refuse(*a, **k):
        raise AssertionError("FlashAttention inferred the sequence boundaries from position_ids")

    monkeypatch.setattr(fa, "prepare_fa_kwargs_from_position_ids", refuse)
    flash_reference.calls.update(varlen=0, dense=0)
    per_sample = attention.per_sample_sdpa

    def counted(*a, **k):
        flash_reference.calls["varlen"] += 1
        return per_sample(*a, **k)

    monkeypatch.setattr(attention, "per_sample_sdpa", counted)


@pytest.fixture(scope="module")
def models(backbones, train_data, flash):  # (module-scoped: built once per attention implementation)
    from llavakit.model.build import assemble

    ref = assemble(backbones["llm"], backbones["clip"], attn_implementation="sdpa")
    fl = assemble(backbones["llm"], backbones["clip"], attn_implementation=flash)
    fl.model.load_state_dict(ref.model.state_dict())  # the same weights (the projector is new in each)
    samples, transform = instruct_samples(ref, train_data)
    for m in (ref.model, fl.model):
        m.eval().config.use_cache = False
    return ref.model, fl.model, samples, transform, ref.tokenizer.pad_token_id


def test_only_the_language_model_uses_varlen_attention(models, flash):
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
    varlen = varlen_kwargs(packed.pop("seq_lengths"), "cpu")
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
    run(stage2_config(backbones, train_data, tmp_path / "padded", projector, attn_implementation="sdpa",
                     model_max_length=rows_of or 2048, **common))
    extra = {"packing_max_length": rows_of, "model_max_length": rows_of} if rows_of else {}
    run(stage2_config(backbones, train_data, tmp_path / "packed", projector, attn_implementation=flash,
                     packing="True", **extra, **common))
    assert flash_reference.calls["varlen"] > 0 and flash_reference.calls["dense"] == 0
    a, b = training_logs(tmp_path / "padded"), training_logs(tmp_path / "packed")
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)


def test_flash_packed_lora_training_matches_padded(backbones, train_data, stage1, tmp_path, flash,
                                                   no_position_inference):
    """LoRA (the boundaries pass through the peft wrapper) with activation checkpointing, as
    scripts/v1_5/finetune_lora.sh runs it: packed under FlashAttention = padded."""
    from .conftest import lora_config

    common = dict(max_steps=4, logging_steps=1, group_by_modality_length="True", per_device_train_batch_size=2,
                  save_strategy="no", lora_dropout=0.0, gradient_checkpointing="True")
    projector = stage1["out"] / "mm_projector.bin"
    run(lora_config(backbones, train_data, tmp_path / "padded", projector, attn_implementation="sdpa", **common))
    run(lora_config(backbones, train_data, tmp_path / "packed", projector, attn_implementation=flash,
                   packing="True", **common))
    assert flash_reference.calls["varlen"] > 0 and flash_reference.calls["dense"] == 0
    a, b = training_logs(tmp_path / "padded"), training_logs(tmp_path / "packed")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)


def test_torch_varlen_hands_pytorchs_kernel_the_flattened_rows(monkeypatch):
    """On a GPU, torch_varlen calls torch.nn.attention.varlen.varlen_attn: here a stand-in checks the
    arguments it gets (flattened rows, int32 boundaries, causal window, GQA) and answers per sample."""
    from llavakit.model import attention

    seen = {}

    def fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        seen.update(shape=tuple(q.shape), kv_heads=k.shape[1], cu=cu_q.tolist(), dtype=cu_q.dtype, max=(max_q, max_k),
                    window=window_size, gqa=enable_gqa, scale=scale, qkv=(q.dtype, k.dtype, v.dtype))
        return attention.per_sample_sdpa(q, k, v, cu_q, window_size == (-1, 0), scale, 0.0)

    monkeypatch.setattr(attention, "kernel_for", lambda q, dropout: fake_varlen_attn)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)  # 2 rows, GQA 4:2
    varlen = varlen_kwargs([[4, 2], [1, 5]], "cpu")
    module = torch.nn.Module()
    module.is_causal = True
    out, _ = attention.varlen_attention_forward(module, q, k, v, None, scaling=0.5, **varlen)
    assert seen == {"shape": (12, 4, 8), "kv_heads": 2, "cu": [0, 4, 6, 7, 12], "dtype": torch.int32, "max": (5, 5),
                    "window": (-1, 0), "gqa": True, "scale": 0.5, "qkv": (torch.float32,) * 3}
    assert out.shape == (2, 6, 4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights under autocast: the kernel gets bf16
        attention.varlen_attention_forward(module, q, k, v, None, scaling=0.5, **varlen)
    assert seen["qkv"] == (torch.bfloat16,) * 3
    # sample 2 of row 0 (positions 4-5) attends only to itself, causally
    ref = torch.nn.functional.scaled_dot_product_attention(q[:1, :, 4:6], k[:1, :, 4:6], v[:1, :, 4:6], is_causal=True,
                                                           scale=0.5, enable_gqa=True)
    assert torch.allclose(out[0, 4:6], ref[0].transpose(0, 1), atol=1e-6)


def test_torch_varlen_refuses_padded_batches_and_needs_packing(tmp_path, backbones, train_data):
    from llavakit.config import ConfigError, parse_train_args
    from llavakit.model import attention

    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="packed batches only"):
        attention.varlen_attention_forward(torch.nn.Module(), q, q, q, None)
    varlen = varlen_kwargs([[3]], "cpu")
    with pytest.raises(ValueError, match="sliding-window"):  # a window shorter than a sample: never silently wrong
        attention.varlen_attention_forward(torch.nn.Module(), q, q, q, None, sliding_window=2, **varlen)
    out, _ = attention.varlen_attention_forward(torch.nn.Module(), q, q, q, None, sliding_window=4096, **varlen)
    assert out.shape == (1, 3, 2, 4)
    with pytest.raises(ConfigError, match="add --packing True"):
        parse_train_args(stage2_flags(backbones, train_data, tmp_path / "o", "", pretrain_mm_mlp_adapter=None,
                                      attn_implementation="torch_varlen"))
