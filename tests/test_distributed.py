"""Real multi-process runs on CPU: torchrun (DDP, gloo) with mixed image / text-only micro-batches."""

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import assert_same_losses, free_port, logged_losses, stage2_config, stage2_flags

pytestmark = pytest.mark.slow


def tail(r) -> str:
    """What a failed run printed, without the deprecation noise."""
    lines = [ln for ln in r.stderr.splitlines() if "Warning" not in ln and "return func(" not in ln]
    return f"exit code {r.returncode}\n" + "\n".join(lines)[-4000:]


def torchrun(args, timeout=150, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()),
           "-m", "llavakit.train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_ddp_mixed_batches_no_unused_parameter_error(backbones, train_data, tmp_path):
    out = tmp_path / "ddp"
    # batch 1 per rank, no grouping: many steps where one rank has an image and the other none;
    # find_unused_parameters off, so a projector left out of one rank's graph would fail the step
    r = torchrun(stage2_flags(backbones, train_data, out, "", pretrain_mm_mlp_adapter=None,
                              group_by_modality_length="False", per_device_train_batch_size=1,
                              ddp_find_unused_parameters="False", ddp_backend="gloo", save_steps=4))
    assert r.returncode == 0, tail(r)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 8 and summary["stage"] == "stage 2 (full)"
    assert (out / "model.safetensors").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [h["loss"] for h in state["log_history"] if "loss" in h]
    assert len(losses) == 8 and all(x == x for x in losses)


@pytest.mark.parametrize("attn", ["sdpa", "torch_varlen"])
def test_ddp_packed_modality_grouped_equals_a_single_padded_process(backbones, train_data, tmp_path, attn):
    """Packing inside modality-grouped batches under DDP: 2 ranks × 2 samples, each rank's pair packed into
    one row, give the losses of one process × 4 padded samples (the same samples per step) — under SDPA's
    block mask, and with torch_varlen's sequence boundaries passed through the DDP wrapper."""
    from llavakit.train.entry import run

    common = dict(pretrain_mm_mlp_adapter=None, group_by_modality_length="True", logging_steps=1, max_steps=4,
                  save_strategy="no")
    single = run(stage2_config(backbones, train_data, tmp_path / "single", "", per_device_train_batch_size=4,
                              **common))
    ref = {h["step"]: h["loss"] for h in single.trainer.state.log_history if "loss" in h}
    out = tmp_path / "ddp_packed"
    r = torchrun(stage2_flags(backbones, train_data, out, "", per_device_train_batch_size=2, packing="True",
                              attn_implementation=attn, ddp_find_unused_parameters="False", ddp_backend="gloo",
                              **common))
    assert r.returncode == 0, tail(r)
    assert "stage 2 (full) done" in r.stdout
    got = logged_losses(out)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    assert_same_losses(ref, got, got, 1e-4)
    from .conftest import training_logs

    assert all(h["real_token_fraction"] == 1.0 for h in training_logs(out))


def test_deepspeed_launcher_zero2_stage1(backbones, train_data, tmp_path):
    """Stage 1 under the `deepspeed` launcher with the shipped ZeRO-2 config, as scripts/v1_5/pretrain.sh
    runs it (the first run on a machine compiles DeepSpeed's ops)."""
    from .conftest import REPO, stage1_flags

    out = tmp_path / "z2"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    r = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                        "llavakit.train",
                        *stage1_flags(backbones, train_data, out, deepspeed=REPO / "scripts" / "zero2.json",
                                      per_device_train_batch_size=2, save_steps=2, save_total_limit=None)],
                       capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, tail(r)
    assert (out / "mm_projector.bin").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["samples_seen"] == 16
    # the engine's checkpoint holds the projector, not the frozen LLM and vision tower
    states = list((out / "checkpoint-2").glob("global_step*/*model_states.pt"))
    assert states and all(p.stat().st_size < 200_000 for p in states)
    # and it resumes: the same losses as the uninterrupted run
    resumed = tmp_path / "z2r"
    r = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module",
                        "llavakit.train",
                        *stage1_flags(backbones, train_data, resumed, deepspeed=REPO / "scripts" / "zero2.json",
                                      per_device_train_batch_size=2, save_steps=2, save_total_limit=None,
                                      resume_from_checkpoint=str(out / "checkpoint-2"))],
                       capture_output=True, text=True, timeout=400, env=env)
    assert r.returncode == 0, tail(r)
    ref, got = logged_losses(out), logged_losses(resumed)
    assert sorted(got) == sorted(ref) and all(abs(got[k] - ref[k]) < 1e-5 for k in range(3, 5) if k in ref)


def test_accelerate_launch(backbones, train_data, tmp_path):
    from .conftest import stage1_flags

    out = tmp_path / "acc"
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    r = subprocess.run([launcher, "launch", "--cpu", "--num_processes", "1", "-m", "llavakit.train",
                        *stage1_flags(backbones, train_data, out, max_steps=2)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, tail(r)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2


def test_deepspeed_zero3_stage2_mixed_batches(backbones, train_data, tmp_path):
    """Stage 2 under ZeRO-3 in bf16, batch 1 per rank, no grouping: steps where one rank has no image
    (LLaVA #699)."""
    from transformers import AutoModelForImageTextToText

    from .conftest import REPO

    out = tmp_path / "z3"
    r = torchrun(stage2_flags(backbones, train_data, out, "", pretrain_mm_mlp_adapter=None,
                              deepspeed=REPO / "scripts" / "zero3.json", group_by_modality_length="False",
                              per_device_train_batch_size=1, save_steps=4, bf16="True"), timeout=400)
    assert r.returncode == 0, tail(r)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 8
    model = AutoModelForImageTextToText.from_pretrained(out)  # 16-bit gather on save: a loadable model
    assert model.config.model_type == "llava"
    assert next(model.parameters()).dtype == torch.bfloat16 and all(
        bool(torch.isfinite(p).all()) for p in model.parameters())


def test_ddp_stage2_resume_matches_uninterrupted(backbones, train_data, tmp_path):
    """Two ranks, mixed micro-batches: N steps vs N/2 + resume + N/2 give the same per-step losses."""
    common = dict(pretrain_mm_mlp_adapter=None, group_by_modality_length="False", per_device_train_batch_size=1,
                  ddp_find_unused_parameters="False", ddp_backend="gloo", save_steps=4, logging_steps=1,
                  save_total_limit=None)
    full = tmp_path / "full"
    r = torchrun(stage2_flags(backbones, train_data, full, "", **common))
    assert r.returncode == 0, tail(r)
    ref = logged_losses(full)
    assert sorted(ref) == list(range(1, 9))
    resumed = tmp_path / "resumed"
    r = torchrun(stage2_flags(backbones, train_data, resumed, "", resume_from_checkpoint=str(full / "checkpoint-4"),
                              **common))
    assert r.returncode == 0, tail(r)
    got = logged_losses(resumed)
    assert sorted(got) == list(range(1, 9))
    assert_same_losses(ref, got, range(5, 9), 1e-5)


def test_ddp_lora_mixed_batches(backbones, train_data, stage1, tmp_path):
    from .conftest import lora_flags

    out = tmp_path / "lora"
    r = torchrun(lora_flags(backbones, train_data, out, stage1["out"] / "mm_projector.bin",
                            group_by_modality_length="False", per_device_train_batch_size=1,
                            ddp_find_unused_parameters="False", ddp_backend="gloo", max_steps=4))
    assert r.returncode == 0, tail(r)
    assert (out / "adapter_model.safetensors").is_file() and (out / "llavakit_base.json").is_file()


def test_deepspeed_zero3_offload_stage2_mixed_batches(backbones, train_data, tmp_path):
    """ZeRO-3 with optimizer and parameters offloaded to CPU memory (compiles DeepSpeed's cpu_adam once)."""
    from .conftest import REPO

    out = tmp_path / "z3off"
    r = torchrun(stage2_flags(backbones, train_data, out, "", pretrain_mm_mlp_adapter=None,
                              deepspeed=REPO / "scripts" / "zero3_offload.json", group_by_modality_length="False",
                              per_device_train_batch_size=1, max_steps=4), timeout=600)
    assert r.returncode == 0, tail(r)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 4
    assert (out / "model.safetensors").is_file()


def test_ddp_losses_equal_a_single_process(backbones, train_data, tmp_path):
    """Two ranks × 1 sample = one process × 2 samples (same samples per step, token-mean loss)."""
    from llavakit.train.entry import run

    common = dict(pretrain_mm_mlp_adapter=None, group_by_modality_length="True", logging_steps=1, max_steps=4,
                  save_strategy="no")
    single = run(stage2_config(backbones, train_data, tmp_path / "single", "", per_device_train_batch_size=2,
                              **common))
    ref = {h["step"]: h["loss"] for h in single.trainer.state.log_history if "loss" in h}
    out = tmp_path / "ddp"
    r = torchrun(stage2_flags(backbones, train_data, out, "", per_device_train_batch_size=1,
                              ddp_find_unused_parameters="False", ddp_backend="gloo", **common))
    assert r.returncode == 0, tail(r)
    got = logged_losses(out)
    assert sorted(got) == sorted(ref) == [1, 2, 3, 4]
    assert_same_losses(ref, got, got, 1e-4)


@pytest.mark.parametrize("config,max_steps,timeout", [("zero2.json", 4, 400), ("zero3_offload.json", 2, 600)])
def test_deepspeed_lora_mixed_batches(backbones, train_data, stage1, tmp_path, config, max_steps, timeout):
    """LoRA under ZeRO-2 (as scripts/v1_5/finetune_lora.sh runs it) and under ZeRO-3 offload, one rank
    text-only on some steps."""
    from .conftest import REPO, lora_flags

    out = tmp_path / "lora"
    r = torchrun(lora_flags(backbones, train_data, out, stage1["out"] / "mm_projector.bin",
                            deepspeed=REPO / "scripts" / config, group_by_modality_length="False",
                            per_device_train_batch_size=1, max_steps=max_steps), timeout=timeout)
    assert r.returncode == 0, tail(r)
    assert (out / "adapter_model.safetensors").is_file()


def test_deepspeed_zero3_stage1_and_stage2_resume(backbones, train_data, tmp_path):
    """ZeRO-3: stage 1 runs and writes the projector; a stage-2 run resumes exactly from its checkpoint."""
    from .conftest import REPO, stage1_flags

    z3 = REPO / "scripts" / "zero3.json"
    s1 = tmp_path / "s1"
    r = torchrun(stage1_flags(backbones, train_data, s1, deepspeed=z3, per_device_train_batch_size=2,
                              max_steps=2), timeout=400)
    assert r.returncode == 0, tail(r)
    assert (s1 / "mm_projector.bin").is_file()
    common = dict(pretrain_mm_mlp_adapter=None, deepspeed=z3, group_by_modality_length="False",
                  per_device_train_batch_size=1, save_steps=4, logging_steps=1, save_total_limit=None)
    full = tmp_path / "full"
    r = torchrun(stage2_flags(backbones, train_data, full, "", **common), timeout=400)
    assert r.returncode == 0, tail(r)
    resumed = tmp_path / "resumed"
    r = torchrun(stage2_flags(backbones, train_data, resumed, "", resume_from_checkpoint=str(full / "checkpoint-4"),
                              **common), timeout=400)
    assert r.returncode == 0, tail(r)
    ref, got = logged_losses(full), logged_losses(resumed)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    assert_same_losses(ref, got, range(5, 9), 1e-5)


def test_deepspeed_zero3_lora_and_zero2_lora_resume(backbones, train_data, stage1, tmp_path):
    """LoRA under ZeRO-3 (mixed micro-batches), and a ZeRO-2 LoRA run that resumes exactly."""
    from .conftest import REPO, lora_flags

    projector = stage1["out"] / "mm_projector.bin"
    out = tmp_path / "z3lora"
    r = torchrun(lora_flags(backbones, train_data, out, projector, deepspeed=REPO / "scripts" / "zero3.json",
                            group_by_modality_length="False", per_device_train_batch_size=1, max_steps=4),
                 timeout=400)
    assert r.returncode == 0, tail(r)
    assert (out / "adapter_model.safetensors").is_file()
    common = dict(deepspeed=REPO / "scripts" / "zero2.json", group_by_modality_length="False",
                  per_device_train_batch_size=1, save_steps=4, logging_steps=1, save_total_limit=None,
                  lora_dropout=0.0)
    full = tmp_path / "full"
    r = torchrun(lora_flags(backbones, train_data, full, projector, **common), timeout=400)
    assert r.returncode == 0, tail(r)
    resumed = tmp_path / "resumed"
    r = torchrun(lora_flags(backbones, train_data, resumed, projector,
                            resume_from_checkpoint=str(full / "checkpoint-4"), **common), timeout=400)
    assert r.returncode == 0, tail(r)
    ref, got = logged_losses(full), logged_losses(resumed)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    assert_same_losses(ref, got, range(5, 9), 1e-5)


def test_deepspeed_zero3_offload_stage1(backbones, train_data, tmp_path):
    from .conftest import REPO, stage1_flags

    out = tmp_path / "z3off_s1"
    r = torchrun(stage1_flags(backbones, train_data, out, deepspeed=REPO / "scripts" / "zero3_offload.json",
                              per_device_train_batch_size=2, max_steps=2), timeout=600)
    assert r.returncode == 0, tail(r)
    assert (out / "mm_projector.bin").is_file()


def test_deepspeed_zero2_stage2_packed(backbones, train_data, tmp_path):
    """Full stage 2 under ZeRO-2 in bf16 (as scripts/v1_5/finetune.sh), packed: rows that mix image and
    text-only samples, no padding."""
    from .conftest import REPO, training_logs

    out = tmp_path / "z2s2"
    r = torchrun(stage2_flags(backbones, train_data, out, "", pretrain_mm_mlp_adapter=None,
                              deepspeed=REPO / "scripts" / "zero2.json", group_by_modality_length="False",
                              per_device_train_batch_size=2, max_steps=2, packing="True", logging_steps=1,
                              bf16="True"),
                 timeout=400)
    assert r.returncode == 0, tail(r)
    assert (out / "model.safetensors").is_file()
    logs = training_logs(out)
    assert len(logs) == 2 and all(h["real_token_fraction"] == 1.0 and h["loss"] == h["loss"] for h in logs)


def test_ddp_bad_samples_counted_over_ranks_and_workers(backbones, train_data, tmp_path):
    """2 ranks × 2 data-loader workers: the replaced samples of every rank and worker add up; the strict run
    stops on every rank (no rank left waiting), the loose one finishes with the count of reported lines."""
    from .conftest import stage1_flags
    from .test_train import four_bad_images

    data = four_bad_images(train_data, tmp_path)
    common = dict(dataloader_num_workers=2, ddp_backend="gloo", per_device_train_batch_size=2)
    strict = torchrun(stage1_flags(backbones, data, tmp_path / "strict", max_bad_fraction=0.2, **common))
    # every rank stops with the same sentence (torchrun then exits non-zero); no rank is left waiting
    assert strict.returncode != 0 and strict.stderr.count("4 of 16 samples seen failed to load") == 2, tail(strict)
    loose = torchrun(stage1_flags(backbones, data, tmp_path / "loose", max_bad_fraction=0.5, **common))
    assert loose.returncode == 0, tail(loose)
    lines = (tmp_path / "loose" / "bad_samples.jsonl").read_text().splitlines()
    summary = json.loads((tmp_path / "loose" / "train_summary.json").read_text())
    assert len(lines) == 4 and summary["replaced_samples"] == 4
