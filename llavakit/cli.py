"""The ``llavakit`` command: parses the command line and hands over to the modules that do the work."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _add_encoder_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--tokenizer", required=required, help="tokenizer directory or hub name")
    p.add_argument("--version", default="vicuna_v1", help="conversation template (plain, v1, llama_2, ...)")
    p.add_argument("--num_image_tokens", type=int, default=576,
                   help="image tokens per image (576 for CLIP ViT-L/14 at 336 px)")
    p.add_argument("--model_max_length", type=int, default=None)
    p.add_argument("--mm_use_im_start_end", action="store_true")


def _encoder(args):
    from llavakit.data.templates import get_template
    from llavakit.data.tokenize import ConversationEncoder, load_tokenizer

    tok = load_tokenizer(args.tokenizer)
    return ConversationEncoder(tok, get_template(args.version, tok), args.num_image_tokens,
                               mm_use_im_start_end=args.mm_use_im_start_end)


def cmd_data_preview(args) -> int:
    from llavakit.data.preview import preview_records, write_preview
    from llavakit.data.records import RecordStore

    enc = _encoder(args)
    store = RecordStore.load(args.data_path)
    errors = write_preview(preview_records(store, enc, args.model_max_length, args.limit), enc.tokenizer, args.json)
    return 1 if errors else 0


def cmd_data_check(args) -> int:
    from llavakit.data.check import run_check

    enc = _encoder(args) if args.tokenizer else None
    report = run_check(args.data_path, args.image_folder, enc, args.model_max_length,
                       progress=not args.json and sys.stderr.isatty())
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print(report.summary())
    return 1 if report.problems else 0


def cmd_eval_score(args) -> int:
    from llavakit.eval.score import score_benchmark

    try:
        result = score_benchmark(args.benchmark, args.answers_file, args.question_file, args.annotations)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"benchmark": args.benchmark, **result}))
    else:
        print(f"{args.benchmark}: {result['score']:.2f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llavakit", description="Train LLaVA-style vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train (stage 1, stage 2, LoRA) with the original LLaVA scripts' flags",
                   add_help=False)
    sub.add_parser("demo", help="train a tiny LLaVA end to end on a CPU and report what it learned",
                   add_help=False)

    data = sub.add_parser("data", help="inspect and prepare training data").add_subparsers(dest="data_cmd",
                                                                                         required=True)
    p = data.add_parser("preview", help="show how records are rendered, tokenized and supervised")
    p.add_argument("--data_path", required=True)
    p.add_argument("--image_folder", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--json", action="store_true", help="one JSON object per record")
    _add_encoder_args(p, required=True)
    p.set_defaults(func=cmd_data_preview)

    p = data.add_parser("check", help="validate records, images and lengths; exit 1 on any problem")
    p.add_argument("--data_path", required=True)
    p.add_argument("--image_folder", default=None)
    p.add_argument("--json", action="store_true")
    _add_encoder_args(p, required=False)
    p.set_defaults(func=cmd_data_check)

    ev = sub.add_parser("eval", help="evaluate on the LLaVA-1.5 benchmarks").add_subparsers(dest="eval_cmd",
                                                                                          required=True)
    p = ev.add_parser("score", help="score an answers file with LLaVA-1.5's rules")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--answers-file", "--answers_file", dest="answers_file", required=True)
    p.add_argument("--question-file", "--question_file", dest="question_file", default=None)
    p.add_argument("--annotations", default=None, help="ground-truth file or folder (per benchmark)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # the original scripts' flags + the Trainer's: parsed by llavakit.config
        from llavakit.train.entry import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] == "demo":
        from llavakit.demo.run import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    from llavakit.data.records import RecordFileError
    from llavakit.data.templates import TemplateError

    try:
        return int(args.func(args) or 0)
    except (RecordFileError, TemplateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
