"""Resuming a stage-1 checkpoint continues exactly: same per-step losses, same final projector."""

import torch

from llavakit.model.projector import PROJECTOR_BIN
from llavakit.train.entry import run

from .conftest import stage1_flags


def _losses(result):
    return {h["step"]: h["loss"] for h in result.trainer.state.log_history if "loss" in h}


def test_stage1_resume_matches_uninterrupted(backbones, train_data, tmp_path):
    common = {"save_steps": 2, "save_total_limit": None, "per_device_train_batch_size": 2,
              "num_train_epochs": 1, "warmup_ratio": 0.25}
    full = run(stage1_flags(backbones, train_data, tmp_path / "full", **common))
    ref = _losses(full)
    assert len(ref) == 8
    half = tmp_path / "full" / "checkpoint-4"
    assert (half / PROJECTOR_BIN).is_file()
    resumed = run(stage1_flags(backbones, train_data, tmp_path / "resumed", resume_from_checkpoint=str(half),
                               **common))
    got = _losses(resumed)  # steps 1-4 come from the checkpoint's state, 5-8 were run after resuming
    assert sorted(got) == list(range(1, 9)) and resumed.trainer.samples_seen == 8
    for step, loss in got.items():
        assert abs(loss - ref[step]) < 1e-6, (step, loss, ref[step])
    a = torch.load(tmp_path / "full" / PROJECTOR_BIN, weights_only=True)
    b = torch.load(tmp_path / "resumed" / PROJECTOR_BIN, weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
