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

from llavakit.model.processing import (
    build_processor,
    chat_template_for,
    image_processor_for,
    keep_sentencepiece_model,
    set_generation_stop,
)

logger = logging.getLogger(__name__)


def save_final(trainer, parts, model_args, data_args, train_args, template) -> None:
    out = train_args.output_dir
    model = trainer.llava
    tokenizer = parts.tokenizer
    chat_template = chat_template_for(template, tokenizer)
    tokenizer.chat_template = chat_template
    set_generation_stop(model.generation_config, tokenizer, template)
    if trainer.stage.projector_only_saves:
        trainer.save_model(out)  # projector + config (see LlavaTrainer._save)
        if train_args.should_save:
            tokenizer.save_pretrained(out)
            keep_sentencepiece_model(tokenizer, out)
        return
    is_lora = trainer.stage.is_lora
    if not is_lora:  # the saved config is for inference
        model.config.use_cache = True
        model.config.text_config.use_cache = True
    trainer.save_model(out)  # weights, config and generation config (or the adapter), see LlavaTrainer._save
    if train_args.should_save:
        aspect = parts.anyres.aspect_ratio if parts.anyres is not None else data_args.image_aspect_ratio
        processor = build_processor(tokenizer, image_processor_for(parts.image_processor, aspect, parts.anyres),
                                    model.config.vision_config, model.config.vision_feature_select_strategy,
                                    chat_template, anyres=parts.anyres)
        if is_lora:  # adapter + projector (peft files) + processor + what the base was; no config.json
            from llavakit.model.lora import write_base_record

            processor.save_pretrained(out)
            keep_sentencepiece_model(tokenizer, out)
            write_base_record(out, model_args, data_args)
            return
        processor.save_pretrained(out)
        keep_sentencepiece_model(tokenizer, out)
        logger.info("final model written to %s", os.path.abspath(out))
