"""Conversion between the original LLaVA checkpoint layout and transformers' native Llava (LLaVA-1.5) or
LlavaNext (LLaVA-NeXT: ``liuhaotian/llava-v1.6-*``, ``mm_patch_merge_type: spatial_unpad``,
``image_aspect_ratio: anyres``, ``image_grid_pinpoints``, the ``model.image_newline`` weight).

Original layout (``liuhaotian/llava-v1.5-*``): a ``config.json`` of the language model plus ``mm_*`` fields
(``architectures: [LlavaLlamaForCausalLM]``, ``model_type: llava_llama``), weights named as the language
model's (``model.layers.*``, ``lm_head.weight``) plus ``model.mm_projector.{0,2}.*``; the vision tower is
named by ``mm_vision_tower`` and loaded from there (its weights are in the checkpoint only when it was
trained: ``model.vision_tower.vision_tower.*``). The original keeps ``<image>`` out of the vocabulary.

Native layout: ``LlavaForConditionalGeneration`` with ``model.language_model.*``,
``model.multi_modal_projector.linear_{1,2}.*``, ``model.vision_tower.*``, ``lm_head.*``, an ``<image>``
token in the vocabulary (embeddings padded to a multiple of 64, new rows set to the mean row), and a
processor whose chat template is the conversation template.

Tensors are moved, never recomputed: original → native → original gives back the same tensors.
"""

from __future__ import annotations

import glob
import json
import logging
import os

import torch

from llavakit import IMAGE_PLACEHOLDER
from llavakit.model.build import ModelLoadError, checkpoint_kind, read_config_dict
from llavakit.model.projector import ORIGINAL_TO_HF
from llavakit.model.tensors import grow_rows, load_tensors

logger = logging.getLogger(__name__)

#: original model_type → (transformers text model_type, original architecture)
ORIGINAL_TEXT_MODELS = {
    "llava": ("llama", "LlavaLlamaForCausalLM"),
    "llava_llama": ("llama", "LlavaLlamaForCausalLM"),
    "llava_mistral": ("mistral", "LlavaMistralForCausalLM"),
}
TEXT_TO_ORIGINAL = {"llama": ("llava_llama", "LlavaLlamaForCausalLM"),
                    "mistral": ("llava_mistral", "LlavaMistralForCausalLM")}
#: config fields the original adds to the language model's config
ORIGINAL_EXTRA_FIELDS = {"image_aspect_ratio", "image_grid_pinpoints", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter",
                         "use_mm_proj", "tokenizer_model_max_length", "tokenizer_padding_side",
                         "unfreeze_mm_vision_tower", "mm_vision_tower_lr", "vision_tower", "s2", "s2_scales",
                         "architectures", "model_type", "_name_or_path", "transformers_version"}
ORIGINAL_PROJECTOR = "model.mm_projector."
ORIGINAL_VISION = "model.vision_tower.vision_tower."
ORIGINAL_NEWLINE = NATIVE_NEWLINE = "model.image_newline"  # LLaVA-NeXT: the same name in both layouts
NATIVE_LM = "model.language_model."
NATIVE_PROJECTOR = "model.multi_modal_projector."
NATIVE_VISION = "model.vision_tower."
PROJECTOR_LAYERS = ORIGINAL_TO_HF  # the original's Sequential indices → transformers' layer names
#: the key prefixes transformers' ``save_pretrained`` writes for Llava (its older module layout, also the
#: llava-hf checkpoints') → the module's current names
SAVED_TO_NATIVE = (("language_model.lm_head.", "lm_head."), ("language_model.model.", NATIVE_LM),
                   ("vision_tower.", NATIVE_VISION), ("multi_modal_projector.", NATIVE_PROJECTOR),
                   ("image_newline", "model.image_newline"))  # LlavaNext


def native_key(key: str) -> str:
    """A Llava / LlavaNext weight name as saved (older layout) or current → its current name."""
    for saved, native in SAVED_TO_NATIVE:
        if key.startswith(saved):
            return native + key[len(saved):]
    return key


#: the level transformers 4.x (the original's pin) has in a vision model's weight names and 5.x has not
VISION_MODEL_LEVEL = "vision_model."
#: buffers older checkpoints saved that transformers 5 rebuilds itself
VISION_CONSTANT_BUFFERS = ("embeddings.position_ids",)


class ConversionError(ModelLoadError):
    pass


def _native_vision_key(key: str, native_state: dict) -> str | None:
    """The name of a vision weight (``vision_model.encoder...`` as the original saves it, or already
    transformers 5's ``encoder...``) in the native tower's state dict, or None."""
    for name in (key, key[len(VISION_MODEL_LEVEL):] if key.startswith(VISION_MODEL_LEVEL) else None,
                 VISION_MODEL_LEVEL + key):
        if name is not None and name in native_state:
            return name
    return None


# ---- weights on disk ----------------------------------------------------------------------------
def read_weights(directory: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory: safetensors or torch ``.bin`` files, sharded or not."""
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for f in files:
            out.update(load_file(f))
        return out
    files = sorted(glob.glob(os.path.join(directory, "pytorch_model*.bin")))
    if not files:
        raise ConversionError(f"{directory}: no *.safetensors or pytorch_model*.bin weight files")
    out = {}
    for f in files:
        out.update(load_tensors(f))
    return out


def write_weights(state: dict[str, torch.Tensor], directory: str, max_shard_size: str = "5GB") -> None:
    from huggingface_hub import save_torch_state_dict

    save_torch_state_dict({k: v.contiguous() for k, v in state.items()}, directory, max_shard_size=max_shard_size)


# ---- original → native --------------------------------------------------------------------------
def from_original(model_path: str, save_path: str, *, vision_tower: str | None = None,
                  conv_mode: str = "vicuna_v1") -> str:
    """Write the native conversion of an original-format checkpoint to ``save_path``."""
    from transformers import CONFIG_MAPPING, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    from llavakit.data.templates import get_template
    from llavakit.data.tokenize import load_tokenizer
    from llavakit.model.build import (
        _quiet_loading,
        _vision_config,
        anyres_config_fields,
        anyres_for,
        has_cls_token,
        load_image_processor,
        model_type_for,
        native_classes,
        num_image_tokens_for,
        prepare_tokenizer,
    )
    from llavakit.model.generation_config import make_savable
    from llavakit.model.processing import (
        build_processor,
        chat_template_for,
        image_processor_for,
        keep_sentencepiece_model,
        set_generation_stop,
    )

    if not os.path.isdir(model_path):  # a hub name: the files, once, into the hub cache
        from huggingface_hub import snapshot_download

        try:
            model_path = snapshot_download(model_path, allow_patterns=["*.json", "*.safetensors", "*.bin",
                                                                      "*.model", "*.txt"])
        except Exception as e:  # noqa: BLE001 - any hub failure: say which name and why
            raise ConversionError(f"{model_path}: not a local directory, and the hub download failed: {e}") from None
    cfg = read_config_dict(model_path)
    if checkpoint_kind(cfg) != "llava-original":
        raise ConversionError(f"{model_path}: not an original-format LLaVA checkpoint (no mm_vision_tower / "
                              "Llava*ForCausalLM in its config.json)")
    mtype = cfg.get("model_type")
    if mtype not in ORIGINAL_TEXT_MODELS:
        raise ConversionError(f"{model_path}: model_type {mtype!r} is not supported; supported: "
                              f"{', '.join(sorted(ORIGINAL_TEXT_MODELS))}")
    if cfg.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(f"{model_path}: mm_projector_type {cfg['mm_projector_type']!r}; only mlp2x_gelu "
                              "(LLaVA-1.5) maps onto transformers' Llava projector")
    merge, aspect = cfg.get("mm_patch_merge_type") or "flat", cfg.get("image_aspect_ratio") or "square"
    next_model = merge == "spatial_unpad" and aspect.startswith("anyres")  # LLaVA-NeXT (llava-v1.6-*), OneVision
    if not next_model and (merge != "flat" or aspect.startswith("anyres")):
        raise ConversionError(f"{model_path}: mm_patch_merge_type {merge!r} with image_aspect_ratio {aspect!r}; "
                              "transformers has LLaVA-1.5 (flat, square or pad) and LLaVA-NeXT (spatial_unpad, "
                              "anyres)")
    tower = vision_tower or cfg.get("mm_vision_tower") or cfg.get("vision_tower")
    if not tower:
        raise ConversionError(f"{model_path}: config.json names no mm_vision_tower; give --vision-tower")
    text_type, _ = ORIGINAL_TEXT_MODELS[mtype]
    text_fields = {k: v for k, v in cfg.items() if not k.startswith("mm_") and k not in ORIGINAL_EXTRA_FIELDS}
    text_config = CONFIG_MAPPING[text_type].from_dict(text_fields)

    tokenizer = load_tokenizer(model_path)
    use_patch, use_start_end = bool(cfg.get("mm_use_im_patch_token")), bool(cfg.get("mm_use_im_start_end"))
    prepare_tokenizer(tokenizer, use_patch, use_start_end)

    try:
        vcfg = _vision_config(tower, None)
    except ModelLoadError as e:
        raise ConversionError(f"{model_path}: cannot load the vision tower {tower!r} it names ({e}); give "
                              "--vision-tower with a local copy of that tower") from None
    strategy = "default" if cfg.get("mm_vision_select_feature", "patch") == "patch" else "full"
    if not has_cls_token(vcfg):
        strategy = "full"
    logger.info("reading %s", model_path)
    original = read_weights(model_path)
    state: dict[str, torch.Tensor] = {}
    own_vision = {}
    for k, v in original.items():
        if k.startswith(ORIGINAL_PROJECTOR):
            layer, _, param = k[len(ORIGINAL_PROJECTOR):].partition(".")
            if layer not in PROJECTOR_LAYERS:
                raise ConversionError(f"{model_path}: projector weight {k} is not part of an mlp2x_gelu projector")
            state[f"{NATIVE_PROJECTOR}{PROJECTOR_LAYERS[layer]}.{param}"] = v
        elif k.startswith(ORIGINAL_VISION):
            own_vision[k[len(ORIGINAL_VISION):]] = v
        elif k == ORIGINAL_NEWLINE and next_model:
            state[NATIVE_NEWLINE] = v
        elif k.startswith("lm_head."):
            state[k] = v
        elif k.startswith("model."):
            state[NATIVE_LM + k[len("model."):]] = v
        else:
            raise ConversionError(f"{model_path}: unexpected weight {k}")
    if f"{NATIVE_PROJECTOR}linear_1.weight" not in state:
        raise ConversionError(f"{model_path}: no model.mm_projector.* weights; a stage-1 projector alone "
                              "(mm_projector.bin) is used with --pretrain_mm_mlp_adapter, not converted")
    logger.info("loading vision tower %s", tower)
    dtype = state[f"{NATIVE_PROJECTOR}linear_1.weight"].dtype
    with _quiet_loading():  # a full CLIP checkpoint also holds the text tower, which is not wanted here
        vision = MODEL_MAPPING[type(vcfg)].from_pretrained(tower, config=vcfg, dtype=dtype)
    vision_state = vision.state_dict()
    if own_vision:
        logger.info("the checkpoint holds its own vision tower (%d tensors): used instead of %s's",
                    len(own_vision), tower)
    for k, v in own_vision.items():
        native = _native_vision_key(k, vision_state)
        if native is None:
            if k.endswith(VISION_CONSTANT_BUFFERS):
                continue  # a constant (position ids), not a weight
            raise ConversionError(f"{model_path}: vision weight {ORIGINAL_VISION}{k} does not fit {tower}")
        if vision_state[native].shape != v.shape:
            raise ConversionError(f"{model_path}: vision weight {ORIGINAL_VISION}{k} has shape {tuple(v.shape)}, "
                                  f"{tower}'s {tuple(vision_state[native].shape)}")
        vision_state[native] = v
    state.update({NATIVE_VISION + k: v for k, v in vision_state.items()})

    embed = NATIVE_LM + "embed_tokens.weight"
    rows = -(-len(tokenizer) // 64) * 64
    rows = max(rows, state[embed].shape[0])
    state[embed] = grow_rows(state[embed], rows)
    tied = bool(cfg.get("tie_word_embeddings", False))
    if tied:
        state.pop("lm_head.weight", None)
    else:
        state["lm_head.weight"] = grow_rows(state["lm_head.weight"], rows)
    text_config.vocab_size = rows
    text_config.pad_token_id = tokenizer.pad_token_id

    n_tokens = num_image_tokens_for(vcfg, strategy)
    anyres = None
    if next_model:
        if NATIVE_NEWLINE not in state:
            raise ConversionError(f"{model_path}: a LLaVA-NeXT config (spatial_unpad) but no {ORIGINAL_NEWLINE}")
        anyres = anyres_for(aspect, cfg.get("image_grid_pinpoints"), vcfg, load_image_processor(tower), strategy,
                            model_path)
    model_cls, config_cls, _ = native_classes(model_type_for(anyres))
    extra = anyres_config_fields(anyres)
    config = config_cls(text_config=text_config, vision_config=vision.config,
                        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER), image_seq_length=n_tokens,
                        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
                        vision_feature_select_strategy=strategy, projector_hidden_act="gelu",
                        multimodal_projector_bias=True, tie_word_embeddings=tied, **extra)
    config.architectures = [model_cls.__name__]
    config.pad_token_id = tokenizer.pad_token_id
    config.dtype = dtype
    os.makedirs(save_path, exist_ok=True)
    config.save_pretrained(save_path)
    write_weights(state, save_path)

    template = get_template(conv_mode, tokenizer)
    tokenizer.chat_template = chat_template_for(template, tokenizer)
    processor = build_processor(tokenizer, image_processor_for(load_image_processor(tower), aspect, anyres),
                                vcfg, strategy, tokenizer.chat_template, anyres=anyres)
    processor.save_pretrained(save_path)
    keep_sentencepiece_model(tokenizer, save_path)
    gen_path = os.path.join(model_path, "generation_config.json")
    gen = GenerationConfig.from_pretrained(model_path) if os.path.isfile(gen_path) else GenerationConfig()
    set_generation_stop(gen, tokenizer, template)
    make_savable(gen)
    gen.save_pretrained(save_path)
    logger.info("converted %s → %s", model_path, save_path)
    return save_path


# ---- native → original --------------------------------------------------------------------------
def to_original(model_path: str, save_path: str, *, vision_tower: str | None = None) -> str:
    """Write ``model_path`` (native) in the original repository's layout to ``save_path``.

    ``vision_tower`` names the public tower the model's tower equals (``mm_vision_tower``); without it the
    tower is saved to ``save_path/vision_tower`` and ``mm_vision_tower`` points there.
    """
    from transformers import CLIPImageProcessor

    from llavakit.model.build import anyres_of, native_classes
    from llavakit.model.processing import load_processor

    cfg = read_config_dict(model_path)
    if checkpoint_kind(cfg) != "llava-hf":
        raise ConversionError(f"{model_path}: not a transformers-native LLaVA checkpoint")
    model = native_classes(cfg.get("model_type"))[0].from_pretrained(model_path, dtype="auto")
    anyres = anyres_of(model.config)
    processor = load_processor(model_path)
    tokenizer = processor.tokenizer
    text_type = model.config.text_config.model_type
    if text_type not in TEXT_TO_ORIGINAL:
        raise ConversionError(f"{model_path}: the original repository has no LLaVA class for a {text_type} "
                              f"language model (supported: {', '.join(TEXT_TO_ORIGINAL)})")
    strategy = model.config.vision_feature_select_strategy
    layer = model.config.vision_feature_layer
    if not isinstance(layer, int):
        raise ConversionError(f"{model_path}: vision_feature_layer {layer!r}; the original takes one layer")

    state = {}
    for k, v in model.state_dict().items():
        if k.startswith(NATIVE_PROJECTOR):
            layer_name, _, param = k[len(NATIVE_PROJECTOR):].partition(".")
            inv = {v2: k2 for k2, v2 in PROJECTOR_LAYERS.items()}
            state[f"{ORIGINAL_PROJECTOR}{inv[layer_name]}.{param}"] = v
        elif k.startswith(NATIVE_LM):
            state["model." + k[len(NATIVE_LM):]] = v
        elif k == "lm_head.weight":
            if not model.config.tie_word_embeddings:
                state[k] = v
        elif k == NATIVE_NEWLINE:
            state[ORIGINAL_NEWLINE] = v
        elif not k.startswith(NATIVE_VISION):
            raise ConversionError(f"{model_path}: unexpected weight {k}")

    os.makedirs(save_path, exist_ok=True)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(save_path)
    image_id = model.config.image_token_index
    if image_id == len(tokenizer) - 1 and _drop_last_added_token(save_path, IMAGE_PLACEHOLDER, image_id):
        vocab = image_id  # <image> was added last (by a conversion or by training): it goes again
    else:  # kept (harmless: the original splits prompts on "<image>" before tokenizing)
        tokenizer.save_pretrained(save_path)
        vocab = len(tokenizer)
    _write_original_tokenizer_config(model_path, save_path, tokenizer, vocab)
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in state:
            state[k] = state[k][:vocab].clone()
    write_weights(state, save_path)

    vision = model.model.vision_tower
    if vision_tower is None:
        vision_tower = os.path.abspath(os.path.join(save_path, "vision_tower"))
        _save_original_vision_tower(vision, vision_tower)
        ip = {k: v for k, v in processor.image_processor.to_dict().items()
              if k in ("crop_size", "do_center_crop", "do_normalize", "do_rescale", "do_resize", "do_convert_rgb",
                       "image_mean", "image_std", "resample", "rescale_factor", "size")}
        CLIPImageProcessor(**ip).save_pretrained(vision_tower)
        logger.info("vision tower saved to %s (mm_vision_tower points there)", vision_tower)

    original_type, arch = TEXT_TO_ORIGINAL[text_type]
    text = _original_text_config(model.config.text_config)
    do_pad = bool(getattr(processor.image_processor, "do_pad", False))
    out_cfg = {
        "architectures": [arch], "model_type": original_type, **text,
        "vocab_size": vocab, "torch_dtype": str(next(iter(state.values())).dtype).replace("torch.", ""),
        "use_cache": True, "pad_token_id": tokenizer.pad_token_id,
        "mm_vision_tower": vision_tower, "mm_hidden_size": model.config.vision_config.hidden_size,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": layer,
        "mm_vision_select_feature": "patch" if strategy == "default" else "cls_patch",
        "mm_use_im_start_end": "<im_start>" in tokenizer.get_vocab(),
        "mm_use_im_patch_token": "<im_patch>" in tokenizer.get_vocab(),
        "mm_patch_merge_type": "spatial_unpad" if anyres else "flat",
        "image_aspect_ratio": anyres.aspect_ratio if anyres else "pad" if do_pad else "square",
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False, "use_mm_proj": True, "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": min(int(getattr(tokenizer, "model_max_length", 2048) or 2048),
                                          model.config.text_config.max_position_embeddings),
    }
    if anyres:
        out_cfg["image_grid_pinpoints"] = [list(p) for p in anyres.pinpoints]
    with open(os.path.join(save_path, "config.json"), "w", encoding="utf-8") as f:
        json.dump(out_cfg, f, indent=2, sort_keys=True)
    from llavakit.model.generation_config import make_savable

    gen = model.generation_config
    make_savable(gen)
    gen.save_pretrained(save_path)
    logger.info("converted %s → %s (original layout)", model_path, save_path)
    return save_path


def _original_text_config(text_config) -> dict:
    """The language model's config as transformers 4.x (the original's pin) reads it: ``rope_theta`` and
    ``rope_scaling`` instead of 5.x's ``rope_parameters``."""
    text = text_config.to_dict()
    for k in ("architectures", "model_type", "_name_or_path", "transformers_version", "dtype", "torch_dtype",
              "output_attentions", "output_hidden_states", "return_dict", "use_return_dict"):
        text.pop(k, None)
    rope = dict(text.pop("rope_parameters", None) or {})
    if "rope_theta" in rope:
        text["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type", rope.pop("type", "default"))
    text["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, "rope_type": rope_type, **rope}
    return text


def _save_original_vision_tower(vision, directory: str) -> None:
    """The tower as transformers 4.x saves a ``CLIPVisionModel``: ``vision_model.``-prefixed weight names
    (the original loads it with ``CLIPVisionModel.from_pretrained``) and a config with ``torch_dtype``."""
    os.makedirs(directory, exist_ok=True)
    state = {}
    for k, v in vision.state_dict().items():
        state[k if k.startswith(VISION_MODEL_LEVEL) else VISION_MODEL_LEVEL + k] = v
    write_weights(state, directory)
    cfg = vision.config.to_dict()
    cfg["torch_dtype"] = str(next(iter(state.values())).dtype).replace("torch.", "")
    cfg.pop("dtype", None)
    cfg["architectures"] = [type(vision).__name__]
    _write_json(os.path.join(directory, "config.json"), cfg)


#: tokenizer_config.json keys that transformers 4.x's LlamaTokenizer / PreTrainedTokenizerFast read
ORIGINAL_TOKENIZER_KEYS = ("add_bos_token", "add_eos_token", "bos_token", "eos_token", "unk_token", "pad_token",
                           "model_max_length", "padding_side", "clean_up_tokenization_spaces", "legacy",
                           "sp_model_kwargs", "added_tokens_decoder")


def _write_original_tokenizer_config(model_path: str, save_path: str, tokenizer, vocab: int) -> None:
    """A tokenizer the original loader (transformers 4.37, ``use_fast=False``) reads: with the model's
    sentencepiece ``tokenizer.model`` a ``LlamaTokenizer``, as Vicuna's and the original's checkpoints ship it;
    without one a ``PreTrainedTokenizerFast`` on ``tokenizer.json``."""
    import shutil

    from llavakit.data.tokenize import tokenizer_adds_bos
    from llavakit.model.processing import sentencepiece_model_of

    sp_model = sentencepiece_model_of(tokenizer, model_path)
    tc_path = os.path.join(save_path, "tokenizer_config.json")
    saved = _read_json(tc_path) if os.path.isfile(tc_path) else {}
    cfg = {k: saved[k] for k in ORIGINAL_TOKENIZER_KEYS if k in saved}
    cfg.setdefault("add_bos_token", tokenizer_adds_bos(tokenizer))
    cfg.setdefault("add_eos_token", False)
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        cfg[name] = getattr(tokenizer, name)
    # tokens added after the base vocabulary (a pad token, say), which a sentencepiece model does not hold
    added = {i: t for t, i in tokenizer.get_added_vocab().items() if i < vocab}
    if added:
        cfg["added_tokens_decoder"] = {str(i): {"content": t, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False,
                                                "special": t in tokenizer.all_special_tokens}
                                       for i, t in sorted(added.items())}
    if sp_model:
        shutil.copyfile(sp_model, os.path.join(save_path, "tokenizer.model"))
        cfg.update(tokenizer_class="LlamaTokenizer", legacy=False)
        cfg.setdefault("sp_model_kwargs", {})
    else:
        logger.warning("%s has no sentencepiece tokenizer.model: the original loader will read tokenizer.json "
                       "as a PreTrainedTokenizerFast", model_path)
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(tc_path, cfg)
    _write_json(os.path.join(save_path, "special_tokens_map.json"),
                {k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if cfg.get(k)})


def _read_json(path: str):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json(path: str, data) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=2)


def _drop_last_added_token(directory: str, token: str, token_id: int) -> bool:
    """Remove ``token`` (the last added token) from a saved tokenizer; True when the reloaded tokenizer no
    longer has it."""
    from transformers import AutoTokenizer

    tj = os.path.join(directory, "tokenizer.json")
    tc = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(tj):
        data = _read_json(tj)
        data["added_tokens"] = [t for t in data.get("added_tokens", []) if t.get("content") != token]
        _write_json(tj, data)
    if os.path.isfile(tc):
        data = _read_json(tc)
        data.get("added_tokens_decoder", {}).pop(str(token_id), None)
        for key in ("additional_special_tokens", "extra_special_tokens"):
            if isinstance(data.get(key), list):
                data[key] = [t for t in data[key] if t != token]
            elif isinstance(data.get(key), dict):
                data[key] = {k: v for k, v in data[key].items() if v != token}
        data.pop("image_token", None)
        _write_json(tc, data)
    sm = os.path.join(directory, "special_tokens_map.json")
    if os.path.isfile(sm):
        data = _read_json(sm)
        if isinstance(data.get("additional_special_tokens"), list):
            data["additional_special_tokens"] = [t for t in data["additional_special_tokens"]
                                                 if (t if isinstance(t, str) else t.get("content")) != token]
        _write_json(sm, data)
    reloaded = AutoTokenizer.from_pretrained(directory)
    return token not in reloaded.get_vocab() and len(reloaded) == token_id
