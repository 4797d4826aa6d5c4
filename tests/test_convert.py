"""Conversion between the original LLaVA layout and transformers' Llava, built from the documented layout."""

import json
import os

import pytest
import torch

from llavakit.cli import main as cli
from llavakit.model.convert import read_weights

from .conftest import llava_inputs

MM_FIELDS = {"mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_projector_type": "mlp2x_gelu",
             "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
             "mm_use_im_patch_token": False, "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad"}


@pytest.fixture(scope="module")
def original(backbones, tmp_path_factory):
    """An original-format checkpoint as ``liuhaotian/llava-v1.5-*`` lays it out (tiny)."""
    from transformers import AutoTokenizer, CLIPVisionConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("original") / "llava-v1.5-tiny"
    llm = LlamaForCausalLM.from_pretrained(backbones["llm"])
    tok = AutoTokenizer.from_pretrained(backbones["llm"])
    tok.save_pretrained(root)
    vision_hidden = CLIPVisionConfig.from_pretrained(backbones["clip"]).hidden_size
    hidden = llm.config.hidden_size
    g = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in llm.state_dict().items()}
    state.update({"model.mm_projector.0.weight": torch.randn(hidden, vision_hidden, generator=g) * 0.1,
                  "model.mm_projector.0.bias": torch.randn(hidden, generator=g) * 0.1,
                  "model.mm_projector.2.weight": torch.randn(hidden, hidden, generator=g) * 0.1,
                  "model.mm_projector.2.bias": torch.randn(hidden, generator=g) * 0.1})
    torch.save(state, root / "pytorch_model.bin")
    cfg = llm.config.to_dict()
    cfg.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava_llama", mm_hidden_size=vision_hidden,
               tune_mm_mlp_adapter=False, freeze_mm_mlp_adapter=False, use_mm_proj=True,
               tokenizer_model_max_length=2048, tokenizer_padding_side="right", **MM_FIELDS)
    (root / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"dir": root, "state": state, "config": cfg, "vocab": len(tok)}


@pytest.fixture(scope="module")
def converted(original, backbones, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "hf"
    assert cli(["convert", "from-original", "--model-path", str(original["dir"]), "--save-model-path", str(out),
                "--vision-tower", backbones["clip"]]) == 0
    return out


def test_from_original_is_the_same_model_in_native_form(original, converted, backbones, train_data):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavakit.model.build import assemble
    from llavakit.model.projector import load_projector

    model = LlavaForConditionalGeneration.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    sd = model.state_dict()
    for k, v in original["state"].items():
        if k.startswith("model.mm_projector."):
            layer = {"0": "linear_1", "2": "linear_2"}[k.split(".")[2]]
            assert torch.equal(sd[f"model.multi_modal_projector.{layer}.{k.split('.')[-1]}"], v), k
        elif k == "lm_head.weight" or k == "model.embed_tokens.weight":
            key = k if k == "lm_head.weight" else "model.language_model.embed_tokens.weight"
            assert torch.equal(sd[key][: original["vocab"]], v)
            assert sd[key].shape[0] % 64 == 0
        else:
            assert torch.equal(sd["model.language_model." + k[len("model."):]], v), k
    assert model.config.vision_feature_layer == -2 and model.config.vision_feature_select_strategy == "default"
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == original["vocab"]
    assert processor.image_processor.do_pad  # image_aspect_ratio "pad" carried over
    assert "USER: " in processor.chat_template and "ASSISTANT:" in processor.chat_template

    # the same outputs as assembling the parts by hand (columns of real tokens; the new rows are new)
    ref = assemble(backbones["llm"], backbones["clip"]).model.eval()
    torch.save({k: v for k, v in original["state"].items() if "mm_projector" in k}, converted.parent / "p.bin")
    load_projector(ref.model.multi_modal_projector, str(converted.parent / "p.bin"))
    inputs = llava_inputs(processor, os.path.join(train_data["images"], "coco", "1.jpg"))
    with torch.no_grad():
        a = model(**inputs).logits[..., : original["vocab"]]
        b = ref(**inputs).logits[..., : original["vocab"]]
    assert torch.allclose(a, b, atol=1e-5)


def test_round_trip_to_original_is_exact(original, converted, backbones, tmp_path):
    back = tmp_path / "back"
    assert cli(["convert", "to-original", "--model-path", str(converted), "--save-model-path", str(back),
                "--vision-tower", original["config"]["mm_vision_tower"]]) == 0
    state = read_weights(str(back))
    assert sorted(state) == sorted(original["state"])
    assert all(torch.equal(state[k], original["state"][k]) for k in state)
    cfg = json.loads((back / "config.json").read_text())
    for k, v in MM_FIELDS.items():
        assert cfg[k] == v, k
    assert cfg["architectures"] == ["LlavaLlamaForCausalLM"] and cfg["model_type"] == "llava_llama"
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        assert cfg[k] == original["config"][k], k
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(back)
    assert len(tok) == original["vocab"] and "<image>" not in tok.get_vocab()


def test_our_output_to_original_and_back_keeps_its_outputs(stage2, train_data, tmp_path):
    """A trained model with its own tower: the tower is saved beside the original-layout checkpoint."""
    from transformers import AutoProcessor, CLIPVisionModel, LlavaForConditionalGeneration

    orig = tmp_path / "orig"
    assert cli(["convert", "to-original", "--model-path", str(stage2["out"]), "--save-model-path", str(orig)]) == 0
    cfg = json.loads((orig / "config.json").read_text())
    assert cfg["mm_vision_tower"] == str((orig / "vision_tower").resolve())
    CLIPVisionModel.from_pretrained(cfg["mm_vision_tower"])
    assert (orig / "vision_tower" / "preprocessor_config.json").is_file()
    again = tmp_path / "again"
    assert cli(["convert", "from-original", "--model-path", str(orig), "--save-model-path", str(again)]) == 0

    a_model = LlavaForConditionalGeneration.from_pretrained(stage2["out"]).eval()
    b_model = LlavaForConditionalGeneration.from_pretrained(again).eval()
    image_id = a_model.config.image_token_index
    assert b_model.config.image_token_index == image_id
    img = os.path.join(train_data["images"], "coco", "2.jpg")
    a_in = llava_inputs(AutoProcessor.from_pretrained(stage2["out"]), img)
    b_in = llava_inputs(AutoProcessor.from_pretrained(again), img)
    assert torch.equal(a_in["input_ids"], b_in["input_ids"]) and torch.equal(a_in["pixel_values"],
                                                                             b_in["pixel_values"])
    with torch.no_grad():
        assert torch.allclose(a_model(**a_in).logits[..., :image_id], b_model(**b_in).logits[..., :image_id],
                              atol=1e-5)


def test_training_refuses_an_original_checkpoint_and_names_the_conversion(original, backbones, train_data):
    from llavakit.model.build import ModelLoadError, load_parts

    with pytest.raises(ModelLoadError, match="llavakit convert from-original"):
        load_parts(str(original["dir"]), None)


def test_unsupported_original_projector_is_a_clear_error(original, tmp_path):
    import shutil

    bad = tmp_path / "linear"
    shutil.copytree(original["dir"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["mm_projector_type"] = "linear"
    (bad / "config.json").write_text(json.dumps(cfg))
    from llavakit.model.convert import ConversionError, from_original

    with pytest.raises(ConversionError, match="only mlp2x_gelu"):
        from_original(str(bad), str(tmp_path / "out"))
