"""Data preparation: downloads against a real local HTTP server (resume, checksum, 404, stall, the hub via
HF_ENDPOINT), safe unpacking, OCR-VQA images, the rename fix, the parallel check, and conversion."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llavakit.data.download import DownloadError, download_file, read_manifest
from llavakit.data.unpack import UnsafeArchiveError, unpack

from .conftest import conv, make_image, write_json


class FileServer:
    """Serves ``files`` (path → bytes) with Range support; ``faults`` (path → list of per-request faults:
    "cut", "stall", an HTTP status) misbehave on the first requests."""

    def __init__(self, files: dict, faults: dict | None = None, stall: float = 3.0):
        self.files, self.faults, self.requests = files, {k: list(v) for k, v in (faults or {}).items()}, []
        outer = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                outer.requests.append((path, self.headers.get("Range")))
                fault = outer.faults.get(path, []).pop(0) if outer.faults.get(path) else None
                if path not in outer.files or isinstance(fault, int):
                    self.send_response(fault if isinstance(fault, int) else 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data, start = outer.files[path], 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "cut":  # half the bytes, then the connection drops
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                if fault == "stall":
                    self.wfile.write(body[:10])
                    self.wfile.flush()
                    time.sleep(outer.stall)
                    return
                self.wfile.write(body)

        self.stall = stall
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.server.shutdown()


@pytest.fixture()
def payload():
    return np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8).tobytes()


def test_download_resumes_after_a_cut_connection(payload, tmp_path):
    srv = FileServer({"/big.bin": payload}, {"/big.bin": ["cut"]})
    try:
        dest = tmp_path / "d" / "big.bin"
        download_file(f"{srv.url}/big.bin", str(dest), sha256=hashlib.sha256(payload).hexdigest(), backoff=0.01,
                      progress=False)
    finally:
        srv.close()
    assert dest.read_bytes() == payload and not Path(str(dest) + ".part").exists()
    assert srv.requests[0][1] is None and srv.requests[1][1] == f"bytes={len(payload) // 2}-"


def test_download_retries_a_stalled_server(payload, tmp_path):
    srv = FileServer({"/f": payload}, {"/f": ["stall", 503]}, stall=2.0)
    try:
        download_file(f"{srv.url}/f", str(tmp_path / "f"), timeout=0.5, backoff=0.01, progress=False)
    finally:
        srv.close()
    assert (tmp_path / "f").read_bytes() == payload and len(srv.requests) == 3
    assert srv.requests[1][1] == "bytes=10-"  # kept what arrived before the stall


def test_download_checksum_mismatch_and_404_are_clear_errors(payload, tmp_path):
    srv = FileServer({"/f": payload})
    try:
        with pytest.raises(DownloadError, match="does not match .*sha256"):
            download_file(f"{srv.url}/f", str(tmp_path / "f"), sha256="0" * 64, retries=1, backoff=0.01,
                          progress=False)
        assert not (tmp_path / "f").exists() and not (tmp_path / "f.part").exists()
        n = len(srv.requests)
        with pytest.raises(DownloadError, match="404"):
            download_file(f"{srv.url}/missing", str(tmp_path / "m"), backoff=0.01, progress=False)
        assert len(srv.requests) == n + 1  # no retry for a 404
    finally:
        srv.close()


def _zip(files: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_named_sets_from_the_hub_and_a_manifest_with_unpack(tmp_path):
    """The CLI in a real process: hub files through HF_ENDPOINT, a manifest archive unpacked, a re-run
    that fetches nothing, and --dry-run."""
    mix = json.dumps([{"id": "1", "conversations": []}]).encode()
    proj = b"projector-bytes"
    archive = _zip({"train2017/0001.jpg": b"jpeg", "train2017/0002.jpg": b"jpeg2"})
    files = {"/datasets/liuhaotian/LLaVA-Instruct-150K/resolve/main/llava_v1_5_mix665k.json": mix,
             "/liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/resolve/main/mm_projector.bin": proj,
             "/coco.zip": archive}
    srv = FileServer(files)
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"files": [{"url": f"{srv.url}/coco.zip", "path": "downloads/coco.zip",
                                               "sha256": hashlib.sha256(archive).hexdigest(), "unpack": "coco"}]}))
    env = {**os.environ, "HF_ENDPOINT": srv.url, "HF_HUB_OFFLINE": "0"}
    root = tmp_path / "playground" / "data"
    cmd = [sys.executable, "-m", "llavakit", "data", "download", "instruct", "projector-7b", "--manifest",
           str(manifest), "--root", str(root)]
    try:
        dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert dry.returncode == 0, dry.stderr
        assert "llava_v1_5_mix665k.json" in dry.stdout and "[missing]" in dry.stdout and not srv.requests
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        n = len(srv.requests)
        again = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
        assert again.returncode == 0 and len(srv.requests) == n  # everything already there: nothing fetched
    finally:
        srv.close()
    assert (root / "llava_v1_5_mix665k.json").read_bytes() == mix
    assert (tmp_path / "checkpoints" / "llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5" / "mm_projector.bin"
            ).read_bytes() == proj
    assert (root / "coco" / "train2017" / "0002.jpg").read_bytes() == b"jpeg2"


def test_manifest_errors_name_the_entry(tmp_path):
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"files": [{"url": "http://x/a", "path": "a"}, {"url": "http://x/b"}]}))
    with pytest.raises(ValueError, match=r"files\[1\] needs 'url' and 'path'"):
        read_manifest(str(m))


# ---- unpack ---------------------------------------------------------------------------------------
def _tar(path: Path, build) -> Path:
    with tarfile.open(path, "w") as tf:
        build(tf)
    return path


def _add(tf, name, data=b"x", **kw):
    info = tarfile.TarInfo(name)
    for k, v in kw.items():
        setattr(info, k, v)
    info.size = len(data) if info.type == tarfile.REGTYPE else 0
    tf.addfile(info, io.BytesIO(data) if info.type == tarfile.REGTYPE else None)


@pytest.mark.parametrize("build,what", [
    (lambda tf: _add(tf, "../evil.txt"), "outside"),
    (lambda tf: _add(tf, "/etc/evil.txt"), "outside"),
    (lambda tf: (_add(tf, "ok/link", type=tarfile.SYMTYPE, linkname="../../etc/passwd")), "points outside"),
])
def test_unpack_refuses_members_that_escape(tmp_path, build, what):
    archive = _tar(tmp_path / "bad.tar", build)
    with pytest.raises(UnsafeArchiveError, match=what):
        unpack(str(archive), str(tmp_path / "out"), progress=False)
    assert not any((tmp_path / "out").rglob("evil*"))


def test_unpack_zip_slip_is_refused_and_a_good_archive_unpacks_once(tmp_path):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(_zip({"../../evil.txt": b"x"}))
    with pytest.raises(UnsafeArchiveError, match="outside"):
        unpack(str(bad), str(tmp_path / "out"), progress=False)
    good = _tar(tmp_path / "good.tar", lambda tf: (_add(tf, "imgs/a.jpg", b"a"),
                                                    _add(tf, "imgs/l.jpg", type=tarfile.SYMTYPE, linkname="a.jpg")))
    out = tmp_path / "out"
    unpack(str(good), str(out), progress=False)
    assert (out / "imgs" / "a.jpg").read_bytes() == b"a" and (out / "imgs" / "l.jpg").read_bytes() == b"a"
    (out / "imgs" / "a.jpg").write_bytes(b"changed")
    unpack(str(good), str(out), progress=False)  # done before: skipped
    assert (out / "imgs" / "a.jpg").read_bytes() == b"changed"


# ---- OCR-VQA ----------------------------------------------------------------------------------------
def _image_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB" if fmt != "GIF" else "P", (20, 16), 120).save(buf, format=fmt)
    return buf.getvalue()


def test_ocrvqa_images_are_saved_as_jpeg_and_failures_reported(tmp_path):
    from llavakit.data.ocrvqa import download_images

    srv = FileServer({"/a.jpg": _image_bytes("JPEG"), "/b.gif": _image_bytes("GIF"), "/c.png": _image_bytes("PNG")})
    ds = tmp_path / "dataset.json"
    ds.write_text(json.dumps({k: {"imageURL": f"{srv.url}/{f}"} for k, f in
                              [("111", "a.jpg"), ("222", "b.gif"), ("333", "c.png"), ("444", "gone.jpg")]}))
    try:
        report = download_images(str(ds), str(tmp_path), workers=4, backoff=0.01, progress=False)
    finally:
        srv.close()
    assert report["downloaded"] == 3 and report["converted_to_jpeg"] == 2 and report["failed"] == 1
    for k in ("111", "222", "333"):
        with Image.open(tmp_path / "ocr_vqa" / "images" / f"{k}.jpg") as im:
            assert im.format == "JPEG"
    failures = [json.loads(x) for x in (tmp_path / "ocr_vqa" / "download_failures.jsonl").read_text().splitlines()]
    assert [f["id"] for f in failures] == ["444"] and "404" in failures[0]["error"]


def test_fix_ocrvqa_renames_or_converts_and_reports(tmp_path):
    images = tmp_path / "images"
    (images / "ocr_vqa" / "images").mkdir(parents=True)
    (images / "ocr_vqa" / "images" / "1.gif").write_bytes(_image_bytes("GIF"))
    (images / "ocr_vqa" / "images" / "2.jpeg").write_bytes(_image_bytes("JPEG"))
    data = write_json(tmp_path / "d.json", [
        {"id": "a", "image": "ocr_vqa/images/1.jpg", "conversations": conv("<image>\nq", "a")},
        {"id": "b", "image": "ocr_vqa/images/2.jpg", "conversations": conv("<image>\nq", "a")},
        {"id": "c", "image": "ocr_vqa/images/3.jpg", "conversations": conv("<image>\nq", "a")}])
    cmd = [sys.executable, "-m", "llavakit", "data", "fix-ocrvqa", "--data_path", str(data), "--image_folder",
           str(images), "--json"]
    dry = subprocess.run(cmd + ["--dry-run"], capture_output=True, text=True, timeout=60)
    report = json.loads(dry.stdout)
    assert [(c["id"], c["action"]) for c in report["changed"]] == [("a", "convert"), ("b", "rename")]
    assert (images / "ocr_vqa" / "images" / "1.gif").exists()  # a dry run changes nothing
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1  # one image is still missing
    assert [m["id"] for m in json.loads(r.stdout)["still_missing"]] == ["c"]
    for k in ("1", "2"):
        with Image.open(images / "ocr_vqa" / "images" / f"{k}.jpg") as im:
            assert im.format == "JPEG"
    assert not (images / "ocr_vqa" / "images" / "1.gif").exists()


# ---- check and convert --------------------------------------------------------------------------------
def test_check_per_source_in_processes(tmp_path, tokenizer_dir):
    images = tmp_path / "images"
    make_image(images / "coco" / "ok.jpg", (40, 30))
    make_image(images / "gqa" / "tiny.jpg", (6, 30))
    good = (images / "coco" / "ok.jpg").read_bytes()
    (images / "vg").mkdir(parents=True)
    (images / "vg" / "cut.jpg").write_bytes(good[: len(good) // 2])  # truncated
    recs = [{"id": f"c{i}", "image": "coco/ok.jpg", "conversations": conv("<image>\nq", "a")} for i in range(300)]
    recs += [{"id": "t", "image": "gqa/tiny.jpg", "conversations": conv("<image>\nq", "a")},
             {"id": "v", "image": "vg/cut.jpg", "conversations": conv("<image>\nq", "a")},
             {"id": "m", "image": "vg/missing.jpg", "conversations": conv("<image>\nq", "a")},
             {"id": "x", "conversations": conv("hello", "world")}]
    data = write_json(tmp_path / "d.json", recs)
    r = subprocess.run([sys.executable, "-m", "llavakit", "data", "check", "--data_path", str(data), "--image_folder",
                        str(images), "--workers", "2", "--min_image_size", "10", "--tokenizer", tokenizer_dir,
                        "--num_image_tokens", "4", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    rep = json.loads(r.stdout)
    kinds = {(p["id"], p["kind"]) for p in rep["problems"]}
    assert kinds == {("t", "tiny_image"), ("v", "bad_image"), ("m", "missing_image")}
    assert rep["missing_images"] == 1
    per = rep["per_source"]
    assert per["coco"]["records"] == 300 and per["coco"]["problems"] == {}
    assert per["vg"]["problems"] == {"bad_image": 1, "missing_image": 1} and per["text-only"]["records"] == 1
    assert per["coco"]["token_lengths"]["median"] > 4 and per["coco"]["truncated"] == 0


def test_convert_then_train_opens_the_directory(tmp_path, tokenizer_dir, sample_records, image_folder):
    from llavakit.data.dataset import encode_lengths
    from llavakit.data.records import load_records
    from llavakit.data.templates import get_template
    from llavakit.data.tokenize import ConversationEncoder, load_tokenizer

    data = write_json(tmp_path / "d.json", sample_records + [{"id": "bad", "conversations": []}])
    out = tmp_path / "converted"
    r = subprocess.run([sys.executable, "-m", "llavakit", "data", "convert", "--data_path", str(data), "--output",
                        str(out), "--tokenizer", tokenizer_dir, "--version", "v1", "--num_image_tokens", "4"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "5 records, 4 valid, 1 problem" in r.stdout and any((out / "lengths").iterdir())
    store, valid, problems = load_records(out, strict=False)
    assert len(store) == 5 and valid == [0, 1, 2, 3] and len(problems) == 1 and problems[0].id == "bad"
    tok = load_tokenizer(tokenizer_dir)
    from llavakit.model.build import prepare_tokenizer

    prepare_tokenizer(tok)
    enc = ConversationEncoder(tok, get_template("v1"), 4)
    fresh_cache = tmp_path / "cache"
    lengths = encode_lengths(store, valid, enc, cache_dir=fresh_cache)
    assert not fresh_cache.exists()  # found in the converted directory, nothing recomputed
    assert lengths["full"].min() > 4
