"""The demo: deterministic synthetic data, and the whole path end to end (`llavakit demo --quick`)."""

import hashlib
import json
import subprocess
import sys

import pytest

from llavakit.demo.scenes import ANSWER_SETS, chance_accuracy, write_dataset


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
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    r = subprocess.run([sys.executable, "-m", "llavakit", "demo", "--quick", "--output", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    for key in ("heldout_accuracy", "stage1_only_accuracy", "chance_accuracy", "per_type", "wall_seconds"):
        assert key in s
    assert set(s["per_type"]) == set(ANSWER_SETS)
    # the quick run is short: it must beat guessing overall and have learned to count from the image
    assert s["heldout_accuracy"] >= s["chance_accuracy"] + 0.05
    assert s["per_type"]["count"] >= 0.6
    assert (out / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "question type" in r.stdout and "stage 2" in r.stdout
    from transformers import AutoModelForImageTextToText

    assert AutoModelForImageTextToText.from_pretrained(out / "stage2").config.model_type == "llava"


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
