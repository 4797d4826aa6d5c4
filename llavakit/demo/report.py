"""``report.html``: the demo's results on one static page that opens from disk (images embedded, no server,
no script from elsewhere): per-type accuracy of the stage-1-only and final models against chance, stage-1
captions, every held-out image with its questions, the expected and the model's answers, and the loss curves.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from llavakit.demo.run import cpu_label

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 70em; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; }
table { border-collapse: collapse; } td, th { padding: 0.25em 0.8em; border-bottom: 1px solid #ddd; }
th { text-align: left; } .num { text-align: right; font-variant-numeric: tabular-nums; }
img.scene { width: 112px; height: 112px; image-rendering: pixelated; border: 1px solid #ccc; }
.cards { display: flex; flex-wrap: wrap; gap: 1em; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 0.6em; width: 19em; }
.qa .card { width: 30em; }
.card table { font-size: 0.85em; } .right { color: #176f2c; } .wrong { color: #b3261e; font-weight: 600; }
.muted { color: #666; font-size: 0.9em; }
"""


def _data_uri(path: Path) -> str:
    kind = {"png": "png", "jpg": "jpeg", "jpeg": "jpeg"}.get(path.suffix.lower().lstrip("."), "png")
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _short(text: str, limit: int = 30) -> str:
    """An answer as scored: up to its first full stop (the stage-1 model goes on with its next question)."""
    text = text.split(".")[0]
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _mark(right: bool) -> str:
    return '<span class="right">✓</span>' if right else '<span class="wrong">✗</span>'


def write_report(path: Path, summary: dict, final: list[dict], stage1: list[dict], captions: list[dict],
                 image_root: Path, loss_curves: Path, max_images: int = 24) -> None:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>llavakit demo</title><style>{STYLE}"
             "</style></head><body>", "<h1>llavakit demo: a tiny LLaVA trained end to end on a CPU</h1>",
             f"<p class='muted'>seed {summary['seed']}{' (quick run)' if summary['quick'] else ''}; "
             f"{summary['wall_seconds']:.0f} s on {e(cpu_label(summary['cpu']))}; "
             f"{summary['heldout_questions']} held-out questions</p>"]

    parts.append("<h2>Held-out accuracy by question type</h2><table id='accuracy'><tr><th>question type</th>"
                 "<th>chance</th><th>stage 1 only</th><th>final</th></tr>")
    for t in sorted(summary["per_type"]):
        parts.append(f"<tr><td>{e(t)}</td><td class='num'>{summary['chance_per_type'][t]:.2f}</td>"
                     f"<td class='num'>{summary['stage1_only_per_type'].get(t, 0):.2f}</td>"
                     f"<td class='num'>{summary['per_type'][t]:.2f}</td></tr>")
    parts.append(f"<tr><th>all</th><th class='num'>{summary['chance_accuracy']:.2f}</th>"
                 f"<th class='num'>{summary['stage1_only_accuracy']:.2f}</th>"
                 f"<th class='num'>{summary['heldout_accuracy']:.2f}</th></tr></table>")

    parts.append("<h2>After stage 1: captions of held-out images</h2>"
                 f"<p>The captions name {summary['stage1_caption_accuracy']:.0%} of the objects by colour and shape "
                 f"together (chance {summary['stage1_caption_chance']:.0%}).</p><div class='cards'>")
    for c in captions[:8]:
        parts.append(f"<div class='card'><img class='scene' alt='{e(c['image'])}' src='{_data_uri(image_root / c['image'])}'>"
                     f"<p>{e(c['caption']) or '<i>(empty)</i>'}</p><p class='muted'>names {c['named']} of "
                     f"{c['objects']} object(s)</p></div>")
    parts.append("</div>")

    parts.append("<h2>Held-out images: questions and answers</h2><div class='cards qa' id='heldout'>")
    by_image: dict[str, list[tuple[dict, dict]]] = {}
    for f, s1 in zip(final, stage1):
        by_image.setdefault(f["image"], []).append((f, s1))
    for image, rows in list(by_image.items())[:max_images]:
        parts.append(f"<div class='card'><img class='scene' alt='{e(image)}' src='{_data_uri(image_root / image)}'>"
                     "<table><tr><th>question</th><th>expected</th><th>stage 1</th><th>final</th></tr>")
        for f, s1 in rows:
            parts.append(f"<tr><td>{e(f['question'])}</td><td>{e(f['expected'])}</td>"
                         f"<td>{_mark(s1['right'])} {e(_short(s1['answer']))}</td>"
                         f"<td>{_mark(f['right'])} {e(_short(f['answer']))}</td></tr>")
        parts.append("</table></div>")
    parts.append("</div>")

    parts.append(f"<h2>Loss curves</h2><img alt='loss curves' src='{_data_uri(loss_curves)}' style='max-width:100%'>")
    chat = summary["chat"]
    parts.append(f"<h2>A chat about a held-out image</h2><img class='scene' alt='{e(chat['image'])}' "
                 f"src='{_data_uri(image_root / chat['image'])}'><table>")
    for turn in chat["turns"]:
        parts.append(f"<tr><th>USER</th><td>{e(turn['user'])}</td></tr>"
                     f"<tr><th>ASSISTANT</th><td>{e(turn['assistant'])}</td></tr>")
    # filled in by the browser once the page has loaded: how many of its images decoded (read by the tests)
    parts.append("</table><script>window.addEventListener('load', () => { const imgs = [...document.images]; "
                 "document.body.dataset.images = imgs.length; document.body.dataset.decoded = "
                 "imgs.filter(i => i.complete && i.naturalWidth > 0).length; });</script></body></html>")
    Path(path).write_text("\n".join(parts), encoding="utf-8")
