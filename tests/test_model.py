"""Model assembly, stage semantics, projector files, optimizer groups, the vision path in every graph."""

import pytest
import torch

from llavakit.model.build import assemble
from llavakit.model.projector import (
    ProjectorFileError,
    from_original,
    load_projector,
    read_projector_file,
    save_projector,
    to_original,
)
from llavakit.train.dummy_image import add_dummy_image
from llavakit.train.stages import Stage


@pytest.fixture()
def asm(backbones):
    return assemble(backbones["llm"], backbones["clip"])


def test_assembled_model_copies_pretrained_weights(asm, backbones):
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    llm = AutoModelForCausalLM.from_pretrained(backbones["llm"])
    vis = CLIPVisionModel.from_pretrained(backbones["clip"])
    m = asm.model
    assert torch.equal(m.model.language_model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight)
    tower = m.model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in vis.state_dict().items())
    n_old = llm.get_input_embeddings().weight.shape[0]
    assert torch.equal(m.get_input_embeddings().weight[:n_old], llm.get_input_embeddings().weight)
    assert m.get_input_embeddings().weight.shape[0] % 64 == 0
    assert m.config.vision_feature_layer == -2 and m.config.vision_feature_select_strategy == "default"
    assert asm.num_image_tokens == 4 and m.config.image_seq_length == 4
    assert asm.tokenizer.pad_token == "<unk>"  # the original's rule: pad = unk


def test_cls_patch_feature_keeps_cls(backbones):
    a = assemble(backbones["llm"], backbones["clip"], select_feature="cls_patch")
    assert a.num_image_tokens == 5 and a.model.config.vision_feature_select_strategy == "full"


def test_stage_semantics(asm):
    from types import SimpleNamespace

    m = asm.model
    s1 = Stage("align")
    s1.configure_trainable(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector" in n for n in trainable) and "projector" in s1.name
    assert s1.projector_only_saves and not s1.is_lora and s1.trainable == sum(
        p.numel() for p in m.model.multi_modal_projector.parameters())
    Stage("full").configure_trainable(m)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert any("language_model" in n for n in trainable) and not any("vision_tower" in n for n in trainable)
    Stage("full", freeze_backbone=True).configure_trainable(m)
    assert all("multi_modal_projector" in n for n, p in m.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="nothing to train"):
        Stage("full", freeze_backbone=True, freeze_projector=True).configure_trainable(m)
    # resolved once from the flags
    flags = SimpleNamespace(tune_mm_mlp_adapter=False, freeze_backbone=False)
    train = SimpleNamespace(lora_enable=True, bits=4, freeze_mm_mlp_adapter=False)
    assert Stage.from_args(flags, train) == Stage("lora", 4)
    assert Stage.from_args(SimpleNamespace(tune_mm_mlp_adapter=True, freeze_backbone=False),
                           SimpleNamespace(lora_enable=False, bits=16, freeze_mm_mlp_adapter=False)).kind == "align"


def test_text_only_batch_keeps_projector_in_graph_with_the_same_loss(asm):
    m = asm.model
    Stage("full").configure_trainable(m)
    m.train()
    cfg = m.config
    batch = {"input_ids": torch.tensor([[1, 50, 60, 70, 2], [1, 80, 90, 0, 0]]),
             "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
             "labels": torch.tensor([[-100, 50, 60, 70, 2], [-100, 80, 90, -100, -100]])}
    ref = m(**batch).loss
    ref.backward()
    assert all(p.grad is None for p in m.model.multi_modal_projector.parameters())
    m.zero_grad()
    padded = add_dummy_image(batch, cfg.image_token_index, cfg.image_seq_length, (3, 28, 28), 0, torch.float32)
    assert padded["input_ids"].shape == (2, 5 + cfg.image_seq_length) and "pixel_values" in padded
    out = m(**padded).loss
    assert torch.allclose(out, ref, atol=1e-6)
    out.backward()
    grads = [p.grad for p in m.model.multi_modal_projector.parameters()]
    assert all(g is not None for g in grads) and all(float(g.abs().sum()) == 0.0 for g in grads)
    with_images = {**batch, "pixel_values": torch.zeros(1, 3, 28, 28)}
    assert add_dummy_image(with_images, 1, 4, (3, 28, 28), 0, torch.float32) is with_images


def test_prepare_batch_is_pure_and_counts_what_the_batch_carries():
    """The batch's host-side bookkeeping leaves as counts; the model gets only its inputs; nothing else changes."""
    from llavakit.train.batch import BatchPlan, prepare_batch

    batch = {"input_ids": torch.tensor([[1, 5, 6, 0], [1, 7, 8, 9]]), "attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]),
             "labels": torch.tensor([[-100, 5, 6, -100], [-100, 7, 8, 9]]),
             "pixel_values": torch.full((2, 3, 2, 2), 255, dtype=torch.uint8), "num_real_tokens": 7,
             "num_samples": 2, "replaced": [{"index": 3, "id": "r3", "reason": "x"}]}
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    dummy = {"image_token_id": 9, "num_image_tokens": 4, "image_shape": (3, 2, 2), "pad_token_id": 0}
    plan = BatchPlan(lambda px: px.float() / 255, torch.float32, dummy, varlen=False)
    inputs, counts = prepare_batch(batch, plan, training=True)
    assert set(inputs) == {"input_ids", "attention_mask", "labels", "pixel_values", "logits_to_keep", "shift_labels"}
    assert inputs["pixel_values"].dtype == torch.float32 and float(inputs["pixel_values"].max()) == 1.0
    assert (counts.samples, counts.real_tokens, counts.positions, counts.images) == (2, 7, 8, 2)
    assert [r["id"] for r in counts.replaced] == ["r3"]
    assert batch.keys() == before.keys() and all(
        torch.equal(batch[k], before[k]) if torch.is_tensor(before[k]) else batch[k] == before[k] for k in batch)
    evaluation, _ = prepare_batch(batch, plan, training=False)  # no loss-only inputs when not training
    assert "logits_to_keep" not in evaluation


def test_projector_original_format_round_trip(asm, tmp_path):
    proj = asm.model.model.multi_modal_projector
    state = proj.state_dict()
    orig = to_original(state)
    assert sorted(orig) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                            "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    assert all(torch.equal(from_original(orig)[k], state[k]) for k in state)
    path = save_projector(state, str(tmp_path))
    with torch.no_grad():
        for p in proj.parameters():
            p.zero_()
    load_projector(proj, path)
    assert all(torch.equal(proj.state_dict()[k], state[k]) for k in state)
    # safetensors and a directory work too
    from safetensors.torch import save_file

    save_file(orig, str(tmp_path / "mm_projector.safetensors"))
    assert set(read_projector_file(str(tmp_path))) == set(state)


def test_projector_file_errors(asm, tmp_path):
    proj = asm.model.model.multi_modal_projector
    bad = tmp_path / "other.bin"
    torch.save({"model.embed_tokens.weight": torch.zeros(3)}, bad)
    with pytest.raises(ProjectorFileError, match="no projector weights"):
        load_projector(proj, str(bad))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.bin"
    torch.save({"model.mm_projector.0.weight": Evil()}, evil)
    with pytest.raises(ProjectorFileError, match="tensor-only"):
        load_projector(proj, str(evil))


def test_optimizer_groups_projector_lr_and_no_decay_on_bias_and_norms(asm, tmp_path):
    from llavakit.config import TrainingArguments
    from llavakit.train.trainer import LlavaTrainer

    m = asm.model
    stage = Stage("full")
    stage.configure_trainable(m)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=2e-4, mm_projector_lr=2e-5, weight_decay=0.1,
                             report_to="none")
    trainer = LlavaTrainer(model=m, args=args, train_dataset=[], stage=stage)
    opt = trainer.create_optimizer()
    names = {id(p): n for n, p in m.named_parameters()}
    for g in opt.param_groups:
        ns = [names[id(p)] for p in g["params"]]
        is_proj = all("multi_modal_projector" in n for n in ns)
        assert is_proj or not any("multi_modal_projector" in n for n in ns)
        assert g["lr"] == (2e-5 if is_proj else 2e-4)
        if g["weight_decay"] > 0:
            assert not any(n.endswith("bias") or "norm" in n for n in ns)
        else:
            assert all(n.endswith("bias") or "norm" in n for n in ns)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(1 for p in m.parameters() if p.requires_grad)


def test_qwen2_language_model_and_siglip_tower(tokenizer_dir, tmp_path):
    """Other causal LMs and a CLS-free vision tower assemble, train a step and generate."""
    from .conftest import qwen2_and_siglip

    parts = qwen2_and_siglip(tokenizer_dir, tmp_path)
    a = assemble(parts["llm"], parts["clip"])
    assert a.model.config.text_config.model_type == "qwen2"
    assert a.model.config.vision_feature_select_strategy == "full" and a.num_image_tokens == 4
    img = a.model.config.image_token_index
    ids = torch.tensor([[1, img, img, img, img, 50, 60]])
    out = a.model(input_ids=ids, pixel_values=torch.zeros(1, 3, 28, 28), labels=ids)
    out.loss.backward()
    assert a.model.model.multi_modal_projector.linear_1.weight.grad is not None


def test_pad_processor_of_a_tower_without_centre_crop_sees_images_as_training():
    """A SigLIP-style image processor (a fixed height and width, no crop): the `pad` processor saved with the
    model gives training's pixels, not the Llava processor's default 224-px crop."""
    import numpy as np
    from PIL import Image
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    from llavakit.data.images import ImageTransform
    from llavakit.model.processing import image_processor_for

    ip = SiglipImageProcessorPil(size={"height": 28, "width": 28})
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 47, 3), dtype=np.uint8))
    ours = ImageTransform.from_processor(ip, "pad")(im)
    theirs = image_processor_for(ip, "pad")(im, return_tensors="np")["pixel_values"][0]
    assert theirs.shape == ours.shape == (3, 28, 28) and np.array_equal(theirs, ours)
