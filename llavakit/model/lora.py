"""LoRA on the language model only, through peft.

Targets the language model's attention and MLP projections (a regex, so CLIP's ``q_proj``/``k_proj``/
``v_proj`` are left alone, and neither the projector nor ``lm_head`` gets an adapter); the projector
trains fully as a peft ``modules_to_save`` module, so it is saved, reloaded and resumed with the adapter.
An AnyRes model's ``image_newline`` (a bare parameter, which peft cannot hold) trains beside it and is saved
next to the adapter (``image_newline.safetensors``).
"""

from __future__ import annotations

import json
import os

LORA_TARGET = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
BASE_FILE = "llavakit_base.json"


def apply_lora(model, train_args, train_projector: bool = True):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=train_args.lora_r, lora_alpha=train_args.lora_alpha, lora_dropout=train_args.lora_dropout,
                     bias=train_args.lora_bias, target_modules=LORA_TARGET,
                     modules_to_save=["multi_modal_projector"] if train_projector else None)
    return get_peft_model(model, cfg)


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path and os.path.exists(path) else path


def read_base_record(directory: str) -> dict | None:
    path = os.path.join(directory, BASE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


#: an AnyRes model's image_newline beside the adapter (peft saves modules, and the newline is a bare parameter)
NEWLINE_FILE = "image_newline.safetensors"


def save_newline(directory: str, value) -> str:
    from safetensors.torch import save_file

    path = os.path.join(directory, NEWLINE_FILE)
    save_file({"image_newline": value.detach().cpu().contiguous()}, path)
    return path


def load_newline(directory: str):
    """The image_newline saved beside an adapter, or None."""
    path = os.path.join(directory, NEWLINE_FILE)
    if not os.path.isfile(path):
        return None
    from safetensors.torch import load_file

    return load_file(path)["image_newline"]


def write_base_record(directory: str, model_args, data_args=None) -> str:
    """What the adapter was trained on, so merging needs no guess from directory names."""
    path = os.path.join(directory, BASE_FILE)
    record = {"model_name_or_path": _abs(model_args.model_name_or_path),
              "vision_tower": _abs(model_args.vision_tower),
              "mm_vision_select_layer": model_args.mm_vision_select_layer,
              "mm_vision_select_feature": model_args.mm_vision_select_feature,
              "mm_use_im_start_end": model_args.mm_use_im_start_end,
              "mm_use_im_patch_token": model_args.mm_use_im_patch_token,
              "pretrain_mm_mlp_adapter": _abs(model_args.pretrain_mm_mlp_adapter),
              "version": model_args.version,
              "image_aspect_ratio": getattr(data_args, "image_aspect_ratio", "square"),
              "image_grid_pinpoints": getattr(data_args, "image_grid_pinpoints", None)}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    return path
