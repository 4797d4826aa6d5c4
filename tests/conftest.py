"""Shared fixtures: a Llama-style tokenizer trained on the spot, real image files, record-file writers."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavakit.data.templates import LLAVA_LLAMA_SYSTEM, MPT_SYSTEM, VICUNA_SYSTEM
from llavakit.demo.backbones import train_tokenizer

CORPUS = [
    VICUNA_SYSTEM, LLAVA_LLAMA_SYSTEM, MPT_SYSTEM, "You are a helpful assistant.",
    "USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>> system user assistant",
    "What colour is the circle? The circle is red. Is there a square? Yes. No. How many shapes are there?",
    "There are three shapes. A blue square on the left and a green triangle on the right.",
    "Describe the image briefly. A small red circle next to a large yellow star.",
    "Where is the star? The star is at the top of the image. Tell me a story about a cat.",
    "Once upon a time a cat lived in a house with a dog and they were friends.",
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    tok = train_tokenizer(CORPUS * 5, vocab_size=400)
    d = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(str(d))
    return str(d)


@pytest.fixture()
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def make_image(path: Path, size=(64, 48), seed: int = 0, mode: str = "RGB", fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        im = im.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format=fmt)
    return path


@pytest.fixture()
def image_folder(tmp_path) -> Path:
    d = tmp_path / "images"
    make_image(d / "coco" / "a.jpg", (64, 48), 1)
    make_image(d / "coco" / "b.png", (40, 60), 2)
    make_image(d / "gqa" / "c.jpg", (50, 50), 3)
    return d


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def conv(*turns: str) -> list[dict]:
    return [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]


@pytest.fixture()
def sample_records() -> list[dict]:
    return [
        {"id": "img1", "image": "coco/a.jpg", "conversations": conv("<image>\nWhat colour is the circle?",
                                                                    "The circle is red.")},
        {"id": "img2", "image": "coco/b.png", "conversations": conv(
            "How many shapes are there?\n<image>", "There are three shapes.", "Is there a square?", "Yes.")},
        {"id": "txt1", "conversations": conv("Tell me a story about a cat.",
                                            "Once upon a time a cat lived in a house.")},
        {"id": "img3", "image": "gqa/c.jpg", "conversations": conv("<image>\nWhere is the star?",
                                                                   "The star is at the top of the image.")},
    ]


@pytest.fixture(scope="session")
def backbones(tmp_path_factory, tokenizer_dir):
    """A tiny Llama (with its tokenizer, like Vicuna) and a tiny CLIP vision tower, saved to disk."""
    from transformers import AutoTokenizer

    from llavakit.demo.backbones import tiny_clip, tiny_llama

    root = tmp_path_factory.mktemp("backbones")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    llm = tiny_llama(tok, root / "llm")
    clip = tiny_clip(root / "clip")
    return {"llm": llm, "clip": clip}


@pytest.fixture(scope="session")
def train_data(tmp_path_factory):
    """Caption records (stage 1) and mixed image / text-only instruction records (stage 2), real JPEGs."""
    root = tmp_path_factory.mktemp("train_data")
    images = root / "images"
    captions, instruct = [], []
    colours = ["red", "blue", "green", "yellow"]
    for i in range(16):
        make_image(images / "coco" / f"{i}.jpg", (40 + i, 30 + 2 * i), seed=i)
        c = colours[i % 4]
        captions.append({"id": f"cap{i}", "image": f"coco/{i}.jpg",
                         "conversations": conv("<image>\nDescribe the image briefly.", f"A small {c} circle.")})
        if i % 4 == 3:
            instruct.append({"id": f"txt{i}", "conversations": conv("Tell me a story about a cat.",
                                                                   "Once upon a time a cat lived in a house.")})
        else:
            instruct.append({"id": f"vqa{i}", "image": f"coco/{i}.jpg", "conversations": conv(
                "What colour is the circle?\n<image>", f"The circle is {c}.", "Is there a square?", "No.")})
    write_json(root / "captions.json", captions)
    write_json(root / "instruct.json", instruct)
    return {"root": root, "images": str(images), "captions": str(root / "captions.json"),
            "instruct": str(root / "instruct.json")}


def qwen2_and_siglip(tokenizer_dir, root: Path) -> dict:
    """A tiny Qwen2 language model (with the suite's tokenizer) and a tiny CLS-free SigLIP tower (with its
    fixed-size image processor), saved under ``root``: {"llm": dir, "clip": dir}, like :func:`backbones`."""
    from transformers import (
        AutoTokenizer,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=128)).save_pretrained(root / "qwen")
    tok.save_pretrained(root / "qwen")
    SiglipVisionModel(SiglipVisionConfig(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=64)).save_pretrained(root / "sig")
    SiglipImageProcessorPil(size={"height": 28, "width": 28}).save_pretrained(root / "sig")
    return {"llm": str(root / "qwen"), "clip": str(root / "sig")}


REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (``--master_port 0`` makes torchrun hang)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model_path, *args: str, command: str = "serve", ready: str = "serving"):
    """``llavakit serve`` (or ``command``) for ``model_path`` in a real process on a free 127.0.0.1 port:
    yields (process, port) once it prints ``ready``; stopped afterwards."""
    import time

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llavakit", command, "--model-path", str(model_path),
                             "--port", str(port), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if ready in line:
                break
            if proc.poll() is not None:
                pytest.fail(f"server exited: {proc.stdout.read()[-2000:]}")
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def training_logs(out) -> list[dict]:
    """The training log lines (those with a loss) a run left in ``out/trainer_state.json``."""
    state = json.loads((Path(out) / "trainer_state.json").read_text())
    return [h for h in state["log_history"] if "loss" in h]


def logged_losses(out) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in training_logs(out)}


def assert_same_losses(ref: dict, got: dict, steps, tol: float) -> None:
    for step in steps:
        assert abs(got[step] - ref[step]) < tol, (step, got[step], ref[step])


def instruct_samples(asm, data) -> tuple[list[dict], object]:
    """Five stage-2 samples of the test data through llavakit's dataset (images and text-only — record 3 —,
    mixed lengths), and the image transform that made them."""
    from llavakit.data.dataset import LlavaDataset, build_sample_index
    from llavakit.data.images import ImageTransform
    from llavakit.data.records import load_records
    from llavakit.data.templates import get_template
    from llavakit.data.tokenize import ConversationEncoder

    store, valid, _ = load_records(data["instruct"])
    enc = ConversationEncoder(asm.tokenizer, get_template("v1"), asm.num_image_tokens)
    index = build_sample_index(store, valid, enc, 512)
    transform = ImageTransform.from_processor(asm.image_processor, "pad")
    ds = LlavaDataset(store, index, enc, transform, data["images"], 512)
    return [ds[i] for i in (0, 3, 1, 2, 7)], transform


def llava_inputs(processor, image_path, text: str = "What colour is the circle?") -> dict:
    """Model inputs for one question about one image, rendered with the processor's chat template."""
    from llavakit.data.images import open_image
    from llavakit.infer.generate import user_message

    prompt = processor.apply_chat_template([user_message(text, 1)], add_generation_prompt=True)
    return processor(images=[open_image(image_path)], text=[prompt], return_tensors="pt")


def script_flags(name: str) -> dict[str, str]:
    """The flags of a shipped script (scripts/v1_5/NAME.sh), as {flag: value}."""
    import shlex

    text = (REPO / "scripts" / "v1_5" / f"{name}.sh").read_text().replace("\\\n", " ")
    lines = [ln for ln in text.splitlines() if "llavakit.train" in ln]
    args = shlex.split(lines[0])
    args = args[args.index("llavakit.train") + 1:]
    flags = {}
    for i in range(0, len(args), 2):
        assert args[i].startswith("--"), args[i]
        flags[args[i][2:]] = args[i + 1]
    return flags


#: what the tests change in the shipped scripts: paths, sizes, reporting, and no DeepSpeed unless asked
SHRINK = {"deepspeed": None, "per_device_train_batch_size": "4", "dataloader_num_workers": "0",
          "report_to": "none", "bf16": None, "seed": "0"}


def _options(script: str, backbones, data, out, paths: dict, over: dict) -> dict[str, str]:
    flags = script_flags(script)
    flags.update(SHRINK)
    flags.update({"model_name_or_path": backbones["llm"], "vision_tower": backbones["clip"],
                  "image_folder": data["images"], "output_dir": str(out), **paths})
    flags.update({k: None if v is None else str(v) for k, v in over.items()})
    return {k: v for k, v in flags.items() if v is not None}


def _stage1(backbones, data, out, over) -> dict[str, str]:
    return _options("pretrain", backbones, data, out, {"data_path": data["captions"]}, over)


def _stage2(backbones, data, out, projector, over) -> dict[str, str]:
    over.setdefault("per_device_train_batch_size", "2")
    return _options("finetune", backbones, data, out, {"data_path": data["instruct"],
                                                       "pretrain_mm_mlp_adapter": str(projector)}, over)


def _lora(backbones, data, out, projector, over) -> dict[str, str]:
    over.setdefault("per_device_train_batch_size", "2")
    return _options("finetune_lora", backbones, data, out, {"data_path": data["instruct"],
                                                            "pretrain_mm_mlp_adapter": str(projector)}, over)


def _argv(options: dict[str, str]) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k}", v)]


def _config(options: dict[str, str]):
    from llavakit.config import RunConfig

    return RunConfig.from_options(**options)


# the shipped scripts' flags (scripts/v1_5/*.sh), paths and sizes shrunk: as `llavakit train` arguments
# (*_flags, for the CLI and launchers) or as the typed RunConfig that llavakit.train.run takes (*_config)
def stage1_flags(backbones, data, out, **over) -> list[str]:
    return _argv(_stage1(backbones, data, out, over))


def stage1_config(backbones, data, out, **over):
    return _config(_stage1(backbones, data, out, over))


def stage2_flags(backbones, data, out, projector, **over) -> list[str]:
    return _argv(_stage2(backbones, data, out, projector, over))


def stage2_config(backbones, data, out, projector, **over):
    return _config(_stage2(backbones, data, out, projector, over))


def lora_flags(backbones, data, out, projector, **over) -> list[str]:
    return _argv(_lora(backbones, data, out, projector, over))


def lora_config(backbones, data, out, projector, **over):
    return _config(_lora(backbones, data, out, projector, over))


# ---- trained outputs shared by the training, inference and conversion tests -----------------------
def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="session")
def stage1(backbones, train_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage1")
    from llavakit.model.build import assemble
    from llavakit.train.entry import run

    before = _snapshot(assemble(backbones["llm"], backbones["clip"]).model)
    res = run(stage1_config(backbones, train_data, out))
    return {"out": out, "result": res, "before": before}


@pytest.fixture(scope="session")
def stage2(backbones, train_data, stage1, tmp_path_factory):
    out = tmp_path_factory.mktemp("stage2")
    from llavakit.model.build import assemble

    before = _snapshot(assemble(backbones["llm"], backbones["clip"]).model)
    cmd = [sys.executable, "-m", "llavakit", "train",
           *stage2_flags(backbones, train_data, out, stage1["out"] / "mm_projector.bin")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return {"out": out, "stdout": r.stdout, "before": before}


@pytest.fixture(scope="session")
def lora_run(backbones, train_data, stage1, tmp_path_factory):
    """A LoRA run with the seed's flags (3 steps, from the stage-1 projector)."""
    from llavakit.train.entry import run

    out = tmp_path_factory.mktemp("lora")
    res = run(lora_config(backbones, train_data, out, stage1["out"] / "mm_projector.bin", max_steps=3))
    return {"out": out, "result": res}


# ---- the demo's quick run (its tests, and the web page's browser test, use its model) --------------------
@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """``llavakit demo --quick`` as a user runs it: its output directory and the finished process."""
    out = tmp_path_factory.mktemp("demo") / "out"
    r = subprocess.run([sys.executable, "-m", "llavakit", "demo", "--quick", "--output", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


# ---- small copies of the repositories users download (see hub_repos.py) ---------------------------
@pytest.fixture(scope="session")
def hub(tmp_path_factory):
    """``lmsys/vicuna-7b-v1.5``, ``openai/clip-vit-large-patch14-336``, ``liuhaotian/llava-v1.5-7b``, a model
    trained with the original code (tower inside, fp32 and bf16), the published stage-1 projector,
    ``llava-hf/llava-1.5-7b-hf`` and ``liuhaotian/llava-v1.6-vicuna-7b``, in their real layouts (small)."""
    import torch

    from . import hub_repos as H

    root = tmp_path_factory.mktemp("hub")
    sp = H.sentencepiece_model()
    vic = H.vicuna(root / "lmsys" / "vicuna-7b-v1.5", sp)
    clip_repo = H.clip(root / "openai" / "clip-vit-large-patch14-336")
    return {
        "vicuna": vic, "clip": clip_repo,
        "released": H.llava_original(root / "liuhaotian" / "llava-v1.5-7b", vic),
        "trained_fp32": H.llava_original(root / "checkpoints" / "llava-v1.5-7b-fp32", vic, clip_repo,
                                         with_tower=True, dtype=torch.float32),
        "trained_bf16": H.llava_original(root / "checkpoints" / "llava-v1.5-7b-bf16", vic, clip_repo,
                                         with_tower=True, dtype=torch.bfloat16),
        "projector": H.projector(root / "liuhaotian" / "llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5"
                                 / "mm_projector.bin"),
        "llava_hf": H.llava_hf(root / "llava-hf" / "llava-1.5-7b-hf", vic, clip_repo),
        "next_original": H.llava_next_original(root / "liuhaotian" / "llava-v1.6-vicuna-7b", vic, clip_repo),
    }
