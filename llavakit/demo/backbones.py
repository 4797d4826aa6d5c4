"""Small stand-ins for the hub backbones, built locally: a Llama-style tokenizer trained on given text,
a tiny Llama causal LM and a tiny CLIP vision tower, all saved with ``save_pretrained`` so that training
loads them through the same ``from_pretrained`` paths as ``lmsys/vicuna-13b-v1.5`` and
``openai/clip-vit-large-patch14-336``.

The demo pretrains them briefly; the test suite uses them as they come (random weights).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

#: special tokens the templates use, so every template can be exercised with one tokenizer
CHAT_SPECIAL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000, extra_special_tokens: list[str] | None = None):
    """Train a Llama-style BPE tokenizer (Metaspace ``▁``, byte fallback, BOS added) on ``texts``.

    Returns a transformers ``LlamaTokenizer`` (a fast tokenizer) with ``<unk>``, ``<s>``, ``</s>`` at ids
    0, 1, 2 like Llama's.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tk = Tokenizer(models.BPE(byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        pre_tokenizers.Punctuation(),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size + len(byte_tokens),
                                  special_tokens=["<unk>", "<s>", "</s>", *byte_tokens],
                                  show_progress=False)
    tk.train_from_iterator(texts, trainer)
    model = json.loads(tk.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = LlamaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=True, add_eos_token=False)
    specials = list(extra_special_tokens if extra_special_tokens is not None else CHAT_SPECIAL_TOKENS)
    if specials:
        tok.add_special_tokens({"extra_special_tokens": specials})
    tok.model_max_length = 4096
    return tok


def save_tokenizer(tok, path: str | os.PathLike) -> str:
    tok.save_pretrained(str(path))
    return str(path)


def new_llama(tokenizer, hidden: int, layers: int, heads: int, intermediate: int, max_positions: int = 2048,
              seed: int = 0):
    """A randomly initialised Llama causal LM sized to ``tokenizer`` (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, intermediate_size=intermediate, max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False))


def save_llama(model, tokenizer, path: str | os.PathLike) -> str:
    """Save a language model with its tokenizer and a plain generation config, as a hub LLM directory is."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path)


def tiny_llama(tokenizer, path: str | os.PathLike, hidden: int = 64, layers: int = 2, heads: int = 4,
               intermediate: int = 128, max_positions: int = 2048, seed: int = 0) -> str:
    """A small random Llama causal LM sized to ``tokenizer``, saved with its tokenizer (like Vicuna)."""
    return save_llama(new_llama(tokenizer, hidden, layers, heads, intermediate, max_positions, seed), tokenizer,
                      path)


def new_clip_vision(image_size: int, patch_size: int, hidden: int, layers: int, heads: int, intermediate: int,
                    seed: int = 0):
    """A randomly initialised CLIP vision tower (seeded)."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    return CLIPVisionModel(CLIPVisionConfig(
        image_size=image_size, patch_size=patch_size, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, intermediate_size=intermediate, projection_dim=hidden))


def save_clip_vision(model, path: str | os.PathLike) -> str:
    """Save a vision tower with its image-processor config, as ``openai/clip-vit-*`` directories are."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    size = model.config.image_size
    model.save_pretrained(str(path))
    CLIPImageProcessorPil(size={"shortest_edge": size},
                          crop_size={"height": size, "width": size}).save_pretrained(str(path))
    return str(path)


def tiny_clip(path: str | os.PathLike, image_size: int = 28, patch_size: int = 14, hidden: int = 32,
              layers: int = 3, heads: int = 4, intermediate: int = 64, seed: int = 0) -> str:
    """A small random CLIP vision tower with its image-processor config (like openai/clip-vit-*)."""
    return save_clip_vision(new_clip_vision(image_size, patch_size, hidden, layers, heads, intermediate, seed),
                            path)
