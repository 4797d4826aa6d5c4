"""``--attn_implementation torch_varlen``: packed training on PyTorch's own FlashAttention varlen kernel.

A FlashAttention varlen kernel attends per sample inside a packed row: no mask, no padding. transformers
gets one from the ``flash-attn`` package (``flash_attention_2``), which has to match the CUDA and torch
builds. PyTorch ships one itself (``torch.nn.attention.varlen.varlen_attn``, CUDA, fp16/bf16); this module
registers it with transformers as ``torch_varlen``, so packing needs nothing but torch. llavakit hands it
every packed batch's sequence boundaries (``cu_seq_lens``, :func:`llavakit.data.collate.varlen_kwargs`).

Where that kernel cannot run (CPU, fp32, attention dropout, a torch without it) the same boundaries drive
one SDPA call per sample: exact, and without the whole-row block mask that makes packed SDPA slow.

It attends packed batches only; a call without boundaries (a padded batch, generation) is an error that
says so. Only the language model uses it (the vision tower stays on SDPA, see ``build.py``).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

NAME = "torch_varlen"
_HALF = (torch.float16, torch.bfloat16)


def _pytorch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9
        return None
    return varlen_attn


def kernel_for(q: torch.Tensor, dropout: float):
    """PyTorch's varlen kernel when it can attend ``q`` (CUDA, fp16/bf16, no dropout), else None."""
    return _pytorch_varlen_attn() if q.is_cuda and q.dtype in _HALF and not dropout else None


def per_sample_sdpa(q, k, v, cu_seq_lens: torch.Tensor, causal: bool, scale: float | None, dropout: float):
    """``(tokens, heads, dim)`` query, ``(tokens, kv_heads, dim)`` key/value; sequence i is rows
    ``cu_seq_lens[i]:cu_seq_lens[i + 1]``. One SDPA call per sequence."""
    bounds = cu_seq_lens.tolist()
    gqa = k.shape[1] != q.shape[1]
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
            outs.append(F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=causal, scale=scale,
                                                       enable_gqa=gqa).transpose(0, 1))
    return torch.cat(outs, dim=0)


def varlen_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                             scaling: float | None = None, is_causal: bool | None = None,
                             cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                             **kwargs):
    """transformers' attention-function interface: ``(batch, heads, length, dim)`` in, ``(batch, length, heads,
    dim)`` out; the rows are laid end to end and attended per sequence of ``cu_seq_lens``."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None:
        raise ValueError(f"--attn_implementation {NAME} attends packed batches only (--packing True), which carry "
                         "their sequence boundaries; use sdpa or flash_attention_2 for padded batches and generation")
    if attention_mask is not None:
        raise ValueError(f"--attn_implementation {NAME} takes no attention mask: the sequence boundaries replace it")
    window = kwargs.get("sliding_window")
    if window is not None and int(max_length_q) > window:
        raise ValueError(f"--attn_implementation {NAME} has no sliding-window attention, and this model attends "
                         f"within {window} tokens while a packed sample has {int(max_length_q)}; use "
                         "flash_attention_2 or sdpa")
    if kwargs.get("softcap") is not None:
        raise ValueError(f"--attn_implementation {NAME} has no attention-logit soft-capping, which this model uses; "
                         "use flash_attention_2 or eager")
    b, h, length, d = query.shape
    q = query.transpose(1, 2).reshape(b * length, h, d)
    k = key.transpose(1, 2).reshape(-1, key.shape[1], d)
    v = value.transpose(1, 2).reshape(-1, value.shape[1], value.shape[-1])
    if q.dtype == torch.float32 and torch.is_autocast_enabled(q.device.type):
        # fp32 weights under autocast: RoPE's fp32 cos/sin promote q and k; attend in the autocast dtype, as
        # transformers does for FlashAttention
        dt = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dt), k.to(dt), v.to(dt)
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    kernel = kernel_for(q, dropout)
    if kernel is not None:
        out = kernel(q, k, v, cu_seq_lens_q, cu_seq_lens_k, int(max_length_q), int(max_length_k), scale=scaling,
                     window_size=(-1, 0) if causal else (-1, -1), enable_gqa=k.shape[1] != h)
    else:
        if q.is_cuda:
            _warn_fallback(q, dropout)
        out = per_sample_sdpa(q, k, v, cu_seq_lens_q, causal, scaling, dropout)
    return out.view(b, length, h, -1), None


_warned = False


def _warn_fallback(q, dropout: float) -> None:
    global _warned
    if not _warned:
        _warned = True
        why = ("attention dropout" if dropout else f"{q.dtype} (the kernel takes fp16/bf16)" if q.dtype not in _HALF
               else "this torch has no torch.nn.attention.varlen (2.9 or later does)")
        logger.warning("%s: PyTorch's FlashAttention varlen kernel cannot run (%s); attending with one SDPA call "
                       "per sample instead", NAME, why)


def register() -> str:
    """Make ``torch_varlen`` an attention implementation transformers accepts (idempotent). No mask function is
    registered, so transformers builds no attention mask for it."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    return NAME
