"""The private names of transformers, torch and Python that llavakit relies on, in one place.

Each is listed in :data:`PRIVATE_NAMES` with what llavakit uses it for and the versions it was checked on;
:func:`check_internals` verifies that every one is still where llavakit expects it (the test suite calls it,
so an upgrade that moves one fails loudly instead of silently changing a guarantee). No other module of
llavakit touches a private name: :class:`TrainerSeam` overrides the Trainer's private save and resume
methods and turns them into public hooks that :class:`llavakit.train.trainer.LlavaTrainer` defines; the
helpers below cover the rest.

The Trainer offers no public hook for these guarantees: a callback's ``on_save`` runs after the checkpoint
is written (too late to stage it, or to keep rotation from deleting the last complete one), and the weights
a save writes or a resume reads are decided inside ``_save`` / ``_load_from_checkpoint``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import os
import shutil

#: (dotted name, parameters it must accept — None for a plain attribute, what llavakit uses it for)
PRIVATE_NAMES: tuple[tuple[str, tuple[str, ...] | None, str], ...] = (
    ("transformers.Trainer._save", ("output_dir", "state_dict"),
     "TrainerSeam: a save's weights (stage 1: the projector alone); transformers 5.0-5.24"),
    ("transformers.Trainer._get_output_dir", ("trial",),
     "TrainerSeam: checkpoints are written into a staging directory first (atomic publish); 5.0-5.24"),
    ("transformers.Trainer._save_checkpoint", ("model", "trial"),
     "TrainerSeam: staging + atomic rename + rotation after publish; transformers 5.0-5.24"),
    ("transformers.Trainer._save_optimizer_and_scheduler", ("output_dir",),
     "TrainerSeam: DeepSpeed stage-1 checkpoints leave the frozen weights out; transformers 5.0-5.24"),
    ("transformers.Trainer._load_from_checkpoint", ("resume_from_checkpoint", "model"),
     "TrainerSeam: stage-1 and full checkpoints reload strictly (older Llava key names); 5.0-5.24"),
    ("transformers.trainer.deepspeed_load_checkpoint", ("deepspeed_engine", "checkpoint_path"),
     "TrainerSeam: replaced during a DeepSpeed stage-1 resume to load non-strictly; 5.0-5.24"),
    ("transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref", None,
     "ZeRO-3 construction-time partitioning paused while the Llava shell is built on meta; transformers 5.0-5.24"),
    ("transformers.PreTrainedModel.disable_input_require_grads", (),
     "removes the hooks in _require_grads_hooks, which llavakit sets on the language model only; 5.0-5.24"),
    ("transformers.PretrainedConfig._attn_implementation", None,
     "the attention kernel a config names: set on the assembled Llava's config, read by the trainer; 5.0-5.24"),
    ("atexit._run_exitfuncs", (),
     "a launched rank runs its exit handlers, then os._exit (no interpreter teardown abort); CPython 3.10-3.13"),
)


def _resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


def check_internals() -> list[str]:
    """What moved: one line per private name that is missing or no longer takes the parameters used."""
    problems = []
    for dotted, params, why in PRIVATE_NAMES:
        try:
            obj = _resolve(dotted)
        except (ImportError, AttributeError):
            problems.append(f"{dotted} is gone (used for: {why})")
            continue
        if params:
            names = set(inspect.signature(obj).parameters)
            missing = [p for p in params if p not in names]
            if missing:
                problems.append(f"{dotted} no longer takes {', '.join(missing)} (used for: {why})")
    return problems


@contextlib.contextmanager
def deepspeed_zero3_init_paused():
    """ZeRO-3's construction-time partitioning off for the duration (a model built on the meta device
    whose sub-models are replaced right away by real, already partitioned ones)."""
    from transformers.integrations import deepspeed as hf_ds

    ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    obj = ref() if ref is not None else None
    if obj is not None:
        hf_ds.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if obj is not None:
            hf_ds.set_hf_deepspeed_config(obj)


def set_input_require_grads_hook(model, module, hook) -> None:
    """Make ``module``'s output require grad through ``hook``, registered where transformers'
    ``disable_input_require_grads`` finds and removes it."""
    model._require_grads_hooks = [module.register_forward_hook(hook)]


def attention_kernel(config) -> str | None:
    """The attention implementation a model config names (``sdpa``, ``flash_attention_2``, ...)."""
    return getattr(config, "_attn_implementation", None)


def name_attention_kernel(config, implementation: str) -> None:
    """Record ``implementation`` on ``config`` alone (its sub-models already run it)."""
    config._attn_implementation = implementation


def run_exit_handlers() -> None:
    """Run the ``atexit`` handlers now (before an ``os._exit``)."""
    import atexit

    atexit._run_exitfuncs()


class TrainerSeam:
    """Mixed into a ``transformers.Trainer`` subclass (``class T(TrainerSeam, Trainer)``): the Trainer's private
    save and resume methods, mapped onto public hooks the subclass defines —

    * ``save_weights(output_dir, state_dict) -> bool``: called by every save; True when it wrote the
      weights itself (the Trainer's own ``_save`` is skipped);
    * ``resume_weights(checkpoint) -> bool``: True when it loaded the checkpoint's weights itself;
    * ``engine_saves_trainable_only`` (bool): DeepSpeed engine checkpoints leave the frozen weights out, and
      a resume loads them non-strictly;
    * ``publish_checkpoint(staged, final, save_total_limit)``: the complete checkpoint ``staged`` becomes
      ``final``, then older ones rotate (run on the saving rank, after every rank finished writing);
    * ``staging_dir(run_dir) -> str``: where checkpoints are written before they are published.
    """

    _staging_dir: str | None = None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.save_weights(output_dir or self.args.output_dir, state_dict):
            super()._save(output_dir, state_dict=state_dict)

    def _get_output_dir(self, trial) -> str:
        return self._staging_dir or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into the staging directory, published once every rank is done;
        rotation (``save_total_limit``) waits until then."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        run_dir = super()._get_output_dir(trial)
        staging = self.staging_dir(run_dir)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.args.should_save and os.path.exists(os.path.join(staging, name)):
            shutil.rmtree(os.path.join(staging, name))  # left by a run killed mid-save
        self.accelerator.wait_for_everyone()
        limit = self.args.save_total_limit
        self._staging_dir = staging
        try:
            self.args.save_total_limit = None  # no rotation inside the Trainer's save
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
            self.args.save_total_limit = limit
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            self.publish_checkpoint(os.path.join(staging, name), os.path.join(run_dir, name), limit)
        self.accelerator.wait_for_everyone()

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not (self.is_deepspeed_enabled and self.engine_saves_trainable_only):
            return super()._save_optimizer_and_scheduler(output_dir)
        engine = self.model_wrapped
        save = engine.save_checkpoint
        engine.save_checkpoint = functools.partial(save, exclude_frozen_parameters=True)
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del engine.save_checkpoint

    def train(self, *args, **kwargs):
        if not (self.is_deepspeed_enabled and self.engine_saves_trainable_only):
            return super().train(*args, **kwargs)
        import transformers.trainer as hf_trainer

        load = hf_trainer.deepspeed_load_checkpoint
        hf_trainer.deepspeed_load_checkpoint = functools.partial(_load_non_strict, load)
        try:
            return super().train(*args, **kwargs)
        finally:
            hf_trainer.deepspeed_load_checkpoint = load

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self.resume_weights(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)


def _load_non_strict(load, engine, path, load_module_strict=True, **kw):
    """An engine checkpoint saved without its frozen weights cannot be loaded strictly."""
    return load(engine, path, load_module_strict=False, **kw)
