"""`llavakit data preview` and `llavakit data check` through the real command line."""

import json
import subprocess
import sys

from llavakit import IGNORE_INDEX
from llavakit.cli import main

from .conftest import conv, write_json


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "llavakit", *args], capture_output=True, text=True, timeout=120)


def test_preview_json_one_object_per_record_in_file_order(tmp_path, tokenizer_dir, tokenizer, sample_records):
    data = write_json(tmp_path / "d.json", sample_records)
    r = run_cli("data", "preview", "--data_path", str(data), "--tokenizer", tokenizer_dir, "--version", "v1",
                "--num_image_tokens", "5", "--json")
    assert r.returncode == 0, r.stderr
    items = [json.loads(line) for line in r.stdout.splitlines()]
    assert [i["id"] for i in items] == ["img1", "img2", "txt1", "img3"]
    first = items[0]
    assert set(first) >= {"id", "prompt", "input_ids", "labels", "image_token_id", "image_tokens"}
    assert first["image_tokens"] == [5]  # per image
    assert first["input_ids"].count(first["image_token_id"]) == 5
    assert "USER: <image>\nWhat colour is the circle? ASSISTANT: The circle is red.</s>" in first["prompt"]
    sup = [t for t, lab in zip(first["input_ids"], first["labels"]) if lab != IGNORE_INDEX]
    assert tokenizer.decode(sup) == "The circle is red.</s>"


def test_preview_readable_highlights_supervised_text(tmp_path, tokenizer_dir, sample_records, capsys):
    data = write_json(tmp_path / "d.json", sample_records)
    rc = main(["data", "preview", "--data_path", str(data), "--tokenizer", tokenizer_dir, "--limit", "1",
               "--num_image_tokens", "3"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "<image×3>" in out and "[[The circle is red.</s>]]" in out and "img2" not in out


def test_preview_reports_invalid_records_and_fails(tmp_path, tokenizer_dir, sample_records):
    data = write_json(tmp_path / "d.json", sample_records + [{"id": "bad", "conversations": conv("q", "")}])
    r = run_cli("data", "preview", "--data_path", str(data), "--tokenizer", tokenizer_dir, "--json")
    assert r.returncode == 1
    last = json.loads(r.stdout.splitlines()[-1])
    assert last["id"] == "bad" and "empty" in last["error"]


def test_check_json_lists_every_problem_and_exits_nonzero(tmp_path, tokenizer_dir, sample_records, image_folder):
    recs = sample_records + [
        {"id": "missing", "image": "coco/none.jpg", "conversations": conv("<image>\nq", "a")},
        {"id": "noimg", "conversations": conv("<image>\nq", "a")},
        {"id": "roles", "conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
    ]
    (image_folder / "gqa" / "c.jpg").write_bytes(b"\xff\xd8 broken")
    data = write_json(tmp_path / "d.json", recs)
    r = run_cli("data", "check", "--data_path", str(data), "--image_folder", str(image_folder), "--json",
                "--tokenizer", tokenizer_dir, "--model_max_length", "2048")
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    assert rep["total"] == 7 and rep["ok"] == 3
    kinds = {(p["id"], p["kind"]) for p in rep["problems"]}
    assert kinds == {("img3", "bad_image"), ("missing", "missing_image"),
                     ("noimg", "unexpected_image_token"), ("roles", "role_order")}
    assert all(set(p) == {"index", "id", "kind", "message"} for p in rep["problems"])
    assert rep["token_lengths"]["max"] > 576


def test_check_clean_file_exits_zero_with_summary(tmp_path, sample_records, image_folder, capsys):
    data = write_json(tmp_path / "d.json", sample_records)
    rc = main(["data", "check", "--data_path", str(data), "--image_folder", str(image_folder)])
    out = capsys.readouterr().out
    assert rc == 0 and "4 records, 4 ok" in out and "no problems found" in out


def test_check_unreadable_file(tmp_path, capsys):
    p = tmp_path / "x.json"
    p.write_text("[{")
    rc = main(["data", "check", "--data_path", str(p), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert rc == 1 and rep["problems"][0]["kind"] == "unreadable_file" and "line 1" in rep["problems"][0]["message"]
