"""``llavakit web``: the conversation logic on a real model, and the page itself in headless Chromium."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llavakit.infer.generate import Predictor, Sampling
from llavakit.infer.web import WebInputError, add_turn, answer, find_examples, to_messages, view
from tests.browser import ARTIFACTS, CHROMIUM_FLAGS, chromium
from tests.conftest import make_image, serving


@pytest.fixture(scope="module")
def predictor(stage2):
    return Predictor.from_pretrained(str(stage2["out"]), device="cpu")


def test_a_turn_needs_a_question_and_readable_images(predictor, train_data, tmp_path, monkeypatch):
    img = os.path.join(train_data["images"], "coco", "1.jpg")
    with pytest.raises(WebInputError, match="Type a question to go with the image"):
        add_turn([], "  \n", [img])
    with pytest.raises(WebInputError, match="Type a question"):
        add_turn([], None, [])
    broken = tmp_path / "holiday.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(WebInputError, match="holiday.png: not an image llavakit can read"):
        add_turn([], "What is this?", [img, str(broken)])
    monkeypatch.setenv("LLAVAKIT_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(WebInputError, match=r"1.jpg: .*pixel"):
        add_turn([], "What is this?", [img])
    monkeypatch.delenv("LLAVAKIT_MAX_IMAGE_PIXELS")
    turns = add_turn([], " What colour is the circle? ", [img])
    assert turns[0].question == "What colour is the circle?" and turns[0].images == [img]
    with pytest.raises(WebInputError, match="no answer yet"):
        add_turn(turns, "And the square?", [])


def test_answers_stream_and_equal_chat_over_turns_with_several_images(predictor, train_data):
    a, b, c = (os.path.join(train_data["images"], "coco", f"{i}.jpg") for i in (1, 2, 3))
    turns = add_turn([], "What colour is the circle?", [a, b])
    usage: dict = {}
    pieces = list(answer(predictor, turns, Sampling(max_new_tokens=8), usage))
    assert pieces and usage["completion_tokens"] >= 1
    assert all(later.startswith(earlier) for earlier, later in zip(pieces, pieces[1:]))
    messages, images = to_messages(turns)
    assert pieces[-1] == predictor.chat(messages, images, Sampling(max_new_tokens=8))
    turns[-1].answer = pieces[-1]

    turns = add_turn(turns, "Is there a square?", [c])
    messages, images = to_messages(turns)
    assert images == [a, b, c]
    assert [[p["type"] for p in m["content"]] for m in messages] == [["image", "image", "text"], ["text"],
                                                                    ["image", "text"]]
    prompt = predictor.render(messages)
    assert prompt.count("<image>") == 3 and prompt.index(pieces[-1]) < prompt.rindex("<image>")
    final = list(answer(predictor, turns, Sampling(max_new_tokens=8)))[-1]
    assert final == predictor.chat(messages, images, Sampling(max_new_tokens=8))
    turns[-1].answer = final
    shown = view(turns)
    assert [m["role"] for m in shown] == ["user"] * 3 + ["assistant"] + ["user"] * 2 + ["assistant"]
    assert shown[0]["content"] == {"path": a} and shown[-1]["content"] == final


def test_a_conversation_longer_than_the_context_is_a_message(predictor):
    context = predictor.context_length
    turns = add_turn([], "circle " * (context + 10), [])
    with pytest.raises(WebInputError, match=f"the model's context is {context}.*Clear the conversation"):
        list(answer(predictor, turns, Sampling(max_new_tokens=4)))


def test_examples_come_from_the_model_directory_or_the_demo_output(tmp_path):
    model = tmp_path / "run" / "stage2"
    model.mkdir(parents=True)
    assert find_examples(str(model)) == []
    images = tmp_path / "run" / "data" / "images"
    for i in range(3):
        make_image(images / "test" / f"{i:05d}.png", (56, 56), seed=i)
    qs = [{"image": f"test/{i // 2:05d}.png", "text": f"question {i}"} for i in range(6)]
    qs.append({"image": "test/00009.png", "text": "a missing image is not offered"})
    (tmp_path / "run" / "data" / "heldout.jsonl").write_text("".join(json.dumps(q) + "\n" for q in qs))
    assert find_examples(str(model)) == [(str(images / "test" / f"{i:05d}.png"), f"question {2 * i}")
                                         for i in range(3)]
    make_image(model / "examples" / "b.jpg", (30, 30), seed=1)
    make_image(model / "examples" / "a.png", (30, 30), seed=2)
    (model / "examples" / "notes.txt").write_text("not an image")
    assert [os.path.basename(p) for p, _ in find_examples(str(model))] == ["a.png", "b.jpg"]


def test_the_model_info_names_the_template(predictor, stage2):
    from llavakit.infer.web import describe_model
    from llavakit.model.processing import template_name_of

    line = describe_model(predictor, str(stage2["out"]))
    assert "template `vicuna_v1`" in line and "cpu, float32" in line
    assert template_name_of("{{ messages }}", predictor.tokenizer) is None


def test_a_model_that_cannot_load_fails_before_the_page_starts(backbones, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llavakit", "web", "--model-path", backbones["llm"],
                        "--port", "1"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a transformers-native LLaVA checkpoint" in r.stderr
    assert "llavakit web:" not in r.stdout


@pytest.mark.slow
def test_the_page_in_headless_chromium_answers_as_predict_does(quick_demo, tmp_path):
    """Upload a held-out demo scene in a real browser, ask its question: the streamed answer is ``llavakit
    predict``'s greedy answer. An empty question and a broken image are messages in the page; the page loads
    nothing from anywhere but the app. The screenshot is kept in test-artifacts/ (look at it)."""
    from playwright.sync_api import sync_playwright

    out, _ = quick_demo
    model, image_root = out / "stage2", out / "data" / "images"
    q = json.loads((out / "data" / "heldout.jsonl").read_text().splitlines()[0])
    qfile, answers = tmp_path / "q.jsonl", tmp_path / "answers.jsonl"
    qfile.write_text(json.dumps({"question_id": "w0", "image": q["image"], "text": q["text"]}) + "\n")
    r = subprocess.run([sys.executable, "-m", "llavakit", "predict", "--model-path", str(model), "--question-file",
                        str(qfile), "--image-folder", str(image_root), "--answers-file", str(answers)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    expected = json.loads(answers.read_text())["text"]
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    browser_path = chromium()

    with serving(model, command="web", ready="llavakit web:") as (_, port):
        app = f"http://127.0.0.1:{port}"
        elsewhere = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=browser_path,
                                         args=[f for f in CHROMIUM_FLAGS if f != "--headless"])
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.on("request", lambda req: None if req.url.startswith((app, "data:", "blob:"))
                    else elsewhere.append(req.url))
            page.goto(app)
            page.get_by_text(q["text"]).first.wait_for()  # the held-out scenes are offered as examples
            assert "template vicuna_v1" in page.locator("#model-info").inner_text()

            box = page.locator("#ask")
            box.locator("input[type=file]").set_input_files(str(image_root / q["image"]))
            box.locator("img").first.wait_for()  # uploaded
            box.locator("textarea").press("Enter")
            page.get_by_text("Type a question to go with the image(s).").first.wait_for()

            box.locator("textarea").fill(q["text"])  # the image is still attached
            box.locator("textarea").press("Enter")
            page.wait_for_function("document.querySelector('#status').innerText.startsWith('Answered')",
                                   timeout=120_000)
            shown = page.locator('#chat [data-testid="bot"]').last.inner_text().strip()
            assert shown == expected
            assert page.locator('#chat [data-testid="user"] img').count() == 1
            # Regenerate answers the same question again (greedy: the same answer), in place
            page.evaluate("""() => { window.statuses = [];
                new MutationObserver(() => window.statuses.push(document.querySelector('#status').innerText))
                    .observe(document.querySelector('#status'), {subtree: true, childList: true, characterData: true});
            }""")
            page.locator("#regenerate").click()
            page.wait_for_function("window.statuses.some(s => s.startsWith('Answering')) && "
                                   "document.querySelector('#status').innerText.startsWith('Answered')",
                                   timeout=120_000)
            assert page.locator('#chat [data-testid="bot"]').count() == 1
            assert page.locator('#chat [data-testid="bot"]').last.inner_text().strip() == expected
            for close in page.locator(".toast-close").all():  # the empty question's message, read above
                close.click()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "web-chat.png"), full_page=True)

            box.locator("input[type=file]").set_input_files(str(broken))
            box.locator("textarea").fill("And this one?")
            box.locator("textarea").press("Enter")
            page.get_by_text("broken.png: not an image llavakit can read").first.wait_for()
            assert page.locator('#chat [data-testid="bot"]').count() == 1  # the conversation is as it was

            page.locator("#clear").click()
            page.wait_for_function("!document.querySelector('#chat [data-testid=\"user\"]')")
            browser.close()
        assert elsewhere == []
