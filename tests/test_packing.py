"""Packing: the same samples without padding give the same loss, the same logits per sample, and the same
training run; images stay in sample order; image blocks are never split; throughput is logged."""

import json

import pytest
import torch

from llavakit import IGNORE_INDEX
from llavakit.data.collate import LlavaCollator, pack_rows
from llavakit.train.entry import run

from .conftest import instruct_samples, stage2_config, training_logs


@pytest.fixture(scope="module")
def model_and_samples(backbones, train_data):
    from llavakit.model.build import assemble

    asm = assemble(backbones["llm"], backbones["clip"], attn_implementation="sdpa")
    model = asm.model.eval()
    model.config.use_cache = False
    model.config.text_config.use_cache = False
    samples, transform = instruct_samples(asm, train_data)
    return model, samples, transform, asm.tokenizer.pad_token_id


def _loss(model, batch):
    batch = {k: v for k, v in batch.items() if k not in ("num_real_tokens", "num_samples")}
    with torch.no_grad():
        out = model(**batch)
    return out


def test_pack_rows_first_fit_decreasing():
    assert pack_rows([5, 3, 4], None) == [[0, 1, 2]]
    assert pack_rows([5, 3, 4], 12) == [[0, 1, 2]]
    rows = pack_rows([6, 5, 4, 3, 2], 8)
    assert sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]
    assert all(sum([6, 5, 4, 3, 2][i] for i in r) <= 8 for r in rows) and len(rows) == 3


@pytest.mark.parametrize("capacity", [None, 120])
def test_packed_loss_and_logits_equal_unpacked(model_and_samples, capacity):
    model, samples, transform, pad = model_and_samples
    padded = LlavaCollator(pad, transform)(samples)
    packed = LlavaCollator(pad, transform, packing=True, packing_max_length=capacity)(samples)
    assert "attention_mask" not in packed and packed["input_ids"].shape[0] == (1 if capacity is None else
                                                                                len(pack_rows([len(s["input_ids"]) for s in samples], capacity)))
    assert packed["num_real_tokens"] == int(padded["attention_mask"].sum()) == padded["num_real_tokens"]
    assert type(packed["num_real_tokens"]) is int and type(padded["num_samples"]) is int  # host-side: no GPU wait
    if capacity is None:
        assert packed["input_ids"].numel() == int(packed["num_real_tokens"])  # no padding at all
    a, b = _loss(model, padded), _loss(model, packed)
    # the token-mean loss of the same supervised tokens
    assert abs(float(a.loss) - float(b.loss)) < 1e-5, (float(a.loss), float(b.loss))
    # and the same logits for every sample: attention never crosses into another sample
    rows = pack_rows([len(s["input_ids"]) for s in samples], capacity)
    for r, row in enumerate(rows):
        pos = 0
        for i in row:
            n = len(samples[i]["input_ids"])
            assert torch.allclose(a.logits[i, :n], b.logits[r, pos:pos + n], atol=1e-4), (i, r)
            assert packed["labels"][r, pos] == IGNORE_INDEX
            assert torch.equal(packed["position_ids"][r, pos:pos + n], torch.arange(n))
            pos += n


def test_packed_images_follow_the_rows(model_and_samples):
    model, samples, transform, pad = model_and_samples
    packed = LlavaCollator(pad, transform, packing=True, packing_max_length=120)(samples)
    rows = pack_rows([len(s["input_ids"]) for s in samples], 120)
    expected = torch.cat([samples[i]["images"] for row in rows for i in row if samples[i]["images"] is not None])
    assert torch.equal(packed["pixel_values"], transform.normalize(expected))


@pytest.mark.parametrize("stage", ["stage2", "lora", "stage1"])
def test_packed_training_run_matches_padded(backbones, train_data, stage1, tmp_path, stage):
    """The same steps, same samples per step: the same losses; only the padding is gone (stage 2 full and
    LoRA on mixed image / text-only batches, stage 1 on captions)."""
    from .conftest import lora_config, stage1_config, stage2_config

    common = dict(max_steps=4, logging_steps=1, group_by_modality_length="False", per_device_train_batch_size=4,
                  attn_implementation="sdpa", save_strategy="no")
    projector = stage1["out"] / "mm_projector.bin"
    if stage == "stage1":
        def flags(out, **kw):
            return stage1_config(backbones, train_data, out, **kw)
    else:
        make = lora_config if stage == "lora" else stage2_config
        if stage == "lora":
            common["lora_dropout"] = 0.0  # dropout masks follow the tensor shapes, which packing changes

        def flags(out, **kw):
            return make(backbones, train_data, out, projector, **kw)
    run(flags(tmp_path / "padded", **common))
    run(flags(tmp_path / "packed", packing="True", **common))
    a, b = training_logs(tmp_path / "padded"), training_logs(tmp_path / "packed")
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert abs(x["loss"] - y["loss"]) < 1e-4, (x, y)
    assert all(h["real_token_fraction"] == 1.0 for h in b)
    if stage != "stage1":  # (the test captions are all as long, so stage 1's padded batches have no padding)
        assert any(h["real_token_fraction"] < 1.0 for h in a)
    for h in b:
        assert h["samples_per_second"] > 0 and h["real_tokens_per_second"] > 0 and 0 <= h["data_wait_fraction"] <= 1


def test_mfu_is_logged_with_a_peak(backbones, train_data, stage1, tmp_path):
    run(stage2_config(backbones, train_data, tmp_path / "o", stage1["out"] / "mm_projector.bin", max_steps=2,
                     logging_steps=1, peak_tflops=1.0))
    logs = training_logs(tmp_path / "o")
    assert all(h["mfu"] > 0 for h in logs)


def test_bench_padding_reports_the_three_ways():
    from llavakit.bench import bench_padding

    r = bench_padding()
    assert r["records"] == 665298 and 0.05 < r["text_only_fraction"] < 0.07
    assert 850 < r["lengths"]["mean"] < 900 and r["lengths"]["p99"] <= 2048
    assert r["original_real_fraction"] < r["grouped_real_fraction"] < r["packed_real_fraction"] == 1.0
    assert r["grouped_real_fraction"] < r["grouped_50_steps_real_fraction"] > 0.97


def test_bench_train_cli_reports_packed_and_padded(capsys):
    from llavakit.cli import main

    assert main(["bench", "train", "--steps", "3", "--batch", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["steps"] == 3 and r["per_device_batch"] == 4
    assert r["packed_real_token_fraction"] == 1.0 > r["padded_real_token_fraction"]
    assert r["packed_varlen_real_token_fraction"] == 1.0
    for name in ("padded", "packed", "packed_rows", "packed_varlen"):
        assert r[f"{name}_real_tokens_per_second"] > 0
    assert r["packed_speedup"] == pytest.approx(r["packed_real_tokens_per_second"] / r["padded_real_tokens_per_second"],
                                                abs=1e-3)


@pytest.mark.slow
def test_throughput_benchmark_script_runs_at_toy_size():
    import subprocess
    import sys

    from .conftest import REPO

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--size", "toy", "--device",
                        "cpu", "--steps", "1", "--batch", "2", "--stages", "stage2-full,stage2-lora",
                        "--packed-attention", "torch_varlen"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    final = json.loads(r.stdout.strip().splitlines()[-1])
    assert final["info"]["packed_attention"] == "torch_varlen"
    assert final["info"]["check"]["relative_difference"] <= 1e-4  # packed = padded before anything is timed
    assert [(x["stage"], x["packed"]) for x in final["results"]] == [
        ("stage2-full", False), ("stage2-full", True), ("stage2-lora", False), ("stage2-lora", True)]
    assert all(x["real_tokens_per_second"] > 0 for x in final["results"])
    assert all(x["real_token_fraction"] == 1.0 for x in final["results"] if x["packed"])


def test_peak_tflops_from_device_names():
    from llavakit.train.throughput import detect_peak_tflops, peak_tflops_for

    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H100 NVL") == 835.0
    assert peak_tflops_for("NVIDIA H200") == 989.0
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops_for("Tesla T4") is None
    if not torch.cuda.is_available():
        assert detect_peak_tflops() is None


def test_packing_rows_one_per_micro_batch_only_with_a_varlen_kernel():
    from types import SimpleNamespace

    from llavakit.train.entry import packing_capacity

    def cap(attn, explicit=None):
        return packing_capacity(SimpleNamespace(attn_implementation=attn, packing_max_length=explicit,
                                                model_max_length=2048))

    assert cap("flash_attention_2") is None and cap("flash_attention_3") is None
    assert cap("kernels-community/flash-attn2") is None and cap("torch_varlen") is None
    assert cap("sdpa") == cap("eager") == cap(None) == 2048
    assert cap("flash_attention_2", 4096) == cap("sdpa", 4096) == 4096


@pytest.mark.parametrize("packing", [False, True])
def test_logits_only_where_a_supervised_token_is_predicted_give_the_models_own_loss(model_and_samples, packing):
    from llavakit.data.collate import scored_logits_kwargs

    model, samples, transform, pad = model_and_samples
    batch = LlavaCollator(pad, transform, packing=packing)(samples)
    for k in ("num_real_tokens", "num_samples", "seq_lengths"):
        batch.pop(k, None)
    scored = scored_logits_kwargs(batch["labels"])
    n_supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    with torch.no_grad():
        for extra in ({}, {"num_items_in_batch": torch.tensor(n_supervised + 7)}):  # mean, and the Trainer's sum / n
            full = model(**batch, **extra)
            part = model(**batch, **scored, **extra)
            assert abs(float(full.loss) - float(part.loss)) < 1e-6, (extra, float(full.loss), float(part.loss))
    width = batch["input_ids"].shape[1]
    assert part.logits.shape[1] == len(scored["logits_to_keep"]) < width / 2  # image and prompt positions dropped
    assert int((scored["shift_labels"] != IGNORE_INDEX).sum()) == n_supervised
