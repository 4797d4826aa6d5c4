"""Every user command that takes a model, on small copies of the repositories users really download
(``tests/hub_repos.py``): Vicuna with only ``tokenizer.model`` and ``.bin`` shards, the full CLIP checkpoint,
the original's released and self-trained checkpoints, the published projector, ``llava-hf``."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from llavakit import IGNORE_INDEX
from llavakit.cli import main as cli
from llavakit.model.convert import read_weights

from .conftest import (
    lora_config,
    serving,
    stage1_config,
    stage2_config,
    stage2_flags,
    write_jsonl,
)


def hub_backbones(hub) -> dict:
    return {"llm": hub["vicuna"]["dir"], "clip": hub["clip"]["dir"]}


@pytest.fixture(scope="module")
def hub_stage1(hub, train_data, tmp_path_factory):
    """scripts/v1_5/pretrain.sh's flags on lmsys/vicuna-7b-v1.5 + openai/clip-vit-large-patch14-336."""
    from llavakit.train.entry import run

    out = tmp_path_factory.mktemp("hub_stage1")
    run(stage1_config(hub_backbones(hub), train_data, out, max_steps=2))
    return out


@pytest.fixture(scope="module")
def hub_stage2(hub, train_data, tmp_path_factory):
    """scripts/v1_5/finetune.sh's flags from the published projector, through the CLI."""
    out = tmp_path_factory.mktemp("hub_stage2")
    r = subprocess.run([sys.executable, "-m", "llavakit", "train",
                        *stage2_flags(hub_backbones(hub), train_data, out, hub["projector"]["path"], max_steps=2)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def hub_lora(hub, train_data, tmp_path_factory):
    from llavakit.train.entry import run

    out = tmp_path_factory.mktemp("hub_lora")
    run(lora_config(hub_backbones(hub), train_data, out, hub["projector"]["path"], max_steps=2))
    return out


@pytest.fixture(scope="module")
def converted_released(hub, tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "llava-v1.5-7b-hf"
    assert cli(["convert", "from-original", "--model-path", hub["released"]["dir"], "--save-model-path", str(out),
                "--vision-tower", hub["clip"]["dir"]]) == 0
    return out


def question_file(path: Path, image: str) -> Path:
    return write_jsonl(path, [{"question_id": 1, "image": image, "text": "What colour is the circle?"},
                              {"question_id": 2, "image": image, "text": "How many shapes are there?"}])


# ---- the seed's base model loads on a fresh install -----------------------------------------------
def test_data_preview_and_check_read_vicunas_tokenizer_model(hub, train_data, capsys):
    assert not os.path.exists(os.path.join(hub["vicuna"]["dir"], "tokenizer.json"))
    assert cli(["data", "preview", "--data_path", train_data["instruct"], "--tokenizer", hub["vicuna"]["dir"],
                "--version", "v1", "--limit", "2", "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(rows) == 2 and all(r["input_ids"][0] == 1 for r in rows)  # Llama's BOS
    assert cli(["data", "check", "--data_path", train_data["instruct"], "--image_folder", train_data["images"],
                "--tokenizer", hub["vicuna"]["dir"], "--version", "v1", "--model_max_length", "2048"]) == 0


def test_a_missing_sentencepiece_is_one_sentence_naming_the_directory(hub, train_data):
    code = ("import sys; sys.modules['sentencepiece'] = None; from llavakit.cli import main; "
            f"sys.exit(main(['data', 'preview', '--data_path', {train_data['instruct']!r}, "
            f"'--tokenizer', {hub['vicuna']['dir']!r}, '--version', 'v1']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert hub["vicuna"]["dir"] in r.stderr and "pip install sentencepiece" in r.stderr


def test_stage1_on_vicuna_and_the_full_clip_checkpoint(hub, hub_stage1):
    state = torch.load(hub_stage1 / "mm_projector.bin", weights_only=True)
    assert sorted(state) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                             "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    assert (hub_stage1 / "tokenizer.model").is_file()


def test_stage2_from_the_published_projector_loads_and_tokenizes_as_trained(hub, hub_stage2, train_data):
    """The final directory: plain transformers loads it, and AutoProcessor + its chat template build the ids
    training built for the same question."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from llavakit.data.images import open_image
    from llavakit.data.records import load_records, parse_record
    from llavakit.data.templates import get_template
    from llavakit.data.tokenize import ConversationEncoder
    from llavakit.infer.generate import user_message

    files = set(os.listdir(hub_stage2))
    assert {"tokenizer.model", "tokenizer.json", "generation_config.json", "model.safetensors"} <= files
    gen = json.loads((hub_stage2 / "generation_config.json").read_text())
    assert gen.get("do_sample") or gen.get("temperature") in (None, 1.0)  # #1144 made savable
    model = AutoModelForImageTextToText.from_pretrained(hub_stage2)
    processor = AutoProcessor.from_pretrained(hub_stage2)
    store, valid, _ = load_records(train_data["instruct"])
    rec = parse_record(store, valid[0])
    enc = ConversationEncoder(processor.tokenizer, get_template("v1"), model.config.image_seq_length)
    e = enc.encode(rec)
    first = next(i for i, lab in enumerate(e.labels) if lab != IGNORE_INDEX)
    question = rec.turns[0].text.replace("<image>", "").strip()
    text = processor.apply_chat_template([user_message(question, 1)], add_generation_prompt=True)
    inputs = processor(text=[text], images=[open_image(os.path.join(train_data["images"], rec.images[0]))],
                       return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == e.input_ids[:first]
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


def test_lora_on_vicuna_merges(hub_lora, tmp_path, train_data):
    from transformers import LlavaForConditionalGeneration

    merged = tmp_path / "merged"
    assert cli(["merge-lora", "--model-path", str(hub_lora), "--save-model-path", str(merged)]) == 0
    assert (merged / "tokenizer.model").is_file() and (hub_lora / "tokenizer.model").is_file()
    LlavaForConditionalGeneration.from_pretrained(merged)
    answers = tmp_path / "a.jsonl"
    assert cli(["predict", "--model-path", str(merged), "--question-file",
                str(question_file(tmp_path / "q.jsonl", "coco/1.jpg")), "--image-folder", train_data["images"],
                "--answers-file", str(answers), "--max-new-tokens", "3"]) == 0
    assert len(answers.read_text().splitlines()) == 2


# ---- the original's checkpoints ---------------------------------------------------------------------
def test_released_checkpoint_converts_with_the_named_tower(hub, converted_released):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(converted_released)
    sd = model.state_dict()
    for k, v in hub["released"]["state"].items():
        if k.startswith("model.mm_projector."):
            layer = {"0": "linear_1", "2": "linear_2"}[k.split(".")[2]]
            assert torch.equal(sd[f"model.multi_modal_projector.{layer}.{k.split('.')[-1]}"], v)
        elif k.startswith("model.layers."):
            assert torch.equal(sd["model.language_model." + k[len("model."):]], v), k
    for k, v in hub["clip"]["vision_state"].items():  # the tower named by --vision-tower, not random
        assert torch.equal(sd["model.vision_tower." + k], v.to(sd["model.vision_tower." + k].dtype)), k
    assert (converted_released / "tokenizer.model").is_file()


@pytest.mark.parametrize("which", ["trained_fp32", "trained_bf16"])
def test_self_trained_checkpoint_with_its_tower_converts_and_round_trips(hub, which, tmp_path):
    from transformers import LlavaForConditionalGeneration

    src = hub[which]
    native = tmp_path / "hf"
    assert cli(["convert", "from-original", "--model-path", src["dir"], "--save-model-path", str(native),
                "--vision-tower", hub["clip"]["dir"]]) == 0
    sd = LlavaForConditionalGeneration.from_pretrained(native, dtype="auto").state_dict()
    prefix = "model.vision_tower.vision_tower.vision_model."
    tower = {k[len(prefix):]: v for k, v in src["state"].items() if k.startswith(prefix)}
    assert tower and all(torch.equal(sd["model.vision_tower." + k], v) for k, v in tower.items())  # its own

    back = tmp_path / "orig"
    assert cli(["convert", "to-original", "--model-path", str(native), "--save-model-path", str(back)]) == 0
    state = read_weights(str(back))
    expected = {k: v for k, v in src["state"].items() if not k.startswith("model.vision_tower.")}
    assert sorted(state) == sorted(expected) and all(torch.equal(state[k], expected[k]) for k in state)
    saved_tower = read_weights(str(back / "vision_tower"))  # the original's names, the same tensors
    assert sorted(saved_tower) == sorted("vision_model." + k for k in tower)
    assert all(torch.equal(saved_tower["vision_model." + k], v) for k, v in tower.items())


def test_to_original_writes_what_the_original_loader_reads(hub, converted_released, tmp_path):
    """transformers 4.37's loader (the original's pin): a LlamaTokenizer with tokenizer.model, rope_theta,
    the tower's config with torch_dtype and its weights under vision_model."""
    back = tmp_path / "orig"
    assert cli(["convert", "to-original", "--model-path", str(converted_released), "--save-model-path",
                str(back)]) == 0
    assert (back / "tokenizer.model").read_bytes() == (Path(hub["vicuna"]["dir"]) / "tokenizer.model").read_bytes()
    tc = json.loads((back / "tokenizer_config.json").read_text())
    assert tc["tokenizer_class"] == "LlamaTokenizer" and tc["legacy"] is False and "backend" not in tc
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["rope_theta"] == 10000.0 and cfg["rope_scaling"] is None and "rope_parameters" not in cfg
    vcfg = json.loads((back / "vision_tower" / "config.json").read_text())
    assert vcfg["model_type"] == "clip_vision_model" and "torch_dtype" in vcfg
    assert all(k.startswith("vision_model.") for k in read_weights(str(back / "vision_tower")))
    import sentencepiece as spm  # the tokenizer the original reads has the model's vocabulary

    assert spm.SentencePieceProcessor(model_file=str(back / "tokenizer.model")).get_piece_size() == cfg["vocab_size"]


# ---- inference on converted and llava-hf checkpoints -------------------------------------------------
def test_predict_on_llava_hf_builds_the_originals_ids(hub, train_data, tmp_path):
    """A llava-hf checkpoint's own template, tokenized as the original tokenized prompts (chunk-wise)."""
    from llavakit.infer.generate import Predictor, user_message

    pred = Predictor.from_pretrained(hub["llava_hf"]["dir"], device="cpu")
    text = pred.render([user_message("What colour is the circle?", 1)])
    assert text == "USER: <image>\nWhat colour is the circle? ASSISTANT:"
    tok = pred.tokenizer
    ids = pred.input_ids(text)
    image_id = hub["llava_hf"]["image_token_index"]
    n = (28 // 14) ** 2  # the tiny tower's patches (the CLS token dropped)
    after = tok("\nWhat colour is the circle? ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert ids == tok("USER: ")["input_ids"] + [image_id] * n + after
    assert tok.convert_ids_to_tokens(after[:2]) == ["▁", "<0x0A>"]
    answers = tmp_path / "a.jsonl"
    assert cli(["predict", "--model-path", hub["llava_hf"]["dir"], "--question-file",
                str(question_file(tmp_path / "q.jsonl", "coco/1.jpg")), "--image-folder", train_data["images"],
                "--answers-file", str(answers), "--max-new-tokens", "3"]) == 0
    assert [json.loads(x)["question_id"] for x in answers.read_text().splitlines()] == [1, 2]


def test_chat_on_a_converted_original_checkpoint(converted_released, train_data):
    img = os.path.join(train_data["images"], "coco", "1.jpg")
    r = subprocess.run([sys.executable, "-m", "llavakit", "chat", "--model-path", str(converted_released),
                        "--image-file", img, "--max-new-tokens", "3"], input="What colour is it?\nexit\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [ln.split(":")[0] for ln in r.stdout.splitlines() if ln.startswith(("USER", "ASSISTANT"))] == \
        ["USER", "ASSISTANT"]


def test_eval_run_on_a_converted_original_checkpoint(converted_released, train_data, tmp_path):
    import shutil

    root = tmp_path / "eval"
    (root / "pope" / "val2014").mkdir(parents=True)
    (root / "pope" / "coco").mkdir()
    shutil.copy(Path(train_data["images"]) / "coco" / "1.jpg", root / "pope" / "val2014" / "a.jpg")
    write_jsonl(root / "pope" / "llava_pope_test.jsonl", [
        {"question_id": 1, "image": "a.jpg", "category": "random",
         "text": "Is there a circle in the image?\nAnswer the question using a single word or phrase."}])
    for split in ("adversarial", "popular", "random"):
        write_jsonl(root / "pope" / "coco" / f"coco_pope_{split}.json",
                    [{"question_id": 1, "label": "yes"}] if split == "random" else [])
    out = tmp_path / "results"
    assert cli(["eval", "run", "--model-path", str(converted_released), "--benchmark", "pope", "--data-root",
                str(root), "--output-dir", str(out), "--max-new-tokens", "2"]) == 0
    assert 0 <= json.loads((out / "pope" / "scores.json").read_text())["score"] <= 100
    assert len((out / "pope" / "answers.jsonl").read_text().splitlines()) == 1


def test_serve_on_a_llava_hf_checkpoint(hub, train_data):
    with serving(hub["llava_hf"]["dir"], "--max-new-tokens", "3") as (_, port):
        img = Path(train_data["images"]) / "coco" / "3.jpg"
        url = "data:image/jpeg;base64," + base64.b64encode(img.read_bytes()).decode()
        body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "What colour is the circle?"}, {"type": "image_url", "image_url": {"url": url}}]}]}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as resp:
            reply = json.loads(resp.read())
        assert reply["choices"][0]["message"]["role"] == "assistant" and reply["usage"]["prompt_tokens"] > 4


def test_fine_tuning_a_llava_hf_checkpoint_on_own_data(hub, train_data, tmp_path):
    """``--model_name_or_path llava-hf/llava-1.5-7b-hf``: no tower, no projector flags; the result loads."""
    from transformers import LlavaForConditionalGeneration

    from llavakit.train.entry import run

    out = tmp_path / "ft"
    run(stage2_config({"llm": hub["llava_hf"]["dir"], "clip": None}, train_data, out, None, max_steps=2,
                      vision_tower=None, pretrain_mm_mlp_adapter=None))
    model = LlavaForConditionalGeneration.from_pretrained(out)
    assert model.config.image_token_index == hub["llava_hf"]["image_token_index"]
    assert (out / "tokenizer.model").is_file()
