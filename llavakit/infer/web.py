"""``llavakit web``: a chat page in the browser for a LLaVA model, on the inference code of ``chat`` and
``serve`` (one model, one process, no controller).

Drop one or more images into the message box with a question; the answer streams as it is generated. Each
image goes with the message it was attached to, before its text (as training data places them); the whole
conversation is the next turn's prompt, rendered with the template the model was trained with. Regenerate
answers the last question again; Clear starts over; temperature, top-p and max new tokens are under
"Generation".

Bad input is a message in the page (an empty question, a file that is not a readable image, an image over
the pixel limit or the upload limit, a conversation longer than the model's context); a model that cannot be
loaded is an error before the page starts.

Private by default: it listens on 127.0.0.1 unless ``--host`` says otherwise, sends no usage statistics,
makes no share link unless ``--share`` asks for one, and the page loads nothing from other sites (system
fonts).

The conversation logic (:class:`Turn`, :func:`add_turn`, :func:`answer`, :func:`view`) does not import
Gradio; :func:`build_app` wires it to the page.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

#: the largest file the page accepts (Gradio refuses bigger uploads in the browser)
MAX_UPLOAD_MB = 32
#: asked with an example image that comes without a question
DEFAULT_QUESTION = "Describe the image briefly."
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class WebInputError(ValueError):
    """Something the person typed or dropped cannot be asked; the message says what and how to fix it."""


@dataclass
class Turn:
    question: str
    images: list[str] = field(default_factory=list)  # files attached to this question
    answer: str | None = None


def add_turn(turns: list[Turn], text: str | None, files: list[str]) -> list[Turn]:
    """The conversation with a new question (and its images) at the end; a :class:`WebInputError` naming the
    problem when the question is empty or a file is not an image llavakit can read."""
    from llavakit.data.images import ImageLoadError, open_image

    text = (text or "").strip()
    if not text:
        raise WebInputError("Type a question to go with the image(s)." if files else "Type a question.")
    if turns and turns[-1].answer is None:
        raise WebInputError("The last question has no answer yet: regenerate it or clear the conversation.")
    for path in files:
        name = os.path.basename(path)
        try:
            open_image(path, name)  # decoded as training decodes; the pixel limit applies
        except ImageLoadError as e:
            raise WebInputError(f"{name}: not an image llavakit can read ({e}). Drop a PNG, JPEG, WebP, "
                                "BMP, GIF or TIFF file.") from None
    return [*turns, Turn(text, list(files))]


def to_messages(turns: list[Turn]) -> tuple[list[dict], list[str]]:
    """Chat-template messages and the images in order: each image part before its question's text."""
    from llavakit.infer.generate import user_message

    messages: list[dict] = []
    images: list[str] = []
    for t in turns:
        messages.append(user_message(t.question, len(t.images)))
        images += t.images
        if t.answer is not None:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": t.answer}]})
    return messages, images


def answer(predictor, turns: list[Turn], sampling, usage: dict | None = None) -> Iterator[str]:
    """The last turn's answer so far, after each generated piece (stripped as ``chat`` strips it). A
    :class:`WebInputError` when the conversation does not fit the model's context."""
    if not turns or turns[-1].answer is not None:
        raise WebInputError("Ask a question first.")
    messages, images = to_messages(turns)
    try:
        pieces = predictor.chat_stream(messages, images, sampling, usage=usage)  # the prompt is checked here
    except ValueError as e:
        raise WebInputError(f"{e}. Clear the conversation (or ask with fewer images).") from None
    text = ""
    for piece in pieces:
        text += piece
        yield text.strip()


def view(turns: list[Turn]) -> list[dict]:
    """The conversation as the page's chat shows it: images, then the question, then the answer."""
    out: list[dict] = []
    for t in turns:
        out += [{"role": "user", "content": {"path": p}} for p in t.images]
        out.append({"role": "user", "content": t.question})
        if t.answer is not None:
            out.append({"role": "assistant", "content": t.answer})
    return out


def find_examples(model_path: str, limit: int = 6) -> list[tuple[str, str]]:
    """(image, question) pairs to offer: images in ``<model>/examples/`` (asked :data:`DEFAULT_QUESTION`), or,
    for the demo's model (``demo-output/stage2``), held-out demo scenes with their first question."""
    model = Path(model_path)
    folder = model / "examples"
    if folder.is_dir():
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [(str(p), DEFAULT_QUESTION) for p in images[:limit]]
    heldout, images = model.parent / "data" / "heldout.jsonl", model.parent / "data" / "images"
    if not (heldout.is_file() and images.is_dir()):
        return []
    out, seen = [], set()
    for line in heldout.read_text().splitlines():
        q = json.loads(line)
        if q["image"] not in seen and (images / q["image"]).is_file():
            seen.add(q["image"])
            out.append((str(images / q["image"]), q["text"]))
        if len(out) == limit:
            break
    return out


def describe_model(predictor, model_path: str) -> str:
    """One line about the model: where it is from, its template, image tokens, device and dtype."""
    from llavakit.model.processing import template_name_of

    template = template_name_of(predictor.processor.chat_template, predictor.tokenizer) or "the model's own"
    return (f"**{model_path}** · template `{template}` · {predictor.encoder.num_image_tokens} image tokens per "
            f"image · {predictor.device.type}, {str(predictor.model.dtype).removeprefix('torch.')}")


def build_app(predictor, *, title: str, examples: list[tuple[str, str]] = (), temperature: float = 0.0,
              top_p: float | None = None, max_new_tokens: int = 512):
    """The Gradio page (not launched)."""
    import gradio as gr

    from llavakit.infer.generate import Sampling

    limit = max(max_new_tokens, min(4096, predictor.context_length or 4096))

    def ask(turns, message):
        message = message or {}
        files = [f if isinstance(f, str) else f["path"] for f in message.get("files") or []]
        try:
            turns = add_turn(turns, message.get("text"), files)
        except WebInputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return turns, view(turns), gr.MultimodalTextbox(value=None), "Answering…"

    def respond(turns, temp, p, max_new):
        sampling = Sampling(max_new_tokens=int(max_new), temperature=float(temp),
                            top_p=None if p >= 1.0 else float(p))
        usage: dict = {}
        start = time.monotonic()
        turns = [dataclasses.replace(t) for t in turns]
        try:
            for text in answer(predictor, turns, sampling, usage):
                turns[-1].answer = text
                yield turns, view(turns), "Answering…"
        except WebInputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        if turns[-1].answer is None:
            turns[-1].answer = ""
        seconds = time.monotonic() - start
        n = usage.get("completion_tokens", 0)
        yield turns, view(turns), f"Answered: {n} tokens in {seconds:.1f} s."

    def again(turns):
        if not turns:
            raise gr.Error("Nothing to regenerate yet: ask a question first.", print_exception=False)
        turns = [*turns[:-1], dataclasses.replace(turns[-1], answer=None)]
        return turns, view(turns), "Answering…"

    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title=f"llavakit · {title}", analytics_enabled=False) as app:
        gr.Markdown(f"### llavakit web\n{describe_model(predictor, title)}", elem_id="model-info")
        turns = gr.State([])
        chat = gr.Chatbot(elem_id="chat", height=480, show_label=False, feedback_options=None,
                          buttons=["copy", "copy_all"],
                          placeholder="Drop one or more images into the box below and ask about them.")
        box = gr.MultimodalTextbox(elem_id="ask", file_types=["image"], file_count="multiple", sources=["upload"],
                                   placeholder="Ask about the image(s)… (drop or attach images here)",
                                   show_label=False)
        status = gr.Markdown("Ready.", elem_id="status")
        with gr.Row():
            regenerate = gr.Button("Regenerate", elem_id="regenerate")
            clear = gr.Button("Clear", elem_id="clear")
        with gr.Accordion("Generation", open=False):
            temp = gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="temperature (0 = greedy)")
            p = gr.Slider(0.05, 1.0, value=1.0 if top_p is None else top_p, step=0.05, label="top-p")
            max_new = gr.Slider(1, limit, value=max_new_tokens, step=1, label="max new tokens")
        if examples:
            gr.Examples([[{"text": q, "files": [img]}] for img, q in examples], inputs=[box],
                        label="Examples")
        settings = [temp, p, max_new]
        # one model: every answer, asked or regenerated, waits in one queue
        box.submit(ask, [turns, box], [turns, chat, box, status]).success(
            respond, [turns, *settings], [turns, chat, status], concurrency_id="model")
        regenerate.click(again, [turns], [turns, chat, status]).success(
            respond, [turns, *settings], [turns, chat, status], concurrency_id="model")
        clear.click(lambda: ([], [], None, "Ready."), None, [turns, chat, box, status])
        chat.clear(lambda: ([], "Ready."), None, [turns, status])  # the chat's own bin icon
    app.llavakit_theme = theme  # launch() takes the theme in Gradio 6
    return app


def launch(app, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           allowed_paths: list[str] = (), max_queued: int = 8) -> str:
    """Start the page's server in the background; its URL. One answer is generated at a time, and at most
    ``max_queued`` more requests wait."""
    app.queue(default_concurrency_limit=1, max_size=max_queued).launch(
        server_name=host, server_port=port, share=share, inbrowser=False, show_error=True, ssr_mode=False,
        max_file_size=f"{MAX_UPLOAD_MB}mb", allowed_paths=list(allowed_paths), footer_links=[],
        theme=app.llavakit_theme, quiet=True, prevent_thread_lock=True)
    return app.share_url or app.local_url


def main(args) -> int:
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio is imported: no usage statistics
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own requests to the page, one line each
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("llavakit web needs Gradio: pip install 'llavakit[web]'") from None
    from llavakit.infer.generate import Predictor
    from llavakit.infer.serve import warn_if_exposed

    predictor = Predictor.from_pretrained(args.model_path, model_base=args.model_base, device=args.device,
                                          conv_mode=args.conv_mode)
    examples = find_examples(args.model_path)
    app = build_app(predictor, title=args.model_path, examples=examples, temperature=args.temperature,
                    top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    warn_if_exposed(args.host)
    url = launch(app, host=args.host, port=args.port, share=args.share,
                 allowed_paths=sorted({os.path.dirname(img) for img, _ in examples}))
    print(f"llavakit web: {args.model_path} at {url} (Ctrl-C stops)", flush=True)
    try:
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return 0
