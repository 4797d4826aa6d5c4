"""Throughput and MFU, logged with the loss at every logging step (console, wandb, tensorboard).

Per logging window: ``samples_per_second``, ``real_tokens_per_second`` (tokens that are not padding),
``real_token_fraction`` (real tokens / every position the model ran), ``data_wait_fraction`` (time
between steps, waiting for the next batch, over wall time) and ``mfu``.

Model FLOPs per real token (the usual 2·N forward, 4·N backward): ``6·N`` for trained language-model
weights, ``4·N`` for frozen language-model weights that gradients still flow through (stage 1, LoRA's
base), ``6·N`` for LoRA weights; per image token ``6·N`` of the projector; per vision-tower token ``2·N``
(frozen, forward only); plus causal attention ``6·layers·hidden·L`` per token of an L-token sample.
MFU divides by the device's peak dense TFLOPS at the training dtype (known GPUs are detected;
``--peak_tflops`` sets it; without either, MFU is not reported).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from transformers import TrainerCallback

#: peak dense bf16/fp16 tensor TFLOPS of common training GPUs (vendor datasheets)
PEAK_TFLOPS = {"H200 NVL": 835.0, "H200": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0,
               "A100": 312.0, "L40S": 362.0, "A800": 312.0, "H800": 989.0, "RTX 4090": 165.2, "V100": 125.0}


def peak_tflops_for(device_name: str) -> float | None:
    """The table's figure for a CUDA device name (``torch.cuda.get_device_name()``), or None."""
    for key, value in PEAK_TFLOPS.items():  # the more specific names come first
        if key in device_name:
            return value
    return None


def detect_peak_tflops() -> float | None:
    import torch

    return peak_tflops_for(torch.cuda.get_device_name()) if torch.cuda.is_available() else None


@dataclass
class ModelFlops:
    lm_trained: int  # language-model weights that train (full fine-tuning)
    lm_frozen: int  # frozen language-model weights that gradients flow through
    adapters: int  # LoRA weights
    projector: int
    vision: int
    vision_tokens: int  # per image, CLS included
    image_tokens: int  # per image, in the language model
    layers: int
    hidden: int

    @classmethod
    def of(cls, model, num_image_tokens: int) -> ModelFlops:
        from llavakit.train.stages import Stage

        base = Stage.base(model)
        lm, vis, proj, adapters, lm_trained, lm_frozen = base.model.language_model, base.model.vision_tower, \
            base.model.multi_modal_projector, 0, 0, 0
        lm_params = list(lm.named_parameters()) + [("lm_head." + n, p) for n, p in base.lm_head.named_parameters()]
        for n, p in lm_params:
            if "embed_tokens" in n:
                continue  # a lookup, not a matmul
            if "lora_" in n:
                adapters += p.numel()
            elif p.requires_grad:
                lm_trained += p.numel()
            else:
                lm_frozen += p.numel()
        vcfg = base.config.vision_config
        tcfg = base.config.text_config
        return cls(lm_trained, lm_frozen, adapters, sum(p.numel() for p in proj.parameters()),
                   sum(p.numel() for p in vis.parameters()),
                   (vcfg.image_size // vcfg.patch_size) ** 2 + 1, num_image_tokens,
                   tcfg.num_hidden_layers, tcfg.hidden_size)

    def flops(self, real_tokens: int, samples: int, images: int) -> float:
        per_token = 6 * self.lm_trained + 4 * self.lm_frozen + 6 * self.adapters
        mean_len = real_tokens / max(1, samples)
        attention = 6 * self.layers * self.hidden * mean_len * real_tokens
        vision = images * (2 * self.vision * self.vision_tokens + 6 * self.projector * self.image_tokens)
        return per_token * real_tokens + attention + vision


class ThroughputMeter:
    """Counts since the last log; :meth:`metrics` turns them into rates (summed over ranks)."""

    def __init__(self, trainer, flops: ModelFlops | None, peak_tflops: float | None):
        self.trainer = trainer
        self.flops = flops
        self.peak = peak_tflops
        self._last = self._counters()
        self._t = time.perf_counter()
        self._wait = 0.0
        self._step_end: float | None = None

    def _counters(self) -> tuple[int, int, int, int]:
        t = self.trainer
        return t.samples_seen, t.tokens_seen, t.tokens_processed, t.images_seen

    def reset(self) -> None:
        """Start the first window when training starts (not when the meter was made)."""
        self._last, self._t, self._wait, self._step_end = self._counters(), time.perf_counter(), 0.0, None

    def step_begin(self) -> None:
        if self._step_end is not None:
            self._wait += time.perf_counter() - self._step_end

    def step_end(self) -> None:
        self._step_end = time.perf_counter()

    def metrics(self) -> dict:
        import torch

        now = time.perf_counter()
        cur = self._counters()
        delta = [c - p for c, p in zip(cur, self._last)]
        elapsed = max(now - self._t, 1e-9)
        wait = self._wait
        self._last, self._t, self._wait = cur, now, 0.0
        tr = self.trainer
        if tr.args.world_size > 1:
            t = torch.tensor(delta, dtype=torch.float64, device=tr.args.device)
            delta = [float(x) for x in tr.accelerator.reduce(t, reduction="sum").tolist()]
        samples, real, processed, images = delta
        out = {"samples_per_second": round(samples / elapsed, 3),
               "real_tokens_per_second": round(real / elapsed, 1),
               "real_token_fraction": round(real / processed, 4) if processed else 0.0,
               "data_wait_fraction": round(min(1.0, wait / elapsed), 4)}
        if self.flops is not None and self.peak:
            achieved = self.flops.flops(int(real), int(samples), int(images)) / elapsed
            out["mfu"] = round(achieved / (self.peak * 1e12 * tr.args.world_size), 6)
        return out


class MeterCallback(TrainerCallback):
    """Marks step boundaries for :class:`ThroughputMeter` (the time between steps is data wait)."""

    def __init__(self, meter: ThroughputMeter):
        self.meter = meter

    def on_train_begin(self, args, state, control, **kwargs):
        self.meter.reset()

    def on_step_begin(self, args, state, control, **kwargs):
        self.meter.step_begin()

    def on_step_end(self, args, state, control, **kwargs):
        self.meter.step_end()
