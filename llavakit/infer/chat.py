"""``llavakit chat``: a multi-turn conversation about one or more images on the command line.

The images go with the first question (as in training data); each answer streams as it is generated; the
whole conversation is the prompt of the next turn, rendered with the template the model was trained with.
An empty line is ignored; ``exit``, ``quit`` or end of input ends the chat; ``/reset`` starts over.
"""

from __future__ import annotations

import sys
from typing import TextIO


def run_chat(predictor, image_files: list[str], sampling, stdin: TextIO = sys.stdin,
             stdout: TextIO = sys.stdout) -> list[dict]:
    """Read questions from ``stdin`` until it ends; return the conversation."""
    from llavakit.data.images import open_image
    from llavakit.infer.generate import user_message

    images = [open_image(f) for f in image_files]
    messages: list[dict] = []
    interactive = stdin.isatty()
    while True:
        if interactive:
            stdout.write("USER: ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("exit", "quit"):
            break
        if text == "/reset":
            messages = []
            stdout.write("(conversation reset)\n")
            continue
        if not interactive:
            stdout.write(f"USER: {text}\n")
        messages.append(user_message(text, 0 if messages else len(images)))
        stdout.write("ASSISTANT: ")
        stdout.flush()
        pieces = []
        for piece in predictor.chat_stream(messages, images, sampling):
            pieces.append(piece)
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "".join(pieces).strip()}]})
    return messages


def main(args) -> int:
    from llavakit.infer.generate import Predictor, Sampling

    files = [f for item in args.image_file for f in item.split(",") if f]
    predictor = Predictor.from_pretrained(args.model_path, model_base=args.model_base, device=args.device,
                                          conv_mode=args.conv_mode)
    run_chat(predictor, files, Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                        top_p=args.top_p))
    return 0
