"""AnyRes (LLaVA-NeXT) training on transformers' LlavaNextForConditionalGeneration.

* Geometry: each image's views (base view + tiles) are byte-equal to ``LlavaNextImageProcessorPil``'s and its
  token count equals ``LlavaNextProcessor``'s, over many sizes, two tile sizes and both pinpoint spellings.
* Training from the CLI (stage 1, then stage 2 with multi-image records and data-loader workers): the saved
  model is a LlavaNext that plain ``AutoProcessor`` feeds with the very ids and pixels training used.
* Packed == padded losses with AnyRes samples; a missing image is a named skip, not a crash.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from llavakit.data.anyres import AnyRes, AnyResError, parse_grid_pinpoints
from llavakit.data.images import ImageTransform
from tests.conftest import conv, make_image, write_json

PINPOINTS = "[[28, 56], [56, 28], [56, 56], [84, 28], [28, 84]]"


def hf_processors(tile: int, patch: int, pinpoints, cls_token: bool = True):
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ip = LlavaNextImageProcessorPil(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                    image_grid_pinpoints=[list(p) for p in pinpoints])
    proc = LlavaNextProcessor.__new__(LlavaNextProcessor)  # the counting needs no tokenizer
    proc.image_processor, proc.patch_size = ip, patch
    proc.num_additional_image_tokens = 1 if cls_token else 0
    proc.vision_feature_select_strategy = "default" if cls_token else "full"
    return ip, proc


@pytest.mark.parametrize("tile,patch,pinpoints", [
    (28, 14, None),  # LLaVA-NeXT's five grids, scaled to the tower
    (30, 10, "(1x1),...,(3x3)"),  # LLaVA-OneVision's range spelling
])
def test_views_and_token_counts_are_transformers(tile, patch, pinpoints):
    pins = parse_grid_pinpoints(pinpoints, tile)
    ip, proc = hf_processors(tile, patch, pins)
    geometry = AnyRes(pins, tile, patch)
    transform = ImageTransform.from_processor(ip.to_dict(), "anyres", geometry)
    rng = np.random.default_rng(0)
    sizes = [(int(rng.integers(4, 240)), int(rng.integers(4, 240))) for _ in range(40)] + \
        [(tile, tile), (1, 300), (300, 1), (tile * 3, tile)]
    for h, w in sizes:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        ref = ip(im, return_tensors="np")["pixel_values"][0]
        views = transform.views(im)
        assert views.dtype == np.uint8 and len(views) == geometry.num_views(h, w) == len(ref), (h, w)
        assert np.array_equal(transform.normalize(views), ref), (h, w)
        expected = proc._get_number_of_features(h, w, tile, tile) - 1  # "default" drops CLS
        assert geometry.num_tokens(h, w) == expected, (h, w)


@pytest.mark.parametrize("tile,patch,max_tiles", [(28, 14, 1), (28, 7, 2), (30, 10, 9)])
def test_onevision_views_and_token_counts_are_transformers(tile, patch, max_tiles):
    """anyres_max_N (LLaVA-OneVision): pooled token counts for an image alone in its sample, one padded view
    and one newline for each image of a multi-image sample — as transformers' OneVision processors."""
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    pins = parse_grid_pinpoints("(1x1),...,(3x3)", tile)
    ip = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile}, do_center_crop=False,
                                         crop_size={"height": tile, "width": tile},
                                         image_grid_pinpoints=[list(p) for p in pins])
    geometry = AnyRes(pins, tile, patch, max_tiles=max_tiles)
    proc = LlavaOnevisionProcessor.__new__(LlavaOnevisionProcessor)  # the counting needs no tokenizer
    proc.image_processor, proc.num_image_tokens = ip, geometry.tile_tokens
    proc.vision_aspect_ratio, proc.vision_feature_select_strategy = geometry.aspect_ratio, "full"
    transform = ImageTransform.from_processor(ip.to_dict(), "anyres", geometry)
    rng = np.random.default_rng(1)
    for _ in range(30):
        h, w = int(rng.integers(4, 240)), int(rng.integers(4, 240))
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        assert np.array_equal(transform.normalize(transform.views(im)), ip(im, return_tensors="np")["pixel_values"][0])
        two = ip([[im, im]], return_tensors="np")["pixel_values"][0][:1]  # each image of two: one padded view
        assert np.array_equal(transform.normalize(transform.views(im, 2)), two), (h, w)
        assert geometry.num_tokens(h, w) == proc._get_number_of_features(h, w, tile, tile), (h, w)
        assert geometry.num_tokens(h, w, 2) == geometry.tile_tokens + 1


def test_grid_pinpoints_spellings_and_errors():
    assert parse_grid_pinpoints("[[336, 672], [672, 336]]", 336) == ((336, 672), (672, 336))
    assert parse_grid_pinpoints([[28, 56]], 28) == ((28, 56),)
    assert parse_grid_pinpoints("(1x1),...,(2x2)", 384) == ((384, 384), (384, 768), (768, 384), (768, 768))
    assert parse_grid_pinpoints(None, 336)[0] == (336, 672)
    with pytest.raises(AnyResError, match="not a whole number of 28-pixel tiles"):
        parse_grid_pinpoints("[[30, 56]]", 28)
    with pytest.raises(AnyResError, match="not a list of"):
        parse_grid_pinpoints("[[28, 56], oops]", 28)


# ---- training ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def anyres_data(tmp_path_factory):
    """Images of many sizes and aspect ratios; captions; instructions with one or two images (anywhere in any
    turn) and text-only records."""
    root = tmp_path_factory.mktemp("anyres_data")
    images = root / "images"
    captions, instruct = [], []
    for i in range(12):
        make_image(images / f"{i}.jpg", (20 + 9 * i, 70 - 4 * i), seed=i)
        captions.append({"id": f"cap{i}", "image": f"{i}.jpg",
                         "conversations": conv("<image>\nDescribe the image briefly.", "A small red circle.")})
        if i % 4 == 3:
            instruct.append({"id": f"txt{i}", "conversations": conv("Tell me a story about a cat.",
                                                                   "Once upon a time a cat lived in a house.")})
        elif i % 4 == 2:
            instruct.append({"id": f"two{i}", "image": [f"{i}.jpg", f"{i - 1}.jpg"], "conversations": conv(
                "<image>\nWhat colour is the circle?", "Red.", "And in this one? <image>", "Blue.")})
        else:
            instruct.append({"id": f"vqa{i}", "image": f"{i}.jpg", "conversations": conv(
                "What colour is the circle?\n<image>", "The circle is red.")})
    return {"images": str(images), "captions": str(write_json(root / "captions.json", captions)),
            "instruct": str(write_json(root / "instruct.json", instruct)), "records": instruct}


def anyres_flags(backbones, data, out, **over) -> list[str]:
    flags = {"model_name_or_path": backbones["llm"], "vision_tower": backbones["clip"],
             "image_folder": data["images"], "image_aspect_ratio": "anyres", "image_grid_pinpoints": PINPOINTS,
             "mm_patch_merge_type": "spatial_unpad", "report_to": "none", "per_device_train_batch_size": "4",
             "dataloader_num_workers": "2", "save_strategy": "no", "seed": "0", "logging_steps": "1",
             "learning_rate": "1e-3", "output_dir": str(out), **{k: str(v) for k, v in over.items()}}
    return [x for k, v in flags.items() for x in (f"--{k}", v)]


def train_cli(flags: list[str]) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "llavakit", "train", *flags], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def anyres_run(backbones, anyres_data, tmp_path_factory):
    """Stage 1 (projector only) and stage 2 (full), AnyRes, from the CLI."""
    s1, s2 = tmp_path_factory.mktemp("anyres_s1"), tmp_path_factory.mktemp("anyres_s2")
    train_cli(anyres_flags(backbones, anyres_data, s1, version="plain", data_path=anyres_data["captions"],
                           tune_mm_mlp_adapter=True, num_train_epochs=1))
    train_cli(anyres_flags(backbones, anyres_data, s2, version="v1", data_path=anyres_data["instruct"],
                           pretrain_mm_mlp_adapter=s1 / "mm_projector.bin", num_train_epochs=2,
                           group_by_modality_length=True))
    return {"s1": s1, "s2": s2}


def training_samples(model_path, data, version: str = "v1", aspect: str = "anyres") -> tuple[list[dict], object]:
    """The samples stage-2 training builds from ``data``'s instructions (through the dataset)."""
    from llavakit.config import RunConfig
    from llavakit.model.build import load_parts
    from llavakit.train.entry import build_data

    cfg = RunConfig.from_options(model_name_or_path=str(model_path), image_folder=data["images"], version=version,
                                 image_aspect_ratio=aspect, data_path=data["instruct"], report_to="none",
                                 output_dir=str(model_path / "check"))
    parts = load_parts(str(model_path), None, image_aspect_ratio=aspect)
    ds, collator, _ = build_data(cfg.model, cfg.data, cfg.train, parts.tokenizer, parts.image_processor,
                                 parts.num_image_tokens, parts.anyres)
    return [ds[i] | {"record": data["records"][int(ds.index.record_idx[i])]} for i in range(len(ds))], collator


def test_anyres_model_trains_and_plain_transformers_builds_training_ids(anyres_run, anyres_data):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    out = anyres_run["s2"]
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = AutoProcessor.from_pretrained(out)
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert model.config.image_grid_pinpoints == json.loads(PINPOINTS)

    assert processor_builds_training_inputs(out, anyres_data, model, processor) >= 2


def processor_builds_training_inputs(out, anyres_data, model, processor, version: str = "v1",
                                     aspect: str = "anyres") -> int:
    """For every training sample: AutoProcessor's ids and pixels for the same conversation and images are
    training's, and the model takes them. Returns how many samples had two images."""
    from llavakit.data.images import open_image
    from llavakit.data.records import Turn
    from llavakit.data.templates import place_images

    samples, collator = training_samples(out, anyres_data, version, aspect)
    seen_two = 0
    for s in samples:
        rec = s["record"]
        paths = rec.get("image") or []
        paths = paths if isinstance(paths, list) else [paths]
        imgs = [open_image(f"{anyres_data['images']}/{p}") for p in paths]
        turns = [Turn("human" if t["from"] == "human" else "gpt", t["value"]) for t in rec["conversations"]]
        messages = [{"role": "user" if t.role == "human" else "assistant", "content": t.text}
                    for t in place_images(turns, len(imgs))]
        text = processor.apply_chat_template(messages)
        # OneVision's processor tells a sample's several images from several samples by the nesting
        enc = processor(text=[text], images=([imgs] if aspect != "anyres" else imgs) if imgs else None,
                        return_tensors="pt")
        assert enc["input_ids"][0].tolist() == s["input_ids"].tolist(), rec["id"]
        if not imgs:
            assert s["images"] is None
            continue
        seen_two += len(imgs) == 2
        assert s["image_sizes"].tolist() == [[im.height, im.width] for im in imgs]
        views = [collator.transform.num_views(tuple(hw), len(imgs)) for hw in s["image_sizes"].tolist()]
        ours = torch.split(collator.transform.normalize(s["images"]), views)
        for k, (n, pixels) in enumerate(zip(views, ours)):  # the processor pads each image's views to the most
            assert torch.equal(enc["pixel_values"][k][:n], pixels), rec["id"]
        # the model takes the processor's inputs (every image token gets a feature)
        with torch.no_grad():
            assert model(**enc).logits.shape[1] == len(s["input_ids"])
    return seen_two


def two_image_prompt(samples, images_dir) -> tuple[dict, list[str], list[dict]]:
    """The first training sample with two images: the sample, its image paths, and its conversation as chat
    messages up to its last question."""
    from llavakit.data.records import Turn
    from llavakit.data.templates import place_images

    two = next(s for s in samples if isinstance(s["record"].get("image"), list))
    paths = [f"{images_dir}/{p}" for p in two["record"]["image"]]
    turns = [Turn("human" if t["from"] == "human" else "gpt", t["value"]) for t in two["record"]["conversations"]]
    messages = [{"role": "user" if t.role == "human" else "assistant", "content": t.text}
                for t in place_images(turns, 2)][:-1]
    return two, paths, messages


def assert_greedy_is_plain_generate(pred, processor, queries, answers) -> None:
    """Each query's answer (one image) is what plain transformers' greedy generate gives from the processor's
    inputs."""
    from llavakit.data.images import open_image

    for q, answer in zip(queries, answers):
        prompt = processor.apply_chat_template([{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": q.question}]}], add_generation_prompt=True)
        enc = processor(text=[prompt], images=[open_image(q.image)], return_tensors="pt")
        gen = pred.model.generate(**enc, max_new_tokens=5, do_sample=False)
        assert processor.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == answer


def test_onevision_anyres_max_trains_and_its_processor_builds_training_ids(backbones, anyres_data, tmp_path):
    """``--image_aspect_ratio anyres_max_1`` (LLaVA-OneVision: tile features pooled to about one tile's worth,
    several images of a sample one padded view each): stage 2 from the CLI saves a
    LlavaOnevisionForConditionalGeneration and a LlavaOnevisionProcessor — loaded back here, where torchvision
    (its video processor's backend) is missing, by ``load_processor`` — whose ids and pixels are training's;
    llavakit's inference builds the same ids and answers as plain transformers' generate."""
    from transformers import AutoModelForImageTextToText

    from llavakit.data.images import open_image
    from llavakit.infer.generate import Predictor, Query, Sampling
    from llavakit.model.processing import load_processor

    out = tmp_path / "ov"
    train_cli(anyres_flags(backbones, anyres_data, out, version="v1", data_path=anyres_data["instruct"],
                           image_aspect_ratio="anyres_max_1", num_train_epochs=1))
    model = AutoModelForImageTextToText.from_pretrained(out)
    processor = load_processor(out)
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert type(processor).__name__ == "LlavaOnevisionProcessor"
    assert (model.config.vision_aspect_ratio, processor.vision_aspect_ratio) == ("anyres_max_1", "anyres_max_1")
    assert json.loads((out / "processor_config.json").read_text())["processor_class"] == "LlavaOnevisionProcessor"
    assert processor_builds_training_inputs(out, anyres_data, model, processor, aspect="anyres_max_1") >= 2

    pred = Predictor.from_pretrained(str(out), device="cpu", dtype=torch.float32)
    queries = [Query("What colour is the circle?", f"{anyres_data['images']}/{i}.jpg") for i in (0, 5, 11)]
    assert_greedy_is_plain_generate(pred, processor, queries, pred.generate(queries, max_new_tokens=5, batch_size=3))

    # two images in one prompt (one padded view each): the training sample's ids, and plain transformers' answer
    two, paths, messages = two_image_prompt(training_samples(out, anyres_data, aspect="anyres_max_1")[0],
                                            anyres_data["images"])
    images = [open_image(p) for p in paths]
    inputs = pred._inputs([pred.render(messages)], images)
    assert inputs["batch_num_images"].tolist() == [2]
    ids = inputs["input_ids"][0].tolist()
    assert ids == two["input_ids"].tolist()[:len(ids)]
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}]}]
    answer = pred.chat(chat, images, Sampling(max_new_tokens=5))
    enc = processor(text=[processor.apply_chat_template(chat, add_generation_prompt=True)], images=[images],
                    return_tensors="pt")
    gen = pred.model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert processor.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() == answer


def test_image_newline_trains_in_stage_2_only(anyres_run, backbones):
    from safetensors.torch import load_file
    from transformers import set_seed

    from llavakit.model.build import assemble
    from llavakit.train.stages import Stage

    set_seed(0)  # as the run: --seed decides the new weights, the projector's and then the newline's
    fresh = assemble(backbones["llm"], backbones["clip"], image_aspect_ratio="anyres",
                     image_grid_pinpoints=PINPOINTS).model
    assert type(fresh).__name__ == "LlavaNextForConditionalGeneration"
    hidden = fresh.config.text_config.hidden_size
    initial = fresh.model.image_newline.detach().clone()
    assert initial.shape == (hidden,) and 0.3 < float(initial.std() * hidden ** 0.5) < 3  # N(0, 1/hidden)
    Stage("align").configure_trainable(fresh)
    assert not fresh.model.image_newline.requires_grad  # stage 1: the projector only, as the original's
    assert not any("newline" in k for k in torch.load(anyres_run["s1"] / "mm_projector.bin", weights_only=True))
    Stage("full").configure_trainable(fresh)
    assert fresh.model.image_newline.requires_grad
    trained = load_file(str(anyres_run["s2"] / "model.safetensors"))["image_newline"]  # (saved in the hub layout)
    assert 1e-6 < float((trained - initial).abs().max()) < 0.1  # moved from the run's own initial value


@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_1"])
def test_packed_equals_padded_with_anyres_samples(backbones, anyres_data, tmp_path, aspect):
    from tests.conftest import assert_same_losses, logged_losses

    common = dict(version="v1", data_path=anyres_data["instruct"], max_steps=4, dataloader_num_workers=0,
                  learning_rate="1e-4", image_aspect_ratio=aspect)
    padded = tmp_path / "padded"
    packed = tmp_path / "packed"
    train_cli(anyres_flags(backbones, anyres_data, padded, **common))
    train_cli(anyres_flags(backbones, anyres_data, packed, packing=True, **common))
    assert_same_losses(logged_losses(padded), logged_losses(packed), range(1, 5), 1e-4)


def test_a_missing_image_is_a_named_skip(backbones, anyres_data, tmp_path):
    records = json.loads(open(anyres_data["instruct"]).read())
    records.append({"id": "gone", "image": "nope.jpg", "conversations": conv("<image>\nWhat?", "Red.")})
    data = dict(anyres_data, instruct=str(write_json(tmp_path / "instruct.json", records)))
    out = tmp_path / "out"
    train_cli(anyres_flags(backbones, data, out, version="v1", data_path=data["instruct"], max_steps=1))
    skipped = [json.loads(x) for x in (out / "skipped_samples.jsonl").read_text().splitlines()]
    assert [(s["id"], s["kind"]) for s in skipped] == [("gone", "bad_image")]
    assert "nope.jpg: image file not found" in skipped[0]["message"]


def test_llavakit_inference_builds_training_ids_and_generates(anyres_run, anyres_data):
    from transformers import AutoProcessor

    from llavakit.data.images import open_image
    from llavakit.infer.generate import Predictor, Query

    out = anyres_run["s2"]
    pred = Predictor.from_pretrained(str(out), device="cpu", dtype=torch.float32)
    two, paths, messages = two_image_prompt(training_samples(out, anyres_data)[0], anyres_data["images"])
    ids = pred._inputs([pred.render(messages)], [open_image(p) for p in paths])["input_ids"][0].tolist()
    assert ids == two["input_ids"].tolist()[:len(ids)]
    rest = pred.tokenizer.decode(two["input_ids"][len(ids):], skip_special_tokens=True)
    assert rest.strip() == "Blue."  # only the last answer is left

    # greedy answers: llavakit's batched generation (images of three sizes in one batch) and plain transformers
    queries = [Query("What colour is the circle?", f"{anyres_data['images']}/{i}.jpg") for i in (0, 5, 11)]
    assert_greedy_is_plain_generate(pred, AutoProcessor.from_pretrained(out), queries,
                                    pred.generate(queries, max_new_tokens=5, batch_size=3))
    chat = pred.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                                   {"type": "image"}]}], paths)
    assert isinstance(chat, str)


def test_data_preview_and_check_report_each_samples_image_tokens(backbones, anyres_data, tmp_path):
    from llavakit.cli import main

    anyres = AnyRes(parse_grid_pinpoints(PINPOINTS, 28), 28, 14)
    flags = ["--data_path", anyres_data["instruct"], "--image_folder", anyres_data["images"], "--tokenizer",
             backbones["llm"], "--version", "v1", "--image_aspect_ratio", "anyres", "--image_grid_pinpoints",
             PINPOINTS, "--vision_tower", backbones["clip"]]
    r = subprocess.run([sys.executable, "-m", "llavakit", "data", "preview", *flags, "--json"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    items = {i["id"]: i for i in map(json.loads, r.stdout.splitlines())}
    for rec in anyres_data["records"]:
        paths = rec.get("image") or []
        expected = [anyres.num_tokens(*reversed(Image.open(f"{anyres_data['images']}/{p}").size))
                    for p in (paths if isinstance(paths, list) else [paths])]
        assert items[rec["id"]]["image_tokens"] == expected
        assert items[rec["id"]]["input_ids"].count(items[rec["id"]]["image_token_id"]) == sum(expected)
    assert len(set(map(tuple, (i["image_tokens"] for i in items.values())))) > 4  # the sizes differ

    records = json.loads(open(anyres_data["instruct"]).read())
    records.append({"id": "gone", "image": "nope.jpg", "conversations": conv("<image>\nWhat?", "Red.")})
    data = write_json(tmp_path / "instruct.json", records)
    out = tmp_path / "check.json"
    with open(out, "w") as f, contextlib.redirect_stdout(f):
        rc = main(["data", "check", *flags[2:], "--data_path", str(data), "--json"])
    report = json.loads(out.read_text())
    assert rc == 1 and [(p["id"], p["kind"]) for p in report["problems"]] == [("gone", "missing_image")]
    assert report["image_tokens"]["max"] == max(
        sum(items[r["id"]]["image_tokens"]) for r in anyres_data["records"])


@pytest.mark.slow
def test_ddp_mixed_image_counts_and_exact_resume(backbones, anyres_data, tmp_path):
    """Two ranks, one sample each per step, no grouping: steps where one rank has two images (and more
    tiles) while the other has one or none (the dummy image's views). No hang, no unused parameter; a
    resume from the middle gives the uninterrupted run's losses."""
    from tests.conftest import assert_same_losses, logged_losses
    from tests.test_distributed import tail, torchrun

    common = dict(version="v1", data_path=anyres_data["instruct"], per_device_train_batch_size=1,
                  dataloader_num_workers=1, ddp_find_unused_parameters="False", ddp_backend="gloo",
                  save_strategy="steps", save_steps=3, num_train_epochs=1)
    full = tmp_path / "full"
    r = torchrun(anyres_flags(backbones, anyres_data, full, **common))
    assert r.returncode == 0, tail(r)
    ref = logged_losses(full)
    assert sorted(ref) == list(range(1, 7))
    resumed = tmp_path / "resumed"
    r = torchrun(anyres_flags(backbones, anyres_data, resumed, resume_from_checkpoint=full / "checkpoint-3",
                              **common))
    assert r.returncode == 0, tail(r)
    assert_same_losses(ref, logged_losses(resumed), range(4, 7), 1e-5)


def test_serve_and_predict_take_the_anyres_model(anyres_run, anyres_data, tmp_path):
    """The OpenAI-compatible server answers about two images of different sizes as the model does locally,
    and ``llavakit predict`` answers LLaVA question lines."""
    import base64

    import openai

    from llavakit.infer.generate import Predictor, Sampling
    from tests.conftest import serving

    out = anyres_run["s2"]
    paths = [f"{anyres_data['images']}/{i}.jpg" for i in (1, 10)]
    urls = ["data:image/jpeg;base64," + base64.b64encode(open(p, "rb").read()).decode() for p in paths]
    content = [{"type": "image_url", "image_url": {"url": urls[0]}}, {"type": "text", "text": "Compare"},
               {"type": "image_url", "image_url": {"url": urls[1]}}]
    local = Predictor.from_pretrained(str(out), device="cpu").chat(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"}, {"type": "image"}]}],
        paths, Sampling(max_new_tokens=5))
    with serving(out, "--max-new-tokens", "8") as (_, port):
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                              max_tokens=5)
    assert resp.choices[0].message.content == local

    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": f"q{i}", "image": f"{i}.jpg", "text": "What colour?"})
                                 + "\n" for i in (0, 4, 8)))
    answers = tmp_path / "a.jsonl"
    r = subprocess.run([sys.executable, "-m", "llavakit", "predict", "--model-path", str(out), "--question-file",
                        str(questions), "--image-folder", anyres_data["images"], "--answers-file", str(answers),
                        "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [json.loads(x)["question_id"] for x in answers.read_text().splitlines()] == ["q0", "q4", "q8"]


def test_unfrozen_vision_tower_trains_at_its_own_rate(backbones, anyres_data, tmp_path):
    """--unfreeze_mm_vision_tower: the tower's layers up to the one LLaVA reads train, in their own optimizer
    group at --mm_vision_tower_lr; the last layer and the final norm (which never reach the features) stay."""
    from safetensors.torch import load_file

    from llavakit.config import RunConfig
    from llavakit.train.entry import run

    out = tmp_path / "tower"
    flags = anyres_flags(backbones, anyres_data, out, version="v1", data_path=anyres_data["instruct"], max_steps=2,
                         dataloader_num_workers=0, unfreeze_mm_vision_tower=True, mm_vision_tower_lr=5e-3)
    result = run(RunConfig.from_argv(flags))
    groups = result.trainer.optimizer.param_groups
    tower_params = {id(p) for n, p in result.trainer.model.named_parameters() if "vision_tower." in n}
    tower_groups = [g for g in groups if any(id(p) in tower_params for p in g["params"])]
    assert tower_groups and all(g["lr"] == 0 or g["initial_lr"] == 5e-3 for g in tower_groups)
    assert all(id(p) in tower_params for g in tower_groups for p in g["params"])
    before = load_file(f"{backbones['clip']}/model.safetensors")
    after = {k.split("vision_tower.", 1)[1]: v for k, v in load_file(str(out / "model.safetensors")).items()
             if "vision_tower." in k}
    key = {k.split("vision_model.", 1)[-1]: k for k in before}
    changed = {k for k, v in after.items() if not torch.equal(v, before[key[k]])}
    layers = 3  # tiny_clip: LLaVA reads the second to last layer's output, so layer 2 and the norm are unused
    assert any(k.startswith("encoder.layers.0.") for k in changed) and "embeddings.patch_embedding.weight" in changed
    assert not any(k.startswith(f"encoder.layers.{layers - 1}.") or k.startswith("post_layernorm") for k in changed)


@pytest.mark.parametrize("aspect", ["anyres", "anyres_max_1"])
def test_lora_trains_the_newline_beside_the_adapter_merges_and_resumes(backbones, anyres_data, stage1, tmp_path,
                                                                       aspect):
    """LoRA on an AnyRes model (LLaVA-NeXT, and OneVision), from LLaVA-1.5's stage-1 projector (as LLaVA-NeXT's
    recipe starts): the image_newline trains beside the projector and is saved next to the adapter; merge-lora
    gives the logits of the unmerged model; a resume gives the uninterrupted losses."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from llavakit.cli import main
    from llavakit.data.images import open_image
    from llavakit.infer.generate import user_message
    from llavakit.model.build import assemble
    from llavakit.model.lora import load_newline
    from llavakit.model.processing import load_processor
    from tests.conftest import assert_same_losses, logged_losses

    common = dict(version="v1", data_path=anyres_data["instruct"], lora_enable=True, lora_r=8, lora_alpha=16,
                  pretrain_mm_mlp_adapter=stage1["out"] / "mm_projector.bin", max_steps=4,
                  dataloader_num_workers=0, save_strategy="steps", save_steps=2, image_aspect_ratio=aspect)
    out = tmp_path / "lora"
    train_cli(anyres_flags(backbones, anyres_data, out, **common))
    record = json.loads((out / "llavakit_base.json").read_text())
    assert record["image_aspect_ratio"] == aspect and record["image_grid_pinpoints"] == PINPOINTS
    newline = load_newline(str(out))
    assert newline is not None and load_newline(str(out / "checkpoint-2")) is not None

    merged = tmp_path / "merged"
    assert main(["merge-lora", "--model-path", str(out), "--save-model-path", str(merged)]) == 0
    processor = load_processor(merged)
    prompt = processor.apply_chat_template([user_message("What colour is the circle?", 1)],
                                           add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[open_image(f"{anyres_data['images']}/7.jpg")], return_tensors="pt")
    from transformers import set_seed

    set_seed(0)  # the run's seed: the base as the run built it, with its initial newline
    base = assemble(backbones["llm"], backbones["clip"], image_aspect_ratio=aspect,
                    image_grid_pinpoints=PINPOINTS).model.eval()
    assert 1e-6 < float((base.model.image_newline - newline).abs().max()) < 0.1  # it trained
    with torch.no_grad():
        base.model.image_newline.copy_(newline)
    unmerged = PeftModel.from_pretrained(base, str(out)).eval()
    merged_model = AutoModelForImageTextToText.from_pretrained(merged).eval()
    assert type(merged_model) is type(base)  # LlavaNext, LlavaOnevision
    assert torch.equal(merged_model.model.image_newline, newline)
    with torch.no_grad():
        assert (unmerged(**inputs).logits - merged_model(**inputs).logits).abs().max() < 1e-4

    resumed = tmp_path / "resumed"
    train_cli(anyres_flags(backbones, anyres_data, resumed, resume_from_checkpoint=out / "checkpoint-2", **common))
    assert_same_losses(logged_losses(out), logged_losses(resumed), range(3, 5), 1e-5)
    assert torch.equal(load_newline(str(resumed)), newline)


def test_convert_llava_v1_6_original_to_llava_next_and_back(hub, anyres_data, tmp_path):
    """``liuhaotian/llava-v1.6-*`` (its trained tower inside, the image_newline, the AnyRes fields) → a
    LlavaNext whose tensors are the original's, which AutoProcessor feeds with the ids and pixels its
    training would use, and back to the original's layout, tensor for tensor."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from llavakit.cli import main
    from llavakit.data.images import open_image
    from llavakit.infer.generate import Predictor
    from llavakit.model.convert import read_weights
    from tests.hub_repos import NEXT_FIELDS

    original = hub["next_original"]
    native = tmp_path / "next-hf"
    assert main(["convert", "from-original", "--model-path", original["dir"], "--save-model-path",
                 str(native), "--vision-tower", hub["clip"]["dir"]]) == 0
    model = LlavaNextForConditionalGeneration.from_pretrained(native)
    assert model.config.image_grid_pinpoints == NEXT_FIELDS["image_grid_pinpoints"]
    own = model.state_dict()
    assert torch.equal(own["model.image_newline"], original["state"]["model.image_newline"].float())
    tower = "model.vision_tower.vision_tower.vision_model."
    trained = {k[len(tower):]: v for k, v in original["state"].items() if k.startswith(tower)}
    assert trained and all(torch.equal(own["model.vision_tower." + k], v.float()) for k, v in trained.items())

    processor = AutoProcessor.from_pretrained(native)
    assert type(processor).__name__ == "LlavaNextProcessor"
    pred = Predictor(model, processor, device="cpu")
    images = [open_image(f"{anyres_data['images']}/{i}.jpg") for i in (2, 9)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Compare"},
                                             {"type": "image"}]}]
    ours = pred._inputs([pred.render(messages)], images)
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    plain = processor(text=[text], images=images, return_tensors="pt")
    assert ours["input_ids"][0].tolist() == plain["input_ids"][0].tolist()
    with torch.no_grad():
        a = model(**{k: v for k, v in ours.items()}).logits
        b = model(**plain).logits
    assert (a - b).abs().max() < 1e-5

    back = tmp_path / "next-original"
    assert main(["convert", "to-original", "--model-path", str(native), "--save-model-path", str(back)]) == 0
    cfg = json.loads((back / "config.json").read_text())
    assert (cfg["mm_patch_merge_type"], cfg["image_aspect_ratio"]) == ("spatial_unpad", "anyres")
    assert cfg["image_grid_pinpoints"] == NEXT_FIELDS["image_grid_pinpoints"]
    again = read_weights(str(back))
    for k, v in original["state"].items():
        if not k.startswith("model.vision_tower."):
            assert torch.equal(again[k][:v.shape[0]] if k.endswith(("embed_tokens.weight", "lm_head.weight"))
                               else again[k], v), k


def test_anyres_from_shards_uses_the_image_sizes_they_recorded(backbones, anyres_data, tmp_path):
    """`data shard` records every image's size (and, with an AnyRes encoder, the true token lengths); training
    from the shards with workers needs neither the image folder nor a length pass."""
    import os

    import numpy as np

    from llavakit.config import RunConfig
    from llavakit.train.entry import run

    shards = tmp_path / "shards"
    r = subprocess.run([sys.executable, "-m", "llavakit", "data", "shard", "--data_path", anyres_data["instruct"],
                        "--image_folder", anyres_data["images"], "--output", str(shards), "--shard-size", "8KB",
                        "--workers", "2", "--tokenizer", backbones["llm"], "--version", "v1",
                        "--image_aspect_ratio", "anyres", "--image_grid_pinpoints", PINPOINTS,
                        "--vision_tower", backbones["clip"], "--model_max_length", "2048"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    samples = np.load(shards / "samples.npz")
    sizes = [list(map(list, samples["image_hw"][a:b])) for a, b in zip(samples["image_start"][:-1],
                                                                         samples["image_start"][1:])]
    expected = []
    for rec in anyres_data["records"]:
        paths = rec.get("image") or []
        expected.append([list(reversed(Image.open(f"{anyres_data['images']}/{p}").size))
                         for p in (paths if isinstance(paths, list) else [paths])])
    assert sizes == expected

    cache = tmp_path / "cache"
    os.environ["LLAVAKIT_CACHE"] = str(cache)
    try:
        flags = anyres_flags(backbones, anyres_data, tmp_path / "out", version="v1", data_path=shards, max_steps=3,
                             shuffle_buffer=4)
        flags[flags.index("--image_folder") + 1] = str(tmp_path / "nothing-here")
        (tmp_path / "nothing-here").mkdir()
        result = run(RunConfig.from_argv(flags))
    finally:
        del os.environ["LLAVAKIT_CACHE"]
    assert not (cache / "lengths").exists()  # the lengths stored with the shards were used
    assert result.summary["steps"] == 3 and result.summary["replaced_samples"] == 0


def test_qwen2_and_siglip_anyres(tokenizer_dir, anyres_data, tmp_path):
    """A Qwen2 language model and a CLS-free SigLIP tower (every patch kept) train AnyRes from the CLI, and
    AutoProcessor builds the training ids and pixels for the result (qwen2 template)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.conftest import qwen2_and_siglip

    backbones = qwen2_and_siglip(tokenizer_dir, tmp_path)
    out = tmp_path / "out"
    train_cli(anyres_flags(backbones, anyres_data, out,
                           version="qwen2", data_path=anyres_data["instruct"], max_steps=2))
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert model.config.vision_feature_select_strategy == "full"
    assert processor_builds_training_inputs(out, anyres_data, model, AutoProcessor.from_pretrained(out),
                                            "qwen2") >= 2


def test_a_llava_next_checkpoint_trains_further(anyres_run, anyres_data, tmp_path):
    """`--model_name_or_path` a LlavaNext checkpoint (ours, or shaped like llava-hf/llava-v1.6-*-hf): it brings
    its tower, grid and newline; asked for another aspect ratio, the error says which one it needs."""
    from safetensors.torch import load_file

    from llavakit.config import RunConfig
    from llavakit.model.build import ModelLoadError
    from llavakit.train.entry import run

    out = tmp_path / "more"
    flags = ["--model_name_or_path", str(anyres_run["s2"]), "--image_folder", anyres_data["images"],
             "--image_aspect_ratio", "anyres", "--data_path", anyres_data["instruct"], "--version", "v1",
             "--report_to", "none", "--per_device_train_batch_size", "4", "--max_steps", "2", "--save_strategy", "no",
             "--learning_rate", "1e-3", "--output_dir", str(out)]
    result = run(RunConfig.from_argv(flags))
    assert result.summary["steps"] == 2
    before = load_file(str(anyres_run["s2"] / "model.safetensors"))["image_newline"]
    assert not torch.equal(load_file(str(out / "model.safetensors"))["image_newline"], before)
    flags[flags.index("anyres")] = "pad"
    with pytest.raises(ModelLoadError, match="continue it with --image_aspect_ratio anyres"):
        run(RunConfig.from_argv(flags[:-1] + [str(tmp_path / "other")]))


@pytest.mark.slow
def test_deepspeed_zero3_anyres(backbones, anyres_data, tmp_path):
    """ZeRO-3 (as LLaVA-NeXT's stage 2 runs): the partitioned newline trains and the gathered model loads."""
    from transformers import AutoModelForImageTextToText

    from tests.conftest import REPO
    from tests.test_distributed import tail, torchrun

    out = tmp_path / "z3"
    r = torchrun(anyres_flags(backbones, anyres_data, out, version="v1", data_path=anyres_data["instruct"],
                              deepspeed=REPO / "scripts" / "zero3.json", per_device_train_batch_size=1, max_steps=3,
                              dataloader_num_workers=0), timeout=400)
    assert r.returncode == 0, tail(r)
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert type(model).__name__ == "LlavaNextForConditionalGeneration"
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    hidden = model.config.text_config.hidden_size
    assert model.model.image_newline.shape == (hidden,)
