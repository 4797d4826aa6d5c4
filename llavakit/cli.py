"""The ``llavakit`` command: parses the command line and hands over to the modules that do the work."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys


def _add_encoder_args(p: argparse.ArgumentParser, required: bool) -> None:
    p.add_argument("--tokenizer", required=required, help="tokenizer directory or hub name")
    p.add_argument("--version", default="vicuna_v1", help="conversation template (plain, v1, llama_2, ...)")
    p.add_argument("--num_image_tokens", type=int, default=576,
                   help="image tokens per image (576 for CLIP ViT-L/14 at 336 px)")
    p.add_argument("--model_max_length", type=int, default=None)
    p.add_argument("--mm_use_im_start_end", action="store_true")
    p.add_argument("--image_aspect_ratio", default="square",
                   help="square, pad, or anyres / anyres_max_N: each image's token count follows its size (needs "
                        "--vision_tower)")
    p.add_argument("--image_grid_pinpoints", default=None, help="anyres: as for training")
    p.add_argument("--vision_tower", default=None, help="anyres: the vision tower (its tile and patch size)")


def _encoder(args):
    from llavakit.data.templates import get_template
    from llavakit.data.tokenize import ConversationEncoder, load_tokenizer
    from llavakit.model.build import prepare_tokenizer

    tok = load_tokenizer(args.tokenizer)
    prepare_tokenizer(tok, mm_use_im_start_end=args.mm_use_im_start_end)  # as training prepares it
    anyres = None
    if args.image_aspect_ratio.startswith("anyres"):
        from llavakit.model.build import ModelLoadError, anyres_for, load_image_processor, vision_config_of

        if not args.vision_tower:
            raise ModelLoadError("--image_aspect_ratio anyres: give --vision_tower (its tile and patch size decide "
                                 "each image's tokens)")
        vcfg = vision_config_of(args.vision_tower)
        anyres = anyres_for(args.image_aspect_ratio, args.image_grid_pinpoints, vcfg, load_image_processor(args.vision_tower),
                            "default", f"--vision_tower {args.vision_tower}")
    return ConversationEncoder(tok, get_template(args.version, tok), args.num_image_tokens,
                               mm_use_im_start_end=args.mm_use_im_start_end,
                               max_length=getattr(args, "model_max_length", None), anyres=anyres)


def cmd_data_preview(args) -> int:
    from llavakit.data.preview import preview_records, write_preview
    from llavakit.data.records import RecordStore

    enc = _encoder(args)
    store = RecordStore.load(args.data_path)
    errors = write_preview(preview_records(store, enc, args.model_max_length, args.limit, args.image_folder),
                           enc.tokenizer, args.json)
    return 1 if errors else 0


def cmd_data_check(args) -> int:
    from llavakit.data.check import run_check

    enc = _encoder(args) if args.tokenizer else None
    report = run_check(args.data_path, args.image_folder, enc, args.model_max_length,
                       progress=not args.json and sys.stderr.isatty(), workers=args.workers,
                       min_image_size=args.min_image_size)
    if args.json:
        print(json.dumps(report.to_dict(), ensure_ascii=False))
    else:
        print(report.summary())
    return 1 if report.problems else 0


def cmd_data_download(args) -> int:
    from llavakit.data import download as dl

    sets = dl.expand_sets(args.sets) if args.sets else []
    if not sets and not args.manifest:
        print("error: name a set (" + ", ".join(dl.SET_NAMES) + ") or give --manifest", file=sys.stderr)
        return 2
    specs = [f for name in sets if name != "ocrvqa" for f in dl.NAMED_SETS[name]]
    if args.manifest:
        specs += dl.read_manifest(args.manifest)
    if "ocrvqa" in sets and not args.ocrvqa_json and not args.dry_run:
        print("error: ocrvqa: give --ocrvqa-json, OCR-VQA's dataset.json (from the OCR-VQA project page); its "
              "images are then fetched from the URLs it lists", file=sys.stderr)
        return 2
    if args.dry_run:
        rows = dl.plan(specs, args.root)
        for r in rows:
            size = f"{r['size'] / 2**30:.1f} GiB" if r["size"] else "size unknown"
            unpack = f" → unpacked into {r['unpack']}" if r["unpack"] else ""
            print(f"[{r['state']:>7}] {r['url']}\n          → {r['dest']} ({size}){unpack}")
        if "ocrvqa" in sets:
            print(f"[  ocrvqa] images listed in {args.ocrvqa_json or '<--ocrvqa-json>'} → "
                  f"{os.path.join(args.root, 'ocr_vqa', 'images')}/<id>.jpg")
        return 0
    dl.fetch_all(specs, args.root, retries=args.retries, timeout=args.timeout)
    if "ocrvqa" in sets:
        from llavakit.data.ocrvqa import download_images

        report = download_images(args.ocrvqa_json, args.root, workers=args.workers, timeout=args.timeout)
        print(json.dumps(report))
        return 1 if report["failed"] else 0
    return 0


def cmd_data_unpack(args) -> int:
    from llavakit.data.unpack import unpack

    for archive in args.archives:
        dest = args.dest or os.path.dirname(os.path.abspath(archive))
        unpack(archive, dest)
        print(f"{archive} → {dest}")
    return 0


def cmd_data_fix_ocrvqa(args) -> int:
    from llavakit.data.ocrvqa import fix_missing

    report = fix_missing(args.data_path, args.image_folder, dry_run=args.dry_run)
    if args.json:
        print(json.dumps(report))
        return 1 if report["still_missing"] else 0
    verb = "would " if args.dry_run else ""
    for c in report["changed"][:20]:
        print(f"{verb}{c['action']} {c['from']} → {c['to']} ({c['format']})")
    if len(report["changed"]) > 20:
        print(f"... and {len(report['changed']) - 20} more")
    print(f"{len(report['changed'])} image(s) {verb}fixed, {len(report['still_missing'])} still missing")
    return 1 if report["still_missing"] else 0


def cmd_data_convert(args) -> int:
    from llavakit.data.records import convert_records

    store, valid, problems = convert_records(args.data_path, args.output)
    print(f"{args.data_path} → {args.output}: {len(store)} records, {len(valid)} valid, {len(problems)} problem(s)")
    if args.tokenizer:
        from llavakit.data.dataset import encode_lengths

        encode_lengths(store, valid, _encoder(args), cache_dir=args.output, progress=sys.stderr.isatty())
        print(f"token lengths stored in {os.path.join(args.output, 'lengths')} (train with --data_path "
              f"{args.output} and the same tokenizer, --version and image tokens to use them)")
    return 0


def cmd_data_shard(args) -> int:
    from llavakit.data.shards import parse_size, write_shards

    report = write_shards(args.data_path, args.image_folder, args.output, parse_size(args.shard_size),
                          workers=args.workers, encoder=_encoder(args) if args.tokenizer else None,
                          progress=sys.stderr.isatty())
    print(report.summary())
    print(f"train with --data_path {args.output} (or a brace pattern of its shards, or its URL once uploaded)")
    return 0


def cmd_eval_score(args) -> int:
    from llavakit.eval.run import judge_from_args
    from llavakit.eval.score import score_benchmark

    result = score_benchmark(args.benchmark, args.answers_file, args.question_file, args.annotations,
                             judge=judge_from_args(args))
    if args.json:
        print(json.dumps({"benchmark": args.benchmark, **result}))
    else:
        print(f"{args.benchmark}: {result['score']:.2f}")
    return 0


def cmd_eval_run(args) -> int:
    from llavakit.eval.run import main

    return main(args)


def _add_judge_args(p: argparse.ArgumentParser) -> None:
    _opt(p, "judge-model", default=None, help="GPT judge for llava-bench / mm-vet (e.g. gpt-4-0314)")
    _opt(p, "judge-base-url", default="https://api.openai.com/v1",
         help="any OpenAI-compatible endpoint; the key is read from OPENAI_API_KEY")


def _opt(p: argparse.ArgumentParser, name: str, **kw) -> None:
    """``--some-flag`` (LLaVA's eval scripts' spelling) and ``--some_flag`` both."""
    p.add_argument(f"--{name}", f"--{name.replace('-', '_')}", dest=name.replace("-", "_"), **kw)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _opt(p, "model-path", required=True, help="a LLaVA output directory: full model, LoRA adapter or merged")
    _opt(p, "model-base", default=None, help="for a LoRA adapter: the base, if not the one it records")
    _opt(p, "conv-mode", default=None, help="override the chat template the model was saved with (v1, ...)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")


def _add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    _opt(p, "top-p", type=float, default=None)
    _opt(p, "max-new-tokens", type=int, default=max_new_tokens)


def cmd_merge_lora(args) -> int:
    from llavakit.model.load import merge_lora, save_llava

    model, processor = merge_lora(args.model_path, model_base=args.model_base)
    save_llava(model, processor, args.save_model_path)
    print(f"merged model written to {args.save_model_path}")
    return 0


def cmd_convert(args) -> int:
    from llavakit.model import convert

    if args.direction == "from-original":
        convert.from_original(args.model_path, args.save_model_path, vision_tower=args.vision_tower,
                              conv_mode=args.conv_mode)
    else:
        convert.to_original(args.model_path, args.save_model_path, vision_tower=args.vision_tower)
    print(f"written to {args.save_model_path}")
    return 0


def cmd_predict(args) -> int:
    from llavakit.infer.predict import main

    return main(args)


def cmd_chat(args) -> int:
    from llavakit.infer.chat import main

    return main(args)


def cmd_serve(args) -> int:
    from llavakit.infer.serve import main

    return main(args)


def cmd_web(args) -> int:
    from llavakit.infer.web import main

    return main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llavakit", description="Train LLaVA-style vision-language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("train", help="train (stage 1, stage 2, LoRA) with the original LLaVA scripts' flags",
                   add_help=False)
    sub.add_parser("demo", help="train a tiny LLaVA end to end on a CPU and report what it learned",
                   add_help=False)
    sub.add_parser("bench", help="padding / packing benchmarks (padding, train)", add_help=False)

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
    p.add_argument("--workers", type=int, default=None, help="processes decoding images (default: all cores)")
    p.add_argument("--min_image_size", type=int, default=1, help="smallest acceptable side, in pixels")
    _add_encoder_args(p, required=False)
    p.set_defaults(func=cmd_data_check)

    from llavakit.data.download import SET_NAMES

    p = data.add_parser("download", help="fetch LLaVA-1.5's data into the original layout (resumable)")
    p.add_argument("sets", nargs="*", help=", ".join(SET_NAMES))
    p.add_argument("--root", default="./playground/data")
    p.add_argument("--manifest", default=None, help='JSON {"files": [{"url", "path", "sha256"?, "unpack"?}]}')
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
    _opt(p, "ocrvqa-json", default=None, help="OCR-VQA's dataset.json (image URLs)")
    p.add_argument("--workers", type=int, default=16, help="concurrent OCR-VQA image downloads")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds without a byte before retrying")
    p.set_defaults(func=cmd_data_download)

    p = data.add_parser("unpack", help="unpack zip / tar archives (idempotent, refuses unsafe members)")
    p.add_argument("archives", nargs="+")
    p.add_argument("--dest", default=None, help="default: the archive's folder")
    p.set_defaults(func=cmd_data_unpack)

    p = data.add_parser("fix-ocrvqa", help="give missing images their expected names (rename or convert)")
    p.add_argument("--data_path", required=True)
    p.add_argument("--image_folder", required=True)
    p.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_fix_ocrvqa)

    p = data.add_parser("convert", help="write records in the memory-mapped form training opens directly")
    p.add_argument("--data_path", required=True)
    p.add_argument("--output", required=True)
    _add_encoder_args(p, required=False)
    p.set_defaults(func=cmd_data_convert)

    p = data.add_parser("shard", help="write checked records and their images as WebDataset tar shards (resumable)")
    p.add_argument("--data_path", required=True)
    p.add_argument("--image_folder", default=None)
    p.add_argument("--output", required=True)
    _opt(p, "shard-size", default="1GB", help="about this many bytes per shard (1GB, 500MB, ...)")
    p.add_argument("--workers", type=int, default=None, help="processes checking images and writing shards "
                                                             "(default: all cores)")
    _add_encoder_args(p, required=False)
    p.set_defaults(func=cmd_data_shard)

    ev = sub.add_parser("eval", help="evaluate on the LLaVA-1.5 benchmarks").add_subparsers(dest="eval_cmd",
                                                                                          required=True)
    from llavakit.eval.score import BENCHMARKS

    p = ev.add_parser("score", help="score an answers file with LLaVA-1.5's rules")
    p.add_argument("--benchmark", required=True, choices=BENCHMARKS, metavar="{" + ",".join(BENCHMARKS) + "}")
    _opt(p, "answers-file", required=True, nargs="+",
         help="the answers file (llava-bench: one or more GPT review files)")
    _opt(p, "question-file", default=None)
    p.add_argument("--annotations", default=None, help="ground-truth file or folder (per benchmark)")
    p.add_argument("--json", action="store_true")
    _add_judge_args(p)
    p.set_defaults(func=cmd_eval_score)

    p = ev.add_parser("run", help="predict with LLaVA-1.5's prompts and score, for one or more benchmarks")
    _add_model_args(p)
    p.add_argument("--benchmark", required=True, action="append",
                   help=", ".join(BENCHMARKS) + " (repeat or comma-separate)")
    _opt(p, "data-root", default="./playground/data/eval")
    _opt(p, "output-dir", default="./eval-results")
    _opt(p, "batch-size", type=int, default=8)
    _opt(p, "max-new-tokens", type=int, default=None, help="default: 128, or 1024 for open answers")
    _opt(p, "model-id", default=None)
    _add_judge_args(p)
    p.set_defaults(func=cmd_eval_run)

    p = sub.add_parser("merge-lora", help="merge a LoRA run's adapter into its base: a plain LLaVA checkpoint")
    _opt(p, "model-path", required=True, help="the LoRA run's output directory")
    _opt(p, "model-base", default=None, help="the base (default: the one the adapter records)")
    _opt(p, "save-model-path", required=True)
    p.set_defaults(func=cmd_merge_lora)

    conv = sub.add_parser("convert", help="convert between the original LLaVA layout and transformers' Llava")
    csub = conv.add_subparsers(dest="direction", required=True)
    for name, text in (("from-original", "original-format checkpoint → transformers-native"),
                       ("to-original", "transformers-native → the original repository's layout")):
        p = csub.add_parser(name, help=text)
        _opt(p, "model-path", required=True)
        _opt(p, "save-model-path", required=True)
        _opt(p, "vision-tower", default=None,
             help="from-original: where the tower named by mm_vision_tower is loaded from; to-original: the "
                  "public tower to name in mm_vision_tower (default: the model's own tower, saved beside it)")
        if name == "from-original":
            _opt(p, "conv-mode", default="vicuna_v1", help="the conversation template (LLaVA-1.5: vicuna_v1)")
        p.set_defaults(func=cmd_convert)

    p = sub.add_parser("predict", help="answer a LLaVA-format question file (resumable, batched)")
    _add_model_args(p)
    _opt(p, "question-file", required=True)
    _opt(p, "image-folder", default=None)
    _opt(p, "answers-file", required=True)
    _opt(p, "num-chunks", type=int, default=1)
    _opt(p, "chunk-idx", type=int, default=0)
    _opt(p, "batch-size", type=int, default=8)
    _opt(p, "num-beams", type=int, default=1)
    _opt(p, "model-id", default=None, help="model_id in the answer lines (default: the model directory's name)")
    _add_sampling_args(p, 128)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("chat", help="talk to a model about one or more images")
    _add_model_args(p)
    _opt(p, "image-file", action="append", default=[], help="an image (repeat, or comma-separate, for several)")
    _add_sampling_args(p, 512)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="an OpenAI-compatible /v1/chat/completions server")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    _opt(p, "model-id", default=None)
    _opt(p, "allow-local-files", action="store_true", help="accept image_url paths and file:// URLs")
    _opt(p, "allow-remote-images", action="store_true", help="fetch http(s) image URLs")
    _opt(p, "max-new-tokens", type=int, default=512, help="when a request gives no max_tokens")
    _opt(p, "max-tokens-limit", type=int, default=4096, help="the most max_tokens a request may ask for (400 above)")
    _opt(p, "max-queued", type=int, default=8,
         help="requests that may wait while one generates; past that the server answers 503 at once")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("web", help="a chat page in the browser (Gradio; pip install 'llavakit[web]')")
    _add_model_args(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also make a public Gradio share link (off by default)")
    _add_sampling_args(p, 512)
    p.set_defaults(func=cmd_web)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # the original scripts' flags + the Trainer's: parsed by llavakit.config
        from llavakit.train.entry import main as train_main

        return train_main(argv[1:])
    if argv and argv[0] == "bench":
        from llavakit.bench import main as bench_main

        return bench_main(argv[1:])
    if argv and argv[0] == "demo":
        from llavakit.demo.run import main as demo_main

        return demo_main(argv[1:])
    args = build_parser().parse_args(argv)
    from llavakit.data.download import DownloadError
    from llavakit.data.shards import ShardError

    try:
        return int(args.func(args) or 0)
    # llavakit's input errors are ValueErrors (records, templates, models, questions, archives, scoring
    # inputs); a download that cannot finish is a DownloadError, shards that cannot be written a ShardError
    except (ValueError, FileNotFoundError, DownloadError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
