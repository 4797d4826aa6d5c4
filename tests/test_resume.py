"""Resuming a stage-1 checkpoint continues exactly: same per-step losses, same final projector."""

import torch

from llavakit.model.projector import PROJECTOR_BIN
from llavakit.train.entry import run

from .conftest import assert_same_losses, logged_losses, stage1_config


def test_stage1_resume_matches_uninterrupted(backbones, train_data, tmp_path):
    common = {"save_steps": 2, "save_total_limit": None, "per_device_train_batch_size": 2,
              "num_train_epochs": 1, "warmup_ratio": 0.25}
    run(stage1_config(backbones, train_data, tmp_path / "full", **common))
    ref = logged_losses(tmp_path / "full")
    assert len(ref) == 8
    half = tmp_path / "full" / "checkpoint-4"
    assert (half / PROJECTOR_BIN).is_file()
    resumed = run(stage1_config(backbones, train_data, tmp_path / "resumed", resume_from_checkpoint=str(half),
                               **common))
    got = logged_losses(tmp_path / "resumed")  # steps 1-4 come from the checkpoint's state, 5-8 were run after it
    assert sorted(got) == list(range(1, 9)) and resumed.trainer.samples_seen == 8
    assert_same_losses(ref, got, got, 1e-6)
    a = torch.load(tmp_path / "full" / PROJECTOR_BIN, weights_only=True)
    b = torch.load(tmp_path / "resumed" / PROJECTOR_BIN, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lora_resume_matches_uninterrupted(backbones, train_data, stage1, tmp_path):
    """The original's #1200: a LoRA run resumes from its checkpoint and continues exactly."""
    from safetensors.torch import load_file

    from .conftest import lora_config

    projector = stage1["out"] / PROJECTOR_BIN
    common = {"save_steps": 2, "save_total_limit": None, "per_device_train_batch_size": 4, "num_train_epochs": 1,
              "warmup_ratio": 0.25}
    run(lora_config(backbones, train_data, tmp_path / "full", projector, **common))
    ref = logged_losses(tmp_path / "full")
    assert len(ref) == 4
    half = tmp_path / "full" / "checkpoint-2"
    assert (half / "adapter_model.safetensors").is_file()
    run(lora_config(backbones, train_data, tmp_path / "resumed", projector,
                             resume_from_checkpoint=str(half), **common))
    got = logged_losses(tmp_path / "resumed")
    assert sorted(got) == [1, 2, 3, 4]
    assert_same_losses(ref, got, got, 1e-6)
    a = load_file(tmp_path / "full" / "adapter_model.safetensors")
    b = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_stage2_full_resume_matches_uninterrupted(backbones, train_data, tmp_path):
    """transformers writes Llava weights under older key names that the Trainer's resume skips silently;
    the run must continue from the checkpoint's weights, not from the initial ones."""
    from safetensors.torch import load_file

    from .conftest import stage2_config

    common = {"pretrain_mm_mlp_adapter": None, "save_steps": 4, "save_total_limit": None, "logging_steps": 1,
              "per_device_train_batch_size": 2, "group_by_modality_length": "False"}
    run(stage2_config(backbones, train_data, tmp_path / "full", "", **common))
    ref = logged_losses(tmp_path / "full")
    run(stage2_config(backbones, train_data, tmp_path / "resumed", "",
                               resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-4"), **common))
    got = logged_losses(tmp_path / "resumed")
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    assert_same_losses(ref, got, range(5, 9), 1e-6)
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_model_is_a_clear_error(backbones, train_data, tmp_path):
    import pytest
    from safetensors.torch import load_file, save_file

    from .conftest import stage2_config

    common = {"pretrain_mm_mlp_adapter": None, "save_steps": 2, "max_steps": 2}
    run(stage2_config(backbones, train_data, tmp_path / "a", "", **common))
    ckpt = tmp_path / "a" / "checkpoint-2"
    w = load_file(ckpt / "model.safetensors")
    w.pop(next(k for k in w if "layers.1." in k))
    save_file(w, ckpt / "model.safetensors")
    with pytest.raises(ValueError, match="do not match the model"):
        run(stage2_config(backbones, train_data, tmp_path / "b", "", resume_from_checkpoint=str(ckpt), **common))
