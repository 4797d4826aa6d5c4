"""``llavakit data download``: LLaVA-1.5's data where the original's layout expects it, safe to re-run.

Every download — a named set, a ``--manifest``, an OCR-VQA image — goes through one streaming downloader:
HTTP ``Range`` resume of ``FILE.part``, retries with exponential backoff on dropped connections, stalls
(no byte for ``--timeout`` seconds), 429 and 5xx; no retry on 401/403/404 (the message says what to do);
size and SHA-256 checked where known; the ``.part`` file is renamed only once complete and verified.

Hub files (``hub://datasets/OWNER/NAME/FILE`` or ``hub://models/...``) are fetched from the hub's resolve
URL, built by ``huggingface_hub`` (so ``HF_ENDPOINT`` and the saved token apply).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

logger = logging.getLogger(__name__)

CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


#: what a download URL may be: the web, or a file of a hub repository. Not file:// — a manifest is often
#: someone else's, and copying local files into the data root is not a download's business
URL_SCHEMES = ("http://", "https://", "hub://")


@dataclass
class FileSpec:
    url: str  # http(s)://... or hub://{datasets|models}/OWNER/NAME/PATH/IN/REPO
    path: str  # where it lands, relative to the root (to the working directory for base "cwd")
    sha256: str | None = None
    size: int | None = None
    unpack: str | None = None  # unpack the archive into this folder (relative to the root) when present
    #: "root" (every manifest entry) or "cwd" (the built-in projector sets, which land in ./checkpoints)
    base: str = "root"
    #: where the entry comes from, for messages (a manifest's file and entry)
    origin: str | None = None

    @classmethod
    def from_dict(cls, d: dict, source: str, i: int) -> FileSpec:
        where = f"{source}: files[{i}]"
        if not isinstance(d, dict) or not isinstance(d.get("url"), str) or not isinstance(d.get("path"), str):
            raise ValueError(f"{where} needs 'url' and 'path' strings")
        unknown = set(d) - {"url", "path", "sha256", "size", "unpack"}
        if unknown:
            raise ValueError(f"{where} has unknown keys {sorted(unknown)}")
        if d.get("unpack") is not None and not isinstance(d["unpack"], str):
            raise ValueError(f"{where}: 'unpack' is the folder (under --root) to unpack the archive into, a string; "
                             f"got {d['unpack']!r}")
        if d.get("sha256") is not None and not isinstance(d["sha256"], str):
            raise ValueError(f"{where}: 'sha256' must be a hex string")
        if d.get("size") is not None and (not isinstance(d["size"], int) or isinstance(d["size"], bool)
                                          or d["size"] < 0):
            raise ValueError(f"{where}: 'size' must be a byte count")
        if not d["url"].startswith(URL_SCHEMES):
            raise ValueError(f"{where}: url {d['url']!r}: only {', '.join(URL_SCHEMES)} URLs are downloaded")
        return cls(d["url"], d["path"], d.get("sha256"), d.get("size"), d.get("unpack"), origin=where)


def _inside(base: str, relative: str, what: str) -> str:
    """``base/relative``, refused when it is absolute or would leave ``base`` (``..``, a link out)."""
    if not relative or os.path.isabs(relative) or relative.startswith("~"):
        raise ValueError(f"{what} {relative!r} must be a relative path inside {base}")
    target = os.path.join(base, relative)
    real_base = os.path.realpath(base)
    if os.path.commonpath([real_base, os.path.realpath(target)]) != real_base:
        raise ValueError(f"{what} {relative!r} leaves {base}; every file a download writes stays inside it")
    return os.path.normpath(target)


def check_specs(specs: list[FileSpec], root: str) -> None:
    """Every destination and unpack folder stays inside its base — checked for all before anything is fetched."""
    for s in specs:
        destination(s, root)
        if s.unpack is not None:
            _inside(root, s.unpack, f"{s.origin or s.url}: unpack folder")


def read_manifest(path: str) -> list[FileSpec]:
    """``{"files": [{"url", "path", "sha256"?, "size"?, "unpack"?}]}``."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such manifest") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        raise ValueError(f'{path}: a manifest is {{"files": [{{"url": ..., "path": ...}}, ...]}}')
    return [FileSpec.from_dict(d, path, i) for i, d in enumerate(data["files"])]


# ---- the named sets (LLaVA-1.5's data, the original's layout under --root) ------------------------
_PRETRAIN = "hub://datasets/liuhaotian/LLaVA-Pretrain"
_INSTRUCT = "hub://datasets/liuhaotian/LLaVA-Instruct-150K"
NAMED_SETS: dict[str, list[FileSpec]] = {
    "pretrain": [
        FileSpec(f"{_PRETRAIN}/blip_laion_cc_sbu_558k.json", "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"),
        FileSpec(f"{_PRETRAIN}/blip_laion_cc_sbu_558k_meta.json", "LLaVA-Pretrain/blip_laion_cc_sbu_558k_meta.json"),
        FileSpec(f"{_PRETRAIN}/images.zip", "LLaVA-Pretrain/images.zip", unpack="LLaVA-Pretrain/images"),
    ],
    "instruct": [FileSpec(f"{_INSTRUCT}/llava_v1_5_mix665k.json", "llava_v1_5_mix665k.json")],
    "coco": [FileSpec("http://images.cocodataset.org/zips/train2017.zip", "downloads/coco_train2017.zip",
                      unpack="coco")],
    "gqa": [FileSpec("https://downloads.cs.stanford.edu/nlp/data/gqa/images.zip", "downloads/gqa_images.zip",
                     unpack="gqa")],
    "textvqa": [FileSpec("https://dl.fbaipublicfiles.com/textvqa/images/train_val_images.zip",
                         "downloads/textvqa_train_val_images.zip", unpack="textvqa")],
    "vg": [FileSpec("https://cs.stanford.edu/people/rak248/VG_100K_2/images.zip", "downloads/vg_images.zip",
                    unpack="vg"),
           FileSpec("https://cs.stanford.edu/people/rak248/VG_100K_2/images2.zip", "downloads/vg_images2.zip",
                    unpack="vg")],
    "projector-7b": [FileSpec("hub://models/liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin",
                              "checkpoints/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5/mm_projector.bin",
                              base="cwd")],
    "projector-13b": [FileSpec("hub://models/liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-13b-v1.5/"
                               "mm_projector.bin",
                               "checkpoints/llava-v1.5-mlp2x-336px-pretrain-vicuna-13b-v1.5/mm_projector.bin",
                               base="cwd")],
}
#: OCR-VQA's images come from the URLs in its dataset.json (``--ocrvqa-json``), not from an archive
ALL_FINETUNE = ("instruct", "coco", "gqa", "ocrvqa", "textvqa", "vg")
SET_NAMES = (*NAMED_SETS, "ocrvqa", "all-finetune")


def expand_sets(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        if n not in SET_NAMES:
            raise ValueError(f"unknown set {n!r}; choose from {', '.join(SET_NAMES)}")
        for m in (ALL_FINETUNE if n == "all-finetune" else (n,)):
            if m not in out:
                out.append(m)
    return out


def destination(spec: FileSpec, root: str) -> str:
    """Where a file lands: under ``root`` (the projector sets: under the working directory, in
    ``checkpoints/``); a path that would leave it is a ValueError."""
    base = "." if spec.base == "cwd" else root
    return _inside(base, spec.path, f"{spec.origin or spec.url}: path")


def resolve(url: str) -> tuple[str, dict]:
    """A downloadable URL and its headers (``hub://`` → the hub's resolve URL, with the saved token)."""
    if not url.startswith("hub://"):
        return url, {}
    from huggingface_hub import get_token, hf_hub_url

    kind, _, rest = url[len("hub://"):].partition("/")
    parts = rest.split("/")
    if kind not in ("datasets", "models") or len(parts) < 3:
        raise ValueError(f"{url}: expected hub://datasets/OWNER/NAME/FILE or hub://models/OWNER/NAME/FILE")
    repo_id, filename = "/".join(parts[:2]), "/".join(parts[2:])
    real = hf_hub_url(repo_id, filename, repo_type="dataset" if kind == "datasets" else None)
    token = get_token()
    return real, ({"Authorization": f"Bearer {token}"} if token else {})


# ---- the downloader -----------------------------------------------------------------------------
def _sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _verify(path: str, size: int | None, sha256: str | None) -> str | None:
    """None when ``path`` matches what is known of it, else why not."""
    actual = os.path.getsize(path)
    if size is not None and actual != size:
        return f"size {actual} bytes, expected {size}"
    if sha256 is not None:
        digest = _sha256_of(path)
        if digest != sha256.lower():
            return f"sha256 {digest}, expected {sha256.lower()}"
    return None


def download_file(url: str, dest: str, *, sha256: str | None = None, size: int | None = None, retries: int = 5,
                  timeout: float = 60.0, backoff: float = 2.0, progress: bool = True,
                  headers: dict | None = None) -> str:
    """Fetch ``url`` to ``dest`` (resuming ``dest.part``); returns ``dest``. Skips a complete ``dest``."""
    if os.path.isfile(dest):
        why = _verify(dest, size, sha256)
        if why is None:
            logger.info("%s: already there", dest)
            return dest
        raise DownloadError(f"{dest} exists but does not match ({why}); remove it to download again")
    os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
    part = dest + ".part"
    headers = dict(headers or {})
    last = ""
    for attempt in range(retries + 1):
        if attempt:
            wait = backoff * 2 ** (attempt - 1)
            logger.warning("%s: %s; retrying in %.0f s (%d/%d)", url, last, wait, attempt, retries)
            time.sleep(wait)
        try:
            total = _fetch(url, part, headers, timeout, progress, os.path.basename(dest))
        except _Permanent as e:
            raise DownloadError(str(e)) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, _Retry) as e:
            last = str(getattr(e, "reason", e)) or type(e).__name__
            continue
        why = _verify(part, size if size is not None else total, sha256)
        if why is not None:
            os.remove(part)  # corrupt: the next try starts over
            last = f"downloaded file does not match ({why})"
            if sha256 is not None and attempt == retries:
                break
            continue
        os.replace(part, dest)
        return dest
    raise DownloadError(f"{url}: failed after {retries + 1} tries ({last}); the partial file "
                        f"{part if os.path.exists(part) else '(none)'} is kept for the next run")


class _Retry(Exception):
    pass


class _Permanent(Exception):
    pass


def _fetch(url: str, part: str, headers: dict, timeout: float, progress: bool, name: str) -> int | None:
    """Append the rest of ``url`` to ``part``; return the full size when the server says it."""
    offset = os.path.getsize(part) if os.path.exists(part) else 0
    h = dict(headers)
    if offset:
        h["Range"] = f"bytes={offset}-"
    req = urllib.request.Request(url, headers=h)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # nothing left to fetch: the part file is complete
            return offset
        if e.code in (401, 403):
            raise _Permanent(f"{url}: HTTP {e.code} — not authorised (for a gated hub repo, accept its terms "
                             "and run `huggingface-cli login`)") from None
        if e.code == 404:
            raise _Permanent(f"{url}: HTTP 404 — not found (check the URL or HF_ENDPOINT)") from None
        if e.code == 429 or e.code >= 500:
            raise _Retry(f"HTTP {e.code}") from None
        raise _Permanent(f"{url}: HTTP {e.code}") from None
    with resp:
        if offset and resp.status == 200:  # the server ignored the range: start over
            offset = 0
        mode = "ab" if offset and resp.status == 206 else "wb"
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, desc=name, mininterval=1.0)
        got = offset
        try:
            with open(part, mode) as f:
                while True:
                    block = resp.read1(CHUNK)  # what has arrived; a stall raises a timeout after `timeout` s
                    if not block:
                        break
                    f.write(block)
                    got += len(block)
                    if bar:
                        bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        finally:
            if bar:
                bar.close()
    if total is not None and got < total:
        raise _Retry(f"connection closed at {got} of {total} bytes")
    return total if total is not None else got


# ---- sets and manifests -------------------------------------------------------------------------
def plan(specs: list[FileSpec], root: str) -> list[dict]:
    check_specs(specs, root)
    rows = []
    for s in specs:
        dest = destination(s, root)
        state = "present" if os.path.isfile(dest) else ("partial" if os.path.isfile(dest + ".part") else "missing")
        rows.append({"url": s.url, "dest": dest, "size": s.size, "state": state,
                     "unpack": os.path.join(root, s.unpack) if s.unpack else None})
    return rows


def fetch_all(specs: list[FileSpec], root: str, *, progress: bool = True, retries: int = 5, timeout: float = 60.0,
              backoff: float = 2.0) -> list[str]:
    from llavakit.data.unpack import unpack

    check_specs(specs, root)
    done = []
    for s in specs:
        url, headers = resolve(s.url)
        dest = download_file(url, destination(s, root), sha256=s.sha256, size=s.size, retries=retries,
                             timeout=timeout, backoff=backoff, progress=progress, headers=headers)
        if s.unpack:
            unpack(dest, os.path.join(root, s.unpack), progress=progress)
        done.append(dest)
    return done
