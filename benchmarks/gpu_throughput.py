"""Training throughput of the LLaVA recipe on one device: tokens/s, MFU, peak memory.

    python benchmarks/gpu_throughput.py                      # on a GPU: ~1.1B Llama + CLIP-L/14-336
    python benchmarks/gpu_throughput.py --size toy --device cpu --steps 2   # the test suite's toy run

Random weights from configs (no download): a Llama-style language model (``--size 0.5b|1b|toy``) and a
CLIP ViT-L/14-336 tower (toy: a tiny one). Samples are synthetic token ids with 576-token image blocks
and text lengths drawn from the mix665k-shaped distribution of ``llavakit bench padding`` (stage 1:
captions of ~60 tokens). Batches go through llavakit's own collator (padded, or packed) and the stage
set-up of ``llavakit train`` (stage 1: projector only; stage 2: projector + LLM, or LoRA r128 on the LLM),
in bf16 autocast with fp32 master weights and AdamW, as the Trainer runs them. Attention: FlashAttention-2
when installed; otherwise SDPA for padded batches and ``torch_varlen`` (PyTorch's FlashAttention varlen
kernel) for packed ones (``--packed-attention`` picks); the vision tower always SDPA. Liger kernels for
Llama when installed. First one batch's loss is computed padded and packed, and the script stops unless
they agree. Prints one JSON line per configuration, and a summary list at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import torch

SIZES = {  # hidden, layers, heads, kv heads, intermediate
    "toy": (64, 2, 4, 4, 128),
    "0.5b": (1024, 24, 16, 16, 2816),
    "1b": (2048, 16, 16, 16, 5632),
}


def build(size: str, device: torch.device, attn: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    h, layers, heads, kv, inter = SIZES[size]
    text = LlamaConfig(vocab_size=32064, hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                       use_cache=False)
    if size == "toy":
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=56, patch_size=14)
    else:
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    n_img = (vision.image_size // vision.patch_size) ** 2
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_index=32000, image_seq_length=n_img,
                      vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg._attn_implementation = attn
    cfg.text_config._attn_implementation = attn
    cfg.vision_config._attn_implementation = "sdpa"
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg)
    return model, n_img


def samples(n: int, n_img: int, stage: str, image_size: int, rng: np.random.Generator, max_len: int) -> list[dict]:
    from llavakit.bench import mix665k_lengths

    lengths, has_image = mix665k_lengths(0)
    out = []
    for _ in range(n):
        if stage == "stage1":
            text = int(rng.integers(30, 90))
        else:
            k = int(rng.integers(len(lengths)))
            while not has_image[k]:
                k = int(rng.integers(len(lengths)))
            text = int(lengths[k]) - 576
        text = min(text, max_len - n_img - 1)
        ids = torch.cat([torch.tensor([1]), torch.full((n_img,), 32000), torch.randint(3, 31999, (text,))])
        labels = ids.clone()
        labels[: 1 + n_img + text // 3] = -100  # the prompt part is not supervised
        out.append({"input_ids": ids, "labels": labels,
                    "images": torch.randint(0, 256, (1, 3, image_size, image_size), dtype=torch.uint8)})
    return out


def model_inputs(batch: dict, device: torch.device, attn: str) -> tuple[dict, int, int]:
    """A collated batch as the trainer hands it to the model (sequence boundaries for a varlen kernel), with
    its real-token and sample counts."""
    from llavakit.data.collate import varlen_kwargs
    from llavakit.model.build import uses_varlen_attention

    real, n = batch.pop("num_real_tokens"), batch.pop("num_samples")
    batch.pop("replaced", None)
    seq_lengths = batch.pop("seq_lengths", None)
    inputs = {k: v.to(device) for k, v in batch.items()}
    if seq_lengths is not None and uses_varlen_attention(attn):
        inputs.update(varlen_kwargs(seq_lengths, device))
    return inputs, real, n


def check_packed_equals_padded(model, n_img: int, attn: str, packed_attn: str, device: torch.device,
                               capacity: int | None, rng, batch: int) -> dict:
    """One batch's loss padded (``attn``) and packed (``packed_attn``): the figures that follow time a
    computation only when the two agree (bf16 on a GPU: within 2%, fp32 on the CPU: 1e-4)."""
    from llavakit.data.collate import LlavaCollator
    from llavakit.data.images import ImageTransform

    size = model.config.vision_config.image_size
    transform = ImageTransform(shortest_edge=size, crop_hw=(size, size))
    features = samples(batch, n_img, "stage2", size, rng, 2048)
    losses = {}
    model.eval()
    for packed, impl in ((False, attn), (True, packed_attn)):
        model.set_attn_implementation({"text_config": impl})
        b, _, _ = model_inputs(LlavaCollator(0, transform, packing=packed, packing_max_length=capacity)(features),
                               device, impl)
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            losses[packed] = float(model(**b).loss)
    diff = abs(losses[True] - losses[False]) / max(abs(losses[False]), 1e-6)
    out = {"padded_loss": round(losses[False], 5), "packed_loss": round(losses[True], 5),
           "relative_difference": round(diff, 6)}
    if not diff <= (2e-2 if device.type == "cuda" else 1e-4):
        raise SystemExit(f"packed and padded losses differ: {json.dumps(out)}")
    return out


def run_config(model, n_img: int, stage: str, packed: bool, steps: int, batch: int, device: torch.device,
               peak: float | None, rng, capacity: int | None) -> dict:
    from llavakit.bench import timed_train_step
    from llavakit.data.collate import LlavaCollator, scored_logits_kwargs
    from llavakit.data.images import ImageTransform
    from llavakit.train.stages import Stage
    from llavakit.train.throughput import ModelFlops

    class Args:  # the LoRA flags of scripts/v1_5/finetune_lora.sh; checkpointing is set up below
        lora_r, lora_alpha, lora_dropout, lora_bias = 128, 256, 0.05, "none"
        activation_checkpointing = False

    kind = {"stage1": "align", "stage2-lora": "lora"}.get(stage, "full")
    target = Stage(kind).setup(model, Args())
    size = model.config.vision_config.image_size
    transform = ImageTransform(shortest_edge=size, crop_hw=(size, size))
    collate = LlavaCollator(0, transform, packing=packed, packing_max_length=capacity)
    params = [p for p in target.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    flops = ModelFlops.of(target, n_img)
    target.train()
    times, real, processed, n_samples = [], 0, 0, 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(steps + 1):  # step 0 warms up
        batch_, r, ns = model_inputs(
            collate(samples(batch, n_img, "stage1" if stage == "stage1" else "stage2", size, rng, 2048)), device,
            model.config.text_config._attn_implementation)
        batch_.update(scored_logits_kwargs(batch_["labels"]))  # logits where a token is supervised, as the trainer
        seconds, _ = timed_train_step(target, batch_, opt, device)
        if step:
            times.append(seconds)
            real += r
            processed += batch_["input_ids"].numel()
            n_samples += ns
    elapsed = sum(times)
    out = {"stage": stage, "packed": packed, "steps": steps, "per_device_batch": batch,
           "real_tokens_per_second": round(real / elapsed, 1), "samples_per_second": round(n_samples / elapsed, 2),
           "real_token_fraction": round(real / processed, 4), "step_seconds": round(elapsed / steps, 3)}
    achieved = flops.flops(real, n_samples, n_samples) / elapsed
    out["model_tflops_per_second"] = round(achieved / 1e12, 3)
    if peak:
        out["mfu"] = round(achieved / (peak * 1e12), 4)
    if device.type == "cuda":
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    if stage == "stage2-lora":
        target.unload()  # back to the plain model for the next configuration
    return out


def main() -> None:
    from llavakit.model.build import uses_varlen_attention
    from llavakit.train.throughput import detect_peak_tflops

    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--stages", default="stage1,stage2-full,stage2-lora")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--packed-attention", default="auto",
                    help="the language model's attention for packed batches: flash_attention_2, torch_varlen, sdpa; "
                         "auto: flash_attention_2 when flash-attn is installed, else torch_varlen on a GPU, sdpa on CPU")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    has_fa2 = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    attn = "flash_attention_2" if has_fa2 else "sdpa"  # padded batches
    packed_attn = args.packed_attention
    if packed_attn == "auto":
        packed_attn = "flash_attention_2" if has_fa2 else "torch_varlen" if device.type == "cuda" else "sdpa"
    if packed_attn == "torch_varlen":
        from llavakit.model.attention import register

        register()
    if device.type == "cuda" and importlib.util.find_spec("liger_kernel"):
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    model, n_img = build(args.size, device, attn)
    peak = args.peak_tflops or detect_peak_tflops()
    capacity = None if uses_varlen_attention(packed_attn) else 2048
    info = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "attention": attn,
            "packed_attention": packed_attn,
            "size": args.size, "peak_tflops": peak,
            "liger": bool(device.type == "cuda" and importlib.util.find_spec("liger_kernel")),
            "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3)}
    rng = np.random.default_rng(args.seed)
    info["check"] = check_packed_equals_padded(model, n_img, attn, packed_attn, device, capacity, rng, args.batch)
    print(json.dumps(info), flush=True)
    results = []
    for stage in args.stages.split(","):
        for packed in (False, True):
            model.set_attn_implementation({"text_config": packed_attn if packed else attn})
            res = run_config(model, n_img, stage, packed, args.steps, args.batch, device, peak, rng, capacity)
            print(json.dumps(res), flush=True)
            results.append(res)
    print(json.dumps({"info": info, "results": results}))


if __name__ == "__main__":
    main()
