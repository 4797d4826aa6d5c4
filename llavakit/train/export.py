"""The final output of a run.

* stage 1: ``mm_projector.bin`` (the original's key names, loadable by the original repository) + config;
* otherwise: a transformers-native LLaVA directory — weights, config, tokenizer, image processor, processor
  with a chat template that renders as the training template, and a valid ``generation_config.json`` that
  stops at the template's end-of-turn token. ``AutoModelForImageTextToText`` / ``AutoProcessor`` load it
  with no custom code.
"""

from __future__ import annotations

import logging
import os

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


def build_processor(tokenizer, image_processor, vision_config, strategy: str, chat_template: str | None):
    from transformers import LlavaProcessor

    from llavakit.model.build import has_cls_token

    # LlavaProcessor counts a CLS token as "additional" and drops it again with the "default" strategy
    has_cls = has_cls_token(vision_config)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=vision_config.patch_size, vision_feature_select_strategy=strategy,
                          num_additional_image_tokens=1 if has_cls else 0, chat_template=chat_template,
                          image_token=IMAGE_PLACEHOLDER)


def set_generation_stop(model, tokenizer, template) -> None:
    gc = model.generation_config
    ids = []
    if template.stop_str:
        ids.append(tokenizer.convert_tokens_to_ids(template.stop_str))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if ids:
        gc.eos_token_id = ids if len(ids) > 1 else ids[0]
    gc.pad_token_id = tokenizer.pad_token_id
    gc.bos_token_id = tokenizer.bos_token_id


def save_final(trainer, parts, model_args, data_args, train_args, template) -> None:
    out = train_args.output_dir
    model = trainer.llava
    tokenizer = parts.tokenizer
    chat_template = template.to_jinja()
    tokenizer.chat_template = chat_template
    set_generation_stop(model, tokenizer, template)
    if trainer.stage.projector_only_saves:
        trainer.save_model(out)  # projector + config (see LlavaTrainer._save)
        if train_args.should_save:
            tokenizer.save_pretrained(out)
        return
    is_lora = hasattr(trainer.model, "peft_config")
    if not is_lora:  # the saved config is for inference
        model.config.use_cache = True
        model.config.text_config.use_cache = True
    trainer.save_model(out)  # weights, config and generation config (or the adapter), see LlavaTrainer._save
    if train_args.should_save:
        processor = build_processor(tokenizer, image_processor_for(parts.image_processor, data_args.image_aspect_ratio),
                                    model.config.vision_config,
                                    model.config.vision_feature_select_strategy, chat_template)
        if is_lora:  # adapter + projector (peft files) + processor + what the base was; no config.json
            from llavakit.model.lora import write_base_record

            processor.save_pretrained(out)
            write_base_record(out, model_args)
            return
        processor.save_pretrained(out)
        logger.info("final model written to %s", os.path.abspath(out))
