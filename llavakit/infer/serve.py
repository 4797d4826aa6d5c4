"""``llavakit serve``: an OpenAI-compatible chat endpoint for a LLaVA model.

``POST /v1/chat/completions`` takes ``messages`` whose content is a string or a list of ``text`` and
``image_url`` parts, with ``stream`` (server-sent events, as the OpenAI API sends them), ``max_tokens`` /
``max_completion_tokens``, ``temperature`` and ``top_p``; ``GET /v1/models`` lists the one model.

Images: ``data:image/...;base64,`` URLs always; local files (a path or ``file://``) only with
``--allow-local-files``; ``http(s)://`` only with ``--allow-remote-images`` — by default the server fetches
nothing. It listens on 127.0.0.1 unless ``--host`` says otherwise.

Limits: one generation runs at a time and at most ``--max-queued`` more wait; a request past that gets 503
at once (with ``Retry-After``). ``max_tokens`` above ``--max-tokens-limit`` is a 400, and generation stops
where the model's context ends; a generation stops as soon as its client disconnects, so a client that goes
away frees the model for the next request. Request bodies are limited to 64 MiB, fetched images to 32 MiB,
every image to the project's pixel limit (``LLAVAKIT_MAX_IMAGE_PIXELS``).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import os
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024 * 1024
MAX_REMOTE_IMAGE = 32 * 1024 * 1024


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.param = param


@dataclass
class ServeOptions:
    model_id: str
    allow_local_files: bool = False
    allow_remote_images: bool = False
    default_max_tokens: int = 512
    max_tokens_limit: int = 4096
    max_queued: int = 8


def load_image_url(url: str, opts: ServeOptions):
    from llavakit.data.images import ImageLoadError, open_image

    if url.startswith("data:"):
        header, _, payload = url.partition(",")
        if ";base64" not in header:
            raise RequestError("image_url data URLs must be base64-encoded (data:image/png;base64,...)")
        try:
            raw = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError("image_url: the data URL's base64 payload is invalid") from None
        source = io.BytesIO(raw)
    elif url.startswith(("http://", "https://")):
        if not opts.allow_remote_images:
            raise RequestError("image_url: remote URLs are not fetched by this server (start it with "
                               "--allow-remote-images); send the image as a base64 data URL")
        source = io.BytesIO(_fetch(url))
    else:
        path = url[len("file://"):] if url.startswith("file://") else url
        if not opts.allow_local_files:
            raise RequestError("image_url: local files are not read by this server (start it with "
                               "--allow-local-files); send the image as a base64 data URL")
        if not os.path.isfile(path):
            raise RequestError(f"image_url: {path} not found")
        source = path
    try:
        return open_image(source, "image_url")  # decoded exactly as training decodes its images
    except ImageLoadError as e:
        raise RequestError(f"image_url: not a readable image ({e})") from None


def _fetch(url: str) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            data = r.read(MAX_REMOTE_IMAGE + 1)
    except OSError as e:
        raise RequestError(f"image_url: cannot fetch {url}: {e}") from None
    if len(data) > MAX_REMOTE_IMAGE:
        raise RequestError(f"image_url: {url} is larger than {MAX_REMOTE_IMAGE // 2**20} MiB")
    return data


def parse_messages(messages, opts: ServeOptions) -> tuple[list[dict], list]:
    """OpenAI messages → chat-template messages (image parts before text, as training saw them) + images."""
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f"messages[{i}]: role must be system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, str):
            out.append({"role": m["role"], "content": [{"type": "text", "text": _text(content, i)}]})
            continue
        if not isinstance(content, list):
            raise RequestError(f"messages[{i}].content must be a string or a list of parts", param="messages")
        texts, n_images = [], 0
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                texts.append(_text(part.get("text", ""), i))
            elif kind == "image_url":
                if m["role"] != "user":
                    raise RequestError(f"messages[{i}]: only user messages may hold images", param="messages")
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise RequestError(f"messages[{i}].content[{j}]: image_url needs a url", param="messages")
                images.append(load_image_url(url, opts))
                n_images += 1
            else:
                raise RequestError(f"messages[{i}].content[{j}]: unsupported part type {kind!r} "
                                   "(text and image_url are)", param="messages")
        out.append({"role": m["role"], "content": [{"type": "image"}] * n_images +
                    [{"type": "text", "text": "\n".join(texts)}]})
    if out[-1]["role"] != "user":
        raise RequestError("the last message must be the user's", param="messages")
    return out, images


def _text(text, i: int) -> str:
    from llavakit import IMAGE_PLACEHOLDER

    if not isinstance(text, str):
        raise RequestError(f"messages[{i}]: text must be a string", param="messages")
    if IMAGE_PLACEHOLDER in text:
        raise RequestError(f"messages[{i}]: the text holds {IMAGE_PLACEHOLDER!r}, which only an image_url part may "
                           "stand for", param="messages")
    return text


def _client_gone(sock) -> bool:
    """Whether the peer closed the connection (readable with nothing to read)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class Admission:
    """One generation at a time, at most ``max_queued`` waiting: whether a request may take its turn."""

    def __init__(self, max_queued: int):
        self.capacity = 1 + max_queued
        self.active = 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.active >= self.capacity:
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.active -= 1


def sampling_from(body: dict, opts: ServeOptions):
    from llavakit.infer.generate import Sampling

    def number(name, default, lo, hi):
        v = body.get(name, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
            raise RequestError(f"'{name}' must be a number in [{lo}, {hi}]", param=name)
        return v

    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = opts.default_max_tokens if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise RequestError("'max_tokens' must be a positive integer", param="max_tokens")
    if max_tokens > opts.max_tokens_limit:
        raise RequestError(f"'max_tokens' {max_tokens} is over this server's limit of {opts.max_tokens_limit} "
                           "(--max-tokens-limit)", param="max_tokens")
    if body.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    return Sampling(max_new_tokens=max_tokens, temperature=float(number("temperature", 0.0, 0, 2)),
                    top_p=number("top_p", None, 0, 1))


def make_handler(predictor, opts: ServeOptions):
    admission = Admission(opts.max_queued)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            logger.info("%s %s", self.address_string(), fmt % args)

        def _json(self, status: int, obj: dict, headers: dict | None = None) -> None:
            body = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, e: RequestError, headers: dict | None = None) -> None:
            kind = "invalid_request_error" if e.status < 500 else "server_error"
            self._json(e.status, {"error": {"message": str(e), "type": kind, "param": e.param, "code": None}},
                       headers)

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [{"id": opts.model_id, "object": "model",
                                                             "created": 0, "owned_by": "llavakit"}]})
            elif self.path.rstrip("/") in ("/health", "/healthz"):
                self._json(200, {"status": "ok"})
            else:
                self._error(RequestError(f"no route {self.path}", 404))

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(RequestError(f"no route {self.path}", 404))
                return
            try:
                try:
                    length = int(self.headers.get("Content-Length") or 0)
                except ValueError:
                    raise RequestError("Content-Length is not a number") from None
                if length > MAX_BODY:
                    raise RequestError("request body too large", 413)
                try:
                    body = json.loads(self.rfile.read(length) or b"null")
                except json.JSONDecodeError:
                    raise RequestError("the request body is not JSON") from None
                if not isinstance(body, dict):
                    raise RequestError("the request body must be a JSON object")
                sampling = sampling_from(body, opts)
                messages, images = parse_messages(body.get("messages"), opts)
            except RequestError as e:
                self._error(e)
                return
            if not admission.enter():
                self._error(RequestError(f"busy: a generation is running and {admission.capacity - 1} more are "
                                         "waiting; retry shortly", 503), {"Retry-After": "1"})
                return
            try:
                self._complete(body, messages, images, sampling)
            finally:
                admission.leave()

        def _complete(self, body: dict, messages: list, images: list, sampling) -> None:
            try:
                inputs, sampling = predictor.prepare(messages, images, sampling)
            except ValueError as e:
                self._error(RequestError(str(e)))
                return
            rid = "chatcmpl-" + uuid.uuid4().hex
            created = int(time.time())
            usage: dict = {}
            gone = threading.Event()
            sock = self.connection

            def stop() -> bool:  # checked at every generated token
                if not gone.is_set() and _client_gone(sock):
                    logger.info("client went away: generation stopped")
                    gone.set()
                return gone.is_set()

            pieces = predictor.stream(inputs, sampling, usage, stop=stop)
            if body.get("stream"):
                self._stream(rid, created, pieces, usage, sampling, gone)
                return
            try:
                text = "".join(pieces).strip()
                if gone.is_set():
                    return
            except Exception as e:  # noqa: BLE001 - the client gets the reason, the server keeps serving
                logger.exception("generation failed")
                self._json(500, {"error": {"message": f"generation failed: {e}", "type": "server_error",
                                           "param": None, "code": None}})
                return
            n_prompt, n_out = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
            self._json(200, {"id": rid, "object": "chat.completion", "created": created, "model": opts.model_id,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": _finish(usage, sampling)}],
                             "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                                       "total_tokens": n_prompt + n_out}})

        def _stream(self, rid: str, created: int, pieces, usage: dict, sampling, gone: threading.Event) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict, finish: str | None = None) -> None:
                chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": opts.model_id,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            try:
                event({"role": "assistant", "content": ""})
                first = True
                for piece in pieces:
                    if first:
                        piece = piece.lstrip()
                        first = not piece
                    if piece:
                        event({"content": piece})
                event({}, _finish(usage, sampling))
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                logger.info("client went away during a streamed answer")
                gone.set()
                for _ in pieces:  # the generation sees `gone` at its next token and ends
                    pass
            except Exception:  # noqa: BLE001 - headers are sent; end the stream, keep serving
                logger.exception("generation failed during a streamed answer")

    return Handler


def _finish(usage: dict, sampling) -> str:
    return "length" if usage.get("completion_tokens", 0) >= sampling.max_new_tokens else "stop"


def make_server(predictor, opts: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((host, port), make_handler(predictor, opts))
    server.daemon_threads = True
    return server


def warn_if_exposed(host: str) -> None:
    """A warning when a server listens beyond this machine (``serve``, ``web``)."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: anyone who can reach this address can use the model", host)


def main(args) -> int:
    from llavakit.infer.generate import Predictor
    from llavakit.infer.predict import model_id_for

    predictor = Predictor.from_pretrained(args.model_path, model_base=args.model_base, device=args.device,
                                          conv_mode=args.conv_mode)
    opts = ServeOptions(model_id=args.model_id or model_id_for(args.model_path),
                        allow_local_files=args.allow_local_files, allow_remote_images=args.allow_remote_images,
                        default_max_tokens=args.max_new_tokens, max_tokens_limit=args.max_tokens_limit,
                        max_queued=args.max_queued)
    if opts.default_max_tokens > opts.max_tokens_limit:
        raise ValueError(f"--max-new-tokens {opts.default_max_tokens} is over --max-tokens-limit "
                         f"{opts.max_tokens_limit}")
    server = make_server(predictor, opts, args.host, args.port)
    host, port = server.server_address[:2]
    warn_if_exposed(args.host)
    print(f"serving {opts.model_id} on http://{host}:{port}/v1 (OpenAI-compatible; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
