"""Shared fixtures: a Llama-style tokenizer trained on the spot, real image files, record-file writers."""

from __future__ import annotations

import json
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
