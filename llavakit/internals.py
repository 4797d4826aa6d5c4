"""The private names of transformers, torch and Python that llavakit relies on, in one place.

Each is listed in :data:`PRIVATE_NAMES` with what llavakit uses it for and the versions it was checked on;
:func:`check_internals` verifies that every one is still where llavakit expects it (the test suite calls it,
so an upgrade that moves one fails loudly instead of silently changing a guarantee). The helpers below are
the only code outside :class:`llavakit.train.trainer.LlavaTrainer` (whose overrides of the Trainer's
private save/load methods are listed here too) that touches a private name.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect

#: (dotted name, parameters it must accept — None for a plain attribute, what llavakit uses it for)
PRIVATE_NAMES: tuple[tuple[str, tuple[str, ...] | None, str], ...] = (
    ("transformers.Trainer._save", ("output_dir", "state_dict"),
     "stage 1 saves the projector alone (LlavaTrainer._save); transformers 5.0-5.24"),
    ("transformers.Trainer._get_output_dir", ("trial",),
     "checkpoints are written into a staging directory first (atomic publish); transformers 5.0-5.24"),
    ("transformers.Trainer._save_checkpoint", ("model", "trial"),
     "staging + atomic rename + rotation after publish; transformers 5.0-5.24"),
    ("transformers.Trainer._save_optimizer_and_scheduler", ("output_dir",),
     "DeepSpeed stage-1 checkpoints leave the frozen weights out; transformers 5.0-5.24"),
    ("transformers.Trainer._load_from_checkpoint", ("resume_from_checkpoint", "model"),
     "full checkpoints reload strictly under transformers' older Llava key names; transformers 5.0-5.24"),
    ("transformers.trainer.deepspeed_load_checkpoint", ("deepspeed_engine", "checkpoint_path"),
     "replaced during a DeepSpeed stage-1 resume to load non-strictly; transformers 5.0-5.24"),
    ("transformers.integrations.deepspeed._hf_deepspeed_config_weak_ref", None,
     "ZeRO-3 construction-time partitioning paused while the Llava shell is built on meta; transformers 5.0-5.24"),
    ("transformers.PreTrainedModel.disable_input_require_grads", (),
     "removes the hooks in _require_grads_hooks, which llavakit sets on the language model only; 5.0-5.24"),
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


def run_exit_handlers() -> None:
    """Run the ``atexit`` handlers now (before an ``os._exit``)."""
    import atexit

    atexit._run_exitfuncs()
