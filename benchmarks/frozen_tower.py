"""Training steps with activation checkpointing: transformers' set-up vs llavakit's (no gradient through the
frozen vision tower).

    python benchmarks/frozen_tower.py [--steps 5] [--stage stage1|stage2] [--device cpu|cuda]

transformers' ``activation_checkpointing_enable`` makes the output of every sub-model's input embeddings
require grad, the vision tower's patch embedding included, so each step runs the frozen tower's backward
(and recomputes its checkpointed layers) for every image. llavakit keeps the hook on the language model's
embeddings only (``llavakit.train.stages.enable_activation_checkpointing``). Random weights from configs:
a CLIP-style tower (``--vision``: ``small`` hidden 384 × 8 layers at 224 px, or ``l14-336`` = CLIP ViT-L/14-336)
and a small Llama; the same batches for both set-ups; the losses must agree. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json

import torch

VISION = {  # hidden, layers, heads, intermediate, image size
    "toy": (32, 2, 2, 64, 56),  # the test suite's
    "small": (384, 8, 6, 1536, 224),
    "l14-336": (1024, 24, 16, 4096, 336),
}


def build(vision: str, device: torch.device):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    h, layers, heads, inter, size = VISION[vision]
    vcfg = CLIPVisionConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                            image_size=size, patch_size=14)
    tcfg = LlamaConfig(vocab_size=1000, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                       intermediate_size=688, use_cache=False)
    n_img = (size // 14) ** 2
    cfg = LlavaConfig(text_config=tcfg, vision_config=vcfg, image_token_index=999, image_seq_length=n_img,
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration(cfg)
    return model, n_img, size


def main() -> None:
    from llavakit.bench import timed_train_step
    from llavakit.train.stages import Stage, enable_activation_checkpointing

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--stage", default="stage1", choices=["stage1", "stage2"])
    ap.add_argument("--vision", default="small", choices=sorted(VISION))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    model, n_img, size = build(args.vision, device)
    Stage("align" if args.stage == "stage1" else "full").configure_trainable(model)
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.steps + 1):
        ids = torch.cat([torch.full((args.batch, 1), 1), torch.full((args.batch, n_img), 999),
                         torch.randint(3, 998, (args.batch, 32), generator=gen)], dim=1)
        labels = ids.clone()
        labels[:, :1 + n_img] = -100
        batches.append({"input_ids": ids, "labels": labels,
                        "pixel_values": torch.randn(args.batch, 3, size, size, generator=gen)})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = {"vision": args.vision, "stage": args.stage, "batch": args.batch, "steps": args.steps,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    for name in ("transformers", "llavakit"):
        model.load_state_dict(state)
        if name == "transformers":
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            enable_activation_checkpointing(model)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        model.train()
        times, losses = [], []
        for step, batch in enumerate(batches):
            seconds, loss = timed_train_step(model, {k: v.to(device) for k, v in batch.items()}, opt, device)
            if step:  # step 0 warms up
                times.append(seconds)
            losses.append(loss)
        out[f"{name}_ms_per_step"] = round(1000 * sum(times) / len(times), 1)
        out[f"{name}_losses"] = [round(x, 5) for x in losses]
    if out["transformers_losses"] != out["llavakit_losses"]:
        raise SystemExit(f"the two set-ups trained differently: {json.dumps(out)}")
    out["speedup"] = round(out["transformers_ms_per_step"] / out["llavakit_ms_per_step"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
