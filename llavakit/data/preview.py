"""``llavakit data preview``: how each record is rendered, tokenized and supervised."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

from llavakit import IGNORE_INDEX
from llavakit.data.dataset import resolve_image
from llavakit.data.images import ImageLoadError, image_size
from llavakit.data.records import RecordStore, check_record
from llavakit.data.templates import TemplateError
from llavakit.data.tokenize import ConversationEncoder, SampleTooLong, SupervisionError


def preview_records(store: RecordStore, encoder: ConversationEncoder, model_max_length: int | None = None,
                    limit: int | None = None, image_folder: str | None = None) -> Iterator[dict]:
    """One dict per record in file order; invalid or unencodable records carry an ``error``. With AnyRes
    each image's token count follows its size, read from its header under ``image_folder``."""
    n = len(store) if limit is None else min(limit, len(store))
    for i in range(n):
        raw = store.raw(i)
        rec, problems = check_record(raw, i, store.source)
        if rec is None:
            yield {"index": i, "id": raw.get("id") if isinstance(raw, dict) else None,
                   "error": "; ".join(p.message for p in problems)}
            continue
        try:
            sizes = [image_size(resolve_image(image_folder, p)) for p in rec.images] \
                if encoder.anyres is not None else None
            enc = encoder.fit(encoder.encode(rec, sizes), model_max_length)
        except (SupervisionError, SampleTooLong, TemplateError, ImageLoadError) as e:
            yield {"index": i, "id": rec.id, "error": f"{store.source}: record {i} (id={rec.id!r}): {e}"}
            continue
        yield {"index": i, "id": rec.id, "prompt": enc.prompt, "input_ids": enc.input_ids,
               "labels": enc.labels, "image_token_id": encoder.image_token_id,
               "image_tokens": [b - a for a, b in enc.image_spans]}


def render_readable(item: dict, tokenizer, color: bool) -> str:
    """The token sequence as text: supervised runs highlighted, image blocks collapsed."""
    if "error" in item:
        return f"#{item['index']} id={item['id']!r}\n  ERROR: {item['error']}\n"
    on, off = ("\x1b[1;32m", "\x1b[0m") if color else ("[[", "]]")
    images = f", {sum(item['image_tokens'])} image tokens" if item["image_tokens"] else ""
    out = [f"#{item['index']} id={item['id']!r}  ({len(item['input_ids'])} tokens{images}, "
           f"{sum(lab != IGNORE_INDEX for lab in item['labels'])} supervised)"]
    text, run, sup_run = [], [], None
    img = item["image_token_id"]

    def flush():
        if run:
            s = tokenizer.decode(run, skip_special_tokens=False)
            text.append(on + s + off if sup_run else s)
            run.clear()

    i, ids, labels = 0, item["input_ids"], item["labels"]
    while i < len(ids):
        if ids[i] == img:
            flush()
            j = i
            while j < len(ids) and ids[j] == img:
                j += 1
            text.append(f"<image×{j - i}>")
            i = j
            continue
        sup = labels[i] != IGNORE_INDEX
        if sup != sup_run:
            flush()
            sup_run = sup
        run.append(ids[i])
        i += 1
    flush()
    out.append("".join(text))
    return "\n".join(out) + "\n"


def write_preview(items, tokenizer, as_json: bool, stream=None) -> int:
    stream = stream or sys.stdout
    errors = 0
    color = hasattr(stream, "isatty") and stream.isatty()
    for item in items:
        errors += "error" in item
        stream.write(json.dumps(item, ensure_ascii=False) + "\n" if as_json
                     else render_readable(item, tokenizer, color))
    return errors
