"""The `attnzoo` command: list, describe and benchmark the registered mechanisms.

Every user mistake ends in one line on stderr (``attnzoo: error: ...``) and exit status 2, caught
before any work: argument values, names, options, devices, output paths, missing extras.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import os
import sys
import typing
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import attnzoo
from attnzoo._progress import Progress
from attnzoo.demos import DEFAULT_MECHANISMS  # the package only: --help stays light
from attnzoo.registry import ModuleSpec, get_spec, list_modules

__all__ = ["main"]

DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (no usage block), naming where to read more."""

    def error(self, message: str) -> typing.NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _require_demo(command: str) -> None:
    """One line naming the extra when a demo package is missing (before any work)."""
    from attnzoo.demos import missing_demo_packages

    missing = missing_demo_packages()
    if missing:
        raise CliError(
            f"attnzoo {command} needs the demo extra (missing: {', '.join(missing)}): "
            "pip install 'attnzoo[demo]'"
        )


def _device(text: str) -> str:
    """A device this machine has: cpu, cuda, cuda:N or mps."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"expected a device such as cpu, cuda or cuda:0, got {text!r}"
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def _output_file(path: str) -> None:
    """Check that a file can be written at ``path`` (its folder exists and is writable)."""
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise CliError(f"output: {path!r} is a folder; expected a file name")
    if not folder.is_dir():
        raise CliError(f"output: the folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK):
        raise CliError(f"output: the folder {str(folder)!r} is not writable")


def _output_folder(path: str) -> None:
    from attnzoo.demos.compare import prepare_output

    try:
        prepare_output(path)
    except ValueError as error:
        raise CliError(str(error)) from None


def _params(spec: ModuleSpec) -> int:
    module = spec.build(spec.sizes(device="meta"))
    return sum(p.numel() for p in module.parameters())


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def _resolve(patterns: Sequence[str]) -> list[str]:
    """Names matching the given names or shell patterns (all when none); unknown names are errors."""
    if not patterns:
        return list_modules()
    names: list[str] = []
    for pattern in patterns:
        if any(ch in pattern for ch in "*?["):
            matched = fnmatch.filter(list_modules(), pattern)
            if not matched:
                raise CliError(f"no registered module matches {pattern!r}")
            names += matched
        else:
            try:
                names.append(get_spec(pattern).name)
            except KeyError as error:
                raise CliError(str(error.args[0])) from None
    return list(dict.fromkeys(names))


def cmd_list(args: argparse.Namespace) -> int:
    names = list_modules(args.pattern, family=args.family)
    if not names:
        where = f" in family {args.family!r}" if args.family else ""
        raise CliError(f"no registered module matches {args.pattern!r}{where} (attnzoo list shows all)")
    rows = []
    for name in names:
        spec = get_spec(name)
        rows.append((name, spec.family, spec.paper.cite(), f"{_params(spec):,}"))
    print(_table(("name", "family", "paper", "params (default size)"), rows))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    names = _resolve([args.name])
    print("\n\n".join(_info(get_spec(name)) for name in names))
    return 0


def _info(spec: ModuleSpec) -> str:
    sizes = spec.default_sizes
    module = spec.build(sizes)
    inputs = spec.example_inputs(sizes)
    with torch.no_grad():
        result = module.eval()(*inputs)
    out = result[0] if isinstance(result, tuple) else result
    flags = [
        f
        for f, on in (
            ("returns attention maps", spec.returns_attn),
            ("supports masks", spec.supports_mask),
            ("shape-preserving", spec.shape_preserving),
        )
        if on
    ]
    doc = (spec.cls.__doc__ or "").strip().splitlines()
    lines = [
        f"{spec.name}: {doc[0] if doc else spec.cls.__name__}",
        f"  class     {spec.cls.__module__}.{spec.cls.__qualname__}",
        f"  family    {spec.family}",
        f"  paper     {spec.paper.cite()}" + (f"  {spec.paper.url}" if spec.paper.url else ""),
        f"  equation  {spec.equation}",
        f"  defaults  {spec.defaults}",
        f"  inputs    {', '.join(str(tuple(x.shape)) for x in inputs)}  (at the default sizes)",
        f"  output    {tuple(out.shape)}",
        f"  params    {sum(p.numel() for p in module.parameters()):,}",
        f"  cost      {spec.cost}",
        f"  features  {', '.join(flags) or '-'}; {spec.num_inputs} input(s)",
    ]
    if spec.notes:
        lines.append(f"  notes     {spec.notes}")
    lines.append(f"  docs      docs/mechanisms/{spec.name}.md")
    return "\n".join(lines)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0, got {value}")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    from attnzoo.bench.report import bench_module, format_table, to_csv, to_json

    names = _resolve(args.names)
    if args.output:
        _output_file(args.output)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = Progress(len(names), enabled=not args.quiet)
    rows, failures = [], []
    try:
        for name in names:
            spec = get_spec(name)
            sizes = replace(
                spec.default_sizes,
                batch=args.batch,
                width=args.width,
                extent=args.extent,
                dtype=DTYPES[args.dtype],
                device=args.device,
            )
            try:
                rows.append(
                    bench_module(
                        spec,
                        sizes,
                        repeats=args.repeats,
                        warmup=args.warmup,
                        against_float32=args.dtype != "float32",
                        compile=args.compile,
                    )
                )
            except (ValueError, TypeError, RuntimeError, NotImplementedError) as error:
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                failures.append(
                    f"{name} at batch={sizes.batch} width={sizes.width} extent={sizes.extent}: {reason}"
                )
            progress.update(name)
    finally:
        progress.close()
    if not rows:
        raise CliError(
            failures[0] if len(failures) == 1 else f"no module could be measured; first: {failures[0]}"
        )
    for failure in failures:
        print(f"attnzoo: skipped {failure}", file=sys.stderr)
    text = {"table": format_table, "json": to_json, "csv": to_csv}[args.format](rows)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)
    if args.format == "table" and not args.quiet:
        print(
            f"\n{len(rows)} modules, {args.dtype}, {args.device}, {torch.get_num_threads()} threads, "
            f"median of {args.repeats} after {args.warmup} warm-up",
            file=sys.stderr,
        )
    return 0


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise argparse.ArgumentTypeError("expected at least one seed")
    return seeds


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected comma-separated names, e.g. none,se,cbam")
    return names


def _setting(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME.KEY=VALUE`` -> (NAME, {KEY: VALUE}), VALUE read as a Python literal when it is one."""
    target, sep, raw = text.partition("=")
    name, dot, key = target.partition(".")
    if not (sep and dot and name and key):
        raise argparse.ArgumentTypeError(
            f"expected NAME.KEY=VALUE (e.g. non_local.sub_sample=False), got {text!r}"
        )
    try:
        value: Any = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word: a string option such as gc.pooling=avg
    return name, {key: value}


#: Options of `attnzoo compare` that belong to some tasks only (given for another task, they are an
#: error rather than silently ignored). Each task's module reads its own.
TASK_OPTIONS: dict[str, tuple[str, ...]] = {
    "image_size": ("classification", "segmentation"),
    "depth": ("classification", "segmentation"),
    "width": ("classification", "segmentation"),
    "upsample": ("segmentation",),
    "tasks": ("sequence",),
    "lengths": ("sequence",),
    "cost_lengths": ("sequence",),
}


def _check_task_options(args: argparse.Namespace) -> None:
    for option, tasks in TASK_OPTIONS.items():
        if getattr(args, option, None) is not None and args.task not in tasks:
            flag = "--" + option.replace("_", "-")
            raise CliError(f"{flag} applies to --task {' or '.join(tasks)}, not to --task {args.task}")


def cmd_compare(args: argparse.Namespace) -> int:
    _require_demo("compare")
    _check_task_options(args)
    if args.task == "segmentation":
        from attnzoo.demos.segmentation import compare_from_args
    elif args.task == "sequence":
        from attnzoo.demos.sequence_compare import compare_from_args
    else:
        compare_from_args = _compare_classification
    try:
        return int(compare_from_args(args))
    except (ValueError, KeyError) as error:
        raise CliError(str(error.args[0]) if error.args else str(error)) from None


def _compare_classification(args: argparse.Namespace) -> int:
    from attnzoo.demos.compare import CompareConfig, check_config, comparison_table, run_compare, write_report

    config = CompareConfig(
        mechanisms=args.mechanisms or list(DEFAULT_MECHANISMS),
        epochs=args.epochs or 8,
        seeds=args.seeds,
        image_size=args.image_size or 32,
        depth=8 if args.depth is None else args.depth,
        width=args.width or 16,
        batch_size=args.batch_size or 32,
        lr=5e-3 if args.lr is None else args.lr,
        data=args.data,
        limit=args.limit,
        output=args.output or "reports/compare",
        threads=args.threads,
        workers=args.workers,
        device=args.device,
        progress=not args.quiet,
    )
    for name, options in args.set:
        if name not in config.mechanisms:
            try:
                get_spec(name)
            except KeyError as error:
                raise CliError(f"--set {name}: {error.args[0]}") from None
            raise CliError(
                f"--set {name}: {name!r} is not among the compared mechanisms "
                f"({', '.join(config.mechanisms)})"
            )
        config.attention_kwargs.setdefault(name, {}).update(options)
    check_config(config)  # names, options and their types, device: in a moment, before the data
    _output_folder(config.output)
    results, data, maps = run_compare(config)  # checks every network on the data, then trains
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 reports
    report = write_report(results, data, maps, config)
    print(comparison_table(results, len(config.seeds)))
    print(f"\nreport: {report}")
    return 0


def _translate_variants(config: Any, workers: int | None) -> int:
    """``translate --compare``: every attention variant trained side by side, the paper-style table."""
    from pathlib import Path

    from attnzoo.demos.translate import compare_variants, variants_table

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CliError("--compare runs its variants in worker processes; run it without torchrun")
    try:
        rows = compare_variants(config, workers=workers)
    except (ValueError, KeyError) as error:
        raise CliError(str(error.args[0]) if error.args else str(error)) from None
    table = variants_table(rows)
    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "variants.md"
    report.write_text(
        "# Attention variants on the dates task\n\n"
        f"Seq2Seq, hidden {config.hidden}, {config.epochs} epochs on {config.n_train} pairs, seed "
        f"{config.seed}; greedy decoding and AER on {config.n_test} held-out pairs (AER: forced decoding, "
        "one link per output character to its most attended source character, against the gold "
        "sure/possible alignment generated with the data).\n\n" + table + "\n"
    )
    print(table)
    print(f"report: {report}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    _require_demo("translate")
    _output_folder(args.output)
    from attnzoo.demos.translate import TranslateConfig, run_translate, write_translate_report

    if args.compare and (args.attention != "luong" or args.score or args.local_mode != "local-p"):
        raise CliError("--compare trains every attention variant; drop --attention, --score and --local-mode")
    score = args.score or ("general" if args.attention != "bahdanau" else None)
    config = TranslateConfig(
        attention=args.attention,
        score=score,
        local_mode=args.local_mode,
        cell=args.cell,
        hidden=args.hidden,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        n_train=args.train_size,
        seed=args.seed,
        output=args.output,
        threads=args.threads,
        device=args.device,
        progress=not args.quiet,
    )
    if args.compare:
        return _translate_variants(config, args.workers)
    try:
        result, model, pairs = run_translate(config)
    except (ValueError, KeyError) as error:
        raise CliError(str(error.args[0]) if error.args else str(error)) from None
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    report = write_translate_report(result, model, pairs, config)
    print(
        f"exact match {100 * result.exact_match:.1f}%, character accuracy {100 * result.char_accuracy:.1f}%, "
        f"alignment error rate {100 * (result.aer or 0):.1f}%"
    )
    for source, target, prediction in result.examples:
        print(f"  {source!r:32} -> {prediction}  ({'ok' if prediction == target else 'expected ' + target})")
    print(f"report: {report}")
    return 0


def _query(text: str) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected Y,X (two cell indices), got {text!r}") from None
    if y < 0 or x < 0:
        raise argparse.ArgumentTypeError(f"expected a cell Y,X with Y, X >= 0, got {text!r}")
    return y, x


def cmd_show(args: argparse.Namespace) -> int:
    _require_demo("show")
    from attnzoo.demos.show import show

    name = _resolve([args.name])[0]
    if args.image is not None and not Path(args.image).is_file():
        raise CliError(f"image: no file at {args.image}")
    if args.report is not None and not Path(args.report).is_dir():
        raise CliError(f"--from: no report folder at {args.report} (written by attnzoo compare -o FOLDER)")
    try:
        path = show(name, args.image, args.output, query=args.query, report=args.report)
    except ValueError as error:
        raise CliError(str(error)) from None
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="attnzoo", description=__doc__)
    parser.add_argument("--version", action="version", version=f"attnzoo {attnzoo.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered mechanisms: name, family, paper, parameters")
    p.add_argument("pattern", nargs="?", default="*", help="shell pattern on the name (default: all)")
    p.add_argument("--family", choices=attnzoo.registry.FAMILIES)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("info", help="one mechanism: paper, equation, defaults, shapes, cost")
    p.add_argument("name")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="params, FLOPs, latency and peak memory of mechanisms")
    p.add_argument("names", nargs="*", help="names or shell patterns (default: every registered module)")
    p.add_argument("--batch", type=_positive, default=8)
    p.add_argument("--width", type=_positive, default=64, help="channels / embedding width (default 64)")
    p.add_argument(
        "--extent", type=_positive, default=32, help="sequence length or spatial side (default 32)"
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="float32 (default); another dtype is also timed against float32 (the speed-up)",
    )
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument(
        "--compile",
        action="store_true",
        help="also time torch.compile-d copies, and report their gain and the compile time",
    )
    p.add_argument("--threads", type=_positive, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=_positive, default=5)
    p.add_argument("--warmup", type=_count, default=2)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--format", choices=("table", "json", "csv"), default="table")
    fmt.add_argument("--json", dest="format", action="store_const", const="json")
    fmt.add_argument("--csv", dest="format", action="store_const", const="csv")
    p.add_argument("--output", "-o", help="write the result to this file instead of stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "compare",
        help="train the same network with each mechanism and report accuracy, cost and attention maps",
    )
    p.add_argument(
        "--task",
        choices=("classification", "segmentation", "sequence"),
        default="classification",
        help="classification: a ResNet on images (default); segmentation: a dilated ResNet with an "
        "FCN head, per-pixel classes; sequence: a Transformer encoder on long-range sequence tasks",
    )
    p.add_argument(
        "--mechanisms",
        type=_names,
        help="comma-separated names; 'none' is the plain network (default for classification: "
        f"{','.join(DEFAULT_MECHANISMS)}; for segmentation: none,non_local,dnl,danet,criss_cross,"
        "glore,cgnl,gc, and 'all' adds asymmetric_non_local,psa,adaptive_context,spygr,dgmn,"
        "double_attention)",
    )
    p.add_argument(
        "--epochs", type=_positive, help="default: 8 (classification), 16 (segmentation), 15 (sequence)"
    )
    p.add_argument("--seeds", type=_seeds, default=[0, 1], help="comma-separated seeds (default 0,1)")
    p.add_argument("--image-size", type=_positive, help="default 32 (classification), 48 (segmentation)")
    p.add_argument(
        "--depth",
        type=int,
        help="ResNet depth: classification 8 (default), 14, 20, ... or 18, 34, 50; segmentation 18 "
        "(default), 34, 50",
    )
    p.add_argument("--width", type=_positive, help="first-stage width (default 16; segmentation 8)")
    p.add_argument("--batch-size", type=_positive, help="default: 32 for classification, 16 for segmentation")
    p.add_argument("--lr", type=float, help="default: 5e-3 for classification, 1e-2 for segmentation")
    p.add_argument(
        "--data",
        help="classification: an image folder with one sub-folder per class (default: cluttered digits); "
        "sequence: a text file, one LABEL<TAB>TOKEN TOKEN ... per line",
    )
    p.add_argument("--limit", type=_positive, help="use at most this many training examples")
    p.add_argument(
        "--upsample",
        choices=("bilinear", "carafe"),
        help="segmentation: the decoder's upsampling of the head's output (default bilinear)",
    )
    p.add_argument(
        "--tasks",
        type=_names,
        help="sequence: generated tasks, retrieval,listops (default both; sequence defaults: the six "
        "sequence mechanisms, 15 epochs, batch 32, lr 2e-3, output reports/compare-sequence)",
    )
    p.add_argument("--lengths", type=_seeds, help="sequence: comma-separated trained lengths (default 64)")
    p.add_argument(
        "--cost-lengths",
        type=_seeds,
        help="sequence: lengths where step time, memory and FLOPs are measured (default 256,...,4096)",
    )
    p.add_argument(
        "--output", "-o", help="report folder (default reports/compare, reports/compare-TASK for the others)"
    )
    p.add_argument("--threads", type=_positive, help="torch threads in all (default: one per core)")
    p.add_argument(
        "--workers",
        type=_positive,
        help="training runs side by side, each on threads/workers threads (default: one per thread; CPU)",
    )
    p.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME.KEY=VALUE",
        help="a constructor option for one mechanism, repeatable (default: non_local.sub_sample=True)",
    )
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "translate", help="train Seq2Seq with Bahdanau or Luong attention on dates; draw alignments"
    )
    p.add_argument("--attention", choices=("bahdanau", "luong", "luong_local"), default="luong")
    p.add_argument(
        "--score", choices=("dot", "general", "concat", "location"), help="Luong's score (default general)"
    )
    p.add_argument("--local-mode", choices=("local-p", "local-m"), default="local-p")
    p.add_argument(
        "--compare",
        action="store_true",
        help="train Bahdanau, Luong global (dot, general, concat, location), local-m and local-p side "
        "by side and print accuracy, alignment error rate and time",
    )
    p.add_argument("--workers", type=_positive, help="worker processes for --compare (default: 1 per thread)")
    p.add_argument("--cell", choices=("gru", "lstm"), help="default: the paper's (GRU Bahdanau, LSTM Luong)")
    p.add_argument("--hidden", type=_positive, default=64)
    p.add_argument("--epochs", type=_positive, default=8)
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-size", type=_positive, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", "-o", default="reports/translate")
    p.add_argument("--threads", type=_positive)
    p.add_argument("--device", type=_device, default="cpu")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_translate)

    p = sub.add_parser("show", help="draw a mechanism's attention maps on an image")
    p.add_argument("name")
    p.add_argument("--image", help="an image file (default: scikit-learn's bundled photo)")
    p.add_argument(
        "--query",
        type=_query,
        help="Y,X cell of the 32 x 32 feature map whose attention is drawn (default centre)",
    )
    p.add_argument(
        "--from",
        dest="report",
        metavar="REPORT_DIR",
        help="draw the network trained by `attnzoo compare -o REPORT_DIR` instead of untrained weights",
    )
    p.add_argument("--output", "-o", default="reports/show", help="a .png file, or a folder for NAME.png")
    p.set_defaults(func=cmd_show)
    return parser


def _argv_with_negative_values(argv: Sequence[str]) -> list[str]:
    """``--query -1,-1`` -> ``--query=-1,-1``: argparse reads a value that starts with '-' as an
    option, and would report a missing value instead of the value's own problem."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == "--query" and out[i + 1].startswith("-") and out[i + 1][1:2].isdigit():
            out[i : i + 2] = [f"--query={out[i + 1]}", ""]
    return [a for a in out if a != ""]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_argv_with_negative_values(sys.argv[1:] if argv is None else argv))
    try:
        return int(args.func(args))
    except CliError as error:
        print(f"attnzoo: error: {error}", file=sys.stderr)
        return 2
    except KeyError as error:
        print(f"attnzoo: error: {error.args[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnzoo: interrupted", file=sys.stderr)
        return 130  # the shell's code for a command ended by SIGINT
    except BrokenPipeError:
        # the reader went away (`attnzoo list | head`): stop quietly, and keep Python's exit-time
        # flush of stdout from raising again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":
    sys.exit(main())
