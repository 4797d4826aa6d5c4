"""Stage semantics in one place: which stage a run is, what trains, what a save writes.

:class:`Stage` is resolved once from the flags and is the only thing the rest of training asks:

* ``align`` — stage 1 (``--tune_mm_mlp_adapter``): only the projector trains; saves write the projector
  alone (``mm_projector.bin`` with the original's key names) plus the config; DeepSpeed checkpoints leave
  the frozen weights out and resume non-strictly;
* ``full`` — stage 2: projector + language model train (``--freeze_backbone`` freezes the language model,
  ``--freeze_mm_mlp_adapter`` the projector); saves write the whole model;
* ``lora`` — stage 2 with LoRA (``--lora_enable``, ``--bits 4|8`` for QLoRA): peft adapters on the language
  model, the projector trained fully beside them; saves write the adapter, the projector and the base record.

The vision tower is frozen (LLaVA-1.5 never trains it) unless ``--unfreeze_mm_vision_tower`` trains it in
full stage-2 training (LLaVA-NeXT's recipe). An AnyRes model's ``image_newline`` (the embedding that ends
every row of tiles) trains with the language model, as the original's does, and beside the projector under
LoRA (saved beside the adapter: ``model/lora.py``); stage 1 leaves it as initialised.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PROJECTOR = "multi_modal_projector"
TOWER = "vision_tower"
STAGE_NAMES = {"align": "stage 1 (projector only)", "full": "stage 2 (full)", "lora": "stage 2 (LoRA)"}


@dataclass
class Stage:
    kind: str  # "align" | "full" | "lora"
    bits: int | None = None  # QLoRA: the language model quantised to 4 or 8 bits
    freeze_backbone: bool = False
    freeze_projector: bool = False
    train_tower: bool = False  # --unfreeze_mm_vision_tower
    trainable: int = 0  # parameters, once :meth:`setup` ran
    total: int = 0

    @classmethod
    def from_args(cls, model_args, train_args) -> Stage:
        kind = "align" if model_args.tune_mm_mlp_adapter else "lora" if train_args.lora_enable else "full"
        bits = train_args.bits if train_args.bits in (4, 8) else None
        return cls(kind, bits, bool(model_args.freeze_backbone), bool(train_args.freeze_mm_mlp_adapter),
                   bool(getattr(model_args, "unfreeze_mm_vision_tower", False)))

    @property
    def name(self) -> str:
        return STAGE_NAMES[self.kind]

    @property
    def is_lora(self) -> bool:
        return self.kind == "lora"

    @property
    def projector_only_saves(self) -> bool:
        return self.kind == "align"

    @staticmethod
    def base(model):
        """The Llava model itself, under a peft wrapper or not."""
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def setup(self, model, train_args):
        """Prepare ``model`` for this stage (k-bit preparation, LoRA adapters, ``requires_grad``, activation
        checkpointing); returns the model to train (a peft wrapper for LoRA)."""
        if self.bits is not None:
            from peft import prepare_model_for_kbit_training

            # norms and the other non-quantised weights in fp32 (as the original does); checkpointing below
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if self.is_lora:
            from llavakit.model.lora import apply_lora

            model = apply_lora(model, train_args, train_projector=not self.freeze_projector)
        base = self.base(model)
        self.configure_trainable(base)
        if train_args.activation_checkpointing:
            enable_activation_checkpointing(base)
            train_args.activation_checkpointing = False  # done here; the Trainer must not redo it on the wrapper
        return model

    def configure_trainable(self, model) -> None:
        """Set ``requires_grad`` for the stage and count what trains. The only place that decides it."""
        inner = model.model
        inner.vision_tower.requires_grad_(False)
        projector = inner.multi_modal_projector
        newline = getattr(inner, "image_newline", None)  # AnyRes (LlavaNext)
        if self.kind == "align":
            model.requires_grad_(False)
            projector.requires_grad_(True)
        elif self.kind == "full":
            inner.language_model.requires_grad_(not self.freeze_backbone)
            model.lm_head.requires_grad_(not self.freeze_backbone)
            projector.requires_grad_(not self.freeze_projector)
            if newline is not None:
                newline.requires_grad_(not self.freeze_backbone)
        elif newline is not None:  # lora: the newline is new weight, not the language model's: it trains beside
            newline.requires_grad_(not self.freeze_projector)  # the projector (saved beside the adapter)
        # lora: peft has frozen the base and made the adapters and the projector copy (modules_to_save) trainable
        inner.vision_tower.requires_grad_(self.kind == "full" and self.train_tower)
        if self.kind == "full" and self.train_tower:
            freeze_unused_tower_parts(inner.vision_tower, model.config.vision_feature_layer)
        self.trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.total = sum(p.numel() for p in model.parameters())
        if self.trainable == 0:
            raise ValueError("nothing to train: every parameter is frozen (check --freeze_backbone and "
                             "--freeze_mm_mlp_adapter)")
        logger.info(self.describe())

    def describe(self) -> str:
        pct = 100.0 * self.trainable / max(self.total, 1)
        return f"{self.name}: {self.trainable:,} of {self.total:,} parameters train ({pct:.2f}%)"


def freeze_unused_tower_parts(tower, feature_layer) -> list[str]:
    """Freeze what of a trained vision tower never reaches the features: the encoder layers after the
    selected one (LLaVA reads the second to last), the final norm and a pooling head. They get no gradient
    (under DDP an "unused parameter" error, with activation checkpointing a failed step) and would only
    decay. Returns the frozen parts' names."""
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if layers is None:
        return []
    chosen = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    hidden_states = len(layers) + 1  # the embeddings, then every layer's output
    last = max(k if k >= 0 else hidden_states + k for k in chosen)
    frozen = [f"encoder.layers.{i}" for i in range(last, len(layers))]
    for i in range(last, len(layers)):
        layers[i].requires_grad_(False)
    for name in ("post_layernorm", "head"):
        if getattr(tower, name, None) is not None:
            getattr(tower, name).requires_grad_(False)
            frozen.append(name)
    return frozen


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
