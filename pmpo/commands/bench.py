"""``pmpo bench``: PMPO's speed and memory next to the floor set by the frozen CLIP, in one run."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..bench import DEVICE_DEFAULTS, DTYPES, TRAIN_METHODS, BenchConfig, format_markdown, run_bench
from ..errors import InputError
from ..reference_bench import PRECISIONS, ReferenceBenchConfig, format_reference_markdown, resolve_checkouts, run_reference_bench
from . import SUMMARIES


def _int_list(value: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from exc


def _str_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def register(sub: argparse._SubParsersAction) -> None:
    d = BenchConfig()
    gpu, cpu = DEVICE_DEFAULTS["cuda"], DEVICE_DEFAULTS["cpu"]

    def both(key: str) -> str:
        def show(v) -> str:
            return "all" if v is None else ",".join(map(str, v)) if isinstance(v, tuple) else str(v)

        return f"default: {show(gpu[key])} on GPU, {show(cpu[key])} on CPU"
    p = sub.add_parser(
        "bench",
        help=SUMMARIES["bench"],
        description=(
            "Measure, side by side in one process: plain open_clip encode_image (the floor), PMPO "
            "inference with cached class weights, one training step of PMPO/CoOp/MaPLe, the naive vs "
            "batched-truncated text pass, and the peak memory of one ImageNet-scale training step. "
            "Random-init weights by default: speed does not depend on them."
        ),
        epilog="example: pmpo bench --device cuda --dtype bf16 --batch 64 --json bench.json",
    )
    p.add_argument("--model", default=d.model, help=f"open_clip model name or local-dir:PATH (default: {d.model})")
    p.add_argument("--pretrained", default=d.pretrained, help="pretrained tag or weights file (default: none = random init)")
    p.add_argument("--batch", type=int, default=d.batch, help=f"images per batch ({both('batch')})")
    p.add_argument("--n-prompts", type=int, default=d.n_prompts, help=f"PMPO prompts N (default: {d.n_prompts})")
    p.add_argument("--classes", type=int, default=d.classes,
                   help=f"classes in the inference and training rows (default: {d.classes})")
    p.add_argument("--text-classes", type=_int_list, default=None,
                   help=f"class counts for the naive vs batched text rows, comma-separated; '' skips them ({both('text_classes')})")
    p.add_argument("--naive-max-chunks", type=int, default=-1,
                   help=f"time at most this many of the naive pass's identical {d.naive_chunk}-sequence calls per class "
                        f"count and scale to the full pass; 0 = time them all ({both('naive_max_chunks')})")
    p.add_argument("--methods", type=_str_list, default=d.train_methods,
                   help=f"training rows, comma-separated methods: any preset (default: {','.join(TRAIN_METHODS)})")
    p.add_argument("--infer-methods", type=_str_list, default=d.infer_methods,
                   help="inference rows, comma-separated methods (default: pmpo); e.g. pmpo,coop,cocoop puts "
                        "CoCoOp's per-image class weights beside CoOp's cached ones")
    p.add_argument("--memory-infer", type=_str_list, default=d.memory_infer_methods,
                   help="also measure the peak memory of one inference batch (--memory-batch images, "
                        "--memory-classes classes) for these methods, e.g. coop,cocoop (default: none)")
    p.add_argument("--parts", type=_str_list, default=d.parts_methods,
                   help="training methods also timed against their minimal parts (prompted image fwd + input-grad bwd, "
                        "N·C text fwd + bwd; default: pmpo,maple; '' skips)")
    p.add_argument("--no-train-memory", action="store_true",
                   help="skip the PMPO training-step memory rows (keeps --memory-infer ones)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="fp32, or bf16 autocast (default: fp32)")
    p.add_argument("--repeats", type=int, default=d.repeats, help=f"timed rounds; medians reported (default: {d.repeats})")
    p.add_argument("--warmup", type=int, default=d.warmup, help=f"untimed rounds first (default: {d.warmup})")
    p.add_argument("--compile", action="store_true", help="torch.compile the towers (and the floor's encode_image)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--memory-classes", type=int, default=None,
                   help=f"classes in the memory step; 1000 = ImageNet ({both('memory_classes')})")
    p.add_argument("--memory-batch", type=int, default=d.memory_batch, help=f"batch of the memory step (default: {d.memory_batch})")
    p.add_argument("--scaling", action="store_true",
                   help="also time PMPO at three sizes of classes (C/10, C, 10C), prompts (1, N, 2N) and images (B/2, B, 2B)")
    p.add_argument("--json", dest="json_out", help="write all measurements as JSON to this file")
    p.add_argument("--markdown", help="write the tables as Markdown to this file")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ref = p.add_argument_group(
        "against the reference implementations",
        "Any of these runs only the side-by-side comparison with the authors' code (their CoOp and MaPLe "
        "models built at our backbone's sizes, random init), using --model, --pretrained, --batch, --classes, "
        "--device, --repeats, --warmup, --json, --markdown and --quiet; see docs/PERFORMANCE.md.")
    ref.add_argument("--reference", metavar="DIR",
                     help="a folder holding the checkouts CoOp, Dassl.pytorch and multimodal-prompt-learning")
    ref.add_argument("--reference-coop", metavar="PATH", help="a checkout of KaiyangZhou/CoOp (needs --reference-dassl)")
    ref.add_argument("--reference-dassl", metavar="PATH", help="a checkout of KaiyangZhou/Dassl.pytorch")
    ref.add_argument("--reference-maple", metavar="PATH",
                     help="a checkout of muzairkhattak/multimodal-prompt-learning (needs --reference-dassl)")
    ref.add_argument("--reference-precision", default="auto", choices=PRECISIONS,
                     help="auto (default): fp32 on CPU; on CUDA their fp16 path against our fp16 autocast")
    ref.add_argument("--reference-maple-depth", type=int, default=ReferenceBenchConfig.maple_depth, metavar="D",
                     help="MaPLe's PROMPT_DEPTH on both sides (default: 9, their base-to-new config; 3 for their "
                          "cross-dataset one)")
    p.set_defaults(func=run)


def reference_config(args: argparse.Namespace) -> ReferenceBenchConfig | None:
    """The side-by-side run the arguments ask for, or None when no reference option is given."""
    paths = (args.reference, args.reference_coop, args.reference_dassl, args.reference_maple)
    if all(p is None for p in paths):
        return None
    if args.dtype != "fp32":
        raise InputError("--dtype is for the plain bench; against the reference code use --reference-precision")
    from .common import resolve_device

    checkouts = resolve_checkouts(*paths)
    device = resolve_device(args.device)
    batch = args.batch if args.batch is not None else DEVICE_DEFAULTS["cuda" if device.type == "cuda" else "cpu"]["batch"]
    return ReferenceBenchConfig(
        checkouts={k: str(v) for k, v in checkouts.items()}, model=args.model, pretrained=args.pretrained,
        batch=batch, classes=args.classes, device=str(device), precision=args.reference_precision,
        repeats=args.repeats, warmup=args.warmup, maple_depth=args.reference_maple_depth,
    )


def _write(path: str | None, content: str) -> None:
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(content, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror}") from exc


def run(args: argparse.Namespace) -> int:
    log = None if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    reference = reference_config(args)
    if reference is not None:
        result = run_reference_bench(reference, log=log, quiet=args.quiet)
        text = format_reference_markdown(result)
        print(text)
        _write(args.json_out, json.dumps(result, indent=2))
        _write(args.markdown, text + "\n")
        return 0
    if args.naive_max_chunks < -1:
        raise InputError(f"--naive-max-chunks must be >= 0, got {args.naive_max_chunks}")
    cfg = BenchConfig(
        model=args.model, pretrained=args.pretrained, batch=args.batch, n_prompts=args.n_prompts,
        classes=args.classes, text_classes=None if args.text_classes is None else tuple(args.text_classes),
        naive_max_chunks=args.naive_max_chunks or None, device=args.device, dtype=args.dtype,
        repeats=args.repeats, warmup=args.warmup, compile=args.compile, memory=not args.no_memory,
        memory_classes=args.memory_classes, memory_batch=args.memory_batch, scaling=args.scaling,
        train_methods=tuple(args.methods), infer_methods=tuple(args.infer_methods),
        memory_infer_methods=tuple(args.memory_infer), train_memory=not args.no_train_memory,
        parts_methods=tuple(args.parts),
    )
    result = run_bench(cfg, log=log)
    text = format_markdown(result)
    print(text)
    _write(args.json_out, json.dumps(result.to_dict(), indent=2))
    _write(args.markdown, text + "\n")
    return 0
