"""The `attnzoo` command: list, describe and benchmark the registered mechanisms."""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Sequence
from dataclasses import replace

import torch

import attnzoo
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
    rows = []
    for name in names:
        spec = get_spec(name)
        rows.append((name, spec.family, spec.paper.cite(), f"{_params(spec):,}"))
    print(_table(("name", "family", "paper", "params (default size)"), rows))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    spec = get_spec(_resolve([args.name])[0])
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
    print("\n".join(lines))
    return 0


class _Progress:
    """A one-line progress bar on stderr (a line per step when stderr is not a terminal)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = sys.stderr.isatty()

    def step(self, label: str) -> None:
        if not self.enabled:
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        bar = f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} {label}"
        if self.tty:
            sys.stderr.write("\r\033[K" + bar)
        else:
            sys.stderr.write(bar + "\n")
        sys.stderr.flush()
        self.done += 1

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    from attnzoo.bench.report import bench_module, format_table, to_csv, to_json

    names = _resolve(args.names)
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = _Progress(len(names), enabled=not args.quiet)
    rows = []
    for name in names:
        progress.step(name)
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
            rows.append(bench_module(spec, sizes, repeats=args.repeats, warmup=args.warmup))
        except (ValueError, TypeError) as error:
            progress.close()
            raise CliError(
                f"{name} at batch={sizes.batch} width={sizes.width} extent={sizes.extent}: {error}"
            ) from None
    progress.close()
    text = {"table": format_table, "json": to_json, "csv": to_csv}[args.format](rows)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text + "\n")
    else:
        print(text)
    if args.format == "table" and not args.quiet:
        print(
            f"\n{len(rows)} modules, {args.dtype}, {torch.get_num_threads()} threads, "
            f"median of {args.repeats} after {args.warmup} warm-up",
            file=sys.stderr,
        )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnzoo", description=__doc__)
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
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=_positive, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=_positive, default=5)
    p.add_argument("--warmup", type=int, default=2)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--format", choices=("table", "json", "csv"), default="table")
    fmt.add_argument("--json", dest="format", action="store_const", const="json")
    fmt.add_argument("--csv", dest="format", action="store_const", const="csv")
    p.add_argument("--output", "-o", help="write the result to this file instead of stdout")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except CliError as error:
        print(f"attnzoo: error: {error}", file=sys.stderr)
        return 2
    except KeyError as error:
        print(f"attnzoo: error: {error.args[0]}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
