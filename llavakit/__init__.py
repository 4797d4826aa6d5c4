"""llavakit: train LLaVA-style vision-language models end to end.

Data preparation and checking, stage 1 feature alignment, stage 2 visual instruction tuning (full or
LoRA), evaluation and inference, on transformers' native ``LlavaForConditionalGeneration``.
"""

__version__ = "0.1.0"

IGNORE_INDEX = -100
IMAGE_PLACEHOLDER = "<image>"
