"""Load any llavakit output (or an HF-native LLaVA checkpoint) for inference: model + processor.

What a directory is, is read from its files, never from its name:

* ``config.json`` of a transformers-native LLaVA (our stage-2 output, a merged LoRA, a conversion, or a
  ``llava-hf/llava-1.5-*-hf`` style checkpoint): loaded as it is;
* ``adapter_config.json`` (a LoRA run's output): the base is rebuilt from the adapter's own record
  (``llavakit_base.json``; ``model_base`` overrides the language model), the adapter and the projector are
  loaded and merged;
* an original-format checkpoint: refused with the conversion command to run.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from llavakit.model.build import ModelLoadError, checkpoint_kind, native_classes, read_config_dict

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Loaded:
    model: Any  # LlavaForConditionalGeneration (LlavaNext for AnyRes), eval mode
    processor: Any  # LlavaProcessor (LlavaNextProcessor) with the chat template the model was trained with
    kind: str  # "llava-hf" or "lora"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def load_llava(path: str, *, model_base: str | None = None, dtype: torch.dtype | None = None,
               device: str | torch.device | None = None, conv_mode: str | None = None) -> Loaded:
    """Model and processor for inference; ``conv_mode`` replaces the saved chat template."""
    device = torch.device(device) if device else default_device()
    dtype = dtype or default_dtype(device)
    if is_adapter_dir(path):
        model, processor = merge_lora(path, model_base=model_base, dtype=dtype)
        kind = "lora"
    else:
        if not os.path.exists(path) and "/" not in path:
            raise ModelLoadError(f"{path}: no such model directory")
        cfg = read_config_dict(path)
        kind = checkpoint_kind(cfg)
        if kind != "llava-hf":
            hint = (f"convert it first: llavakit convert from-original --model-path {path} --save-model-path "
                    f"{path.rstrip('/')}-hf" if kind == "llava-original" else
                    "give a LLaVA checkpoint (a stage-2 or merged output), not a language model")
            raise ModelLoadError(f"{path} is not a transformers-native LLaVA checkpoint; {hint}")
        from llavakit.model.processing import load_processor

        model_cls = native_classes(cfg.get("model_type"))[0]
        model = model_cls.from_pretrained(path, dtype=dtype)
        processor = load_processor(path)
    if conv_mode:
        use_template(model, processor, conv_mode)
    model.to(device).eval()
    return Loaded(model, processor, kind)


def use_template(model, processor, conv_mode: str) -> None:
    """Render prompts with ``conv_mode`` (and stop where it ends a turn) instead of the saved template."""
    from llavakit.data.templates import get_template
    from llavakit.model.processing import chat_template_for, set_generation_stop

    template = get_template(conv_mode, processor.tokenizer)
    processor.chat_template = chat_template_for(template, processor.tokenizer)
    set_generation_stop(model.generation_config, processor.tokenizer, template)


def merge_lora(adapter_dir: str, *, model_base: str | None = None, dtype: torch.dtype = torch.float32):
    """(merged model, processor) from a LoRA run's output directory."""
    from peft import PeftModel

    from llavakit.data.templates import get_template
    from llavakit.model.build import assemble
    from llavakit.model.lora import BASE_FILE, load_newline, read_base_record
    from llavakit.model.processing import load_processor, set_generation_stop
    from llavakit.model.projector import load_projector

    record = read_base_record(adapter_dir)
    if record is None and model_base is None:
        raise ModelLoadError(f"{adapter_dir}: no {BASE_FILE} saying what the adapter was trained on; give the "
                             "base with --model-base (a LLaVA checkpoint)")
    record = dict(record or {})
    if model_base:
        record["model_name_or_path"] = model_base
    base_kind = checkpoint_kind(read_config_dict(record["model_name_or_path"]))
    asm = assemble(record["model_name_or_path"], record.get("vision_tower") if base_kind == "lm" else None,
                   select_layer=record.get("mm_vision_select_layer", -2),
                   select_feature=record.get("mm_vision_select_feature", "patch"), dtype=dtype,
                   mm_use_im_patch_token=record.get("mm_use_im_patch_token", False),
                   mm_use_im_start_end=record.get("mm_use_im_start_end", False),
                   image_aspect_ratio=record.get("image_aspect_ratio") or "square",
                   image_grid_pinpoints=record.get("image_grid_pinpoints"))
    model = asm.model
    newline = load_newline(adapter_dir)
    if newline is not None:  # an AnyRes adapter's image_newline, saved beside it
        with torch.no_grad():
            model.model.image_newline.copy_(newline)
    adapter_holds_projector = _adapter_keys_match(adapter_dir, "multi_modal_projector")
    if not adapter_holds_projector and record.get("pretrain_mm_mlp_adapter"):
        load_projector(model.model.multi_modal_projector, record["pretrain_mm_mlp_adapter"])
    logger.info("merging the LoRA adapter %s into %s", adapter_dir, record["model_name_or_path"])
    model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    processor = load_processor(adapter_dir)
    if record.get("version"):
        set_generation_stop(model.generation_config, processor.tokenizer, get_template(record["version"], processor.tokenizer))
    model.config.use_cache = True
    model.config.text_config.use_cache = True
    return model, processor


def _adapter_keys_match(adapter_dir: str, fragment: str) -> bool:
    st = os.path.join(adapter_dir, "adapter_model.safetensors")
    if os.path.isfile(st):
        from safetensors import safe_open

        with safe_open(st, "pt") as f:
            return any(fragment in k for k in f.keys())
    binf = os.path.join(adapter_dir, "adapter_model.bin")
    if os.path.isfile(binf):
        from llavakit.model.tensors import load_tensors

        return any(fragment in k for k in load_tensors(binf))
    raise ModelLoadError(f"{adapter_dir}: {ADAPTER_CONFIG} but no adapter_model.safetensors / .bin")


def save_llava(model, processor, out: str) -> None:
    """Write a transformers-native LLaVA directory (weights, config, generation config, processor)."""
    from llavakit.model.generation_config import make_savable

    os.makedirs(out, exist_ok=True)
    make_savable(model.generation_config)
    from llavakit.model.processing import keep_sentencepiece_model

    model.save_pretrained(out)
    processor.save_pretrained(out)
    keep_sentencepiece_model(processor.tokenizer, out)
