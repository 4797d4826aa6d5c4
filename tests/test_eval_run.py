"""``llavakit eval run`` on a small data root in LLaVA's playground layout, and the GPT judge against a local
fake OpenAI-compatible server."""

import base64
import json
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from llavakit.eval import run as evrun
from llavakit.eval.judge import JudgeClient, JudgeError

from .conftest import write_jsonl


@pytest.fixture(scope="module")
def data_root(train_data, tmp_path_factory):
    """pope, scienceqa, mmbench, textvqa, vqav2 and llava-bench, each with a few questions on real images."""
    root = tmp_path_factory.mktemp("eval") / "playground" / "data" / "eval"
    src = Path(train_data["images"]) / "coco"

    def images(dest: Path, n: int) -> list[str]:
        dest.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shutil.copy(src / f"{i}.jpg", dest / f"img{i}.jpg")
        return [f"img{i}.jpg" for i in range(n)]

    names = images(root / "pope" / "val2014", 2)
    qs, labels = [], {s: [] for s in ("adversarial", "popular", "random")}
    for split in labels:
        for j, name in enumerate(names):
            qs.append({"question_id": len(qs) + 1, "image": name, "category": split,
                       "text": "Is there a circle in the image?\nAnswer the question using a single word or phrase."})
            labels[split].append({"question_id": len(qs), "label": "yes" if j == 0 else "no"})
    write_jsonl(root / "pope" / "llava_pope_test.jsonl", qs)
    (root / "pope" / "coco").mkdir()
    for split, rows in labels.items():
        write_jsonl(root / "pope" / "coco" / f"coco_pope_{split}.json", rows)

    images(root / "scienceqa" / "images" / "test" / "7", 1)
    (root / "scienceqa" / "llava_test_CQM-A.json").write_text(json.dumps([
        {"id": "7", "image": "7/img0.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhich colour?\nA. red\nB. blue"}, {"from": "gpt", "value": "A"}]},
        {"id": "8", "conversations": [
            {"from": "human", "value": "Which is a number?\nA. cat\nB. 2"}, {"from": "gpt", "value": "B"}]}]))

    (root / "mmbench").mkdir()
    b64 = base64.b64encode((src / "3.jpg").read_bytes()).decode()
    rows = ["index\tquestion\thint\tA\tB\tanswer\tcategory\timage",
            f"5\tWhat colour is the circle?\tLook closely.\tred\tblue\tA\tcolour\t{b64}",
            f"1000005\tWhat colour is the circle?\tLook closely.\tblue\tred\tB\tcolour\t{b64}"]
    (root / "mmbench" / "mmbench_dev_20230712.tsv").write_text("\n".join(rows) + "\n")

    tnames = images(root / "textvqa" / "train_images", 2)
    write_jsonl(root / "textvqa" / "llava_textvqa_val_v051_ocr.jsonl", [
        {"question_id": n[:-4], "image": n, "text": "what is written?\nReference OCR token: A\nAnswer the question "
         "using a single word or phrase."} for n in tnames])
    (root / "textvqa" / "TextVQA_0.5.1_val.json").write_text(json.dumps({"data": [
        {"image_id": n[:-4], "question": "what is written?", "answers": ["stop"] * 10} for n in tnames]}))

    vnames = images(root / "vqav2" / "test2015", 2)
    write_jsonl(root / "vqav2" / "llava_vqav2_mscoco_test-dev2015.jsonl",
                [{"question_id": 100 + i, "image": n, "text": "What is it?"} for i, n in enumerate(vnames)])

    lnames = images(root / "llava-bench-in-the-wild" / "images", 2)
    lb = root / "llava-bench-in-the-wild"
    write_jsonl(lb / "questions.jsonl", [{"question_id": i, "image": n, "text": "Describe the image.",
                                          "category": "detail" if i else "conv"} for i, n in enumerate(lnames)])
    write_jsonl(lb / "context.jsonl", [{"id": n, "image": n, "caption": "A circle.", "instances": []}
                                       for n in lnames])
    write_jsonl(lb / "answers_gpt4.jsonl", [{"question_id": i, "text": "A red circle.", "answer_id": f"g{i}"}
                                            for i in range(2)])
    return root


class FakeJudge:
    """A local OpenAI-compatible endpoint: answers every review with fixed scores; the first call is a 429."""

    def __init__(self, reply: str):
        self.requests = []
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, self.headers.get("Authorization"), body))
                if len(outer.requests) == 1:
                    self.send_response(429)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self):
        self.server.shutdown()


@pytest.fixture(scope="module")
def predictor(stage2):
    from llavakit.infer.generate import Predictor

    return Predictor.from_pretrained(str(stage2["out"]), device="cpu")


def test_eval_run_builds_prompts_predicts_and_scores(predictor, data_root, tmp_path):
    judge_server = FakeJudge("7 8\nAssistant 2 is more detailed.")
    judge = JudgeClient(base_url=judge_server.url, model="judge-x", api_key="k", backoff=0.01)
    try:
        out = tmp_path / "results"
        results = evrun.run(["pope", "scienceqa", "mmbench", "textvqa", "vqav2", "llava-bench"], predictor,
                            str(data_root), str(out), model_id="tiny", max_new_tokens=3, judge=judge,
                            progress=False)
    finally:
        judge_server.close()
    for name in results:
        assert (out / name / "answers.jsonl").is_file() and (out / name / "scores.json").is_file()
    assert 0 <= results["pope"]["score"] <= 100 and set(results["pope"]["splits"]) == {"adversarial", "popular",
                                                                                       "random"}
    # LLaVA-1.5's prompts
    sqa = [json.loads(x) for x in (out / "scienceqa" / "answers.jsonl").read_text().splitlines()]
    assert sqa[0]["prompt"] == ("Which colour?\nA. red\nB. blue\n"
                                "Answer with the option's letter from the given choices directly.")
    mmb = [json.loads(x) for x in (out / "mmbench" / "answers.jsonl").read_text().splitlines()]
    assert [a["question_id"] for a in mmb] == [5, 1000005]
    assert mmb[0]["prompt"] == ("Look closely.\nWhat colour is the circle?\nA. red\nB. blue\n"
                                "Answer with the option's letter from the given choices directly.")
    assert (out / "mmbench" / "images" / "5.jpg").is_file()
    assert results["mmbench"]["questions"] == 1 and results["mmbench"]["score"] in (0.0, 100.0)
    assert 0 <= results["textvqa"]["score"] <= 100 and results["textvqa"]["questions"] == 2
    upload = json.loads(Path(results["vqav2"]["upload"]).read_text())
    assert [u["question_id"] for u in upload] == [100, 101] and results["vqav2"]["score"] is None
    # the judge: retried after the 429, authorised, two reviews, the ratio 8/7
    assert len(judge_server.requests) == 3
    path, auth, body = judge_server.requests[-1]
    assert path == "/v1/chat/completions" and auth == "Bearer k" and body["model"] == "judge-x"
    assert "[Assistant 1]\nA red circle." in body["messages"][1]["content"]
    assert results["llava-bench"]["score"] == round(8 / 7 * 100, 1)
    reviews = [json.loads(x) for x in (out / "llava-bench" / "reviews.jsonl").read_text().splitlines()]
    assert [r["tuple"] for r in reviews] == [[7.0, 8.0], [7.0, 8.0]]

    # a second run answers nothing again and judges nothing again
    before = (out / "pope" / "answers.jsonl").read_text()
    again = evrun.run(["pope", "llava-bench"], predictor, str(data_root), str(out), model_id="tiny",
                      max_new_tokens=3, judge=JudgeClient(base_url="http://127.0.0.1:9/v1", retries=0),
                      progress=False)
    assert (out / "pope" / "answers.jsonl").read_text() == before
    assert again["llava-bench"]["score"] == results["llava-bench"]["score"]
    print(evrun.summary_table(results))


def test_eval_run_cli_names_missing_data(stage2, tmp_path):
    r = subprocess.run([sys.executable, "-m", "llavakit", "eval", "run", "--benchmark", "pope,gqa", "--model-path",
                        str(stage2["out"]), "--data-root", str(tmp_path)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2
    assert "pope/llava_pope_test.jsonl not found" in r.stderr and "playground/data/eval" in r.stderr


def test_judge_gives_up_with_a_clear_error():
    with pytest.raises(JudgeError, match="no answer after 2 tries"):
        JudgeClient(base_url="http://127.0.0.1:9/v1", retries=1, backoff=0.01, api_key="x").complete("s", "u")


def test_mm_vet_local_judge_and_upload(tmp_path):
    from llavakit.eval import mmvet

    answers = tmp_path / "a.jsonl"
    write_jsonl(answers, [{"question_id": 0, "text": "4"}, {"question_id": 1, "text": "a cat"}])
    truth = tmp_path / "mm-vet.json"
    truth.write_text(json.dumps({"v1_0": {"question": "2+2?", "answer": "4", "capability": ["math"]},
                                 "v1_1": {"question": "What?", "answer": "dog<OR>puppy", "capability": ["rec"]}}))
    server = FakeJudge("0.5")
    try:
        res = mmvet.judge_mmvet(str(answers), str(truth), str(tmp_path / "r.jsonl"),
                              JudgeClient(base_url=server.url, backoff=0.01))
    finally:
        server.close()
    assert res["score"] == 50.0 and res["per_capability"] == {"math": 50.0, "rec": 50.0}
    assert mmvet.mmvet_submission(str(answers), str(tmp_path / "up.json")) == 2
    assert json.loads((tmp_path / "up.json").read_text()) == {"v1_0": "4", "v1_1": "a cat"}


def test_seed_and_gqa_scorers(tmp_path):
    from llavakit.eval import seed as seed_bench
    from llavakit.eval import vqa

    seed = tmp_path / "SEED-Bench.json"
    seed.write_text(json.dumps({"question_type": {"Scene Understanding": 1, "Instance Counting": 2},
                                "questions": [{"question_id": "1", "answer": "A", "data_type": "image",
                                               "question_type_id": 1},
                                              {"question_id": "2", "answer": "C", "data_type": "image",
                                               "question_type_id": 2},
                                              {"question_id": "3", "answer": "B", "data_type": "video",
                                               "question_type_id": 2}]}))
    answers = tmp_path / "a.jsonl"
    write_jsonl(answers, [{"question_id": "1", "text": "A"}, {"question_id": "2", "text": "B."}])
    s = seed_bench.score_seed(str(answers), str(seed))
    assert s["score"] == 50.0 and s["per_type"] == {"Instance Counting": 0.0, "Scene Understanding": 100.0}
    gqa = tmp_path / "testdev.json"
    gqa.write_text(json.dumps({"q1": {"answer": "yes"}, "q2": {"answer": "left"}}))
    write_jsonl(answers, [{"question_id": "q1", "text": "Yes."}, {"question_id": "q2", "text": "right"}])
    assert vqa.score_gqa(str(answers), str(gqa))["score"] == 50.0
