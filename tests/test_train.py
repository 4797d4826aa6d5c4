"""Stage 1 and stage 2 end to end with the seed's flags, on tiny models built by the tests."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from llavakit.model.projector import PROJECTOR_BIN
from llavakit.train.entry import run

from .conftest import make_image, stage1_config, stage2_config, stage2_flags


def test_stage1_trains_only_the_projector(stage1):
    model = stage1["result"].trainer.llava
    before = stage1["before"]
    after = model.state_dict()
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    assert changed and all("multi_modal_projector" in k for k in changed)
    assert {k for k in after if "multi_modal_projector" in k} <= changed | {k for k in after if "bias" in k}


def test_stage1_output_is_the_original_projector_file(stage1):
    out = stage1["out"]
    state = torch.load(out / PROJECTOR_BIN, weights_only=True)
    assert sorted(state) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                             "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    proj = stage1["result"].trainer.llava.model.multi_modal_projector
    assert torch.equal(state["model.mm_projector.0.weight"], proj.linear_1.weight.detach())
    assert json.loads((out / "config.json").read_text())["model_type"] == "llava"
    assert (out / "llavakit_config.yaml").is_file()
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["samples_seen"] == 16 and summary["tokens_seen"] > 0


def test_stage1_checkpoints_hold_no_frozen_weights(stage1):
    ckpts = [d for d in os.listdir(stage1["out"]) if d.startswith("checkpoint-")]
    assert ckpts
    files = set(os.listdir(stage1["out"] / ckpts[0]))
    assert PROJECTOR_BIN in files and "optimizer.pt" in files and "rng_state.pth" in files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    size = sum(os.path.getsize(stage1["out"] / ckpts[0] / f) for f in files)
    assert size < 200_000


def test_stage2_cli_summary_and_outputs(stage2):
    out = stage2["out"]
    assert "llavakit train: stage 2 (full) done" in stage2["stdout"]
    for f in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
              "processor_config.json", "chat_template.jinja", "llavakit_config.yaml"):
        assert (out / f).is_file(), f


def test_stage2_trains_llm_and_projector_keeps_vision_tower(stage2, stage1):
    from transformers import LlavaForConditionalGeneration

    weights = LlavaForConditionalGeneration.from_pretrained(stage2["out"]).state_dict()
    assert load_file(stage2["out"] / "model.safetensors")  # safetensors, not a pickle
    before = stage2["before"]
    vision = [k for k in before if "vision_tower" in k]
    assert vision and all(torch.equal(before[k], weights[k]) for k in vision)
    assert not torch.equal(before["model.language_model.layers.0.self_attn.q_proj.weight"],
                           weights["model.language_model.layers.0.self_attn.q_proj.weight"])
    stage1_w = torch.load(stage1["out"] / PROJECTOR_BIN, weights_only=True)["model.mm_projector.0.weight"]
    final_w = weights["model.multi_modal_projector.linear_1.weight"]
    assert not torch.equal(stage1_w, final_w)  # started from stage 1 and trained on
    assert torch.allclose(stage1_w, final_w, atol=1e-2)


def test_stage2_output_loads_with_plain_transformers_and_generates(stage2, train_data):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llavakit.data.images import ImageTransform, open_image
    from llavakit.data.templates import VICUNA_SYSTEM

    out = str(stage2["out"])
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(msgs, add_generation_prompt=True)
    # the space after the image makes the one-piece tokenization below give training's chunk-wise ids
    # (tests/test_tokenization_path.py)
    assert prompt == f"{VICUNA_SYSTEM} USER: <image> \nWhat colour is it? ASSISTANT:"
    path = os.path.join(train_data["images"], "coco", "3.jpg")
    inputs = processor(images=Image.open(path), text=prompt, return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 4
    # inference preprocesses images as training did (pad mode)
    t = ImageTransform.from_processor(processor.image_processor, aspect_ratio="pad")
    assert torch.equal(inputs["pixel_values"][0], torch.from_numpy(t(open_image(path))))
    gen = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert gen.shape[1] > inputs["input_ids"].shape[1]
    gc = json.loads((stage2["out"] / "generation_config.json").read_text())
    assert gc["eos_token_id"] == processor.tokenizer.eos_token_id


def test_vicuna_generation_config_1144_still_saves(backbones, train_data, tmp_path):
    """LLaVA #1144: temperature/top_p without do_sample must not kill the run at save time."""
    import shutil

    from transformers import GenerationConfig

    llm = tmp_path / "vicuna"
    shutil.copytree(backbones["llm"], llm)
    cfg = json.loads((llm / "generation_config.json").read_text())
    cfg.update({"temperature": 0.9, "top_p": 0.6, "max_length": 4096})
    (llm / "generation_config.json").write_text(json.dumps(cfg))
    loaded = GenerationConfig.from_pretrained(llm)
    loaded.pad_token_id = 0  # any change after loading (training sets the pad id) makes the save strict
    with pytest.raises(ValueError):
        loaded.save_pretrained(tmp_path / "check")
    out = tmp_path / "out"
    run(stage2_config({**backbones, "llm": str(llm)}, train_data, out, "", pretrain_mm_mlp_adapter=None,
                     save_steps=2, max_steps=2))
    gc = GenerationConfig.from_pretrained(out)
    assert gc.temperature in (None, 1.0) and gc.top_p in (None, 1.0)
    assert any(d.startswith("checkpoint-") for d in os.listdir(out))


def test_pretrained_projector_from_another_model_is_a_clear_error(backbones, train_data, tmp_path):
    bad = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(5120, 1024), "model.mm_projector.0.bias": torch.zeros(5120),
                "model.mm_projector.2.weight": torch.zeros(5120, 5120), "model.mm_projector.2.bias": torch.zeros(5120)},
               bad)
    r = subprocess.run([sys.executable, "-m", "llavakit", "train",
                        *stage2_flags(backbones, train_data, tmp_path / "o", bad)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert "size 1024 to a language model of hidden size 5120" in r.stderr


def test_bad_image_mid_run_is_replaced_and_reported(backbones, train_data, tmp_path):
    import shutil

    data = dict(train_data)
    images = tmp_path / "images"
    shutil.copytree(train_data["images"], images)
    (images / "coco" / "5.jpg").write_bytes(b"corrupt")
    data["images"] = str(images)
    res = run(stage1_config(backbones, data, tmp_path / "o", max_bad_fraction=0.5))
    lines = (tmp_path / "o" / "bad_samples.jsonl").read_text().splitlines()
    assert [json.loads(x)["id"] for x in lines] == ["cap5"]
    assert res.summary["replaced_samples"] == 1
    make_image(images / "coco" / "5.jpg", (20, 20))


def four_bad_images(train_data, tmp_path) -> dict:
    import shutil

    data = dict(train_data)
    images = tmp_path / "images"
    shutil.copytree(train_data["images"], images)
    for i in (1, 6, 10, 13):  # 4 of the 16 captions' images
        (images / "coco" / f"{i}.jpg").write_bytes(b"garbage")
    data["images"] = str(images)
    return data


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_counted_from_worker_processes(backbones, train_data, tmp_path, workers):
    """The replaced samples reach the trainer in the batches, so --max_bad_fraction holds with data-loader
    workers: 4 of 16 stop a run at 0.2; at 0.5 it finishes and counts exactly the reported lines."""
    from llavakit.data.dataset import DataQualityError

    data = four_bad_images(train_data, tmp_path)
    with pytest.raises(DataQualityError, match="of .* samples seen failed to load"):
        run(stage1_config(backbones, data, tmp_path / "strict", max_bad_fraction=0.2,
                         dataloader_num_workers=workers))
    res = run(stage1_config(backbones, data, tmp_path / "loose", max_bad_fraction=0.5,
                           dataloader_num_workers=workers))
    lines = (tmp_path / "loose" / "bad_samples.jsonl").read_text().splitlines()
    assert sorted(json.loads(x)["id"] for x in lines) == ["cap1", "cap10", "cap13", "cap6"]
    assert res.summary["replaced_samples"] == 4


def test_continue_from_a_llava_checkpoint_needs_no_vision_tower(stage2, backbones, train_data, tmp_path):
    """The original's finetune_task.sh: --model_name_or_path is a (transformers-native) LLaVA checkpoint."""
    res = run(stage2_config(backbones, train_data, tmp_path / "task", "", pretrain_mm_mlp_adapter=None,
                           model_name_or_path=str(stage2["out"]), vision_tower=None, max_steps=2))
    assert res.summary["steps"] == 2
    from transformers import LlavaForConditionalGeneration

    start = LlavaForConditionalGeneration.from_pretrained(stage2["out"]).state_dict()
    end = LlavaForConditionalGeneration.from_pretrained(tmp_path / "task").state_dict()
    proj = "model.multi_modal_projector.linear_1.weight"
    assert not torch.equal(start[proj], end[proj])
    vision = [k for k in start if "vision_tower" in k]
    assert all(torch.equal(start[k], end[k]) for k in vision)


def test_lora_with_the_seed_flags_trains_adapters_and_projector_only(backbones, lora_run):
    out, res = lora_run["out"], lora_run["result"]
    model = res.trainer.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "multi_modal_projector.modules_to_save" in n for n in trainable)
    assert any("lora_A" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 128 and cfg["lora_alpha"] == 256
    assert (out / "adapter_model.safetensors").is_file() and (out / "llavakit_base.json").is_file()
    assert not (out / "config.json").exists()  # an adapter directory is not mistaken for a full model
    base = json.loads((out / "llavakit_base.json").read_text())
    assert base["model_name_or_path"] == backbones["llm"] and base["vision_tower"] == backbones["clip"]
    saved = load_file(out / "adapter_model.safetensors")
    assert any("multi_modal_projector" in k for k in saved) and any("lora_A" in k for k in saved)
    assert not any("vision_tower" in k for k in saved)


@pytest.mark.parametrize("which", ["stage1", "lora_run"])
def test_checkpointed_runs_keep_gradients_out_of_the_frozen_vision_tower(request, which):
    """The scripts' --gradient_checkpointing True: the language model is checkpointed, but no gradient goes
    through the frozen vision tower (transformers' own set-up would run its backward for every image)."""
    model = request.getfixturevalue(which)["result"].trainer.llava
    assert model.model.language_model.is_activation_checkpointing
    assert not model.model.vision_tower.is_activation_checkpointing
    seen = []
    hook = model.model.vision_tower.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state.requires_grad))
    try:
        model.train()
        n = model.config.image_seq_length
        ids = torch.tensor([[1, *[model.config.image_token_index] * n, 5, 6, 7]])
        size = model.config.vision_config.image_size
        out = model(input_ids=ids, pixel_values=torch.randn(1, 3, size, size), labels=ids)
        out.loss.backward()
        projector_grads = [p.grad is not None for p in model.model.multi_modal_projector.parameters()]
    finally:
        hook.remove()
        model.zero_grad(set_to_none=True)
    assert seen == [False]
    assert any(projector_grads)


def test_activation_checkpointing_leaves_the_losses_unchanged(backbones, train_data, stage1, tmp_path):
    """Stage 1 with the scripts' checkpointing (the stage1 fixture) and without it: the same losses."""
    from .conftest import logged_losses

    run(stage1_config(backbones, train_data, tmp_path / "plain", gradient_checkpointing="False"))
    ref, got = logged_losses(stage1["out"]), logged_losses(tmp_path / "plain")
    assert sorted(ref) == sorted(got) and len(ref) >= 2
    assert all(abs(ref[k] - got[k]) < 1e-5 for k in ref), (ref, got)


def test_frozen_tower_benchmark_runs_and_both_set_ups_train_alike():
    from .conftest import REPO

    r = subprocess.run([sys.executable, str(REPO / "benchmarks" / "frozen_tower.py"), "--vision", "toy", "--steps", "1",
                        "--batch", "2", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["transformers_losses"] == out["llavakit_losses"] and len(out["llavakit_losses"]) == 2
    assert out["transformers_ms_per_step"] > 0 and out["llavakit_ms_per_step"] > 0
