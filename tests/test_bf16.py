"""The shipped scripts train with ``--bf16 True``: the three recipes with bf16 weights, end to end, and a bf16
checkpoint that resumes exactly."""

import json

import torch

from llavakit.train.entry import run

from .conftest import (
    lora_config,
    stage1_config,
    stage2_config,
    training_logs,
)


def test_bf16_stage1_stage2_and_lora_as_the_scripts_run_them(backbones, train_data, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    common = dict(bf16="True", max_steps=2, logging_steps=1)
    s1 = tmp_path / "s1"
    run(stage1_config(backbones, train_data, s1, **common))
    projector = torch.load(s1 / "mm_projector.bin", weights_only=True)
    assert projector and all(v.dtype == torch.bfloat16 for v in projector.values())

    s2 = tmp_path / "s2"
    # with data-loader worker processes, as the scripts run (--dataloader_num_workers 4)
    flags = dict(packing="True", save_steps=1, save_total_limit=None, dataloader_num_workers=2, **common)
    run(stage2_config(backbones, train_data, s2, s1 / "mm_projector.bin", **flags))
    logs = training_logs(s2)
    assert len(logs) == 2 and all(h["loss"] == h["loss"] and h["real_token_fraction"] == 1.0 for h in logs)
    resumed = tmp_path / "s2r"  # and a bf16 checkpoint resumes to the same second step
    run(stage2_config(backbones, train_data, resumed, s1 / "mm_projector.bin",
                     resume_from_checkpoint=str(s2 / "checkpoint-1"), **flags))
    assert [h["loss"] for h in training_logs(resumed) if h["step"] == 2] == [logs[1]["loss"]]
    weights = load_file(str(next(s2.glob("*.safetensors"))))
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.bfloat16}
    model = AutoModelForImageTextToText.from_pretrained(s2)
    assert model.config.model_type == "llava"

    lora = tmp_path / "lora"
    run(lora_config(backbones, train_data, lora, s1 / "mm_projector.bin", **common))
    assert (lora / "adapter_model.safetensors").is_file()
    assert all(h["loss"] == h["loss"] for h in training_logs(lora))
    assert json.loads((lora / "train_summary.json").read_text())["steps"] == 2
