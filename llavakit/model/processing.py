"""What turns a LLaVA model into something to talk to: the processor (image processor that sees images as
training did, tokenizer, chat template = the training template) and the generation stop tokens.

Used by the final save of a run, by merging, by conversion and by every inference entry point.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil

from llavakit import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)


def image_processor_for(image_processor, aspect_ratio: str, anyres=None):
    """The image processor that sees images the way training did: with ``pad``, a ``LlavaImageProcessor``
    with ``do_pad`` (pad to square with the mean colour); with ``anyres`` (and its geometry), a
    ``LlavaNextImageProcessor`` that cuts the same base view and tiles; otherwise the tower's own."""
    if aspect_ratio != "pad" and not aspect_ratio.startswith("anyres"):
        return image_processor
    cfg = {k: v for k, v in image_processor.to_dict().items()
           if k not in ("image_processor_type", "processor_class", "_processor_class")}
    cfg["do_pad"] = True
    # a tower processor without a centre crop (SigLIP's: a fixed height and width) has none here either — the
    # Llava processors' own defaults (a 224-px crop) must not fill the gap; its side is AnyRes's tile
    cfg["do_center_crop"] = bool(cfg.get("do_center_crop")) and bool(cfg.get("crop_size"))
    if not cfg["do_center_crop"]:
        size = cfg.get("size") or {}
        side = size.get("height") or size.get("shortest_edge") if isinstance(size, dict) else size
        cfg["crop_size"] = {"height": side, "width": size.get("width", side) if isinstance(size, dict) else side}
    if aspect_ratio.startswith("anyres"):
        if anyres is None:
            raise ValueError(f"image_processor_for: {aspect_ratio!r} needs the AnyRes geometry")
        cfg["image_grid_pinpoints"] = [list(p) for p in anyres.pinpoints]
        if anyres.max_tiles is not None:
            from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
                LlavaOnevisionImageProcessorPil,
            )

            return LlavaOnevisionImageProcessorPil(**cfg)
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        return LlavaNextImageProcessorPil(**cfg)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    return LlavaImageProcessorPil(**cfg)


def chat_template_for(template, tokenizer) -> str:
    """The Jinja chat template saved with a model: renders as ``template`` does and then writes, after each
    image that text follows, the separator that makes plain transformers' one-piece tokenization give the
    ids of training's chunk-wise tokenization (for a Vicuna tokenizer a space; for byte-level BPE nothing,
    and the template is saved as it is).

    Rendering it with ``llavakit_image_sep=False`` gives the text training tokenized (llavakit's inference
    does, and tokenizes chunk-wise)."""
    from llavakit.data.tokenize import image_text_separator

    jinja = template.to_jinja()
    sep = image_text_separator(tokenizer)
    if sep is None:
        logger.warning("this tokenizer tokenizes the text after an image differently in one piece than on its "
                       "own, whatever comes between: tokenize prompts split at <image> (llavakit's inference "
                       "does) to get the ids training used")
        return jinja
    if not sep.text and not sep.before_space:
        return jinja
    specials = sorted({t for t in tokenizer.all_special_tokens} |
                      {t for t, i in tokenizer.get_added_vocab().items()
                       if getattr(tokenizer.added_tokens_decoder.get(i), "special", False)})
    specials_tuple = "(" + "".join(json.dumps(t) + ", " for t in specials) + ")"
    return (
        "{% set llavakit_rendered %}" + jinja + "{% endset %}"
        "{% if llavakit_image_sep is defined and not llavakit_image_sep %}{{ llavakit_rendered }}{% else %}"
        "{% for piece in llavakit_rendered.split('<image>') %}{% if not loop.first %}{{ '<image>' }}"
        "{% if piece and not piece.startswith(" + specials_tuple + ") %}"
        "{% if piece.startswith(' ') %}{{ " + json.dumps(sep.before_space) + " }}"
        "{% else %}{{ " + json.dumps(sep.text) + " }}{% endif %}{% endif %}{% endif %}{{ piece }}{% endfor %}"
        "{% endif %}")


def template_name_of(chat_template: str | None, tokenizer) -> str | None:
    """The name of llavakit's template that saved ``chat_template`` (``vicuna_v1``, ``plain``, ...), or None
    for another one (a tokenizer's own, an edited one)."""
    from llavakit.data.templates import TEMPLATES

    if not chat_template:
        return None
    for name, template in TEMPLATES.items():
        if chat_template_for(template, tokenizer) == chat_template:
            return name
    return None


def build_processor(tokenizer, image_processor, vision_config, strategy: str, chat_template: str | None,
                    anyres=None):
    """``LlavaProcessor``, or for an AnyRes geometry ``LlavaNextProcessor`` (``LlavaOnevisionProcessor`` with
    ``anyres_max_N``); ``image_processor`` from :func:`image_processor_for`."""
    from transformers import LlavaNextProcessor, LlavaOnevisionProcessor, LlavaProcessor

    from llavakit.model.build import has_cls_token

    if anyres is not None and anyres.max_tiles is not None:
        from transformers.models.llava_onevision.video_processing_llava_onevision import (
            LlavaOnevisionVideoProcessor,
        )

        # it counts the base view's patches itself (as given) and drops none; its video processor (llavakit
        # trains on images) takes the image processor's size and normalisation
        video_processor = LlavaOnevisionVideoProcessor(**{k: v for k, v in image_processor.to_dict().items()
                                                          if k in _VIDEO_FIELDS})
        with _video_processor_accepted():
            return LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                           video_processor=video_processor, num_image_tokens=anyres.tile_tokens,
                                           vision_feature_select_strategy="full", chat_template=chat_template,
                                           image_token=IMAGE_PLACEHOLDER, vision_aspect_ratio=anyres.aspect_ratio)
    # the processors count a CLS token as "additional" and drop it again with the "default" strategy
    has_cls = has_cls_token(vision_config)
    cls = LlavaNextProcessor if anyres is not None else LlavaProcessor
    return cls(image_processor=image_processor, tokenizer=tokenizer,
               patch_size=vision_config.patch_size, vision_feature_select_strategy=strategy,
               num_additional_image_tokens=1 if has_cls else 0, chat_template=chat_template,
               image_token=IMAGE_PLACEHOLDER)


_VIDEO_FIELDS = ("size", "resample", "image_mean", "image_std", "rescale_factor", "do_rescale", "do_normalize",
                 "do_resize", "do_convert_rgb")


@contextlib.contextmanager
def _video_processor_accepted():
    """Let ``LlavaOnevisionProcessor`` be built without torchvision.

    transformers checks a processor's video processor against its registry of video processor classes, which
    is empty where torchvision is not installed; OneVision's processor has a video processor even for a model
    trained on images, so it could neither be built nor loaded there. Within this block (only where
    torchvision is missing) any video processor passes that check; saving is transformers' own.
    """
    from transformers.processing_utils import ProcessorMixin
    from transformers.utils import is_torchvision_available
    from transformers.video_processing_utils import BaseVideoProcessor

    if is_torchvision_available():
        yield
        return
    check = ProcessorMixin.check_argument_for_proper_class

    def accept_video_processor(self, name, argument):
        if name == "video_processor" and isinstance(argument, BaseVideoProcessor):
            return type(argument)
        return check(self, name, argument)

    ProcessorMixin.check_argument_for_proper_class = accept_video_processor
    try:
        yield
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


def load_processor(path: str | os.PathLike):
    """``AutoProcessor.from_pretrained(path)`` — and where torchvision is missing, a saved
    ``LlavaOnevisionProcessor`` (which ``AutoProcessor`` then refuses) from its files."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError:
        config_file = os.path.join(path, "processor_config.json")
        if not os.path.isfile(config_file):
            raise
        with open(config_file, encoding="utf-8") as f:
            cfg = json.load(f)
        if cfg.get("processor_class") != "LlavaOnevisionProcessor":
            raise
    from transformers import AutoTokenizer, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )
    from transformers.models.llava_onevision.video_processing_llava_onevision import (
        LlavaOnevisionVideoProcessor,
    )

    def fields(d: dict, kind: str) -> dict:
        return {k: v for k, v in d.items() if k != kind}

    tokenizer = AutoTokenizer.from_pretrained(path)
    template_file = os.path.join(path, "chat_template.jinja")
    chat_template = None
    if os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as f:
            chat_template = f.read()
    options = {k: cfg[k] for k in ("num_image_tokens", "vision_feature_select_strategy", "image_token",
                                   "video_token", "vision_aspect_ratio") if k in cfg}
    with _video_processor_accepted():
        return LlavaOnevisionProcessor(
            image_processor=LlavaOnevisionImageProcessorPil(**fields(cfg["image_processor"], "image_processor_type")),
            tokenizer=tokenizer,
            video_processor=LlavaOnevisionVideoProcessor(**fields(cfg["video_processor"], "video_processor_type")),
            chat_template=chat_template, **options)


def set_generation_stop(gc, tokenizer, template) -> None:
    """Stop at the template's end-of-turn token (and EOS); pad and BOS from the tokenizer."""
    ids = []
    if template.stop_str:
        ids.append(tokenizer.convert_tokens_to_ids(template.stop_str))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if ids:
        gc.eos_token_id = ids if len(ids) > 1 else ids[0]
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = tokenizer.bos_token_id


def sentencepiece_model_of(tokenizer, directory: str | None = None) -> str | None:
    """The sentencepiece ``tokenizer.model`` a tokenizer was read from (or that ``directory`` holds)."""
    for path in (getattr(tokenizer, "vocab_file", None),
                 os.path.join(directory, "tokenizer.model") if directory else None):
        if path and str(path).endswith(".model") and os.path.isfile(path):
            return str(path)
    return None


def keep_sentencepiece_model(tokenizer, out: str) -> None:
    """Copy the sentencepiece model a tokenizer was read from beside the ``tokenizer.json`` that
    ``save_pretrained`` wrote (transformers 5 writes no ``tokenizer.model``): the original's loader and
    ``convert to-original`` need it. ``tokenizer.json`` still takes precedence when loading."""
    src = sentencepiece_model_of(tokenizer)
    dst = os.path.join(out, "tokenizer.model")
    if src and os.path.abspath(src) != os.path.abspath(dst):
        shutil.copyfile(src, dst)
