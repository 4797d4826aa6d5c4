"""Generation configs that always save (LLaVA issue #1144).

Vicuna ships ``temperature=0.9, top_p=0.6`` without ``do_sample``; transformers refuses to save such a
config, and the original's 20-hour runs died at their very last step. Before any save we drop the
sampling-only values that the config would not use (greedy stays greedy) and say so once.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def make_savable(gen_config) -> list[str]:
    """Fix ``gen_config`` in place so that ``save_pretrained`` accepts it; return what was changed."""
    if gen_config is None:
        return []
    try:
        gen_config.validate(strict=True)
        return []
    except ValueError:
        pass
    from transformers import GenerationConfig

    defaults = GenerationConfig()
    changed = []
    if not gen_config.do_sample:
        for name in SAMPLING_ONLY:
            if getattr(gen_config, name, None) != getattr(defaults, name, None):
                changed.append(f"{name}={getattr(gen_config, name)}")
                setattr(gen_config, name, getattr(defaults, name, None))
    try:
        gen_config.validate(strict=True)
    except ValueError as e:
        # anything else invalid: keep only the token ids, which generation needs
        keep = {k: getattr(gen_config, k, None) for k in
                ("bos_token_id", "eos_token_id", "pad_token_id", "max_length", "max_new_tokens")}
        for k, v in GenerationConfig(**{k: v for k, v in keep.items() if v is not None}).to_dict().items():
            setattr(gen_config, k, v)
        changed.append(f"reset to token ids only ({str(e).splitlines()[0]})")
    if changed:
        logger.warning("generation_config adjusted so that it can be saved (LLaVA #1144): %s", ", ".join(changed))
    return changed
