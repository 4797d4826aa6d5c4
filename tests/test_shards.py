"""WebDataset shards: `llavakit data shard`, the read plan, training from a folder, a brace pattern and an
HTTP server on 127.0.0.1 (with byte ranges, like object storage), bad data, and exact resume under DDP
with data-loader workers."""

import contextlib
import http.server
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from .conftest import (
    assert_same_losses,
    conv,
    free_port,
    logged_losses,
    stage2_flags,
    training_logs,
    write_json,
)


def llavakit(*args, timeout=300, env=None):
    return subprocess.run([sys.executable, "-m", "llavakit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="session")
def shard_source(train_data, tmp_path_factory):
    """48 good records (35 with an image, one with two, 12 text-only) and 2 bad ones (a missing image, a
    broken JPEG)."""
    root = tmp_path_factory.mktemp("shard_source")
    base = json.loads(Path(train_data["instruct"]).read_text())
    records = [{**r, "id": f"{r['id']}-{k}"} for k in range(3) for r in base]
    records[7] = {"id": "two-images", "image": ["coco/1.jpg", "coco/2.jpg"],  # several images per record
                  "conversations": conv("Compare <image> and <image>.", "The first is smaller.")}
    import shutil

    images = root / "images"
    shutil.copytree(train_data["images"], images)
    (images / "coco" / "broken.jpg").write_bytes((images / "coco" / "0.jpg").read_bytes()[:200])
    records.insert(5, {"id": "gone", "image": "coco/missing.jpg", "conversations": conv("<image>\nHi?", "Hello.")})
    records.insert(20, {"id": "broken", "image": "coco/broken.jpg", "conversations": conv("<image>\nHi?", "Hi.")})
    write_json(root / "records.json", records)
    return {"records": str(root / "records.json"), "images": str(images), "good": 48}


@pytest.fixture(scope="session")
def shards(shard_source, backbones, tmp_path_factory):
    """The shards, with token lengths for the tiny model (its tokenizer, v1, 4 image tokens, 2048)."""
    out = tmp_path_factory.mktemp("shards") / "out"
    r = llavakit("data", "shard", "--data_path", shard_source["records"], "--image_folder", shard_source["images"],
                 "--output", out, "--shard-size", "12KB", "--workers", "2", "--tokenizer", backbones["llm"],
                 "--version", "v1", "--num_image_tokens", "4", "--model_max_length", "2048")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "48 of 50 records written" in r.stdout, r.stdout
    return out


def test_shard_writes_checked_records_and_their_image_bytes(shards, shard_source):
    index = json.loads((shards / "index.json").read_text())
    assert index["format"] == "llavakit-shards" and index["samples"] == 48
    assert len(index["shards"]) >= 4 and sum(s["samples"] for s in index["shards"]) == 48
    rejected = [json.loads(x) for x in (shards / "rejected.jsonl").read_text().splitlines()]
    assert {(x["id"], x["kind"]) for x in rejected} == {("gone", "missing_image"), ("broken", "bad_image")}
    assert all("records.json: record" in x["message"] for x in rejected)
    records = [x for x in json.loads(Path(shard_source["records"]).read_text()) if x["id"] not in ("gone", "broken")]
    samples = np.load(shards / "samples.npz")
    # every sample's members: its record and its image file's own bytes, where the sample table says
    for k, rec in enumerate(records):
        s = index["shards"][int(samples["shard"][k])]
        with tarfile.open(shards / s["name"]) as t:
            names = {m.name: m for m in t.getmembers() if m.name.startswith(f"{k:09d}.")}
            assert json.loads(t.extractfile(names[f"{k:09d}.json"]).read()) == rec
            paths = [rec["image"]] if isinstance(rec.get("image"), str) else rec.get("image", [])
            assert set(names) == {f"{k:09d}.json"} | {f"{k:09d}.img{j}.jpg" for j in range(len(paths))}
            for j, p in enumerate(paths):
                got = t.extractfile(names[f"{k:09d}.img{j}.jpg"]).read()
                assert got == Path(shard_source["images"], p).read_bytes()
            assert samples["offset"][k] == min(m.offset for m in names.values())
    # the records beside the shards are a converted record directory of exactly the written samples
    from llavakit.data.records import load_records

    store, valid, problems = load_records(shards)
    assert len(store) == 48 and valid == list(range(48)) and not problems
    assert [store.raw(k)["id"] for k in range(48)] == [r["id"] for r in records]
    assert len(index["lengths"]) == 1 and (shards / index["lengths"][0]).is_file()  # --tokenizer: stored


#: `llavakit data shard` killed (-9) while it writes its fourth shard
KILLED_CHILD = r"""
import os, signal, sys
from llavakit.data import shards
orig, done = shards._write_shard, []
def write(job):
    if len(done) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    done.append(orig(job))
    return done[-1]
shards._write_shard = write
from llavakit.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_shard_resumes_after_kill_9_and_refuses_other_inputs(shard_source, shards, tmp_path):
    out = tmp_path / "out"
    args = ["data", "shard", "--data_path", shard_source["records"], "--image_folder", shard_source["images"],
            "--output", str(out), "--shard-size", "12KB", "--workers", "1"]
    script = tmp_path / "child.py"
    script.write_text(KILLED_CHILD)
    r = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL
    assert not (out / "index.json").exists() and len(list((out / ".partial").glob("shard-*.json"))) == 3
    r = llavakit(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "3 shard(s) kept from an interrupted run" in r.stdout
    assert not (out / ".partial").exists() and not list(out.glob("*.tmp"))
    # the same bytes as an uninterrupted run (sizes are fixed, mtimes zero)
    first = {p.name: p.read_bytes() for p in shards.glob("shard-*.tar")}
    assert {p.name: p.read_bytes() for p in out.glob("shard-*.tar")} == first
    assert json.loads((out / "index.json").read_text())["shards"] == json.loads(
        (shards / "index.json").read_text())["shards"]
    # finished: the same command is a no-op; other records into the same folder are refused
    r = llavakit(*args)
    assert r.returncode == 0 and "48 of 50 records written" in r.stdout
    other = tmp_path / "other.json"
    write_json(other, json.loads(Path(shard_source["records"]).read_text())[:10])
    r = llavakit("data", "shard", "--data_path", other, "--image_folder", shard_source["images"], "--output", out)
    assert r.returncode == 2 and "already holds other shards" in r.stderr


# ---- the plan --------------------------------------------------------------------------------------


def _plan(n=203, shards=7, world=2, workers=2, batch=4, window=12, seed=0, drop_last=False):
    from llavakit.data.stream import ShardBatchSampler

    rng = np.random.default_rng(1)
    shard_of = np.repeat(np.arange(shards), np.diff(np.linspace(0, n, shards + 1).astype(int)))
    offset = np.concatenate([np.arange((shard_of == s).sum()) * 1024 for s in range(shards)])
    lengths = rng.integers(10, 300, n)
    has_image = rng.random(n) < 0.7
    return ShardBatchSampler(shard_of, offset, np.full(n, 1024), lengths, has_image, batch_size=batch,
                             world_size=world, workers=workers, window=window, seed=seed, group_by_modality=True,
                             sort_by_length=True, drop_last=drop_last)


def _rank_batches(sampler, world):
    batches = list(sampler)
    return [batches[r::world] for r in range(world)]


def test_plan_gives_each_rank_and_worker_a_disjoint_equal_share():
    sampler = _plan()
    per_rank = _rank_batches(sampler, 2)
    assert len(sampler) == 2 * len(per_rank[0]) and len(per_rank[0]) == len(per_rank[1])
    seen = [i for rank in per_rank for b in rank for i in b]
    assert len(seen) == len(set(seen)) == sampler.samples_per_epoch == 203 // 4 * 4
    for r, rank in enumerate(per_rank):
        for i, b in enumerate(rank):  # the DataLoader's worker i % workers reads share rank * workers + i % workers
            share = set(sampler.share_ids(0, r * 2 + i % 2).tolist())
            assert set(b) <= share
            assert b.window.key[1] == r * 2 + i % 2
            # a window's byte ranges hold every sample of its batches
            for i_s in b:
                assert any(s == sampler.shard_of[i_s] and a <= sampler.offset[i_s] < sampler.end[i_s] <= e
                           for s, a, e in b.window.ranges)
        assert list(sampler.rank_batches(0, r)) == rank
    # modality-pure batches, except at most one mixed batch per window
    mixed = {}
    for b in list(sampler):
        kinds = {bool(sampler.has_image[i]) for i in b}
        mixed[b.window.key] = mixed.get(b.window.key, 0) + (len(kinds) > 1)
    assert max(mixed.values()) <= 1


def test_plan_is_deterministic_and_reshuffles_each_epoch():
    a, b = _plan(), _plan()
    assert [list(x) for x in a] == [list(x) for x in b]
    b.set_epoch(1)
    e1 = [list(x) for x in b]
    assert e1 != [list(x) for x in a] and len(e1) == len(a)
    c = _plan(seed=1)
    assert [list(x) for x in c] != [list(x) for x in a]


def test_resume_with_another_world_size_stays_within_the_documented_bound():
    """After k steps of 2 ranks, a resume with 1 rank skips k steps of its own plan: in that epoch no sample
    is repeated or missed beyond the samples trained before the stop; later epochs are whole."""
    k = 5
    two = _plan(world=2, workers=2)
    before = {i for rank in _rank_batches(two, 2) for b in rank[:k] for i in b}
    one = _plan(world=1, workers=2)
    after = [i for b in list(one)[k:] for i in b]
    repeated = before & set(after)
    missed = set(range(203)) - before - set(after) - {i for b in list(one)[:k] for i in b}
    missed |= set(two.order(0)[two.samples_per_epoch:].tolist()) - before - set(after)  # waiting for an epoch
    assert len(after) == len(set(after))
    assert len(repeated) <= len(before) and len(missed) <= len(before)


# ---- training ----------------------------------------------------------------------------------


def _shard_flags(backbones, train_data, out, data_path, **over):
    over.setdefault("per_device_train_batch_size", 2)
    over.setdefault("shuffle_buffer", 4)
    over.setdefault("group_by_modality_length", "True")
    return stage2_flags(backbones, train_data, out, "", pretrain_mm_mlp_adapter=None, data_path=str(data_path),
                        image_folder=None, **over)


def test_train_from_a_shard_folder_with_workers_and_from_a_brace_pattern(backbones, train_data, shards, tmp_path):
    from llavakit.train.entry import run

    from .conftest import _config, _stage2

    def config(out, data_path, **over):
        over.setdefault("per_device_train_batch_size", 2)
        over.setdefault("shuffle_buffer", 4)
        return _config(_stage2(backbones, train_data, out, "", {
            "pretrain_mm_mlp_adapter": None, "data_path": str(data_path), "image_folder": None,
            "group_by_modality_length": "True", "save_strategy": "no", "logging_steps": 1, **over}))

    cache = tmp_path / "cache"
    os.environ["LLAVAKIT_CACHE"] = str(cache)
    try:
        res = run(config(tmp_path / "all", shards, dataloader_num_workers=2, num_train_epochs=1))
    finally:
        del os.environ["LLAVAKIT_CACHE"]
    assert not (cache / "lengths").exists()  # the token lengths stored with the shards were used
    s = res.summary
    assert s["train_samples"] == 48 and s["samples_seen"] == 48 and s["replaced_samples"] == 0
    assert s["steps"] == 24
    logs = training_logs(tmp_path / "all")  # the throughput log lines, as with JSON data
    assert len(logs) == 24 and all("samples_per_second" in h and "data_wait_fraction" in h for h in logs)
    # without workers: one share per rank, the same samples in another order
    again = run(config(tmp_path / "again", shards, dataloader_num_workers=0, num_train_epochs=1))
    assert again.summary["samples_seen"] == 48 and again.summary["steps"] == 24
    # --max_steps past an epoch: the next epoch's plan continues, as with JSON data
    res = run(config(tmp_path / "steps", shards, max_steps=30, packing="True"))
    assert res.summary["steps"] == 30 and res.summary["samples_seen"] == 60
    # a brace pattern picks shards
    index = json.loads((shards / "index.json").read_text())
    n = sum(x["samples"] for x in index["shards"][1:3])
    res = run(config(tmp_path / "two", f"{shards}/shard-{{000001..000002}}.tar", num_train_epochs=1))
    assert res.summary["train_samples"] == n and res.summary["samples_seen"] == n


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP byte ranges (as object stores serve them); STALL names a file whose reads hang."""

    stall: str | None = None
    requests: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):  # noqa: N802
        RangeHandler.requests.append((self.path, self.headers.get("Range")))
        if RangeHandler.stall and RangeHandler.stall in self.path:
            time.sleep(30)
            return
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        data = Path(path).read_bytes()
        rng = self.headers.get("Range")
        if rng:
            a, _, b = rng.removeprefix("bytes=").partition("-")
            a, b = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
            data = data[a:b + 1]
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(os.path.getsize(path)))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()


@contextlib.contextmanager
def http_server(root: Path, stall: str | None = None):
    RangeHandler.stall = stall
    RangeHandler.requests = []
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), lambda *a: RangeHandler(*a, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


def test_train_from_shards_over_http_reads_byte_ranges(backbones, train_data, shards, tmp_path):
    from llavakit.train.entry import main

    with http_server(shards.parent) as url:
        out = tmp_path / "http"
        flags = _shard_flags(backbones, train_data, out, f"{url}/{shards.name}/", num_train_epochs=1,
                             save_strategy="no", logging_steps=1, dataloader_num_workers=2)
        env_cache = tmp_path / "cache"
        os.environ["LLAVAKIT_CACHE"] = str(env_cache)
        try:
            assert main(flags) == 0
        finally:
            del os.environ["LLAVAKIT_CACHE"]
        reads = [(p, r) for p, r in RangeHandler.requests if p.endswith(".tar") and r]
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["samples_seen"] == 48
    assert reads and all(r.startswith("bytes=") for _, r in reads)
    # the same losses as from the folder
    local = tmp_path / "local"
    from llavakit.train.entry import main as main2

    assert main2(_shard_flags(backbones, train_data, local, shards, num_train_epochs=1, save_strategy="no",
                              logging_steps=1, dataloader_num_workers=2)) == 0
    assert_same_losses(logged_losses(local), logged_losses(out), range(1, 25), 1e-6)


def test_a_stalled_server_is_retried_then_named(backbones, train_data, shards, tmp_path):
    with http_server(shards.parent, stall="shard-000002.tar") as url:
        out = tmp_path / "stall"
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "llavakit.train", *_shard_flags(
            backbones, train_data, out, f"{url}/{shards.name}", num_train_epochs=1, save_strategy="no",
            shard_timeout=1, shard_retries=1)], capture_output=True, text=True, timeout=240,
            env={**os.environ, "LLAVAKIT_CACHE": str(tmp_path / "cache")})
    assert r.returncode != 0
    assert "shard-000002.tar" in r.stderr and "failed 2 times" in r.stderr, r.stderr[-3000:]
    assert time.time() - t0 < 200


def test_a_missing_shard_is_an_error_naming_it(backbones, train_data, shards, tmp_path, capsys):
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(shards, copy)
    (copy / "shard-000003.tar").unlink()
    r = subprocess.run([sys.executable, "-m", "llavakit.train", *_shard_flags(backbones, train_data, tmp_path / "o",
                                                                              copy)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 2
    assert "shard-000003.tar: not found" in r.stderr and "1 of" in r.stderr, r.stderr[-2000:]
    # object storage whose fsspec package is not installed: named, before any weight is loaded
    from llavakit.train.entry import main

    assert main(_shard_flags(backbones, train_data, tmp_path / "s3", "s3://no-such-bucket/shards")) == 2
    assert "s3://no-such-bucket/shards: cannot open s3:// (Install s3fs" in capsys.readouterr().err


def test_a_corrupt_member_is_a_counted_skip(backbones, train_data, shards, tmp_path):
    import shutil

    from llavakit.train.entry import run

    from .conftest import _config, _stage2

    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    samples = np.load(copy / "samples.npz")
    store = json.loads((copy / "index.json").read_text())
    k = next(k for k in range(48) if samples["size"][k] > 1500)  # a sample with an image
    shard = copy / store["shards"][int(samples["shard"][k])]["name"]
    data = bytearray(shard.read_bytes())
    at = int(samples["offset"][k]) + 1024 + 40  # inside the image's bytes
    data[at:at + 16] = b"\0" * 16
    shard.write_bytes(bytes(data))
    out = tmp_path / "run"
    res = run(_config(_stage2(backbones, train_data, out, "", {
        "pretrain_mm_mlp_adapter": None, "data_path": str(copy), "image_folder": None, "shuffle_buffer": "4",
        "group_by_modality_length": "True", "save_strategy": "no", "max_bad_fraction": "0.1",
        "num_train_epochs": "1", "dataloader_num_workers": "2"})))
    assert res.summary["replaced_samples"] == 1 and res.summary["samples_seen"] == 48
    bad = [json.loads(x) for x in (out / "bad_samples.jsonl").read_text().splitlines()]
    assert len(bad) == 1 and bad[0]["index"] == k
    assert "checksum mismatch" in bad[0]["reason"] and shard.name in bad[0]["reason"]


# ---- exact resume under DDP with workers -----------------------------------------------------------


def _torchrun(flags, timeout=300, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "-m", "llavakit.train", *flags]
    return cmd, env


@pytest.mark.slow
def test_ddp_two_workers_kill_9_and_resume_equals_straight(backbones, train_data, shards, tmp_path):
    """2 ranks × 2 workers, 2 epochs of 12 steps: straight vs killed (-9) after the checkpoint of step 16 (in
    the second epoch) and resumed — the same losses at every step; then a resume of that checkpoint with 1
    rank finishes, warning that the epoch in progress is cut anew."""
    common = dict(num_train_epochs=2, save_steps=8, logging_steps=1, dataloader_num_workers=2,
                  ddp_backend="gloo", ddp_find_unused_parameters="False", save_total_limit=None)
    straight = tmp_path / "straight"
    cmd, env = _torchrun(_shard_flags(backbones, train_data, straight, shards, **common))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    ref = logged_losses(straight)
    assert sorted(ref) == list(range(1, 25))

    killed = tmp_path / "killed"
    cmd, env = _torchrun(_shard_flags(backbones, train_data, killed, shards, **common))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoint-16" / "trainer_state.json").is_file():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (killed / "train_summary.json").exists()
    cmd, env = _torchrun(_shard_flags(backbones, train_data, killed, shards, resume_from_checkpoint="latest",
                                      **common))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    got = logged_losses(killed)
    assert sorted(got) == list(range(1, 25))
    assert_same_losses(ref, got, range(17, 25), 1e-5)

    one = tmp_path / "one"
    import shutil

    shutil.copytree(straight / "checkpoint-16", one / "checkpoint-16")
    cmd, env = _torchrun(_shard_flags(backbones, train_data, one, shards, resume_from_checkpoint="latest",
                                      **common), nproc=1)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "the checkpoint's shard plan had 2 x 2" in r.stderr
    summary = json.loads((one / "train_summary.json").read_text())
    assert summary["steps"] == 48  # 1 rank: 24 steps per epoch; resumed at step 16, in the first epoch
