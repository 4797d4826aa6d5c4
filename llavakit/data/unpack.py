"""``llavakit data unpack``: zip and tar archives, idempotent and safe.

* A member that would land outside the destination (an absolute path, ``..``, a link pointing out, a
  device file) is refused before anything is written, with the member named.
* Extraction goes into ``DEST/.unpacking-NAME`` first and is moved into place when complete; a marker
  (``DEST/.unpacked-NAME.json``, with the archive's size and mtime) makes a second run skip the archive.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import zipfile


class UnsafeArchiveError(ValueError):
    pass


def _marker(archive: str, dest: str) -> str:
    return os.path.join(dest, f".unpacked-{os.path.basename(archive)}.json")


def _stamp(archive: str) -> dict:
    st = os.stat(archive)
    return {"archive": os.path.abspath(archive), "size": st.st_size, "mtime": int(st.st_mtime)}


def _inside(base: str, name: str) -> bool:
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return False
    target = os.path.realpath(os.path.join(base, name))
    return target == base or target.startswith(base + os.sep)


def _refuse_outside(base: str, archive: str, name: str) -> None:
    if not _inside(base, name):
        raise UnsafeArchiveError(f"{archive}: member {name!r} would be written outside {base}; "
                                 "refusing to unpack this archive")


def _refuse_link_out(base: str, archive: str, name: str, link_dir: str, target: str) -> None:
    if os.path.isabs(target) or not _inside(base, os.path.relpath(os.path.join(link_dir, target), base)):
        raise UnsafeArchiveError(f"{archive}: link {name!r} → {target!r} points outside {base}")


def _check_zip(zf: zipfile.ZipFile, base: str, archive: str) -> list[zipfile.ZipInfo]:
    members = zf.infolist()
    for m in members:
        _refuse_outside(base, archive, m.filename)
        if (m.external_attr >> 16) & 0o170000 == 0o120000:  # a symlink stored in a zip
            _refuse_link_out(base, archive, m.filename, os.path.dirname(os.path.join(base, m.filename)),
                             zf.read(m).decode(errors="replace"))
    return members


def _check_tar(tf: tarfile.TarFile, base: str, archive: str) -> list[tarfile.TarInfo]:
    members = tf.getmembers()
    for m in members:
        _refuse_outside(base, archive, m.name)
        if m.issym() or m.islnk():  # a hard link's target is relative to the archive root
            _refuse_link_out(base, archive, m.name,
                             os.path.dirname(os.path.join(base, m.name)) if m.issym() else base, m.linkname)
        elif not (m.isfile() or m.isdir()):
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} is a device or fifo; refusing")
    return members


def unpack(archive: str, dest: str, progress: bool = True) -> str:
    """Unpack ``archive`` into ``dest`` (skipped when already done for this very archive)."""
    if not os.path.isfile(archive):
        raise FileNotFoundError(f"{archive}: no such archive")
    os.makedirs(dest, exist_ok=True)
    marker = _marker(archive, dest)
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == _stamp(archive):
                return dest
    staging = os.path.join(dest, f".unpacking-{os.path.basename(archive)}")
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    base = os.path.realpath(staging)
    bar = None
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                members = _check_zip(zf, base, archive)
                bar = _bar(progress, sum(m.file_size for m in members), os.path.basename(archive))
                for m in members:
                    zf.extract(m, staging)
                    if bar:
                        bar.update(m.file_size)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as tf:
                members = _check_tar(tf, base, archive)
                bar = _bar(progress, sum(m.size for m in members), os.path.basename(archive))
                kw = {"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}
                for m in members:
                    tf.extract(m, staging, set_attrs=False, **kw)
                    if bar:
                        bar.update(m.size)
        else:
            raise ValueError(f"{archive}: neither a zip nor a tar archive")
        _merge(staging, dest)
    finally:
        if bar:
            bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(_stamp(archive), f)
    return dest


def _bar(progress: bool, total: int, name: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=f"unpacking {name}", mininterval=1.0)


def _merge(src: str, dest: str) -> None:
    """Move everything from ``src`` into ``dest`` (folders merged, files replaced)."""
    for name in os.listdir(src):
        s, d = os.path.join(src, name), os.path.join(dest, name)
        if os.path.isdir(s) and not os.path.islink(s) and os.path.isdir(d):
            _merge(s, d)
        else:
            if os.path.isdir(d) and not os.path.islink(d):
                shutil.rmtree(d)
            os.replace(s, d)
