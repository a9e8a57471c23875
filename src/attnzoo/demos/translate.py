"""`attnzoo translate`: train an attentional Seq2Seq on dates and draw its alignments.

Dates written in many human formats ("the 3rd of March 1987", "Tue 3 Mar 1987", "03/03/1987" ...)
are translated character by character to ISO 8601 (:mod:`attnzoo.demos.dates`). The task is small
enough for a CPU in a minute or two and its alignments are easy to read: the output's year digits
attend to the source's year, the month to the month name or number, as in the RNNsearch paper's
figure 3. Under ``torchrun`` training is data-parallel with the single-process result.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnzoo._progress import Progress
from attnzoo.demos.alignment import alignment_error_rate, links_from_weights
from attnzoo.demos.dates import BOS, EOS, PAD, DatePairs, date_pairs
from attnzoo.demos.distributed import (
    cleanup_distributed,
    init_distributed,
    one_cycle,
    prepare_model,
    train_epoch,
)
from attnzoo.demos.parallel import plan_workers, run_jobs

__all__ = [
    "PAPER_VARIANTS",
    "TranslateConfig",
    "TranslateResult",
    "alignment_error",
    "compare_variants",
    "run_translate",
    "variants_table",
    "write_translate_report",
]


@dataclass
class TranslateConfig:
    """Everything that decides a run; the same config gives the same model and report."""

    # Luong's unidirectional encoder leaves the alignment to the attention, which makes the sharpest
    # figure; Bahdanau's bidirectional encoder carries positions itself and its maps are blurrier
    attention: str = "luong"
    score: str | None = "general"
    local_mode: str = "local-p"
    cell: str | None = None
    hidden: int = 64
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    n_train: int = 4000
    n_test: int = 500
    seed: int = 0
    samples: int = 4
    output: str = "reports/translate"
    threads: int | None = None
    device: str = "cpu"
    progress: bool = True


@dataclass
class TranslateResult:
    exact_match: float
    char_accuracy: float
    curve: list[float] = field(default_factory=list)  # exact match after each epoch
    losses: list[float] = field(default_factory=list)
    examples: list[tuple[str, str, str]] = field(default_factory=list)  # source, target, prediction
    #: alignment error rate of the maps against the gold alignment (forced decoding, test pairs)
    aer: float | None = None
    train_seconds: float = 0.0


def build_model(config: TranslateConfig, pairs: DatePairs) -> nn.Module:
    from attnzoo.models.seq2seq import Seq2Seq

    return Seq2Seq(
        len(pairs.source_vocab),
        len(pairs.target_vocab),
        hidden=config.hidden,
        attention=config.attention,
        score=config.score,
        local_mode=config.local_mode,
        window=5,  # sources are at most ~40 characters: a +-5 window covers a date field
        cell=config.cell,
        padding_idx=PAD,
        # Luong's location score predicts one weight per source position: as many rows as the
        # longest source has characters, plus its </s>
        max_source_len=(
            max(map(len, pairs.train_sources + pairs.test_sources)) + 1
            if config.score == "location"
            else None
        ),
    )


def _tensors(pairs: DatePairs, sources: list[str], targets: list[str]) -> tuple[Tensor, Tensor, Tensor]:
    src = pairs.source_vocab.encode(sources, eos=True)  # (N, S)
    tgt = pairs.target_vocab.encode(targets, bos=True, eos=True)  # (N, T + 2): <s> ... </s>
    return src, tgt[:, :-1], tgt[:, 1:]  # source, decoder input, decoder output


@torch.no_grad()
def evaluate(
    model: nn.Module, pairs: DatePairs, src: Tensor, targets: list[str]
) -> tuple[float, float, list[str]]:
    """Exact-match and per-character accuracy of greedy decoding, and the predictions."""
    model.eval()
    tokens, _ = model.greedy_decode(src, src != PAD, max_len=12, bos=BOS, eos=EOS)
    predictions = [pairs.target_vocab.decode(row) for row in tokens]
    exact = sum(p == t for p, t in zip(predictions, targets)) / len(targets)
    chars = sum(sum(a == b for a, b in zip(p, t)) for p, t in zip(predictions, targets))
    return exact, chars / sum(len(t) for t in targets), predictions


@torch.no_grad()
def alignment_error(model: nn.Module, pairs: DatePairs, batch_size: int = 256) -> float:
    """AER of the model's attention against the gold alignment of the test pairs.

    As Luong et al. (2015, section 5.4) measure it: the model is force-decoded on the reference
    (teacher forcing), and each target character, ``</s>`` included, is linked to the source
    position it attends to most (:func:`attnzoo.demos.alignment.links_from_weights`).
    """
    model.eval()
    src, tgt_in, _ = _tensors(pairs, pairs.test_sources, pairs.test_targets)
    device = next(model.parameters()).device
    links = []
    for start in range(0, len(src), batch_size):
        batch_src, batch_in = src[start : start + batch_size].to(device), tgt_in[start : start + batch_size]
        _, attn = model(batch_src, batch_src != PAD, batch_in.to(device))  # (b, T, S)
        for i, row in enumerate(attn.float().cpu()):
            index = start + i
            target_len = len(pairs.test_targets[index]) + 1  # the characters and </s>
            source_len = len(pairs.test_sources[index]) + 1
            links.append(links_from_weights(row, target_len, source_len))
    return alignment_error_rate(links, pairs.test_alignments)


def run_translate(config: TranslateConfig) -> tuple[TranslateResult, nn.Module, DatePairs]:
    """Train and evaluate; returns the result, the trained model and the data."""
    if config.threads:
        torch.set_num_threads(config.threads)
    info = init_distributed(config.device)
    try:
        pairs = date_pairs(config.n_train, config.n_test, seed=config.seed)
        src, tgt_in, tgt_out = _tensors(pairs, pairs.train_sources, pairs.train_targets)
        test_src, _, _ = _tensors(pairs, pairs.test_sources, pairs.test_targets)
        src, tgt_in, tgt_out = src.to(info.device), tgt_in.to(info.device), tgt_out.to(info.device)
        torch.manual_seed(config.seed)
        model = prepare_model(build_model(config, pairs), info)
        core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
        steps = -(-len(src) // config.batch_size) * config.epochs
        scheduler = one_cycle(optimizer, config.lr, steps)
        generator = torch.Generator().manual_seed(config.seed)

        def loss_fn(idx: Tensor) -> Tensor:
            logits, _ = model(src[idx], src[idx] != PAD, tgt_in[idx])  # (b, T, V)
            return F.cross_entropy(logits.flatten(0, 1), tgt_out[idx].flatten(), ignore_index=PAD)

        progress = Progress(config.epochs, enabled=config.progress and info.is_main)
        result = TranslateResult(0.0, 0.0)
        started = time.perf_counter()
        for epoch in range(config.epochs):
            result.losses.append(
                train_epoch(
                    model, optimizer, scheduler, len(src), config.batch_size, generator, loss_fn, info
                )
            )
            exact, chars, predictions = evaluate(core, pairs, test_src.to(info.device), pairs.test_targets)
            result.curve.append(exact)
            result.exact_match, result.char_accuracy = exact, chars
            progress.update(
                f"epoch {epoch + 1}/{config.epochs}: loss {result.losses[-1]:.3f}, exact match {exact:.3f}"
            )
        progress.close()
        result.train_seconds = time.perf_counter() - started
        result.examples = list(zip(pairs.test_sources, pairs.test_targets, predictions))[: config.samples]
        result.aer = alignment_error(core, pairs)
        return result, core.cpu(), pairs
    finally:
        cleanup_distributed(info)


def write_translate_report(
    result: TranslateResult, model: nn.Module, pairs: DatePairs, config: TranslateConfig
) -> Path:
    """Alignment matrices of sample sentences (PNG) and report.md under ``config.output``."""
    from attnzoo import viz

    out = Path(config.output)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    lines = [
        f"# Date translation with {config.attention} attention",
        "",
        f"Seq2Seq ({config.cell or 'default'} cell, hidden {config.hidden}"
        + (f", score {config.score}" if config.score else "")
        + (f", {config.local_mode}" if config.attention == "luong_local" else "")
        + f") trained {config.epochs} epochs on {config.n_train} generated pairs; greedy decoding on "
        f"{config.n_test} held-out pairs.",
        "",
        f"- exact match: **{100 * result.exact_match:.1f}%**",
        f"- character accuracy: {100 * result.char_accuracy:.1f}%",
        f"- alignment error rate (AER) against the gold alignment: {_percent(result.aer)} (forced "
        "decoding of the test pairs; each output character linked to the source character it attends "
        "to most; Och and Ney's definition, as in Luong et al. 2015, Table 6)",
        "",
        "| source | target | prediction |",
        "|---|---|---|",
        *(f"| {s} | {t} | {p} |" for s, t, p in result.examples),
        "",
    ]
    for i, (source, _target, _) in enumerate(result.examples):
        src = pairs.source_vocab.encode([source], eos=True)
        tokens, attn = model.greedy_decode(src, src != PAD, max_len=12, bos=BOS, eos=EOS)
        prediction = pairs.target_vocab.decode(tokens[0])
        out_tokens = [*prediction, "</s>"][: attn.shape[1]]
        source_tokens = [*source, "</s>"]
        path = viz.alignment(
            attn[0, : len(out_tokens), : len(source_tokens)],
            source_tokens,
            out_tokens,
            out / f"alignment_{i}.png",
            title=f"{source} -> {prediction}",
        )
        lines += [f"![alignment {i}]({path.name})", ""]
    (out / "results.json").write_text(
        json.dumps({"config": asdict(config), "result": asdict(result)}, indent=2)
    )
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


#: The attention variants of the paper-style table: (label, attention, score, local mode).
PAPER_VARIANTS: tuple[tuple[str, str, str | None, str], ...] = (
    ("bahdanau", "bahdanau", None, "local-p"),
    ("global (dot)", "luong", "dot", "local-p"),
    ("global (general)", "luong", "general", "local-p"),
    ("global (concat)", "luong", "concat", "local-p"),
    ("global (location)", "luong", "location", "local-p"),
    ("local-m (general)", "luong_local", "general", "local-m"),
    ("local-p (general)", "luong_local", "general", "local-p"),
)


def _variant_run(
    label: str, attention: str, score: str | None, local_mode: str, shared: TranslateConfig, progress: Any
) -> tuple[str, TranslateResult]:
    """Train one variant; module-level so that worker processes can run it."""
    config = replace(
        shared, attention=attention, score=score, local_mode=local_mode, progress=False, threads=None
    )
    result, _, _ = run_translate(config)
    progress.update(f"{label}: exact match {100 * result.exact_match:.1f}%, AER {_percent(result.aer)}")
    return label, result


def compare_variants(
    config: TranslateConfig,
    variants: Sequence[tuple[str, str, str | None, str]] = PAPER_VARIANTS,
    *,
    workers: int | None = None,
) -> list[tuple[str, TranslateResult]]:
    """Train every attention variant with the same data and settings, side by side in workers."""
    jobs = list(variants)
    threads = config.threads or torch.get_num_threads()
    count, per_worker = plan_workers(len(jobs), threads, workers)
    progress = Progress(len(jobs), enabled=config.progress)
    try:
        return run_jobs(
            _variant_run, jobs, shared=config, workers=count, threads=per_worker, progress=progress
        )
    finally:
        progress.close()


def variants_table(rows: Sequence[tuple[str, TranslateResult]]) -> str:
    """The paper-style table (Luong et al. 2015, Table 6): accuracy, AER and training time."""
    lines = [
        "| attention | exact match | character accuracy | AER | training time |",
        "|---|---|---|---|---|",
    ]
    for label, result in rows:
        lines.append(
            f"| {label} | {100 * result.exact_match:.1f}% | {100 * result.char_accuracy:.1f}% | "
            f"{_percent(result.aer)} | {result.train_seconds:.0f} s |"
        )
    return "\n".join(lines)
