"""What turns a LLaVA model into something to talk to: the processor (image processor that sees images as
training did, tokenizer, chat template = the training template) and the generation stop tokens.

Used by the final save of a run, by merging, by conversion and by every inference entry point.
"""

from __future__ import annotations

import logging

from llavakit import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)


def image_processor_for(image_processor, aspect_ratio: str):
    """With ``pad``, a ``LlavaImageProcessor`` with ``do_pad`` (pad to square with the mean colour, as
    training did), so that inference sees images the way training did."""
    if aspect_ratio != "pad":
        return image_processor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    cfg = {k: v for k, v in image_processor.to_dict().items()
           if k not in ("image_processor_type", "processor_class", "_processor_class")}
    cfg["do_pad"] = True
    return LlavaImageProcessorPil(**cfg)


def chat_template_for(template, tokenizer) -> str:
    """The Jinja chat template saved with a model: renders as ``template`` does, with the separator after
    each image that makes plain transformers' one-piece tokenization give training's ids."""
    from llavakit.data.tokenize import image_text_separator, separates

    sep = image_text_separator(tokenizer)
    if sep is None:
        logger.warning("this tokenizer tokenizes text after an image differently in one piece than chunk by "
                       "chunk, whatever follows the image: tokenize prompts split at <image> (llavakit's "
                       "inference does) to get the ids training used")
        sep = ""
    at_end = bool(sep) and separates(tokenizer, sep, template.text_after_user())
    return template.to_jinja(sep, at_end)


def build_processor(tokenizer, image_processor, vision_config, strategy: str, chat_template: str | None):
    from transformers import LlavaProcessor

    from llavakit.model.build import has_cls_token

    # LlavaProcessor counts a CLS token as "additional" and drops it again with the "default" strategy
    has_cls = has_cls_token(vision_config)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=vision_config.patch_size, vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=1 if has_cls else 0, chat_template=chat_template,
                          image_token=IMAGE_PLACEHOLDER)


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
