"""A FlashAttention stand-in for CPU tests: transformers' own FlashAttention path with a reference kernel.

``install()`` registers the attention name :data:`NAME` with transformers' FlashAttention integration
(``flash_attention_forward``, ``flash_attention_mask``, the varlen detection from ``position_ids``, the
unpadding) and loads, in place of the ``flash_attn`` package's kernels, exact PyTorch ones that attend per
sequence of the ``cu_seqlens``. Everything transformers and llavakit do for FlashAttention then runs on the
CPU; only the kernel differs. The name contains "flash", so llavakit treats it as FlashAttention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "flash_reference"
calls = {"varlen": 0, "dense": 0}


def _attend(q, k, v, causal: bool, scale: float | None):
    """q (..., heads, Lq, d), k/v (..., kv_heads, Lk, d)."""
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False):
    """(total, heads, d) tensors; sequence i is rows cu_seqlens[i]:cu_seqlens[i+1]."""
    calls["varlen"] += 1
    out = torch.empty_like(q)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert len(bq) == len(bk) and max(b - a for a, b in zip(bq, bq[1:])) == int(max_seqlen_q)
    for i in range(len(bq) - 1):
        qs, ks, vs = (x.transpose(0, 1) for x in (q[bq[i]:bq[i + 1]], k[bk[i]:bk[i + 1]], v[bk[i]:bk[i + 1]]))
        out[bq[i]:bq[i + 1]] = _attend(qs, ks, vs, causal, softmax_scale).transpose(0, 1)
    return out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """(batch, L, heads, d) tensors, every row one sequence."""
    calls["dense"] += 1
    return _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal, softmax_scale).transpose(1, 2)


#: the private state of transformers' FlashAttention loader that install() fills in
_LOADER_STATE = ("_loaded_implementation", "_flash_fn", "_flash_varlen_fn", "_flash_with_kvcache_fn", "_pad_fn",
                 "_unpad_fn", "_process_flash_kwargs_fn", "_process_with_kvcache_kwargs_fn", "_pad_input",
                 "_unpad_input", "_lazy_define_process_function")


def install() -> str:
    """Register :data:`NAME`; raise ``NotImplementedError`` when this transformers' loader has other internals."""
    import transformers.modeling_flash_attention_utils as fa

    missing = [a for a in _LOADER_STATE if not hasattr(fa, a)]
    if missing:
        raise NotImplementedError(f"transformers' FlashAttention loader has no {', '.join(missing)}")
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.integrations.flash_attention import flash_attention_forward
    from transformers.masking_utils import flash_attention_mask

    AttentionInterface.register(NAME, flash_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    fa._loaded_implementation = NAME
    fa._flash_fn, fa._flash_varlen_fn, fa._flash_with_kvcache_fn = flash_attn_func, flash_attn_varlen_func, None
    fa._pad_fn, fa._unpad_fn = fa._pad_input, fa._unpad_input
    fa._process_flash_kwargs_fn = fa._lazy_define_process_function(flash_attn_varlen_func)
    fa._process_with_kvcache_kwargs_fn = dict
    return NAME
