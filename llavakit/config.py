"""Typed arguments for ``llavakit train``: every flag of the original LLaVA scripts, plus the Trainer's.

``parse_train_args`` reads flags and/or a YAML file (``llavakit train config.yaml --flag value``: flags
override the file), maps the spellings older transformers used (``--evaluation_strategy``,
``--warmup_ratio``, ``--gradient_checkpointing``, ``--group_by_length``), and rejects unknown or
contradictory flags before any weight is loaded.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import transformers
import yaml

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The command line or config file asks for something impossible or contradictory."""


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "the language model (hub name or directory), or a LLaVA checkpoint to continue from"})
    version: str = field(default="vicuna_v1", metadata={"help": "conversation template (plain, v1, llama_2, ...)"})
    freeze_backbone: bool = field(default=False, metadata={"help": "freeze the language model"})
    tune_mm_mlp_adapter: bool = field(default=False, metadata={"help": "stage 1: train only the projector"})
    vision_tower: str | None = field(default=None, metadata={"help": "e.g. openai/clip-vit-large-patch14-336"})
    mm_vision_select_layer: int = field(default=-2)
    pretrain_mm_mlp_adapter: str | None = field(default=None, metadata={
        "help": "stage-1 projector (mm_projector.bin / .safetensors, or its directory)"})
    mm_projector_type: str = field(default="mlp2x_gelu")
    mm_use_im_start_end: bool = field(default=False)
    mm_use_im_patch_token: bool = field(default=False)
    mm_patch_merge_type: str | None = field(default=None, metadata={
        "help": "flat (LLaVA-1.5) or spatial_unpad (AnyRes); default: the one --image_aspect_ratio needs"})
    unfreeze_mm_vision_tower: bool = field(default=False, metadata={
        "help": "stage 2: train the vision tower too (LLaVA-NeXT's recipe; its rate: --mm_vision_tower_lr)"})
    mm_vision_select_feature: str = field(default="patch", metadata={"help": "patch (drop CLS) or cls_patch"})
    trust_remote_code: bool = field(default=False)


@dataclass
class DataArguments:
    data_path: str | None = field(default=None, metadata={
        "help": "LLaVA JSON / JSONL, a converted directory, or shards (`llavakit data shard`): their directory, a "
                "brace pattern of .tar files, or an fsspec URL (s3://, gs://, https://)"})
    lazy_preprocess: bool = field(default=True, metadata={"help": "accepted for compatibility; always lazy"})
    is_multimodal: bool = field(default=False, metadata={"help": "accepted for compatibility"})
    image_folder: str | None = field(default=None)
    image_aspect_ratio: str = field(default="square", metadata={
        "help": "square (resize + crop), pad (LLaVA-1.5), or anyres (LLaVA-NeXT: a base view plus tiles)"})
    image_grid_pinpoints: str | None = field(default=None, metadata={
        "help": "anyres: the resolutions to tile at, [[h, w], ...] in pixels or a range '(1x1),...,(3x3)' of tile "
                "grids (default: LLaVA-NeXT's 1x2, 2x1, 2x2, 3x1, 1x3)"})
    max_bad_fraction: float = field(default=0.01, metadata={
        "help": "stop when more than this fraction of the samples seen had an unreadable image"})
    shuffle_buffer: int = field(default=1000, metadata={
        "help": "shards: samples read, shuffled and grouped into batches together (rounded to a multiple of the "
                "batch size; each data-loader worker holds one such window of raw bytes)"})
    shard_timeout: float = field(default=60.0, metadata={
        "help": "shards over http(s): seconds without a byte before a read is retried"})
    shard_retries: int = field(default=3, metadata={"help": "shards: retries of a failed read before the run stops"})


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    cache_dir: str | None = field(default=None)
    optim: str = field(default="adamw_torch")
    remove_unused_columns: bool = field(default=False)
    freeze_mm_mlp_adapter: bool = field(default=False)
    mpt_attn_impl: str | None = field(default="triton", metadata={"help": "accepted for compatibility"})
    model_max_length: int = field(default=2048, metadata={"help": "maximum sequence length, image tokens included"})
    double_quant: bool = field(default=True)
    quant_type: str = field(default="nf4")
    bits: int = field(default=16)
    lora_enable: bool = field(default=False)
    lora_r: int = field(default=64)
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_weight_path: str = field(default="")
    lora_bias: str = field(default="none")
    mm_projector_lr: float | None = field(default=None)
    mm_vision_tower_lr: float | None = field(default=None, metadata={
        "help": "with --unfreeze_mm_vision_tower: the vision tower's learning rate (default: --learning_rate)"})
    group_by_modality_length: bool = field(default=False)
    group_by_length: bool = field(default=False)
    length_group_steps: int = field(default=1, metadata={
        "help": "with --group_by_modality_length / --group_by_length: sort samples by length over this many "
                "optimizer steps' samples (default 1, the original's; on one device that leaves the padding "
                "as it is — 50 or more cuts it to a few percent)"})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "start over in an output dir that already holds checkpoints"})
    attn_implementation: str | None = field(default=None, metadata={
        "help": "eager, sdpa, flash_attention_2, flash_attention_3, or torch_varlen (with --packing: PyTorch's own "
                "FlashAttention varlen kernel, no flash-attn package needed)"})
    packing: bool = field(default=False, metadata={
        "help": "concatenate each micro-batch's samples without padding, attention kept within each sample"})
    packing_max_length: int | None = field(default=None, metadata={
        "help": "longest packed row (default: one row per micro-batch with FlashAttention, else "
                "--model_max_length, which bounds the block attention mask of sdpa/eager)"})
    peak_tflops: float | None = field(default=None, metadata={
        "help": "the accelerator's peak dense TFLOPS at the training dtype, for MFU (known GPUs are detected)"})
    logging_dir: str | None = field(default=None, metadata={
        "help": "TensorBoard log directory (older transformers' flag; default: under output_dir)"})

    def __post_init__(self):
        import torch

        has_accelerator = (torch.accelerator.is_available() if hasattr(torch, "accelerator")
                           else torch.cuda.is_available())
        if not has_accelerator:
            self.dataloader_pin_memory = False
            # without this, accelerate treats torchrun's processes on a CPU-only machine as independent
            # single-process runs (no DDP wrapping, no gradient sync): each rank would train alone
            self.use_cpu = True
        if self.logging_dir:  # transformers 5 reads the TensorBoard directory from the environment
            os.environ["TENSORBOARD_LOGGING_DIR"] = self.logging_dir
        super().__post_init__()


#: old spelling -> current flag
LEGACY_FLAGS = {
    "--evaluation_strategy": "--eval_strategy",
    "--warmup_ratio": "--warmup_steps",
    "--gradient_checkpointing": "--activation_checkpointing",
}


def _yaml_to_argv(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read the config file: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of flag names to values")
    return options_to_argv(data)


def options_to_argv(options: dict[str, Any]) -> list[str]:
    """``{"learning_rate": 2e-5, "bf16": True, ...}`` as flags (a YAML file's keys, or Python keywords)."""
    argv: list[str] = []
    for key, value in options.items():
        flag = "--" + str(key).lstrip("-")
        if isinstance(value, list):
            argv += [flag, *[str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif value is None:
            continue
        else:
            argv += [flag, str(value)]
    return argv


def normalize_argv(argv: list[str]) -> list[str]:
    """Expand a leading YAML file and map legacy flag spellings."""
    argv = list(argv)
    if argv and argv[0].endswith((".yaml", ".yml")) and not argv[0].startswith("-"):
        argv = _yaml_to_argv(argv[0]) + argv[1:]
    out = []
    for a in argv:
        name, eq, val = a.partition("=")
        if name in LEGACY_FLAGS:
            a = LEGACY_FLAGS[name] + (eq + val if eq else "")
        out.append(a)
    return out


def _check_dtype_flags(argv: list[str]) -> list[str]:
    """``--tf32 True`` on a machine without CUDA is dropped with a warning instead of an error."""
    import torch

    if torch.cuda.is_available():
        return argv
    out, i = [], 0
    while i < len(argv):
        if argv[i] in ("--tf32", "--tf32=True", "--tf32=true"):
            logger.warning("--tf32 ignored: no CUDA device")
            if argv[i] == "--tf32" and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                i += 1
            i += 1
            continue
        out.append(argv[i])
        i += 1
    return out


def parse_train_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse ``llavakit train`` arguments; raises :class:`ConfigError` on contradictions."""
    argv = _check_dtype_flags(normalize_argv(argv))
    parser = transformers.HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments), prog="llavakit train",
        usage="llavakit train [RUN.yaml] [--flag value ...]",
        description="Train a LLaVA (stage 1, stage 2, LoRA) with the original scripts' flags and every "
                    "transformers TrainingArguments flag. A leading RUN.yaml gives flags as keys; flags on the "
                    "command line override it.",
        epilog="Older spellings accepted: " + ", ".join(f"{old} (= {new})" for old, new in LEGACY_FLAGS.items()))
    try:
        model_args, data_args, train_args, rest = parser.parse_args_into_dataclasses(
            args=argv, return_remaining_strings=True)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if rest:
        raise ConfigError(f"unknown argument(s): {' '.join(rest)} (see `llavakit train --help`)")
    validate_args(model_args, data_args, train_args)
    return model_args, data_args, train_args


@dataclass
class RunConfig:
    """Everything a training run needs, typed: what ``llavakit train`` flags, a YAML file, or Python keywords
    resolve to. ``llavakit.train.run(config)`` runs it."""

    model: ModelArguments
    data: DataArguments
    train: TrainingArguments

    @classmethod
    def from_argv(cls, argv: list[str]) -> RunConfig:
        """From ``llavakit train`` arguments (a leading YAML file, the original's and the Trainer's flags)."""
        return cls(*parse_train_args(argv))

    @classmethod
    def from_options(cls, **options: Any) -> RunConfig:
        """From keyword options named as the flags: ``RunConfig.from_options(model_name_or_path=...,
        data_path=..., version="v1", learning_rate=2e-5, bf16=True)``."""
        return cls.from_argv(options_to_argv(options))

    def validate(self) -> None:
        validate_args(self.model, self.data, self.train)

    def save(self, path: str) -> None:
        save_resolved_config(path, self.model, self.data, self.train)


def validate_args(m: ModelArguments, d: DataArguments, t: TrainingArguments) -> None:
    errors = []
    if not m.model_name_or_path:
        errors.append("--model_name_or_path is required")
    from llavakit.data.shards import is_shard_source

    if not d.data_path:
        errors.append("--data_path is required")
    elif not os.path.exists(d.data_path) and not is_shard_source(d.data_path):
        errors.append(f"--data_path {d.data_path}: no such file or directory")
    if d.image_folder and not os.path.isdir(d.image_folder):
        errors.append(f"--image_folder {d.image_folder}: no such directory")
    if m.tune_mm_mlp_adapter and t.lora_enable:
        errors.append("--tune_mm_mlp_adapter (stage 1, projector only) contradicts --lora_enable; choose one")
    if m.tune_mm_mlp_adapter and t.freeze_mm_mlp_adapter:
        errors.append("--tune_mm_mlp_adapter trains only the projector, but --freeze_mm_mlp_adapter freezes it")
    if m.mm_projector_type != "mlp2x_gelu":
        errors.append(f"--mm_projector_type {m.mm_projector_type!r} is not supported: transformers' Llava has the "
                      "mlp2x_gelu projector (Linear, GELU, Linear)")
    if m.mm_vision_select_feature not in ("patch", "cls_patch"):
        errors.append(f"--mm_vision_select_feature {m.mm_vision_select_feature!r}: use 'patch' or 'cls_patch'")
    from llavakit.data.anyres import AnyResError, max_tiles_of

    anyres = d.image_aspect_ratio.startswith("anyres")
    if anyres:
        try:
            max_tiles_of(d.image_aspect_ratio)
        except AnyResError as e:
            errors.append(str(e))
    if not anyres and d.image_aspect_ratio not in ("square", "pad"):
        errors.append(f"--image_aspect_ratio {d.image_aspect_ratio!r}: use 'square', 'pad', 'anyres' (LLaVA-NeXT) or "
                      "'anyres_max_N' (LLaVA-OneVision)")
    else:
        merge = "spatial_unpad" if anyres else "flat"
        if m.mm_patch_merge_type not in (None, merge):
            errors.append(f"--mm_patch_merge_type {m.mm_patch_merge_type!r} with --image_aspect_ratio "
                          f"{d.image_aspect_ratio}: use {merge}, the only one transformers' "
                          f"{'LlavaNext' if merge != 'flat' else 'Llava'} has")
    if d.image_grid_pinpoints and not anyres:
        errors.append("--image_grid_pinpoints tiles images for --image_aspect_ratio anyres; add it, or drop the grid")
    if t.mm_vision_tower_lr is not None and not m.unfreeze_mm_vision_tower:
        errors.append("--mm_vision_tower_lr is the rate of a vision tower that trains: add --unfreeze_mm_vision_tower True")
    if m.unfreeze_mm_vision_tower and (m.tune_mm_mlp_adapter or t.lora_enable):
        errors.append("--unfreeze_mm_vision_tower trains the tower in full stage-2 training; not with "
                      f"{'--tune_mm_mlp_adapter' if m.tune_mm_mlp_adapter else '--lora_enable'}")
    if m.pretrain_mm_mlp_adapter and not os.path.exists(m.pretrain_mm_mlp_adapter):
        errors.append(f"--pretrain_mm_mlp_adapter {m.pretrain_mm_mlp_adapter}: no such file")
    if t.bits not in (4, 8, 16):
        errors.append(f"--bits {t.bits}: use 4, 8 or 16")
    elif t.bits in (4, 8):
        import importlib.util

        import torch

        if not torch.cuda.is_available():
            errors.append(f"--bits {t.bits} (QLoRA) needs a CUDA GPU with bitsandbytes; none is available here")
        elif importlib.util.find_spec("bitsandbytes") is None:
            errors.append(f"--bits {t.bits} (QLoRA) needs bitsandbytes: pip install bitsandbytes")
        if not t.lora_enable:
            errors.append(f"--bits {t.bits} quantises the language model for LoRA training; add --lora_enable True")
        if t.deepspeed and "zero3" in str(t.deepspeed).replace("_", "").replace("-", "").lower():
            errors.append(f"--bits {t.bits} cannot be combined with ZeRO-3; use ZeRO-2 (scripts/zero2.json)")
        if t.quant_type not in ("nf4", "fp4"):
            errors.append(f"--quant_type {t.quant_type!r}: use nf4 or fp4")
    if t.attn_implementation == "torch_varlen" and not t.packing:
        errors.append("--attn_implementation torch_varlen attends packed batches; add --packing True (or use sdpa or "
                      "flash_attention_2 for padded batches)")
    if t.packing_max_length is not None and t.packing_max_length < t.model_max_length:
        errors.append(f"--packing_max_length {t.packing_max_length} is shorter than --model_max_length "
                      f"{t.model_max_length}: a sample must fit a packed row")
    if d.shuffle_buffer < 1:
        errors.append(f"--shuffle_buffer {d.shuffle_buffer}: use 1 or more samples")
    if d.shard_timeout <= 0 or d.shard_retries < 0:
        errors.append("--shard_timeout must be positive and --shard_retries 0 or more")
    if t.length_group_steps < 1:
        errors.append(f"--length_group_steps {t.length_group_steps}: use 1 or more")
    elif t.length_group_steps > 1 and not (t.group_by_modality_length or t.group_by_length):
        errors.append("--length_group_steps sorts the batches of --group_by_modality_length or --group_by_length; "
                      "add one of them")
    if t.lora_bias not in ("none", "all", "lora_only"):
        errors.append(f"--lora_bias {t.lora_bias!r}: use none, all or lora_only")
    if t.model_max_length < 8:
        errors.append(f"--model_max_length {t.model_max_length} is too small")
    from llavakit.data.templates import ALIASES, TEMPLATES

    if m.version not in TEMPLATES and m.version not in ALIASES and m.version != "chat_template":
        from llavakit.data.templates import TEMPLATE_NAMES

        errors.append(f"--version {m.version!r}: unknown template; choose one of {', '.join(TEMPLATE_NAMES)}")
    if errors:
        raise ConfigError("invalid arguments:\n  " + "\n  ".join(errors))


def resolved_config(m: ModelArguments, d: DataArguments, t: TrainingArguments) -> dict[str, Any]:
    train = {k: v for k, v in t.to_dict().items() if not k.startswith("_")}
    for k in ("hub_token",):
        if train.get(k):
            train[k] = "<redacted>"
    return {"model": asdict(m), "data": asdict(d), "training": train,
            "llavakit_version": __import__("llavakit").__version__,
            "transformers_version": transformers.__version__}


def save_resolved_config(path: str, m: ModelArguments, d: DataArguments, t: TrainingArguments) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(json.loads(json.dumps(resolved_config(m, d, t), default=str)), f, sort_keys=False)
    os.replace(tmp, path)
