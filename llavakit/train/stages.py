"""Stage semantics in one place: what trains, what stays frozen, what a save writes.

* stage 1 (``--tune_mm_mlp_adapter``): only the projector trains; saves write the projector alone
  (``mm_projector.bin`` with the original's key names) plus the config;
* stage 2 (full): projector + language model train (``--freeze_backbone`` freezes the language model,
  ``--freeze_mm_mlp_adapter`` the projector); saves write the whole model;
* the vision tower is always frozen (LLaVA-1.5 never trains it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PROJECTOR = "multi_modal_projector"


@dataclass
class Stage:
    name: str
    projector_only_saves: bool
    trainable: int
    total: int

    def describe(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"{self.name}: {self.trainable:,} of {self.total:,} parameters train ({pct:.2f}%)"


def configure_trainable(model, tune_mm_mlp_adapter: bool, freeze_backbone: bool = False,
                        freeze_mm_mlp_adapter: bool = False, lora: bool = False) -> Stage:
    """Set ``requires_grad`` for the stage and return what it means. The only place that decides it."""
    inner = model.model
    inner.vision_tower.requires_grad_(False)
    projector = inner.multi_modal_projector
    if tune_mm_mlp_adapter:
        model.requires_grad_(False)
        projector.requires_grad_(True)
        name = "stage 1 (projector only)"
    elif lora:
        # peft has frozen the base and made the adapters and the projector copy (modules_to_save) trainable
        name = "stage 2 (LoRA)"
    else:
        inner.language_model.requires_grad_(not freeze_backbone)
        model.lm_head.requires_grad_(not freeze_backbone)
        projector.requires_grad_(not freeze_mm_mlp_adapter)
        name = "stage 2 (full)"
    inner.vision_tower.requires_grad_(False)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trainable == 0:
        raise ValueError("nothing to train: every parameter is frozen (check --freeze_backbone and "
                         "--freeze_mm_mlp_adapter)")
    stage = Stage(name, tune_mm_mlp_adapter, trainable, total)
    logger.info(stage.describe())
    return stage


def _outputs_require_grad(module, inputs, output):
    output.requires_grad_(True)


def enable_activation_checkpointing(model) -> None:
    """Activation checkpointing (non-reentrant) for the language model, with no gradient through the frozen
    vision tower.

    transformers' ``activation_checkpointing_enable`` also makes the output of every sub-model's input
    embeddings require grad (``enable_input_require_grads``) — the vision tower's patch embedding too — so
    autograd would run the frozen tower's backward, and recompute its checkpointed layers, for every image,
    although none of its weights train and the projector's gradient starts at the projector. Only the
    language model's embeddings keep the hook, and the tower runs without checkpointing (it saves nothing for
    a backward that never comes).
    """
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.disable_input_require_grads()
    model.model.vision_tower.activation_checkpointing_disable()
    from llavakit.internals import set_input_require_grads_hook

    set_input_require_grads_hook(model, model.get_input_embeddings(), _outputs_require_grad)
