"""``llavakit train`` (= ``python -m llavakit.train``): the original scripts' flags, our pipeline.

Runs under plain python, ``torchrun``, the ``deepspeed`` launcher and ``accelerate launch`` — the
distributed setup is the HF Trainer's (accelerate). The order is: parse and validate every flag, check
the output directory, read and validate the data, and only then load weights; a mistake costs seconds.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llavakit.config import RunConfig

logger = logging.getLogger("llavakit.train")

RESOLVED_CONFIG = "llavakit_config.yaml"
SKIPPED_REPORT = "skipped_samples.jsonl"
BAD_SAMPLES_REPORT = "bad_samples.jsonl"


class OutputDirError(ValueError):
    pass


class NoSamplesError(ValueError):
    """Nothing in the data can be trained on."""


def _setup_logging(train_args) -> None:
    import transformers

    level = logging.INFO if train_args.process_index == 0 else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    transformers.utils.logging.set_verbosity_warning()


def _checkpoints_in(output_dir: str) -> list[str]:
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    if not os.path.isdir(output_dir):
        return []
    return sorted(d for d in os.listdir(output_dir)
                  if d.startswith(PREFIX_CHECKPOINT_DIR + "-") and os.path.isdir(os.path.join(output_dir, d)))


def resolve_resume(train_args) -> str | None:
    """``--resume_from_checkpoint PATH|latest``; an output dir with checkpoints needs one (or overwrite)."""
    from transformers.trainer_utils import get_last_checkpoint

    out = train_args.output_dir
    resume = train_args.resume_from_checkpoint
    if resume in ("latest", "last", "True", "true"):
        last = get_last_checkpoint(out) if os.path.isdir(out) else None
        if last is None:
            raise OutputDirError(f"--resume_from_checkpoint {resume}: no checkpoint in {out}")
        return last
    if resume:
        if not os.path.isdir(resume):
            raise OutputDirError(f"--resume_from_checkpoint {resume}: no such checkpoint directory")
        return resume
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputDirError(f"--output_dir {out} is a file, not a directory")
    existing = _checkpoints_in(out)
    if existing and not train_args.overwrite_output_dir:
        raise OutputDirError(
            f"{out} already holds checkpoints ({', '.join(existing[-3:])}). Continue with "
            "--resume_from_checkpoint latest, or start over with --overwrite_output_dir.")
    finished = _finished_outputs_in(out)
    if finished and not train_args.overwrite_output_dir:
        raise OutputDirError(
            f"{out} already holds a finished run ({', '.join(finished)}); a new run would replace it. Choose "
            "another --output_dir, or replace it with --overwrite_output_dir.")
    return None


#: files a finished run leaves (stage 2 / merged weights, a LoRA adapter, a stage-1 projector)
FINISHED_OUTPUTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                    "pytorch_model.bin.index.json", "adapter_model.safetensors", "adapter_model.bin",
                    "mm_projector.bin")


def _finished_outputs_in(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    return [f for f in FINISHED_OUTPUTS if os.path.isfile(os.path.join(output_dir, f))]


def _init_deepspeed_comm(train_args) -> None:
    """ZeRO-3 partitions weights while ``from_pretrained`` loads them, which needs DeepSpeed's own comm
    layer up (with the world size) first; accelerate starts it only later on CPU-only machines."""
    if not train_args.deepspeed:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=dist.get_backend())


def build_data(model_args, data_args, train_args, tokenizer, image_processor, num_image_tokens, anyres=None):
    """Records → validated, length-indexed dataset, collator (no model needed); ``anyres``: the model's
    AnyRes geometry (LLaVA-NeXT), which decides each image's views and token count."""
    from llavakit.data.collate import LlavaCollator
    from llavakit.data.dataset import LlavaDataset, build_sample_index
    from llavakit.data.images import ImageTransform
    from llavakit.data.records import load_records
    from llavakit.data.shards import is_shard_source
    from llavakit.data.templates import get_template
    from llavakit.data.tokenize import ConversationEncoder

    template = get_template(model_args.version, tokenizer)
    encoder = ConversationEncoder(tokenizer, template, num_image_tokens,
                                  mm_use_im_start_end=model_args.mm_use_im_start_end,
                                  max_length=train_args.model_max_length, anyres=anyres)
    source = samples = None
    if is_shard_source(data_args.data_path):
        from llavakit.data.stream import ShardSource, open_shards

        source = ShardSource(data_args.data_path, data_args.shard_timeout, data_args.shard_retries)
        with train_args.main_process_first(desc="shard index"):  # one rank asks the storage about every shard
            store, valid, problems, samples = open_shards(source, check=train_args.process_index == 0)
        if data_args.image_folder:
            logger.warning("--image_folder %s ignored: the shards hold their images", data_args.image_folder)
    else:
        store, valid, problems = load_records(data_args.data_path)
    for p in problems:
        logger.warning(p.message)
    sizes = None
    if anyres is not None and samples is not None:  # AnyRes from shards: the sizes `data shard` recorded
        from llavakit.data.shards import sample_image_sizes

        sizes = sample_image_sizes(samples, data_args.data_path)
    with train_args.main_process_first(desc="length index"):
        index = build_sample_index(store, valid, encoder, train_args.model_max_length,
                                   progress=train_args.process_index == 0, image_folder=data_args.image_folder,
                                   image_sizes=sizes)
    if index.skipped:
        logger.warning("%d sample(s) skipped (listed in %s); first: %s", len(index.skipped),
                       os.path.join(train_args.output_dir, SKIPPED_REPORT), index.skipped[0]["message"])
    if train_args.process_index == 0:
        os.makedirs(train_args.output_dir, exist_ok=True)
        with open(os.path.join(train_args.output_dir, SKIPPED_REPORT), "w", encoding="utf-8") as f:
            for s in index.skipped:
                f.write(json.dumps(s) + "\n")
    if len(index.record_idx) == 0:
        why = (f"all {len(index.skipped)} skipped (listed in {os.path.join(train_args.output_dir, SKIPPED_REPORT)}; "
               f"first: {index.skipped[0]['message']})" if index.skipped else "it holds no valid record")
        raise NoSamplesError(f"{data_args.data_path}: no sample left to train on: {why}")
    if index.has_image.any() and not data_args.image_folder and source is None:
        logger.warning("no --image_folder: image paths are taken as they are (absolute or relative to the cwd)")
    transform = ImageTransform.from_processor(image_processor, "anyres" if anyres else data_args.image_aspect_ratio,
                                              anyres)
    report = os.path.join(train_args.output_dir, BAD_SAMPLES_REPORT)
    if source is not None:
        from llavakit.data.stream import ShardDataset

        dataset = ShardDataset(store, index, encoder, transform, None, train_args.model_max_length,
                               report_path=report, source=source, samples=samples, window=data_args.shuffle_buffer)
    else:
        dataset = LlavaDataset(store, index, encoder, transform, data_args.image_folder, train_args.model_max_length,
                               report_path=report)
    # workers hand over uint8 pixels (a quarter of the bytes); the trainer normalises them on the device
    collator = LlavaCollator(tokenizer.pad_token_id, transform, normalize=False, packing=train_args.packing,
                             packing_max_length=packing_capacity(train_args))
    logger.info("data: %d records, %d train (%d with images), %d skipped, %d truncated", len(store),
                len(dataset), int(index.has_image.sum()), len(index.skipped), index.num_truncated)
    if train_args.packing:
        attn, rows = train_args.attn_implementation, collator.packing_max_length
        if rows is None:
            logger.info("packing: one row per micro-batch, attended per sample (%s)", attn)
        else:
            logger.info("packing: rows of at most %d tokens under a block attention mask (%s); "
                        "--attn_implementation flash_attention_2 or torch_varlen attend per sample with no padding",
                        rows, attn or "sdpa")
    return dataset, collator, template


def packing_capacity(train_args) -> int | None:
    """Rows of packed samples: one per micro-batch with a varlen kernel (FlashAttention — ``flash_attention_2``,
    ``flash_attention_3``, hub flash-attn kernels — or ``torch_varlen``: no mask, no padding); otherwise at
    most ``--model_max_length`` tokens, since SDPA / eager attend over a whole row under a block mask
    (``llavakit bench train`` on CPU: one long row 0.58× the padded speed, rows of 512 tokens 1.05-1.12×)."""
    if train_args.packing_max_length is not None:
        return train_args.packing_max_length
    from llavakit.model.build import uses_varlen_attention

    return None if uses_varlen_attention(train_args.attn_implementation) else train_args.model_max_length


@dataclass
class RunResult:
    summary: dict
    trainer: Any
    stopped: str | None = None  # the signal that stopped the run early (a checkpoint was saved)


def run(config: RunConfig | list[str]) -> RunResult:
    """Train: a :class:`llavakit.config.RunConfig`, or ``llavakit train`` arguments that resolve to one."""
    from llavakit.config import RunConfig

    if not isinstance(config, RunConfig):
        config = RunConfig.from_argv(list(config))
    else:
        config.validate()
    model_args, data_args, train_args = config.model, config.data, config.train
    _setup_logging(train_args)
    resume = resolve_resume(train_args)
    t0 = time.time()

    from llavakit.model.build import build_model, load_parts, torch_dtype_for
    from llavakit.model.projector import load_projector
    from llavakit.train.stages import Stage

    parts = load_parts(model_args.model_name_or_path, model_args.vision_tower,
                       select_layer=model_args.mm_vision_select_layer,
                       select_feature=model_args.mm_vision_select_feature, cache_dir=train_args.cache_dir,
                       mm_use_im_patch_token=model_args.mm_use_im_patch_token,
                       mm_use_im_start_end=model_args.mm_use_im_start_end,
                       trust_remote_code=model_args.trust_remote_code,
                       image_aspect_ratio=data_args.image_aspect_ratio,
                       image_grid_pinpoints=data_args.image_grid_pinpoints)
    tokenizer = parts.tokenizer
    dataset, collator, template = build_data(model_args, data_args, train_args, tokenizer,
                                             parts.image_processor, parts.num_image_tokens, parts.anyres)
    _init_deepspeed_comm(train_args)
    from transformers import enable_full_determinism, set_seed

    # --seed decides the new weights (projector, new embedding rows) too, not only the data order
    (enable_full_determinism if train_args.full_determinism else set_seed)(train_args.seed)
    dtype = torch_dtype_for(train_args.bf16, train_args.fp16)
    quant = None
    if train_args.bits in (4, 8):
        from llavakit.model.build import quantization_config

        quant = quantization_config(train_args.bits, dtype, train_args.double_quant, train_args.quant_type)
    model = build_model(parts, dtype=dtype, cache_dir=train_args.cache_dir,
                        attn_implementation=train_args.attn_implementation,
                        trust_remote_code=model_args.trust_remote_code, quantization=quant,
                        device_map={"": train_args.local_process_index} if quant is not None else None)
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model.model.multi_modal_projector, model_args.pretrain_mm_mlp_adapter)
        logger.info("projector loaded from %s", model_args.pretrain_mm_mlp_adapter)
    model.config.use_cache = False
    model.config.text_config.use_cache = False

    stage = Stage.from_args(model_args, train_args)
    model = stage.setup(model, train_args)

    if train_args.process_index == 0:  # only once the data and the model are known good
        config.save(os.path.join(train_args.output_dir, RESOLVED_CONFIG))
    from llavakit.data.dataset import BadSampleGuard
    from llavakit.train.callbacks import (
        DataQualityCallback,
        SamplerEpochCallback,
        ShardPlanState,
        SummaryCallback,
    )
    from llavakit.train.checkpoints import StopOnSignal, StopRequest
    from llavakit.train.trainer import LlavaTrainer

    trainer = LlavaTrainer(model=model, args=train_args, train_dataset=dataset, data_collator=collator,
                           processing_class=tokenizer, stage=stage)
    summary_cb = SummaryCallback(trainer)
    trainer.add_callback(summary_cb)
    trainer.bad_sample_guard = BadSampleGuard(data_args.max_bad_fraction, total=len(dataset),
                                              report_path=dataset.report_path)
    trainer.add_callback(DataQualityCallback(trainer))
    trainer.add_callback(SamplerEpochCallback(trainer))
    if getattr(dataset, "source", None) is not None:
        plan_state = ShardPlanState(train_args.world_size, max(1, train_args.dataloader_num_workers))
        trainer.add_callback(plan_state)
        if resume and train_args.process_index == 0:
            plan_state.warn_if_plan_changed(resume)
    from llavakit.train.throughput import MeterCallback, ModelFlops, ThroughputMeter, detect_peak_tflops

    trainer.meter = ThroughputMeter(trainer, ModelFlops.of(model, parts.num_image_tokens),
                                    train_args.peak_tflops or detect_peak_tflops())
    trainer.add_callback(MeterCallback(trainer.meter))
    stop = StopRequest()
    stop_cb = StopOnSignal(trainer, stop)
    trainer.add_callback(stop_cb)
    stop.install()
    try:
        result = trainer.train(resume_from_checkpoint=resume)
    finally:
        stop.uninstall()
    trainer.save_state()
    if stop_cb.stopped_at is not None:
        ckpt = os.path.join(train_args.output_dir, f"checkpoint-{stop_cb.stopped_at}")
        if train_args.process_index == 0:
            print(f"llavakit train: stopped by {stop.signal_name} at step {stop_cb.stopped_at}; checkpoint "
                  f"saved to {ckpt}. Continue with the same command plus --resume_from_checkpoint latest",
                  flush=True)
        _finish_distributed()
        return RunResult({"stopped_by": stop.signal_name, "step": stop_cb.stopped_at, "checkpoint": ckpt},
                         trainer, stopped=stop.signal_name)

    from llavakit.train.export import save_final

    save_final(trainer, parts, model_args, data_args, train_args, template)
    summary = summary_cb.summary(result, time.time() - t0)
    if train_args.process_index == 0:
        with open(os.path.join(train_args.output_dir, "train_summary.json"), "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
        print(summary_cb.render(summary), flush=True)
    _finish_distributed()
    return RunResult(summary, trainer)


def _finish_distributed() -> None:
    """Let every rank reach the end, then close the process group (a rank that exits while a peer still
    talks to it can abort at interpreter shutdown)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    from llavakit.config import ConfigError
    from llavakit.data.dataset import DataQualityError
    from llavakit.data.records import InvalidRecordsError, RecordFileError
    from llavakit.data.shards import ShardError
    from llavakit.data.templates import TemplateError
    from llavakit.data.tokenize import TokenizerLoadError
    from llavakit.model.build import ModelLoadError
    from llavakit.model.projector import ProjectorFileError
    from llavakit.train.checkpoints import CheckpointMismatchError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        result = run(argv)
    except (ConfigError, OutputDirError, RecordFileError, InvalidRecordsError, TemplateError, ModelLoadError,
            ProjectorFileError, CheckpointMismatchError, TokenizerLoadError, NoSamplesError, DataQualityError,
            ShardError) as e:
        print(f"llavakit train: error: {e}", file=sys.stderr, flush=True)
        return 2
    if result.stopped:  # not finished: the shell convention for a signal, so job scripts do not go on
        return _end_launched_rank(130 if result.stopped == "SIGINT" else 143)
    return _end_launched_rank(0)


def _end_launched_rank(code: int) -> int:
    """A rank started by torchrun or the deepspeed launcher ends here, its outputs written and its process
    group closed: exit handlers run (trackers such as wandb finish, logs flush), then the process exits
    without the interpreter's teardown. That teardown can abort ("terminate called without an active
    exception", exit -6) after a run that succeeded, with no Python frame left on the stack, and the launcher
    then reports the finished run as failed: 8 of 40 two-rank ZeRO-3 stage-1 runs on CPU (two at a time)
    before this exit, 0 of 40 with it.

    In-process callers (no ``LOCAL_RANK``) get the code back as usual.
    """
    if "LOCAL_RANK" not in os.environ:
        return code
    from llavakit.internals import run_exit_handlers

    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
