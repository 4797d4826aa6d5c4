"""Training callbacks: the one-screen summary at the end of a run, the bad-sample guard, the sampler's epoch."""

from __future__ import annotations

import os

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


class SummaryCallback(TrainerCallback):
    """Collects what the end-of-run summary reports (steps, samples, tokens, time, loss, outputs)."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.losses: list[tuple[int, float]] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append((state.global_step, float(logs["loss"])))

    def summary(self, result, wall_seconds: float) -> dict:
        tr = self.trainer
        state = tr.state
        ds = tr.train_dataset
        samples, tokens, replaced = tr.global_counts()  # counts are per process; summed over ranks
        return {
            "stage": tr.stage.name,
            "steps": state.global_step,
            "epochs": round(float(state.epoch or 0), 3),
            "samples_seen": samples,
            "tokens_seen": tokens,
            "train_samples": len(ds),
            "skipped_samples": len(ds.index.skipped),
            "replaced_samples": replaced,
            "first_loss": self.losses[0][1] if self.losses else None,
            "final_loss": self.losses[-1][1] if self.losses else None,
            "train_loss": round(float(result.training_loss), 6) if result is not None else None,
            "wall_seconds": round(wall_seconds, 1),
            "output_dir": os.path.abspath(tr.args.output_dir),
            "trainable_parameters": tr.stage.trainable,
            "total_parameters": tr.stage.total,
        }

    @staticmethod
    def render(s: dict) -> str:
        def fmt(v):
            return f"{v:.4f}" if isinstance(v, float) else str(v)

        lines = [
            "=" * 64,
            f"llavakit train: {s['stage']} done",
            f"  steps {s['steps']}  epochs {s['epochs']}  samples {s['samples_seen']}  tokens {s['tokens_seen']}",
            (f"  loss {fmt(s['first_loss'])} -> {fmt(s['final_loss'])}  (mean {fmt(s['train_loss'])})"
             if s["first_loss"] is not None else
             f"  loss: none logged (fewer steps than --logging_steps); mean {fmt(s['train_loss'])}"),
            f"  time {s['wall_seconds']} s   trainable {s['trainable_parameters']:,} / {s['total_parameters']:,}",
            f"  data: {s['train_samples']} samples, {s['skipped_samples']} skipped, "
            f"{s['replaced_samples']} replaced (bad images)",
            f"  output: {s['output_dir']}",
            "=" * 64,
        ]
        return "\n".join(lines)


class DataQualityCallback(TrainerCallback):
    """After every optimizer step: stop the run (on every rank at once) when too many samples were bad."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.check_data_quality()


class SamplerEpochCallback(TrainerCallback):
    """Tells llavakit's batch sampler the epoch before each one starts. The Trainer does it too, but on a
    resume under several ranks its call does not reach a sampler wrapped in accelerate's shard and skip
    wrappers, and the resumed epoch would be planned as epoch 0."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_epoch_begin(self, args, state, control, **kwargs):
        import math

        sampler = self.trainer.batch_sampler
        if sampler is not None:
            sampler.set_epoch(math.floor((state.epoch or 0.0) + 1e-9))


class ShardPlanState(TrainerCallback, ExportableState):
    """Keeps in every checkpoint the ranks × workers the shard plan was cut for (``trainer_state.json``), so
    that a resume with others can say what it changes (:func:`warn_if_plan_changed`)."""

    def __init__(self, world_size: int, workers: int):
        self.world_size = world_size
        self.workers = workers

    def state(self) -> dict:
        return {"args": {"world_size": self.world_size, "workers": self.workers}, "attributes": {}}

    def warn_if_plan_changed(self, checkpoint: str) -> None:
        import json
        import logging

        try:
            with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
                saved = json.load(f).get("stateful_callbacks", {}).get(type(self).__name__, {}).get("args")
        except (OSError, ValueError):
            return
        if saved and (saved["world_size"], saved["workers"]) != (self.world_size, self.workers):
            logging.getLogger("llavakit.train").warning(
                "resumed with %d rank(s) x %d data-loader worker(s); the checkpoint's shard plan had %d x %d. Finished "
                "epochs are unaffected; the epoch in progress is cut anew, so some of its samples will be seen twice "
                "and some not at all (at most as many as were trained before the stop); later epochs see each "
                "sample once", self.world_size, self.workers, saved["world_size"], saved["workers"])
