"""OCR-VQA images: download them from the URLs in OCR-VQA's ``dataset.json``, and fix mis-suffixed files.

LLaVA's mix665k names every OCR-VQA image ``ocr_vqa/images/<id>.jpg``, but the source URLs also serve GIF
and PNG files, which the original's instructions fix afterwards with a rename snippet. Here each image is
saved under the name the training JSON uses, with GIF/PNG content converted to JPEG; images that cannot be
fetched are reported (``ocr_vqa/download_failures.jsonl``) and the rest goes on.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

logger = logging.getLogger(__name__)

IMAGE_DIR = os.path.join("ocr_vqa", "images")
FAILURES = os.path.join("ocr_vqa", "download_failures.jsonl")


def _save_as_jpeg(data: bytes, dest: str) -> str:
    """Write ``data`` to ``dest`` as a JPEG (converted when it is another format); returns the source format."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        fmt = im.format or "?"
        tmp = dest + ".tmp"
        if fmt == "JPEG":
            with open(tmp, "wb") as f:
                f.write(data)
        else:
            im.seek(0)
            rgb = im.convert("RGB")
            rgb.save(tmp, format="JPEG", quality=95)
    os.replace(tmp, dest)
    return fmt


def _fetch(url: str, timeout: float, retries: int, backoff: float) -> bytes:
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "llavakit"}),
                                        timeout=timeout) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
            if e.code in (400, 401, 403, 404, 410):
                break
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            last = str(getattr(e, "reason", e)) or type(e).__name__
    raise RuntimeError(last)


def download_images(dataset_json: str, root: str, *, workers: int = 16, timeout: float = 30.0, retries: int = 3,
                    backoff: float = 1.0, progress: bool = True) -> dict:
    """Fetch every image of ``dataset_json`` to ``root/ocr_vqa/images/<id>.jpg``; returns counts."""
    with open(dataset_json, encoding="utf-8") as f:
        data = json.load(f)
    out_dir = os.path.join(root, IMAGE_DIR)
    os.makedirs(out_dir, exist_ok=True)
    jobs = [(k, v["imageURL"]) for k, v in data.items()
            if not os.path.isfile(os.path.join(out_dir, f"{k}.jpg"))]
    skipped = len(data) - len(jobs)

    def one(job):
        key, url = job
        try:
            fmt = _save_as_jpeg(_fetch(url, timeout, retries, backoff), os.path.join(out_dir, f"{key}.jpg"))
            return key, url, fmt, None
        except Exception as e:  # noqa: BLE001 - reported per image; the others go on
            return key, url, None, str(e) or type(e).__name__

    failures, converted = [], 0
    with ThreadPoolExecutor(workers) as pool:
        results = pool.map(one, jobs)
        if progress:
            from tqdm.auto import tqdm

            results = tqdm(results, total=len(jobs), desc="OCR-VQA images", unit="img", mininterval=1.0)
        for key, url, fmt, err in results:
            if err:
                failures.append({"id": key, "url": url, "error": err})
            elif fmt != "JPEG":
                converted += 1
    fail_path = os.path.join(root, FAILURES)
    with open(fail_path, "w", encoding="utf-8") as f:
        for x in failures:
            f.write(json.dumps(x) + "\n")
    return {"images": len(data), "already_there": skipped, "downloaded": len(jobs) - len(failures),
            "converted_to_jpeg": converted, "failed": len(failures), "failures_file": fail_path}


def fix_missing(data_path: str, image_folder: str, dry_run: bool = False) -> dict:
    """For each record whose image is missing, use a file with the same stem and another extension:
    renamed when its content already is the target's format, converted to JPEG when the record asks for
    ``.jpg`` and the file is GIF/PNG. Returns what changed (or would) and what is still missing."""
    from PIL import Image

    from llavakit.data.records import RecordStore, parse_record

    store = RecordStore.load(data_path)
    changes, missing, seen = [], [], set()
    for i in range(len(store)):
        try:
            rec = parse_record(store, i)
        except Exception:  # noqa: BLE001 - invalid records are `data check`'s business
            continue
        for rel in rec.images:
            target = os.path.join(image_folder, rel)
            if target in seen or os.path.exists(target):
                continue
            seen.add(target)
            stem, ext = os.path.splitext(target)
            candidates = [c for c in glob.glob(glob.escape(stem) + ".*") if c != target and not c.endswith(".tmp")]
            if not candidates:
                missing.append({"index": i, "id": rec.id, "image": rel})
                continue
            src = sorted(candidates)[0]
            try:
                with Image.open(src) as im:
                    fmt = im.format
            except OSError as e:
                missing.append({"index": i, "id": rec.id, "image": rel, "candidate": src, "error": str(e)})
                continue
            want_jpeg = ext.lower() in (".jpg", ".jpeg")
            action = "convert" if want_jpeg and fmt != "JPEG" else "rename"
            changes.append({"index": i, "id": rec.id, "from": src, "to": target, "action": action, "format": fmt})
            if dry_run:
                continue
            if action == "rename":
                os.replace(src, target)
            else:
                with open(src, "rb") as f:
                    _save_as_jpeg(f.read(), target)
                os.remove(src)
    return {"records": len(store), "changed": changes, "still_missing": missing, "dry_run": dry_run}
