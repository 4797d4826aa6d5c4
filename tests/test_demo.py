"""The demo: deterministic synthetic data, and the whole path end to end (`llavakit demo --quick`)."""

import hashlib
import html
import json
import subprocess

import pytest

from llavakit.demo.scenes import ANSWER_SETS, chance_accuracy, write_dataset
from tests.browser import ARTIFACTS, CHROMIUM_FLAGS, chromium


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def test_synthetic_data_is_deterministic_and_well_formed(tmp_path):
    a = write_dataset(tmp_path / "a", 30, 5, 56, seed=3)
    write_dataset(tmp_path / "b", 30, 5, 56, seed=3)
    write_dataset(tmp_path / "c", 30, 5, 56, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    from llavakit.data.records import load_records

    for name in ("captions", "instruct"):
        store, valid, problems = load_records(a["files"][name])
        assert len(valid) == len(store) and not problems
    instruct = json.loads((tmp_path / "a" / "instruct.json").read_text())
    assert any("image" not in r for r in instruct)  # some text-only records
    heldout = [json.loads(x) for x in (tmp_path / "a" / "heldout.jsonl").read_text().splitlines()]
    assert {q["type"] for q in heldout} == set(ANSWER_SETS)
    assert all(q["answer"] in ANSWER_SETS[q["type"]] for q in heldout)
    assert all(q["image"].startswith("test/") for q in heldout)
    assert chance_accuracy(heldout) <= 0.35


def test_no_training_turn_gives_away_another_turns_answer(tmp_path):
    """A question that names an object by its colour must not sit beside one asking that colour: a model would
    learn to answer from the text instead of the image."""
    write_dataset(tmp_path, 300, 1, 56, seed=0)
    instruct = json.loads((tmp_path / "instruct.json").read_text())
    conversations = [r["conversations"] for r in instruct if "image" in r]
    assert len(conversations) == 300
    for conv in conversations:
        pairs = [(conv[k]["value"], conv[k + 1]["value"]) for k in range(0, len(conv), 2)]
        qa = [(q, a) for q, a in pairs if q != "Describe the image briefly."]
        assert len(qa) >= 2 and qa[0][0].count("<image>") == 1
        for k, (_, answer) in enumerate(qa):
            for j, (question, _) in enumerate(qa):
                assert j == k or answer not in question.replace("?", "").split(), conv


@pytest.mark.slow
def test_quick_demo_end_to_end(quick_demo):
    out, r = quick_demo
    s = json.loads((out / "summary.json").read_text())
    for key in ("heldout_accuracy", "stage1_only_accuracy", "chance_accuracy", "per_type", "wall_seconds",
                "stage1_caption_accuracy", "stage1_caption_chance", "phase_seconds", "cpu"):
        assert key in s
    assert set(s["per_type"]) == set(ANSWER_SETS)
    # the quick run is short: it must beat guessing overall and have learned to count from the image
    assert s["heldout_accuracy"] >= s["chance_accuracy"] + 0.05
    assert s["per_type"]["count"] >= 0.6
    # stage 1 alone aligns: its captions name objects by colour and shape far more often than chance
    assert s["stage1_caption_accuracy"] >= 3 * s["stage1_caption_chance"]
    assert set(s["phase_seconds"]) == {"data", "backbones", "stage1", "stage1_eval", "stage2", "eval", "report"}
    assert s["cpu"]["cores"] >= 1 and s["cpu"]["torch_kernels"]
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "question type" in r.stdout and "stage 2" in r.stdout
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(out / "stage2").config.model_type == "llava"


@pytest.mark.slow
def test_demo_report_opens_from_disk_in_headless_chromium(quick_demo, tmp_path):
    """report.html, opened from disk in a real browser: every image decodes, the tables and captions are there;
    the screenshot is kept beside the demo output (look at it)."""
    out, _ = quick_demo
    s = json.loads((out / "summary.json").read_text())
    page = (out / "report.html").as_uri()
    browser = [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*browser, "--virtual-time-budget=5000", "--dump-dom", page], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    import re

    m = re.search(r'<body data-images="(\d+)" data-decoded="(\d+)"', dom.stdout)
    assert m, dom.stdout[:2000]
    assert int(m.group(1)) >= 10 and m.group(1) == m.group(2)  # held-out scenes, captions, curves, chat
    assert "Held-out accuracy by question type" in dom.stdout and "After stage 1" in dom.stdout
    for example in s["stage1_captions"][:3]:
        assert html.escape(example["caption"]) in dom.stdout
    assert dom.stdout.count("class=\"wrong\"") + dom.stdout.count("class=\"right\"") >= 2 * s["heldout_questions"] // 5
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "demo-report.png"
    r = subprocess.run([*browser, "--window-size=1200,1600", f"--screenshot={shot}", page], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 1600)
        assert len(set(im.convert("RGB").resize((120, 160)).getdata())) > 50  # a page, not a blank


def test_some_training_negatives_need_binding(tmp_path):
    """Some "no" answers name a colour and a shape that are both in the image, on different objects: only a
    model that binds colour to shape answers them."""
    data = write_dataset(tmp_path, 400, 1, 56, seed=0)
    binding = 0
    for r in data["instruct"]:
        if "image" not in r:
            continue
        scene = data["scenes"][r["image"]]
        conv = r["conversations"]
        for q, a in zip(conv[0::2], conv[1::2]):
            words = q["value"].replace("<image>", "").replace("?", "").split()
            if words[:3] != ["Is", "there", "a"]:
                continue
            colour, shape = words[3:5]
            together = any(o.colour == colour and o.shape == shape for o in scene.objects)
            assert a["value"] == ("yes" if together else "no")
            binding += (not together and colour in {o.colour for o in scene.objects}
                        and shape in {o.shape for o in scene.objects})
    assert binding >= 20


def test_object_lists_name_each_object_once_in_no_fixed_order(tmp_path):
    """Stage 1's second kind of caption: every object once, its colour and shape side by side in either order,
    the objects in an order that is not the quadrants' — so that writing it means finding an object by its
    colour or by its shape, which a caption in quadrant order never asks."""
    from llavakit.demo.scenes import PLACES, SHAPES

    data = write_dataset(tmp_path, 200, 1, 56, seed=0)
    stage1 = json.loads((tmp_path / "captions.json").read_text())
    assert stage1 == data["captions"] + data["object_lists"] and len(stage1) == 400
    assert [r["image"] for r in data["object_lists"]] == [r["image"] for r in data["captions"]]
    out_of_place_order = shape_first = colour_first = 0
    for record in data["object_lists"]:
        scene = data["scenes"][record["image"]]
        items = [tuple(x.split()) for x in record["conversations"][1]["value"].rstrip(".").split(". ")]
        assert sorted(sorted(i) for i in items) == sorted(sorted((o.colour, o.shape)) for o in scene.objects)
        places = [next(o.place for o in scene.objects if o.colour in i) for i in items]
        out_of_place_order += places != sorted(places, key=PLACES.index)
        shape_first += sum(i[0] in SHAPES for i in items)
        colour_first += sum(i[0] not in SHAPES for i in items)
    assert out_of_place_order > 50 and shape_first > 100 and colour_first > 100


def test_language_model_texts_are_packed_without_seeing_each_other():
    """The language model's pretraining packs its texts into rows (positions restart per text): the loss is the
    padded batch's, and no text's first token is predicted from the text before it."""
    import torch

    from llavakit.data.collate import LlavaCollator
    from llavakit.demo.backbones import new_llama, train_tokenizer

    tok = train_tokenizer(["a red circle at the top left", "a blue square"] * 50, vocab_size=60,
                          extra_special_tokens=[])
    model = new_llama(tok, 64, 2, 2, 128).eval()
    gen = torch.Generator().manual_seed(0)
    texts = []
    for n in (5, 17, 9, 30, 12, 3, 22):
        ids = torch.randint(3, len(tok), (n,), generator=gen)
        labels = ids.clone()
        labels[: n // 3] = -100
        texts.append((ids, labels))
    packed = LlavaCollator(pad_token_id=0, packing=True, packing_max_length=40)(
        [{"input_ids": i, "labels": lab} for i, lab in texts])  # as pretrain_language_model packs them
    ids, labels, positions = packed["input_ids"], packed["labels"], packed["position_ids"]
    assert ids.shape[0] == 3 and ids.shape[1] <= 40  # 98 tokens in rows of at most 40
    starts = (positions == 0).nonzero().tolist()
    assert all(labels[r, c] == -100 for r, c in starts)
    length = max(len(t[0]) for t in texts)
    pad_ids, pad_labels = torch.zeros(len(texts), length, dtype=torch.long), torch.full((len(texts), length), -100)
    mask = torch.zeros_like(pad_ids)
    for b, (i, lab) in enumerate(texts):
        pad_ids[b, :len(i)], pad_labels[b, :len(i)], mask[b, :len(i)] = i, lab, 1
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=positions, labels=labels, use_cache=False).loss
        padded = model(input_ids=pad_ids, attention_mask=mask, labels=pad_labels).loss
    assert torch.allclose(packed, padded, atol=1e-5)


def test_descriptions_are_one_token_per_quadrant_and_captions_follow_the_quadrants(tmp_path):
    """The language model's pretraining reads one word per quadrant where the image's 4 tokens will be; a
    caption lists the objects from the top left to the bottom right, so the description decides it."""
    from llavakit.demo.backbones import train_tokenizer
    from llavakit.demo.run import question_answer_text
    from llavakit.demo.scenes import DESCRIPTION_WORDS, PLACES, caption, describe, named_objects

    data = write_dataset(tmp_path, 60, 1, 56, seed=0)
    tok = train_tokenizer([c["conversations"][1]["value"] for c in data["captions"]], vocab_size=200,
                          extra_special_tokens=[])
    tok.add_tokens(list(DESCRIPTION_WORDS))
    assert len(DESCRIPTION_WORDS) == len(PLACES) * (1 + 2 * 4 * 3)  # empty, or size × colour × shape
    for scene in data["scenes"].values():
        words = describe(scene)
        assert len(words) == 4 and all(len(tok(w, add_special_tokens=False)["input_ids"]) == 1 for w in words)
        assert sum("empty" not in w for w in words) == len(scene.objects)
        text = caption(scene)
        places = [p for p in PLACES if f"at the {p}" in text]
        assert places == sorted(places, key=PLACES.index) and len(places) == len(scene.objects)
        assert named_objects(scene, text) == len(scene.objects)
    record = next(r for r in data["instruct"] if "image" in r)
    qa = question_answer_text(record)
    assert qa["image"] == record["image"] and qa["conversations"][0]["value"] == "<image>"
    assert "<image>" not in qa["conversations"][1]["value"] and qa["conversations"][1]["value"].endswith(".")


def test_language_model_pretraining_reads_descriptions_in_place_of_the_image(tmp_path):
    """Two steps on a few records: the description's ids sit where the image's tokens go (the template's
    encoding), the model and its tokenizer (no image token added) load back; a description that does not fit
    the image's token count is refused."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llavakit.demo.backbones import train_tokenizer
    from llavakit.demo.pretrain import pretrain_language_model
    from llavakit.demo.scenes import DESCRIPTION_WORDS, describe

    data = write_dataset(tmp_path / "d", 8, 1, 56, seed=0)
    tok = train_tokenizer([c["conversations"][1]["value"] for c in data["captions"]], vocab_size=200,
                          extra_special_tokens=[])
    tok.add_tokens(list(DESCRIPTION_WORDS))
    examples = [(r, describe(data["scenes"][r["image"]])) for r in data["captions"]]
    losses = pretrain_language_model(tok, examples, tmp_path / "lm", hidden=32, layers=1, steps=2, image_tokens=4,
                                     batch=4)
    assert len(losses) == 2 and all(x == x for x in losses)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "lm").config.vocab_size == len(tok)
    assert "<image>" not in AutoTokenizer.from_pretrained(tmp_path / "lm").get_vocab()
    with pytest.raises(ValueError, match="image positions"):
        pretrain_language_model(tok, [(examples[0][0], examples[0][1][:3])], tmp_path / "lm2", hidden=32,
                                layers=1, steps=1, image_tokens=4, batch=2)


def test_composed_descriptions_share_their_parts_and_train(tmp_path):
    """With ``parts``, a description word's saved embedding is the sum of its parts': swapping the colour
    moves two different words by the same vector. The parts train (they are what the model reads), and the
    words' embeddings are written into the plain Llama that is saved."""
    import torch
    from transformers import AutoModelForCausalLM

    from llavakit.demo.backbones import train_tokenizer
    from llavakit.demo.pretrain import pretrain_language_model
    from llavakit.demo.scenes import DESCRIPTION_WORDS, describe, description_parts

    assert description_parts("[top-left:large-red-circle]") == ("top-left", "large", "red", "circle")
    assert description_parts("[bottom-right:empty]") == ("bottom-right", "empty")
    data = write_dataset(tmp_path / "d", 8, 1, 56, seed=0)
    tok = train_tokenizer([c["conversations"][1]["value"] for c in data["captions"]], vocab_size=200,
                          extra_special_tokens=[])
    tok.add_tokens(list(DESCRIPTION_WORDS))
    examples = [(r, describe(data["scenes"][r["image"]])) for r in data["captions"]]
    parts = {w: description_parts(w) for w in DESCRIPTION_WORDS}
    for steps, out in ((0, tmp_path / "lm0"), (3, tmp_path / "lm3")):
        pretrain_language_model(tok, examples, out, hidden=32, layers=1, steps=steps, image_tokens=4, batch=4,
                                parts=parts)
    emb = {name: AutoModelForCausalLM.from_pretrained(tmp_path / name).get_input_embeddings().weight.detach()
           for name in ("lm0", "lm3")}

    def row(name, word):
        return emb[name][tok.convert_tokens_to_ids(word)]

    for name in ("lm0", "lm3"):
        a = row(name, "[top-left:large-red-circle]") - row(name, "[top-left:large-blue-circle]")
        b = row(name, "[bottom-right:small-red-square]") - row(name, "[bottom-right:small-blue-square]")
        assert torch.allclose(a, b, atol=1e-6) and a.norm() > 0
    used = describe(data["scenes"][examples[0][0]["image"]])[0]
    assert not torch.allclose(row("lm0", used), row("lm3", used))  # trained


def test_language_model_pretraining_is_deterministic(tmp_path):
    """Two pretrainings with one seed give the same losses, bit for bit (composed descriptions included: their
    gradient is a product's, not an indexed write's, which threads add up in no fixed order)."""
    from llavakit.demo.backbones import train_tokenizer
    from llavakit.demo.pretrain import pretrain_language_model
    from llavakit.demo.scenes import DESCRIPTION_WORDS, describe, description_parts

    data = write_dataset(tmp_path / "d", 200, 1, 56, seed=0)
    tok = train_tokenizer([c["conversations"][1]["value"] for c in data["captions"]], vocab_size=200,
                          extra_special_tokens=[])
    tok.add_tokens(list(DESCRIPTION_WORDS))
    examples = [(r, describe(data["scenes"][r["image"]])) for r in data["captions"] + data["object_lists"]]
    parts = {w: description_parts(w) for w in DESCRIPTION_WORDS}
    runs = [pretrain_language_model(tok, examples, tmp_path / f"lm{k}", hidden=128, layers=1, steps=30,
                                    image_tokens=4, batch=64, parts=parts) for k in range(2)]
    assert runs[0] == runs[1]


# ---- llavakit demo --anyres ----------------------------------------------------------------------------
def test_anyres_demo_patterns_vanish_in_the_base_view_and_stay_in_the_tiles():
    """The demo's premise, through the training transforms: the three patterns (same colour, place, grey and
    shift) give base views whose square is the same flat tint (only its rim differs, by a few levels: which
    line a pattern starts with), while the AnyRes tile holding the square tells them apart
    everywhere."""
    import random

    import numpy as np

    from llavakit.data.anyres import AnyRes, parse_grid_pinpoints
    from llavakit.data.images import ImageTransform
    from llavakit.demo.anyres import PATTERNS, AnyResDemoConfig, draw

    cfg = AnyResDemoConfig()
    anyres = AnyRes(parse_grid_pinpoints([[56, 56]], cfg.tile), cfg.tile, cfg.patch)
    transform = ImageTransform(shortest_edge=cfg.tile, crop_hw=(cfg.tile, cfg.tile), aspect_ratio="anyres",
                               anyres=anyres)
    for quadrant in range(4):
        images = {p: draw("blue", p, quadrant, cfg, random.Random(7)) for p in PATTERNS}
        views = {p: transform.views(im).astype(int) for p, im in images.items()}
        assert all(v.shape == (5, 3, cfg.tile, cfg.tile) for v in views.values())  # base view + 4 tiles
        rows, cols = np.nonzero(np.asarray(images["checked"]).std(-1) > 0)  # the square, at full resolution
        top, left, bottom, right = rows.min() // 2 + 2, cols.min() // 2 + 2, rows.max() // 2 - 1, cols.max() // 2 - 1
        assert bottom - top >= 6 and right - left >= 6
        for a, b in (("horizontal", "vertical"), ("horizontal", "checked"), ("vertical", "checked")):
            inside = np.abs(views[a][0] - views[b][0])[:, top:bottom, left:right]
            assert inside.max() <= 1, (quadrant, a, b)
            tile = np.abs(views[a][1 + quadrant] - views[b][1 + quadrant])
            assert tile.max() >= 100 and (tile.max(0) >= 100).mean() > 0.25, (quadrant, a, b)


@pytest.mark.slow
def test_anyres_demo_quick_from_the_cli(tmp_path):
    """``llavakit demo --anyres --quick``: both models trained from the same backbones on the same records
    (AnyRes reads 20 more image tokens per sample), both load as transformers' native classes, and the
    summary, table and views are written."""
    import sys

    from PIL import Image
    from transformers import AutoConfig

    from llavakit.demo.anyres import ANSWER_SETS as ANYRES_ANSWERS

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "llavakit", "demo", "--anyres", "--quick", "--output", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    base, anyres = s["base"], s["anyres"]
    assert (base["image_tokens"], anyres["image_tokens"]) == (4, 24)
    n = s["config"]["n_train"] * s["config"]["epochs"]
    assert anyres["tokens_trained"] - base["tokens_trained"] == 20 * n
    assert set(base["per_type"]) == set(anyres["per_type"]) == set(ANYRES_ANSWERS) == set(s["chance_per_type"])
    assert s["heldout_questions"] == 3 * s["config"]["n_test"]
    assert set(s["phase_seconds"]) == {"data", "backbones", "stage2_base", "stage2_anyres", "report"}
    assert AutoConfig.from_pretrained(out / "base").model_type == "llava"
    assert AutoConfig.from_pretrained(out / "anyres").model_type == "llava_next"
    assert Image.open(out / "views.png").size[0] == 3 * 56 * 4 + 4 * 8
    assert "AnyRes" in r.stdout and "pattern" in r.stdout
