"""Assemble transformers' ``LlavaForConditionalGeneration`` from a language model and a vision tower.

Two starting points, decided by reading the files (never by directory names):

* a causal LM (``--model_name_or_path``, e.g. Vicuna) plus a vision tower (``--vision_tower``, e.g. CLIP
  ViT-L/14-336): both are loaded with their own ``from_pretrained`` and put into a Llava shell whose
  projector is new (``mlp2x_gelu``);
* a transformers-native LLaVA checkpoint (ours, or shaped like ``llava-hf/llava-1.5-13b-hf``): loaded as it
  is, with its tokenizer and image processor.

An original-format checkpoint (``LlavaLlamaForCausalLM`` with ``mm_*`` config fields) is recognised and
refused with the conversion command to run.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch

from llavakit import IMAGE_PLACEHOLDER
from llavakit.data.anyres import AnyRes, AnyResError, max_tiles_of, parse_grid_pinpoints
from llavakit.data.tokenize import looks_local
from llavakit.internals import name_attention_kernel
from llavakit.model.tensors import grow_rows

logger = logging.getLogger(__name__)

ORIGINAL_MODEL_TYPES = {"llava", "llava_llama", "llava_mistral", "llava_mpt", "llava_qwen"}


class ModelLoadError(ValueError):
    """The model or vision tower cannot be assembled as asked."""


@dataclass
class Assembled:
    model: Any  # LlavaForConditionalGeneration
    tokenizer: Any
    image_processor: Any
    num_image_tokens: int
    anyres: Any = None  # AnyRes geometry of a LLaVA-NeXT model


def _config_problem(name_or_path: str, error: BaseException, what: str) -> ModelLoadError:
    if looks_local(name_or_path) and not os.path.isdir(name_or_path):
        return ModelLoadError(f"{what}{name_or_path}: no such directory")
    if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "config.json")):
        return ModelLoadError(f"{what}{name_or_path}: no config.json in this directory (not a model "
                              "directory, or an incomplete download)")
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ModelLoadError(f"{what}{name_or_path}: cannot read its config.json ({first})")


def read_config_dict(name_or_path: str, cache_dir: str | None = None) -> dict:
    from transformers import PretrainedConfig

    if (looks_local(name_or_path) and not os.path.isdir(name_or_path)) or \
            (os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "config.json"))):
        raise _config_problem(name_or_path, FileNotFoundError(name_or_path), "")
    try:
        cfg, _ = PretrainedConfig.get_config_dict(name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise _config_problem(name_or_path, e, "") from None
    if not cfg:
        raise _config_problem(name_or_path, ValueError("empty config"), "")
    return cfg


#: transformers-native LLaVA model types: LLaVA-1.5, LLaVA-NeXT (AnyRes), LLaVA-OneVision (anyres_max_N)
NATIVE_MODEL_TYPES = ("llava", "llava_next", "llava_onevision")


def checkpoint_kind(cfg: dict) -> str:
    """'llava-hf' (transformers-native), 'llava-original' (the original repo's format) or 'lm'."""
    if cfg.get("model_type") in NATIVE_MODEL_TYPES and "text_config" in cfg and "vision_config" in cfg:
        return "llava-hf"
    archs = cfg.get("architectures") or []
    if "mm_vision_tower" in cfg or any(a.startswith("Llava") and a.endswith("ForCausalLM") for a in archs) or \
            cfg.get("model_type") in ORIGINAL_MODEL_TYPES - {"llava"}:
        return "llava-original"
    return "lm"


def uses_varlen_attention(attn_implementation: str | None) -> bool:
    """A kernel that attends packed samples by their sequence boundaries (``cu_seq_lens``), with no mask:
    FlashAttention (``flash_attention_2``/``_3``, hub flash-attn kernels) or llavakit's ``torch_varlen``."""
    return "flash" in (attn_implementation or "") or attn_implementation == "torch_varlen"


def torch_dtype_for(bf16: bool, fp16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32


def has_cls_token(vision_config) -> bool:
    """CLIP-style towers put a CLS token before the patches; SigLIP-style towers do not."""
    return "siglip" not in getattr(vision_config, "model_type", "")


def num_image_tokens_for(vision_config, strategy: str) -> int:
    """Image tokens per image: one per patch, plus CLS when the tower has one and the strategy keeps it."""
    n = (vision_config.image_size // vision_config.patch_size) ** 2
    return n + 1 if strategy == "full" and has_cls_token(vision_config) else n


def vision_config_of(vision_tower: str, cache_dir: str | None = None):
    """The vision config of a tower directory or hub name, or of a LLaVA checkpoint's tower."""
    return _vision_config(vision_tower, cache_dir)


def _vision_config(vision_tower: str, cache_dir: str | None):
    from transformers import AutoConfig

    if looks_local(vision_tower) and not os.path.isdir(vision_tower):
        raise _config_problem(vision_tower, FileNotFoundError(vision_tower), "--vision_tower ")
    try:
        cfg = AutoConfig.from_pretrained(vision_tower, cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise _config_problem(vision_tower, e, "--vision_tower ") from None
    vcfg = getattr(cfg, "vision_config", cfg)
    if not hasattr(vcfg, "patch_size") or not hasattr(vcfg, "image_size"):
        raise ModelLoadError(f"--vision_tower {vision_tower}: {type(cfg).__name__} is not a ViT-style vision "
                             "tower (CLIP / SigLIP); it has no patch_size/image_size")
    return vcfg


def load_image_processor(name_or_path: str, cache_dir: str | None = None):
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(name_or_path, backend="pil", cache_dir=cache_dir)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{name_or_path}: cannot load its image processor "
                             f"(preprocessor_config.json): {e}") from None


def prepare_tokenizer(tokenizer, mm_use_im_patch_token: bool = False, mm_use_im_start_end: bool = False) -> None:
    """Add the image token (and the original's optional marker tokens), and a pad token when missing —
    the unk token where there is one, as the original's ``--version`` rules do."""
    from llavakit.data.tokenize import IM_END, IM_START, ensure_special_token

    extra = [IMAGE_PLACEHOLDER]
    if mm_use_im_patch_token:
        extra.append("<im_patch>")
    if mm_use_im_start_end:
        extra += [IM_START, IM_END]
    for token in extra:
        ensure_special_token(tokenizer, token)
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.image_token = IMAGE_PLACEHOLDER


@dataclass
class Parts:
    """Everything but the weights: enough to build and validate the data before loading anything big."""

    model_name_or_path: str
    vision_tower: str | None
    kind: str
    tokenizer: Any
    image_processor: Any
    num_image_tokens: int  # per image (LLaVA-1.5); per view with AnyRes, whose images vary
    vision_config: Any
    strategy: str
    select_layer: int
    anyres: AnyRes | None = None  # AnyRes: the model is a LlavaNext (LlavaOnevision with anyres_max_N)


def anyres_of(config) -> AnyRes | None:
    """The AnyRes geometry of a native model's config (``LlavaNextConfig``, ``LlavaOnevisionConfig``), None
    for LLaVA-1.5."""
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ("llava_next", "llava_onevision") or not pinpoints:
        return None
    v = config.vision_config
    max_tiles = max_tiles_of(config.vision_aspect_ratio) if model_type == "llava_onevision" else None
    return AnyRes(tuple((int(h), int(w)) for h, w in pinpoints), v.image_size, v.patch_size, max_tiles=max_tiles)


def model_type_for(anyres: AnyRes | None) -> str:
    """The native model type a geometry needs: llava (none), llava_next (anyres), llava_onevision (anyres_max)."""
    return "llava" if anyres is None else "llava_next" if anyres.max_tiles is None else "llava_onevision"


def _tower_side(image_processor, vision_config) -> int:
    """The side of the square the image processor hands the tower, which must be the tower's input."""
    from llavakit.data.images import ImageTransform

    t = ImageTransform.from_processor(image_processor)
    hw = t.output_hw or (t.shortest_edge, t.shortest_edge)
    return int(hw[0] or vision_config.image_size)


def anyres_for(image_aspect_ratio: str, image_grid_pinpoints, vision_config, image_processor, strategy: str,
               where: str) -> AnyRes | None:
    """AnyRes geometry from the original's flags for a new model (LM + tower), or None."""
    if not image_aspect_ratio.startswith("anyres"):
        return None
    side = _tower_side(image_processor, vision_config)
    if side != vision_config.image_size:
        raise ModelLoadError(f"{where}: its image processor makes {side}-px views but the tower takes "
                             f"{vision_config.image_size}-px images; AnyRes tiles must be the tower's input")
    if strategy == "full" and has_cls_token(vision_config):
        raise ModelLoadError("--image_aspect_ratio anyres arranges each tile's patches in a grid: it needs "
                             "--mm_vision_select_feature patch (CLS dropped)")
    try:
        pinpoints = parse_grid_pinpoints(image_grid_pinpoints, side)
        max_tiles = max_tiles_of(image_aspect_ratio)
    except AnyResError as e:
        raise ModelLoadError(str(e)) from None
    return AnyRes(pinpoints, side, vision_config.patch_size, max_tiles=max_tiles)


def load_parts(model_name_or_path: str, vision_tower: str | None, *, select_layer: int = -2,
               select_feature: str = "patch", cache_dir: str | None = None, mm_use_im_patch_token: bool = False,
               mm_use_im_start_end: bool = False, trust_remote_code: bool = False,
               image_aspect_ratio: str = "square", image_grid_pinpoints=None) -> Parts:
    """Read configs, tokenizer and image processor; decide what kind of starting point this is.

    ``image_aspect_ratio="anyres"`` with ``image_grid_pinpoints`` makes a new model LLaVA-NeXT-style; a native
    checkpoint brings its own geometry (and must agree)."""
    from transformers import AutoConfig

    from llavakit.data.tokenize import load_tokenizer

    cfg = read_config_dict(model_name_or_path, cache_dir)
    kind = checkpoint_kind(cfg)
    if kind == "llava-original":
        raise ModelLoadError(
            f"{model_name_or_path} is an original-format LLaVA checkpoint "
            f"({(cfg.get('architectures') or ['?'])[0]}). Convert it first: llavakit convert from-original "
            f"--model-path {model_name_or_path} --save-model-path {model_name_or_path.rstrip('/')}-hf")
    if kind == "llava-hf":
        if vision_tower:
            logger.warning("--vision_tower %s ignored: %s already holds its vision tower", vision_tower,
                           model_name_or_path)
        lcfg = AutoConfig.from_pretrained(model_name_or_path, cache_dir=cache_dir)
        vcfg, strategy, layer = lcfg.vision_config, lcfg.vision_feature_select_strategy, lcfg.vision_feature_layer
        processor_src = model_name_or_path
    else:
        if not vision_tower:
            raise ModelLoadError(f"--vision_tower is required: {model_name_or_path} is a language model "
                                 f"({cfg.get('model_type')}), not a LLaVA checkpoint")
        vcfg = _vision_config(vision_tower, cache_dir)
        strategy = "default" if select_feature == "patch" else "full"
        if not has_cls_token(vcfg) and strategy == "default":
            # "default" drops the first token as CLS; a tower without CLS must keep every patch
            logger.info("%s has no CLS token: using every patch (the 'full' strategy)", vision_tower)
            strategy = "full"
        layer = select_layer
        processor_src = vision_tower
    tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
    prepare_tokenizer(tokenizer, mm_use_im_patch_token, mm_use_im_start_end)
    image_processor = load_image_processor(processor_src, cache_dir)
    if kind == "llava-hf":
        anyres = anyres_of(lcfg)
        if (anyres.aspect_ratio if anyres else "square") != (image_aspect_ratio if image_aspect_ratio.startswith(
                "anyres") else "square"):
            raise ModelLoadError(
                f"{model_name_or_path} is a {model_type_for(anyres)} model: continue it with --image_aspect_ratio "
                f"{anyres.aspect_ratio if anyres else 'pad or square'}"
                + ("" if anyres else "; to train AnyRes from it, start from its language model and vision tower "
                                     "and its projector (--pretrain_mm_mlp_adapter)"))
    else:
        anyres = anyres_for(image_aspect_ratio, image_grid_pinpoints, vcfg, image_processor, strategy,
                            f"--vision_tower {vision_tower}")
    return Parts(model_name_or_path, vision_tower if kind == "lm" else None, kind, tokenizer, image_processor,
                 num_image_tokens_for(vcfg, strategy), vcfg, strategy, layer, anyres)


#: never quantised: the vision tower (frozen, and its features feed the projector), the projector (trains
#: fully) and the output layer
NOT_QUANTISED = ["vision_tower", "multi_modal_projector", "lm_head"]


def quantization_config(bits: int, compute_dtype: torch.dtype, double_quant: bool = True, quant_type: str = "nf4"):
    """bitsandbytes settings for QLoRA (``--bits 4|8``): the language model's linear layers only."""
    from transformers import BitsAndBytesConfig

    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute_dtype,
                                  bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_type=quant_type,
                                  llm_int8_skip_modules=NOT_QUANTISED)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=NOT_QUANTISED)


def build_model(parts: Parts, *, dtype: torch.dtype = torch.float32, cache_dir: str | None = None,
                attn_implementation: str | None = None, trust_remote_code: bool = False, quantization=None,
                device_map=None):
    """Load the weights: the LLaVA checkpoint as it is, or the LM + vision tower into a Llava shell.

    ``quantization`` (a :func:`quantization_config`) applies to the language model only, loaded onto
    ``device_map``; the vision tower and the projector stay in ``dtype``."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_MAPPING

    kw = {"cache_dir": cache_dir, "dtype": dtype}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if attn_implementation == "torch_varlen":
        from llavakit.model.attention import register

        register()
    tokenizer = parts.tokenizer
    qkw = {"quantization_config": quantization, "device_map": device_map} if quantization is not None else {}
    model_cls, config_cls, projector_cls = native_classes(model_type_for(parts.anyres))
    if parts.kind == "llava-hf":
        model = model_cls.from_pretrained(parts.model_name_or_path, **kw, **qkw)
    else:
        logger.info("loading language model %s", parts.model_name_or_path)
        llm = AutoModelForCausalLM.from_pretrained(parts.model_name_or_path, trust_remote_code=trust_remote_code,
                                                   **kw, **qkw)
        logger.info("loading vision tower %s", parts.vision_tower)
        vkw = dict(kw)
        if uses_varlen_attention(attn_implementation):
            vkw["attn_implementation"] = "sdpa"  # (see below)
        with _quiet_loading():  # a full CLIP checkpoint also holds the text tower, which is not wanted here
            vision = MODEL_MAPPING[type(parts.vision_config)].from_pretrained(
                parts.vision_tower, config=parts.vision_config, **vkw)
        extra = anyres_config_fields(parts.anyres)
        config = config_cls(
            text_config=llm.config, vision_config=vision.config,
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER),
            image_seq_length=parts.num_image_tokens, vision_feature_layer=parts.select_layer,
            vision_feature_select_strategy=parts.strategy, projector_hidden_act="gelu",
            multimodal_projector_bias=True,
            tie_word_embeddings=bool(getattr(llm.config, "tie_word_embeddings", False)), **extra,
        )
        with _shell_init(), torch.device("meta"):
            model = model_cls(config)
        model.model.language_model = llm.get_decoder()
        model.lm_head = llm.get_output_embeddings()
        model.model.vision_tower = vision
        model.model.multi_modal_projector = projector_cls(config).to(dtype)
        if parts.anyres is not None:  # as the original LLaVA-NeXT initialises it: N(0, 1/hidden)
            hidden = llm.config.hidden_size
            model.model.image_newline = torch.nn.Parameter(
                (torch.randn(hidden) / hidden ** 0.5).to(dtype))
        if quantization is not None:  # the quantised LM sits on its device; the rest joins it
            device = next(llm.parameters()).device
            vision.to(device)
            model.model.multi_modal_projector.to(device)
            model.lm_head.to(device)
            if parts.anyres is not None:
                model.model.image_newline.data = model.model.image_newline.data.to(device)
        model.config.text_config = llm.config
        model.config.vision_config = vision.config
        if attn_implementation:
            name_attention_kernel(model.config, attn_implementation)
        if getattr(llm, "generation_config", None) is not None:
            model.generation_config = llm.generation_config
        _check_no_meta(model)
    if uses_varlen_attention(attn_implementation):
        # varlen attention for the language model only: the packed batches' sequence boundaries (cu_seq_lens) are
        # the language model's, and transformers hands the forward's keyword arguments to the vision tower too;
        # the tower's fixed-length images gain nothing from varlen attention
        model.set_attn_implementation({"vision_config": "sdpa"})
    _resize_embeddings(model, tokenizer)
    _sync_special_ids(model, tokenizer)
    return model


def native_classes(model_type: str):
    """(model, config, projector) classes of transformers' LLaVA-1.5, LLaVA-NeXT or LLaVA-OneVision."""
    if model_type == "llava_onevision":
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
        from transformers.models.llava_onevision.modeling_llava_onevision import (
            LlavaOnevisionMultiModalProjector,
        )

        return LlavaOnevisionForConditionalGeneration, LlavaOnevisionConfig, LlavaOnevisionMultiModalProjector
    if model_type == "llava_next":
        from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
        from transformers.models.llava_next.modeling_llava_next import LlavaNextMultiModalProjector

        return LlavaNextForConditionalGeneration, LlavaNextConfig, LlavaNextMultiModalProjector
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    return LlavaForConditionalGeneration, LlavaConfig, LlavaMultiModalProjector


def anyres_config_fields(anyres: AnyRes | None) -> dict:
    """What a native config holds of a geometry: the grid, and OneVision's ``vision_aspect_ratio``."""
    if anyres is None:
        return {}
    fields = {"image_grid_pinpoints": [list(p) for p in anyres.pinpoints]}
    if anyres.max_tiles is not None:
        fields["vision_aspect_ratio"] = anyres.aspect_ratio
    return fields


def assemble(model_name_or_path: str, vision_tower: str | None, *, select_layer: int = -2,
             select_feature: str = "patch", dtype: torch.dtype = torch.float32, cache_dir: str | None = None,
             attn_implementation: str | None = None, mm_use_im_patch_token: bool = False,
             mm_use_im_start_end: bool = False, trust_remote_code: bool = False,
             image_aspect_ratio: str = "square", image_grid_pinpoints=None) -> Assembled:
    """:func:`load_parts` then :func:`build_model`."""
    parts = load_parts(model_name_or_path, vision_tower, select_layer=select_layer, select_feature=select_feature,
                       cache_dir=cache_dir, mm_use_im_patch_token=mm_use_im_patch_token,
                       mm_use_im_start_end=mm_use_im_start_end, trust_remote_code=trust_remote_code,
                       image_aspect_ratio=image_aspect_ratio, image_grid_pinpoints=image_grid_pinpoints)
    model = build_model(parts, dtype=dtype, cache_dir=cache_dir, attn_implementation=attn_implementation,
                        trust_remote_code=trust_remote_code)
    return Assembled(model, parts.tokenizer, parts.image_processor, parts.num_image_tokens, parts.anyres)


@contextlib.contextmanager
def _quiet_loading():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _shell_init():
    """Build the Llava shell on the meta device with ZeRO-3 construction-time partitioning off: its
    sub-models are replaced right away by the real (already partitioned) ones, and ZeRO-3's weight
    initialisation cannot run on meta tensors."""
    from llavakit.internals import deepspeed_zero3_init_paused

    return deepspeed_zero3_init_paused()


def _check_no_meta(model) -> None:
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if left:
        raise ModelLoadError(f"internal: parameters left uninitialised after assembly: {left[:5]}")


def _resize_embeddings(model, tokenizer) -> None:
    """Room for the tokens the tokenizer gained (``<image>``, a pad token): rows up to a multiple of 64, each
    new row the mean of the old ones (``tensors.grow_rows``, as conversion does)."""
    n = len(tokenizer)
    emb = model.get_input_embeddings().weight
    old = _rows(emb)
    if old >= n:
        return
    with torch.random.fork_rng(devices=[]):  # the rows transformers initialises are overwritten below
        model.resize_token_embeddings(n, pad_to_multiple_of=64, mean_resizing=False)
    weights = {id(w): w for w in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    for w in weights.values():
        with gathered(w, modifier_rank=0):
            w.data.copy_(grow_rows(w.data[:old], w.shape[0]))
    logger.info("resized token embeddings to %d for %d tokens", _rows(model.get_input_embeddings().weight), n)


def _rows(weight) -> int:
    shape = getattr(weight, "ds_shape", None)  # a ZeRO-3 partitioned parameter's full shape
    return int((shape if shape is not None else weight.shape)[0])


def gathered(weight, modifier_rank: int | None = None):
    """The whole tensor while inside (ZeRO-3: gathered; with ``modifier_rank``, that rank's change kept); a
    no-op otherwise."""
    if getattr(weight, "ds_shape", None) is None:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([weight], modifier_rank=modifier_rank)


def _sync_special_ids(model, tokenizer) -> None:
    model.config.image_token_index = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
    model.config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model.config, "text_config"):
        model.config.text_config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
