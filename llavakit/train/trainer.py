"""``LlavaTrainer``: HF ``Trainer`` with LLaVA's sampler, optimizer groups and stage-aware saving.

* the training dataloader uses llavakit's length-grouped batch sampler when ``--group_by_modality_length``
  or ``--group_by_length`` is set (accelerate deals its batches to ranks round-robin);
* the optimizer has the projector (the vision tower) in its own parameter groups when ``--mm_projector_lr``
  (``--mm_vision_tower_lr``) is given, and no weight decay on biases and norms;
* every text-only micro-batch still runs the vision path, loss-neutrally (see ``dummy_image.py``);
* images arrive as uint8 and are normalised on the device (bit-identical to the image processor);
* stage-1 saves (checkpoints included) write only the projector — under DeepSpeed too, whose engine state
  then leaves the frozen weights out — and their checkpoints resume from it;
* every save makes the generation config savable first (LLaVA #1144);
* checkpoints are staged and published atomically (``checkpoints.py``).

The Trainer's private methods behind saving and resuming are overridden in ``llavakit.internals.TrainerSeam``
only; this class defines the public hooks it calls.
"""

from __future__ import annotations

import logging
import os
from functools import partial

import torch
from torch.utils.data import DataLoader
from transformers import Trainer
from transformers.trainer_utils import seed_worker

from llavakit.data.sampler import LengthGroupedBatchSampler
from llavakit.data.stream import ShardDataset
from llavakit.internals import TrainerSeam, attention_kernel
from llavakit.model.build import anyres_of, gathered, num_image_tokens_for, uses_varlen_attention
from llavakit.model.generation_config import make_savable
from llavakit.model.projector import PROJECTOR_BIN, load_projector, save_projector
from llavakit.train.batch import BatchCounts, BatchPlan, prepare_batch
from llavakit.train.stages import PROJECTOR, TOWER, Stage

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


class LlavaTrainer(TrainerSeam, Trainer):
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
        anyres = anyres_of(cfg)
        if anyres is not None:  # a dummy image of one tile's size: its base view and tiles, as for any image
            side = vcfg.image_size
            self._dummy.update(num_image_tokens=anyres.num_tokens(side, side), views=anyres.num_views(side, side),
                               image_size=(side, side), count_images=anyres.max_tiles is not None)
        # packed batches give a varlen kernel (FlashAttention, torch_varlen) their boundaries (collate.varlen_kwargs)
        self._varlen = uses_varlen_attention(attention_kernel(cfg.text_config))
        self.tokens_seen = 0  # real (non-padding) tokens
        self.tokens_processed = 0  # every position the model ran, padding included
        self.samples_seen = 0
        self.images_seen = 0
        self.samples_replaced = 0  # bad samples replaced, as the batches reported them
        self.last_replaced: dict | None = None
        self.bad_sample_guard = None  # a BadSampleGuard, checked after every optimizer step
        self.meter = None  # a ThroughputMeter: rates and MFU added to every training log
        self.batch_sampler = None  # llavakit's batch sampler, when the dataloader uses one

    # ---- data -----------------------------------------------------------------------------------
    def get_train_dataloader(self) -> DataLoader:
        args = self.args
        ds = self.train_dataset
        if isinstance(ds, ShardDataset):  # shards: the plan decides what each rank and worker reads
            sampler = ds.sampler(args.per_device_train_batch_size, args.world_size, args.dataloader_num_workers,
                                 seed=args.seed, group_by_modality=args.group_by_modality_length,
                                 sort_by_length=args.group_by_modality_length or args.group_by_length,
                                 drop_last=args.dataloader_drop_last)
            left = len(ds) - sampler.samples_per_epoch
            logger.info("shards: each epoch %d of %d samples in %d share(s) of %d (%d rank(s) x %d worker(s)), read in "
                        "windows of %d%s", sampler.samples_per_epoch, len(ds), sampler.readers, sampler.share,
                        sampler.world_size, sampler.workers, sampler.window,
                        f"; {left} left for a later epoch (another shard order)" if left else "")
        elif not (args.group_by_modality_length or args.group_by_length):
            return super().get_train_dataloader()
        else:
            sampler = LengthGroupedBatchSampler(
                ds.modality_lengths, args.per_device_train_batch_size, args.world_size,
                args.gradient_accumulation_steps, group_by_modality=args.group_by_modality_length,
                has_image=ds.index.has_image, seed=args.seed, drop_last=args.dataloader_drop_last,
                window_steps=args.length_group_steps)
        self.batch_sampler = sampler
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
        # a part with a rate of its own (--mm_projector_lr, --mm_vision_tower_lr) gets its own groups
        own_lr = {PROJECTOR: self.args.mm_projector_lr, TOWER: self.args.mm_vision_tower_lr}
        groups: dict[tuple[str, bool], list] = {}
        for n, p in opt_model.named_parameters():
            if not p.requires_grad:
                continue
            part = next((k for k, lr in own_lr.items() if lr is not None and f"{k}." in n), "")
            groups.setdefault((part, n in decay), []).append(p)
        param_groups = []
        for (part, has_decay), params in sorted(groups.items()):
            g = {"params": params, "weight_decay": self.args.weight_decay if has_decay else 0.0}
            if part:
                g["lr"] = own_lr[part]
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

    # ---- saving and resuming (the hooks llavakit.internals.TrainerSeam calls) ---------------------
    @property
    def engine_saves_trainable_only(self) -> bool:
        """Stage 1 under DeepSpeed: the engine's checkpoint leaves out the frozen weights (the LLM and the
        vision tower, all but the projector), as it does for LoRA."""
        return self.stage.projector_only_saves

    def staging_dir(self, run_dir: str) -> str:
        from llavakit.train.checkpoints import STAGING

        return os.path.join(run_dir, STAGING)

    def publish_checkpoint(self, staged: str, final: str, save_total_limit: int | None) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        from llavakit.train.checkpoints import publish

        publish(staged, final)
        rotate_checkpoints(output_dir=os.path.dirname(final), save_total_limit=save_total_limit,
                           best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)

    def save_weights(self, output_dir: str, state_dict=None) -> bool:
        """A save's weights: stage 1 writes the projector alone (``mm_projector.bin`` + config); other stages
        leave it to the Trainer. Every save makes the generation config savable first (LLaVA #1144)."""
        make_savable(getattr(self.llava, "generation_config", None))
        if self.stage.is_lora and getattr(self.llava.model, "image_newline", None) is not None:
            self._save_newline(output_dir, state_dict)
        if not self.stage.projector_only_saves:
            return False
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            if state_dict is None:
                state = self.llava.model.multi_modal_projector.state_dict()
            else:
                state = projector_state(state_dict)
            save_projector(state, output_dir)
            self.llava.config.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        return True

    def _save_newline(self, output_dir: str, state_dict=None) -> None:
        """An AnyRes LoRA save: the image_newline beside the adapter (``model/lora.py``)."""
        from llavakit.model.lora import save_newline

        value = next((v for k, v in (state_dict or {}).items() if k.endswith("image_newline")), None)
        if value is None:
            param = self.llava.model.image_newline
            with gathered(param):
                value = param.detach().clone()
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            save_newline(output_dir, value)

    def resume_weights(self, checkpoint: str) -> bool:
        """A stage-1 checkpoint's projector, or a full checkpoint's weights (strictly); LoRA and DeepSpeed
        checkpoints are the Trainer's (an AnyRes LoRA checkpoint's image_newline is loaded here)."""
        if self.stage.is_lora and not self.is_deepspeed_enabled:
            from llavakit.model.lora import load_newline

            value = load_newline(checkpoint)
            if value is not None:
                with torch.no_grad():
                    self.llava.model.image_newline.copy_(value)
        has_weights = any(os.path.exists(os.path.join(checkpoint, f)) for f in WEIGHT_FILES)
        projector_file = os.path.join(checkpoint, PROJECTOR_BIN)
        if not has_weights and os.path.isfile(projector_file):
            logger.info("resuming the projector from %s", projector_file)
            load_projector(self.llava.model.multi_modal_projector, projector_file)
            return True
        full = any(os.path.exists(os.path.join(checkpoint, f)) for f in FULL_WEIGHT_FILES)
        if full and not self.stage.is_lora and not self.is_deepspeed_enabled:
            self._load_full_weights(checkpoint)
            return True
        return False

    def _load_full_weights(self, checkpoint: str) -> None:
        """Model weights of a full checkpoint, strictly. transformers saves Llava under its older key names
        (``language_model.model.*``), which the Trainer's own resume does not map back and then skips
        without an error: the run would continue from the initial weights."""
        from llavakit.model.convert import native_key, read_weights
        from llavakit.train.checkpoints import CheckpointMismatchError

        own = self.llava.state_dict()
        state = {native_key(k): v for k, v in read_weights(checkpoint).items()}
        unexpected = sorted(set(state) - set(own))
        by_ptr = {t.data_ptr(): k for k, t in own.items() if k in state}
        missing = sorted(k for k in set(own) - set(state) if own[k].data_ptr() not in by_ptr)  # tied: fine
        if missing or unexpected:
            raise CheckpointMismatchError(f"{checkpoint}: the checkpoint's weights do not match the model (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}); was it written by another run?")
        self.llava.load_state_dict(state, strict=False)
        logger.info("resumed %d weight tensors from %s", len(state), checkpoint)
