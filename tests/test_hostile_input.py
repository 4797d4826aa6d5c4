"""Hostile and careless input, as regression tests: each case checks the exit code, that no traceback is
printed, that the message names the thing at fault, and that nothing was written outside its folder or
replaced. (The bad-record corpus is in test_records.py.)"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from PIL import Image

from llavakit.cli import main as cli

from .conftest import (
    make_image,
    serving,
    stage1_config,
    stage1_flags,
    stage2_flags,
    write_json,
    write_jsonl,
)
from .test_data_tools import FileServer


@pytest.fixture(autouse=True)
def fresh_logging():
    """An in-process run configures logging onto the stderr of its time; pytest closes that stream after the
    test, so each test here starts with no handlers bound to an old one."""
    import logging

    logging.getLogger().handlers.clear()
    yield


def run_cli(capsys, *args) -> tuple[int, str]:
    code = cli(list(args))
    out = capsys.readouterr()
    text = out.out + out.err
    assert "Traceback" not in text
    return code, text


def train(capsys, flags) -> tuple[int, str]:
    from llavakit.train.entry import main

    code = main(flags)
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.err


def files_under(d: Path) -> set[str]:
    return {str(p.relative_to(d)) for p in d.rglob("*")} if d.exists() else set()


# ---- downloads: nothing written outside --root, refused before anything is fetched -----------------
@pytest.mark.parametrize("entry,words", [
    ({"path": "../../escape.txt"}, "leaves"),
    ({"path": "/tmp/llavakit-abs-escape.txt"}, "relative path"),
    ({"path": "ok.txt", "unpack": "../../dir"}, "leaves"),
    ({"path": "ok.txt", "unpack": True}, "'unpack' is the folder"),
    ({"path": "~/x.txt"}, "relative path"),
    ({"url": "file:///etc/passwd", "path": "passwd"}, "only http://"),
])
def test_a_manifest_cannot_write_outside_the_root(tmp_path, capsys, entry, words):
    srv = FileServer({"/hello.txt": b"hello"})
    try:
        good = {"url": f"{srv.url}/hello.txt", "path": "first.txt"}
        bad = {"url": f"{srv.url}/hello.txt", **entry}
        manifest = write_json(tmp_path / "m.json", {"files": [good, bad]})
        root = tmp_path / "work" / "r" / "sub"
        before = files_under(tmp_path)
        code, text = run_cli(capsys, "data", "download", "--manifest", str(manifest), "--root", str(root))
        assert code == 2 and "m.json: files[1]" in text and words in text
        assert not srv.requests  # refused before the first (good) file was fetched
        assert files_under(tmp_path) == before
        assert not os.path.exists("/tmp/llavakit-abs-escape.txt")
    finally:
        srv.close()


# ---- training: no finished model overwritten, sentences instead of tracebacks --------------------
def test_training_into_a_finished_run_is_refused(backbones, train_data, stage2, tmp_path, capsys):
    out = tmp_path / "done"
    out.mkdir()
    for f in ("model.safetensors", "config.json"):
        shutil.copy(stage2["out"] / f, out / f)
    weights = (out / "model.safetensors").read_bytes()
    code, err = train(capsys, stage1_flags(backbones, train_data, out, max_steps=1))
    assert code == 2 and "finished run" in err and "model.safetensors" in err and "--overwrite_output_dir" in err
    assert (out / "model.safetensors").read_bytes() == weights
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]  # nothing else written


@pytest.mark.parametrize("case", ["no_config", "empty_tower", "missing_model", "output_is_file", "too_short"])
def test_training_input_errors_are_sentences(backbones, train_data, tmp_path, capsys, case):
    out = tmp_path / "out"
    over: dict = {}
    if case == "no_config":  # tokenizer files but no config.json
        d = tmp_path / "llm"
        d.mkdir()
        for f in os.listdir(backbones["llm"]):
            if f.startswith("tokenizer"):
                shutil.copy(os.path.join(backbones["llm"], f), d / f)
        over["model_name_or_path"], words = str(d), ["no config.json", str(d)]
    elif case == "empty_tower":
        (tmp_path / "tower").mkdir()
        over["vision_tower"], words = str(tmp_path / "tower"), ["--vision_tower", "no config.json"]
    elif case == "missing_model":
        over["model_name_or_path"], words = "/nonexistent/vicuna-7b", ["/nonexistent/vicuna-7b", "no such directory"]
    elif case == "output_is_file":
        out = tmp_path / "afile"
        out.write_text("x")
        words = ["is a file"]
    else:  # stage 2's system prompt alone is longer than 8 tokens: every answer would be cut
        over["model_max_length"], words = "8", ["no sample left", "--model_max_length 8", "skipped"]
    flags = stage1_flags(backbones, train_data, out, max_steps=1, **over)
    if case == "too_short":
        flags = stage2_flags(backbones, train_data, out, None, max_steps=1, pretrain_mm_mlp_adapter=None, **over)
    code, err = train(capsys, flags)
    assert code == 2, err
    assert all(w in err for w in words), err
    assert not (out / "llavakit_config.yaml").exists() if out.is_dir() else True  # a failed run leaves no config


def test_a_projector_file_with_objects_is_refused_without_suggesting_unsafe_loading(tmp_path):
    from llavakit.model.projector import ProjectorFileError, read_projector_file

    path = tmp_path / "mm_projector.bin"
    torch.save({"model.mm_projector.0.weight": torch.zeros(2, 2), "extra": Path("x")}, path)
    with pytest.raises(ProjectorFileError) as e:
        read_projector_file(str(path))
    assert "weights_only=False" not in str(e.value) and "does not unpickle" in str(e.value)
    assert str(path) in str(e.value)


def test_the_stage1_summary_without_logged_loss(backbones, train_data, tmp_path, capsys):
    from llavakit.train.entry import run

    res = run(stage1_config(backbones, train_data, tmp_path / "s1", max_steps=1, logging_steps=10))
    out = capsys.readouterr().out
    assert "None -> None" not in out and "none logged" in out and res.summary["steps"] == 1


def test_train_help_names_the_command_yaml_and_old_spellings():
    r = subprocess.run([sys.executable, "-m", "llavakit", "train", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    assert r.stdout.startswith("usage: llavakit train") and "RUN.yaml" in r.stdout
    assert "--evaluation_strategy" in r.stdout and "--gradient_checkpointing" in r.stdout


# ---- data: over-long text and huge images are measured, not swallowed ---------------------------
def test_a_50_mb_string_is_reported_without_tokenizing_it(tmp_path, tokenizer_dir, image_folder):
    big = "x" * (50 * 2**20)
    records = [{"id": "huge", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": big}]},
               {"id": "ok", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yes."}]}]
    data = write_json(tmp_path / "d.json", records)
    code = ("import resource, sys; from llavakit.cli import main; rc = main(sys.argv[1:]); "
            "print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code, "data", "check", "--data_path", str(data), "--tokenizer",
                        tokenizer_dir, "--version", "v1", "--model_max_length", "64", "--num_image_tokens", "4"],
                       capture_output=True, text=True, timeout=300)
    took = time.time() - t0
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "huge" in r.stdout + r.stderr and "not tokenized" in r.stdout + r.stderr
    peak_mb = int(r.stdout.split("maxrss_kb")[1].split()[0]) / 1024
    assert peak_mb < 2000, peak_mb  # bounded by the limit, not the input (it took 21 GB)
    assert took < 120
    p = subprocess.run([sys.executable, "-m", "llavakit", "data", "preview", "--data_path", str(data),
                        "--tokenizer", tokenizer_dir, "--version", "v1", "--num_image_tokens", "4"],
                       capture_output=True, text=True, timeout=300)
    assert "Traceback" not in p.stderr and "MemoryError" not in p.stderr and "not tokenized" in p.stdout + p.stderr


def huge_png(path: Path, size=(12000, 12000)) -> Path:
    Image.new("1", size).save(path)  # 144 million pixels in a few KB
    return path


def test_one_pixel_limit_for_check_and_training(tmp_path, capsys, monkeypatch):
    from llavakit.data.images import ImageLoadError, open_image

    (tmp_path / "imgs").mkdir()
    big = huge_png(tmp_path / "imgs" / "big.png")
    make_image(tmp_path / "imgs" / "small.png", (64, 48), fmt="PNG")
    t0 = time.time()
    with pytest.raises(ImageLoadError, match="144,000,000 pixels, over the limit of 50,000,000"):
        open_image(big)
    assert time.time() - t0 < 1.0  # refused from the header, nothing decoded
    data = write_json(tmp_path / "d.json", [
        {"id": "big", "image": "big.png", "conversations": [{"from": "human", "value": "<image>\nHi"},
                                                          {"from": "gpt", "value": "Yes."}]}])
    code, text = run_cli(capsys, "data", "check", "--data_path", str(data), "--image_folder", str(tmp_path / "imgs"))
    assert code == 1 and "big.png" in text and "over the limit" in text and "DecompressionBomb" not in text
    monkeypatch.setenv("LLAVAKIT_MAX_IMAGE_PIXELS", "1000")
    with pytest.raises(ImageLoadError, match="LLAVAKIT_MAX_IMAGE_PIXELS"):
        open_image(tmp_path / "imgs" / "small.png")


def test_an_empty_dataset_is_a_problem(tmp_path, capsys):
    data = write_json(tmp_path / "empty.json", [])
    code, text = run_cli(capsys, "data", "check", "--data_path", str(data))
    assert code == 1 and "holds no record" in text and "no problems found" not in text


def test_preview_with_a_missing_tokenizer(tmp_path, capsys, train_data):
    code, text = run_cli(capsys, "data", "preview", "--data_path", train_data["instruct"], "--tokenizer",
                         str(tmp_path / "nope"), "--version", "v1")
    assert code == 2 and str(tmp_path / "nope") in text and "no such tokenizer directory" in text


# ---- eval score: input that is not the benchmark's format is refused, with its line ----------------
def test_llava_bench_refuses_a_file_that_is_not_a_review_file(tmp_path, capsys):
    answers = write_jsonl(tmp_path / "pope_answers.jsonl", [{"question_id": 1, "prompt": "q", "text": "yes"}])
    code, text = run_cli(capsys, "eval", "score", "--benchmark", "llava-bench", "--answers-file", str(answers))
    assert code == 2 and "line 1" in text and "not a GPT review file" in text and "100.00" not in text


def pope_files(tmp_path: Path, answers: list[dict]) -> list[str]:
    q = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "a.jpg", "text": "?", "category": "random"},
                                            {"question_id": 2, "image": "b.jpg", "text": "?", "category": "random"}])
    ann = tmp_path / "coco"
    ann.mkdir()
    for split in ("adversarial", "popular", "random"):
        write_jsonl(ann / f"coco_pope_{split}.json",
                    [{"label": "yes"}, {"label": "no"}] if split == "random" else [])
    a = write_jsonl(tmp_path / "a.jsonl", answers)
    return ["--answers-file", str(a), "--question-file", str(q), "--annotations", str(ann)]


def test_pope_answers_without_text_name_the_line(tmp_path, capsys):
    args = pope_files(tmp_path, [{"question_id": 1, "text": "yes"}, {"question_id": 2, "answer": "no"}])
    code, text = run_cli(capsys, "eval", "score", "--benchmark", "pope", *args)
    assert code == 2 and "a.jsonl: line 2" in text and "'text'" in text


def test_question_ids_as_strings_match_numbers(tmp_path, capsys):
    args = pope_files(tmp_path, [{"question_id": "1", "text": "yes"}, {"question_id": "2", "text": "no"}])
    code, text = run_cli(capsys, "eval", "score", "--benchmark", "pope", *args, "--json")
    assert code == 0 and json.loads(text)["score"] > 0


def test_gqa_annotations_given_as_a_directory(tmp_path, capsys):
    a = write_jsonl(tmp_path / "a.jsonl", [{"question_id": 1, "text": "yes"}])
    code, text = run_cli(capsys, "eval", "score", "--benchmark", "gqa", "--answers-file", str(a),
                         "--annotations", str(tmp_path))
    assert code == 2 and str(tmp_path) in text and "a directory" in text


def test_eval_score_lists_the_benchmarks(capsys):
    with pytest.raises(SystemExit) as e:
        cli(["eval", "score", "--benchmark", "popee", "--answers-file", "x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "pope" in err and "mm-vet" in err


# ---- serve: bounded tokens, a client that leaves frees the model, a bounded queue -------------------
@pytest.fixture(scope="module")
def endless_model(stage2, tmp_path_factory):
    """The stage-2 model with no end-of-turn token, so a generation runs to max_tokens."""
    d = tmp_path_factory.mktemp("endless") / "m"
    shutil.copytree(stage2["out"], d, ignore=shutil.ignore_patterns("checkpoint-*"))
    gc = json.loads((d / "generation_config.json").read_text())
    gc["eos_token_id"] = None
    (d / "generation_config.json").write_text(json.dumps(gc))
    return d


@pytest.fixture(scope="module")
def hostile_server(endless_model):
    with serving(endless_model, "--max-new-tokens", "4", "--max-tokens-limit", "1500", "--max-queued", "0") \
            as (proc, port):
        yield {"url": f"http://127.0.0.1:{port}/v1/chat/completions", "port": port, "proc": proc}


def post(url: str, body: dict, timeout: float = 60) -> tuple[int, dict, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def ask(text="What colour is the circle?", **kw) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": text}], **kw}


@pytest.mark.parametrize("max_tokens", [100000, 1e9, 0, -3, "5"])
def test_max_tokens_is_bounded(hostile_server, max_tokens):
    status, body, _ = post(hostile_server["url"], ask(max_tokens=max_tokens))
    assert status == 400 and "max_tokens" in body["error"]["message"]


def test_image_placeholders_in_text_and_non_images_are_400s(hostile_server):
    status, body, _ = post(hostile_server["url"], ask("look: <image> here", max_tokens=2))
    assert status == 400 and "<image>" in body["error"]["message"]
    junk = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    status, body, _ = post(hostile_server["url"], {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": junk}}]}]})
    assert status == 400 and "BytesIO" not in body["error"]["message"] and "not an image" in body["error"]["message"]


def test_a_huge_image_is_refused_at_once(hostile_server, tmp_path):
    png = huge_png(tmp_path / "big.png")
    url = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode()
    t0 = time.time()
    status, body, _ = post(hostile_server["url"], {"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}]})
    assert status == 400 and "over the limit" in body["error"]["message"] and time.time() - t0 < 3


def test_a_client_that_leaves_frees_the_model_and_the_queue_is_bounded(hostile_server):
    # a long streamed answer: the client reads its first event, then a second request finds the model busy
    body = json.dumps(ask(max_tokens=1500, stream=True)).encode()
    s = socket.create_connection(("127.0.0.1", hostile_server["port"]), timeout=60)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    first = s.recv(4096)
    assert b"200" in first.split(b"\r\n")[0]
    status, err, headers = post(hostile_server["url"], ask(max_tokens=2), timeout=30)
    assert status == 503 and "busy" in err["error"]["message"] and headers.get("Retry-After") == "1"
    # the client goes away: the generation stops and the next request is answered
    s.close()
    t0 = time.time()
    while True:
        status, reply, _ = post(hostile_server["url"], ask(max_tokens=2), timeout=30)
        if status == 200 or time.time() - t0 > 20:
            break
        time.sleep(0.2)
    assert status == 200 and reply["usage"]["completion_tokens"] == 2
    assert time.time() - t0 < 20


def test_a_prompt_past_the_context_and_a_generation_cut_at_it(hostile_server, endless_model):
    from transformers import AutoConfig

    context = AutoConfig.from_pretrained(endless_model).text_config.max_position_embeddings
    status, body, _ = post(hostile_server["url"], ask("cat " * (context + 10), max_tokens=2))
    assert status == 400 and "context" in body["error"]["message"]


def test_predictor_stops_when_asked(stage2, train_data):
    from llavakit.infer.generate import Predictor, Sampling, user_message

    pred = Predictor.from_pretrained(str(stage2["out"]), device="cpu")
    pred.model.generation_config.eos_token_id = None
    inputs, sampling = pred.prepare([user_message("Hi", 0)], [], Sampling(max_new_tokens=200))
    calls = []
    usage: dict = {}
    list(pred.stream(inputs, sampling, usage, stop=lambda: calls.append(1) or len(calls) > 3))
    assert usage["completion_tokens"] <= 5
    # a generation is cut where the context ends
    ctx = pred.context_length
    _, capped = pred.prepare([user_message("Hi", 0)], [], Sampling(max_new_tokens=ctx * 2))
    assert capped.max_new_tokens == ctx - inputs["input_ids"].shape[1]


def test_image_bytes_named_in_errors(tmp_path):
    from llavakit.data.images import ImageLoadError, open_image

    with pytest.raises(ImageLoadError) as e:
        open_image(io.BytesIO(b"junk"), "image_url")
    assert "BytesIO" not in str(e.value) and str(e.value).startswith("image_url:")

