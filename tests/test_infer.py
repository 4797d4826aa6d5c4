"""Merging LoRA, loading every kind of output, and the inference commands: predict, chat, serve."""

import base64
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from llavakit.cli import main as cli
from llavakit.model.build import ModelLoadError

from .conftest import llava_inputs, make_image, serving


@pytest.fixture(scope="module")
def merged(lora_run, tmp_path_factory):
    """The adapter copied under an unrelated name (nothing may depend on directory names), then merged."""
    root = tmp_path_factory.mktemp("merge")
    adapter = root / "some-name"
    shutil.copytree(lora_run["out"], adapter)
    out = root / "merged"
    assert cli(["merge-lora", "--model-path", str(adapter), "--save-model-path", str(out)]) == 0
    return {"adapter": adapter, "out": out}


def test_merged_and_unmerged_lora_give_the_same_logits(merged, train_data, backbones):
    from peft import PeftModel
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from llavakit.model.build import assemble

    processor = AutoProcessor.from_pretrained(merged["out"])
    inputs = llava_inputs(processor, os.path.join(train_data["images"], "coco", "1.jpg"))
    base = assemble(backbones["llm"], backbones["clip"]).model.eval()
    with torch.no_grad():
        base_logits = base(**inputs).logits
    unmerged = PeftModel.from_pretrained(base, str(merged["adapter"])).eval()
    merged_model = LlavaForConditionalGeneration.from_pretrained(merged["out"]).eval()
    with torch.no_grad():
        a = unmerged(**inputs).logits
        b = merged_model(**inputs).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - base_logits).abs().max() > 1e-3  # the adapter and the projector did change the model
    assert not (merged["out"] / "adapter_config.json").exists()
    gen = json.loads((merged["out"] / "generation_config.json").read_text())
    assert gen["eos_token_id"] is not None


def test_a_lora_directory_loads_for_inference_directly(lora_run, merged, train_data):
    from llavakit.model.load import load_llava

    img = os.path.join(train_data["images"], "coco", "2.jpg")
    direct = load_llava(str(lora_run["out"]), device="cpu")
    saved = load_llava(str(merged["out"]), device="cpu")
    assert direct.kind == "lora" and saved.kind == "llava-hf"
    with torch.no_grad():
        a = direct.model(**llava_inputs(direct.processor, img)).logits
        b = saved.model(**llava_inputs(saved.processor, img)).logits
    assert (a - b).abs().max() < 1e-4


def test_merge_without_a_base_record_asks_for_model_base(lora_run, stage2, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_run["out"], adapter)
    (adapter / "llavakit_base.json").unlink()
    from llavakit.model.load import merge_lora

    with pytest.raises(ModelLoadError, match="--model-base"):
        merge_lora(str(adapter))


def test_loading_refuses_a_language_model_and_a_missing_path(backbones, tmp_path):
    from llavakit.model.load import load_llava

    with pytest.raises(ModelLoadError, match="not a transformers-native LLaVA"):
        load_llava(backbones["llm"], device="cpu")
    assert cli(["predict", "--model-path", str(tmp_path / "nope"), "--question-file", str(tmp_path / "q.jsonl"),
                "--answers-file", str(tmp_path / "a.jsonl")]) == 2


# ---- predict ------------------------------------------------------------------------------------
def _questions(path, images):
    qs = [{"question_id": f"q{i}", "image": f"coco/{i}.jpg", "text": "What colour is the circle?",
           "category": "colour"} for i in range(4)]
    qs.append({"question_id": "t0", "text": "Tell me a story about a cat."})
    path.write_text("".join(json.dumps(q) + "\n" for q in qs))
    return qs


def _read(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_predict_writes_llava_answer_lines_and_resumes(stage2, train_data, tmp_path):
    qfile = tmp_path / "questions.jsonl"
    _questions(qfile, train_data["images"])
    answers = tmp_path / "out" / "answers.jsonl"
    args = ["predict", "--model-path", str(stage2["out"]), "--question-file", str(qfile), "--image-folder",
            train_data["images"], "--answers-file", str(answers), "--batch-size", "2", "--max-new-tokens", "4"]
    r = subprocess.run([sys.executable, "-m", "llavakit", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    first = _read(answers)
    assert [a["question_id"] for a in first] == ["q0", "q1", "q2", "q3", "t0"]
    for a in first:
        assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert a["model_id"] == stage2["out"].name and isinstance(a["text"], str)
    assert first[0]["prompt"] == "What colour is the circle?"

    # a crash after two answers and half a line: the cut line goes, only the missing ones are answered
    lines = answers.read_text().splitlines(keepends=True)
    answers.write_text("".join(lines[:2]) + lines[2][:15])
    assert cli(args) == 0
    again = _read(answers)
    assert [a["question_id"] for a in again] == ["q0", "q1", "q2", "q3", "t0"]
    assert [a["answer_id"] for a in again[:2]] == [a["answer_id"] for a in first[:2]]
    assert [a["text"] for a in again] == [a["text"] for a in first]  # greedy: the same answers
    assert cli(args) == 0 and len(_read(answers)) == 5  # all done: nothing added


def test_predict_chunks_split_like_llava(stage2, train_data, tmp_path):
    from llavakit.infer.predict import get_chunk

    assert get_chunk(list(range(5)), 2, 0) == [0, 1, 2] and get_chunk(list(range(5)), 2, 1) == [3, 4]
    qfile = tmp_path / "q.jsonl"
    _questions(qfile, train_data["images"])
    out = tmp_path / "chunk1.jsonl"
    assert cli(["predict", "--model-path", str(stage2["out"]), "--question-file", str(qfile), "--image-folder",
                train_data["images"], "--answers-file", str(out), "--num-chunks", "2", "--chunk-idx", "1",
                "--max-new-tokens", "2"]) == 0
    assert [a["question_id"] for a in _read(out)] == ["q3", "t0"]


def test_predict_names_the_bad_question_line_before_loading(stage2, train_data, tmp_path, capsys):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question_id": 1, "image": "coco/missing.jpg", "text": "?"}) + "\n")
    code = cli(["predict", "--model-path", str(stage2["out"]), "--question-file", str(qfile), "--image-folder",
                train_data["images"], "--answers-file", str(tmp_path / "a.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and "q.jsonl:1" in err and "missing.jpg not found" in err


# ---- chat -----------------------------------------------------------------------------------------
def test_chat_multi_turn_with_two_images_through_stdin(stage2, train_data):
    img_a = os.path.join(train_data["images"], "coco", "1.jpg")
    img_b = os.path.join(train_data["images"], "coco", "2.jpg")
    r = subprocess.run([sys.executable, "-m", "llavakit", "chat", "--model-path", str(stage2["out"]),
                        "--image-file", img_a, "--image-file", img_b, "--max-new-tokens", "4"],
                       input="What colour is the circle?\n\nIs there a square?\nexit\nnever asked\n",
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines if ln.startswith(("USER", "ASSISTANT"))] == \
        ["USER", "ASSISTANT", "USER", "ASSISTANT"]
    assert "never asked" not in r.stdout


def test_chat_streams_the_answer_and_keeps_the_history(stage2, train_data):
    from llavakit.infer.chat import run_chat
    from llavakit.infer.generate import Predictor, Sampling

    predictor = Predictor.from_pretrained(str(stage2["out"]), device="cpu")
    writes = []

    class Out(io.StringIO):
        def write(self, s):
            writes.append(s)
            return super().write(s)

    img = os.path.join(train_data["images"], "coco", "1.jpg")
    messages = run_chat(predictor, [img], Sampling(max_new_tokens=6),
                        stdin=io.StringIO("What colour is the circle?\nIs there a square?\n"), stdout=Out())
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [p["type"] for p in messages[0]["content"]] == ["image", "text"]
    assert [p["type"] for p in messages[2]["content"]] == ["text"]
    # the second prompt holds the whole first exchange, rendered with the training template
    prompt = predictor.render(messages[:3])
    first_answer = messages[1]["content"][0]["text"]
    assert prompt.count("USER: ") == 2 and f"ASSISTANT: {first_answer}</s>" in prompt
    # what was streamed piece by piece is the non-streamed answer
    assert first_answer == predictor.chat(messages[:1], [img], Sampling(max_new_tokens=6))


# ---- serve ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(stage2):
    with serving(stage2["out"], "--max-new-tokens", "8") as (_, port):
        yield f"http://127.0.0.1:{port}/v1"


def _data_url(path) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(open(path, "rb").read()).decode()


def test_server_answers_the_openai_client(server, train_data, stage2):
    import openai

    from llavakit.infer.generate import Predictor, Sampling, user_message

    client = openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=120)
    assert [m.id for m in client.models.list().data] == [stage2["out"].name]
    img = os.path.join(train_data["images"], "coco", "3.jpg")
    messages = [{"role": "user", "content": [
        {"type": "text", "text": "What colour is the circle?"},
        {"type": "image_url", "image_url": {"url": _data_url(img)}}]}]
    resp = client.chat.completions.create(model="m", messages=messages, max_tokens=5)
    text = resp.choices[0].message.content
    assert resp.choices[0].message.role == "assistant" and resp.usage.prompt_tokens > 0
    # the same answer as the model gives locally, so the image did reach it
    local = Predictor.from_pretrained(str(stage2["out"]), device="cpu").chat(
        [user_message("What colour is the circle?", 1)], [img], Sampling(max_new_tokens=5))
    assert text == local

    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=5, stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed.strip() == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_server_fetches_nothing_by_default(server, train_data):
    import openai

    client = openai.OpenAI(base_url=server, api_key="none", max_retries=0, timeout=60)
    img = os.path.join(train_data["images"], "coco", "3.jpg")
    for url, words in (("http://127.0.0.1:9/x.png", "remote URLs are not fetched"),
                       (img, "local files are not read"), ("data:image/png;base64,???", "base64")):
        with pytest.raises(openai.BadRequestError, match=words):
            client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": url}}]}])
    with pytest.raises(openai.BadRequestError, match="last message"):
        client.chat.completions.create(model="m", max_tokens=2, messages=[{"role": "assistant", "content": "x"}])


def test_local_images_only_when_enabled(stage2, train_data, tmp_path):
    from llavakit.infer.serve import RequestError, ServeOptions, load_image_url

    img = make_image(tmp_path / "x.png", (20, 30), fmt="PNG")
    with pytest.raises(RequestError):
        load_image_url(str(img), ServeOptions("m"))
    assert load_image_url(f"file://{img}", ServeOptions("m", allow_local_files=True)).size == (20, 30)
