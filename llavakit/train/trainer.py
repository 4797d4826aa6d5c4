"""``LlavaTrainer``: HF ``Trainer`` with LLaVA's sampler, optimizer groups and stage-aware saving.

* the training dataloader uses llavakit's length-grouped batch sampler when ``--group_by_modality_length``
  or ``--group_by_length`` is set (accelerate deals its batches to ranks round-robin);
* the optimizer has the projector in its own parameter groups when ``--mm_projector_lr`` is given, and no
  weight decay on biases and norms;
* every text-only micro-batch still runs the vision path, loss-neutrally (see ``graph.py``);
* images arrive as uint8 and are normalised on the device (bit-identical to the image processor);
* stage-1 saves (checkpoints included) write only the projector — under DeepSpeed too, whose engine state
  then leaves the frozen weights out — and their checkpoints resume from it;
* every save makes the generation config savable first (LLaVA #1144).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from functools import partial

import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import seed_worker

from llavakit.data.sampler import LengthGroupedBatchSampler
from llavakit.model.build import num_image_tokens_for, uses_varlen_attention
from llavakit.model.generation_config import make_savable
from llavakit.model.projector import PROJECTOR_BIN, load_projector, save_projector
from llavakit.train.batch import BatchCounts, BatchPlan, prepare_batch
from llavakit.train.stages import PROJECTOR, Stage

logger = logging.getLogger(__name__)

FULL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                     "pytorch_model.bin.index.json")
WEIGHT_FILES = (*FULL_WEIGHT_FILES, "adapter_model.safetensors", "adapter_model.bin")


def projector_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The projector's tensors out of a full-model state dict, under the projector module's own names."""
    out = {}
    for k, v in state_dict.items():
        if f"{PROJECTOR}." in k:
            out[k.split(f"{PROJECTOR}.", 1)[1]] = v
    return out


#: transformers' older Llava key names (what ``save_pretrained`` writes) → the module's current names
_LEGACY_LLAVA_KEYS = (("language_model.lm_head.", "lm_head."), ("language_model.model.", "model.language_model."),
                      ("vision_tower.", "model.vision_tower."),
                      ("multi_modal_projector.", "model.multi_modal_projector."))


def current_llava_key(key: str) -> str:
    for old, new in _LEGACY_LLAVA_KEYS:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def _load_non_strict(load, engine, path, load_module_strict=True, **kw):
    """A stage-1 DeepSpeed checkpoint holds the projector only: the frozen weights are not in it."""
    return load(engine, path, load_module_strict=False, **kw)


class LlavaTrainer(Trainer):
    def __init__(self, *args, stage: Stage, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage
        unwrapped = self.model
        base = stage.base(unwrapped)
        self.llava = base
        cfg = base.config
        vcfg = cfg.vision_config
        # the tower's own count (a config's image_seq_length may be absent and default to 576)
        n_image = num_image_tokens_for(vcfg, cfg.vision_feature_select_strategy)
        self._dummy = {"image_token_id": cfg.image_token_index, "num_image_tokens": n_image,
                       "image_shape": (getattr(vcfg, "num_channels", 3), vcfg.image_size, vcfg.image_size),
                       "pad_token_id": cfg.pad_token_id if cfg.pad_token_id is not None else 0}
        # packed batches give a varlen kernel (FlashAttention, torch_varlen) their boundaries (collate.varlen_kwargs)
        self._varlen = uses_varlen_attention(getattr(cfg.text_config, "_attn_implementation", None))
        self.tokens_seen = 0  # real (non-padding) tokens
        self.tokens_processed = 0  # every position the model ran, padding included
        self.samples_seen = 0
        self.images_seen = 0
        self.samples_replaced = 0  # bad samples replaced, as the batches reported them
        self.last_replaced: dict | None = None
        self.bad_sample_guard = None  # a BadSampleGuard, checked after every optimizer step
        self.meter = None  # a ThroughputMeter: rates and MFU added to every training log

    # ---- data -----------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        args = self.args
        if not (args.group_by_modality_length or args.group_by_length):
            return super().get_train_dataloader()
        ds = self.train_dataset
        sampler = LengthGroupedBatchSampler(
            ds.modality_lengths, args.per_device_train_batch_size, args.world_size,
            args.gradient_accumulation_steps, group_by_modality=args.group_by_modality_length,
            has_image=ds.index.has_image, seed=args.seed, drop_last=args.dataloader_drop_last,
            window_steps=args.length_group_steps)
        params = {"batch_sampler": sampler, "collate_fn": self.data_collator,
                  "num_workers": args.dataloader_num_workers, "pin_memory": args.dataloader_pin_memory,
                  "persistent_workers": args.dataloader_persistent_workers and args.dataloader_num_workers > 0,
                  "worker_init_fn": partial(seed_worker, num_workers=args.dataloader_num_workers,
                                            rank=args.process_index)}
        if args.dataloader_num_workers > 0 and args.dataloader_prefetch_factor is not None:
            params["prefetch_factor"] = args.dataloader_prefetch_factor
        return self.accelerator.prepare(DataLoader(ds, **params))

    # ---- optimizer ------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[bool, bool], list] = {}
        proj_lr = self.args.mm_projector_lr
        for n, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            key = (PROJECTOR in n and proj_lr is not None, n in decay)
            groups.setdefault(key, []).append(p)
        param_groups = []
        for (is_proj, has_decay), params in sorted(groups.items()):
            g = {"params": params, "weight_decay": self.args.weight_decay if has_decay else 0.0}
            if is_proj:
                g["lr"] = proj_lr
            param_groups.append(g)
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(param_groups, **optimizer_kwargs)
        return self.optimizer

    # ---- step -----------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        tower_dtype = next(self.llava.model.vision_tower.parameters()).dtype
        plan = BatchPlan(self.data_collator.transform.normalize, tower_dtype, self._dummy, self._varlen)
        inputs, counts = prepare_batch(inputs, plan, training=model.training)
        if model.training:
            self.count(counts)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def count(self, c: BatchCounts) -> None:
        """Add a training micro-batch's counts (this process's; :meth:`global_counts` sums the ranks)."""
        self.samples_seen += c.samples
        self.tokens_seen += c.real_tokens
        self.tokens_processed += c.positions
        self.images_seen += c.images
        self.samples_replaced += len(c.replaced)
        if c.replaced:
            self.last_replaced = c.replaced[-1]

    def global_counts(self) -> tuple[int, int, int]:
        """(samples, real tokens, replaced samples) seen so far, summed over ranks (a collective: every rank
        must call it at the same point)."""
        counts = [self.samples_seen, self.tokens_seen, self.samples_replaced]
        if self.accelerator.num_processes > 1:
            t = torch.tensor(counts, dtype=torch.long, device=self.args.device)
            counts = [int(x) for x in self.accelerator.reduce(t, reduction="sum").tolist()]
        return counts[0], counts[1], counts[2]

    def check_data_quality(self) -> None:
        """Enforce ``--max_bad_fraction`` on the counts of every rank (all ranks stop together)."""
        if self.bad_sample_guard is not None:
            samples, _, replaced = self.global_counts()
            self.bad_sample_guard.check(samples, replaced, self.last_replaced)

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.meter is not None and "loss" in logs:
            logs = {**logs, **self.meter.metrics()}
        super().log(logs, start_time)

    # ---- saving ---------------------------------------------------------------------------------
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir or self.args.output_dir
        make_savable(getattr(self.llava, "generation_config", None))
        if not self.stage.projector_only_saves:
            return super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        if state_dict is None:
            state = self.llava.model.multi_modal_projector.state_dict()
        else:
            state = projector_state(state_dict)
        save_projector(state, output_dir)
        self.llava.config.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return staging if staging else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into a staging directory and published by an atomic rename
        once every rank is done; older checkpoints rotate only after that (see ``checkpoints.py``)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
        from transformers.trainer_utils import rotate_checkpoints as rotate

        from llavakit.train.checkpoints import STAGING, publish

        run_dir = super()._get_output_dir(trial)
        staging = os.path.join(run_dir, STAGING)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and os.path.exists(os.path.join(staging, name)):
            shutil.rmtree(os.path.join(staging, name))  # left by a run killed mid-save
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self._staging_dir = staging
        try:
            self.args.save_total_limit = None  # rotation waits until the new checkpoint is complete
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish(os.path.join(staging, name), os.path.join(run_dir, name))
            rotate(output_dir=run_dir, save_total_limit=limit, best_model_checkpoint=self.state.best_model_checkpoint,
                   use_mtime=True)
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not (self.is_deepspeed_enabled and self.stage.projector_only_saves):
            return super()._save_optimizer_and_scheduler(output_dir)
        # stage 1 under DeepSpeed: the engine's checkpoint leaves out the frozen weights (the LLM and the
        # vision tower, all but the projector) as it does for LoRA; train() loads it non-strictly
        engine = self.model_wrapped
        save = engine.save_checkpoint
        engine.save_checkpoint = functools.partial(save, exclude_frozen_parameters=True)
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del engine.save_checkpoint

    def train(self, *args, **kwargs):
        if not (self.is_deepspeed_enabled and self.stage.projector_only_saves):
            return super().train(*args, **kwargs)
        import transformers.trainer as hf_trainer

        load = hf_trainer.deepspeed_load_checkpoint
        hf_trainer.deepspeed_load_checkpoint = functools.partial(_load_non_strict, load)
        try:
            return super().train(*args, **kwargs)
        finally:
            hf_trainer.deepspeed_load_checkpoint = load

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        has_weights = any(os.path.exists(os.path.join(resume_from_checkpoint, f)) for f in WEIGHT_FILES)
        projector_file = os.path.join(resume_from_checkpoint, PROJECTOR_BIN)
        if not has_weights and os.path.isfile(projector_file):
            logger.info("resuming the projector from %s", projector_file)
            load_projector(self.llava.model.multi_modal_projector, projector_file)
            return
        full = any(os.path.exists(os.path.join(resume_from_checkpoint, f)) for f in FULL_WEIGHT_FILES)
        if full and not self.stage.is_lora and not self.is_deepspeed_enabled:
            self._load_full_weights(resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_full_weights(self, checkpoint: str) -> None:
        """Model weights of a full checkpoint, strictly. transformers saves Llava under its older key names
        (``language_model.model.*``), which the Trainer's own resume does not map back and then skips
        without an error: the run would continue from the initial weights."""
        from llavakit.model.convert import read_weights
        from llavakit.train.checkpoints import CheckpointMismatchError

        own = self.llava.state_dict()
        state = {current_llava_key(k): v for k, v in read_weights(checkpoint).items()}
        unexpected = sorted(set(state) - set(own))
        by_ptr = {t.data_ptr(): k for k, t in own.items() if k in state}
        missing = sorted(k for k in set(own) - set(state) if own[k].data_ptr() not in by_ptr)  # tied: fine
        if missing or unexpected:
            raise CheckpointMismatchError(f"{checkpoint}: the checkpoint's weights do not match the model (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}); was it written by another run?")
        self.llava.load_state_dict(state, strict=False)
        logger.info("resumed %d weight tensors from %s", len(state), checkpoint)
