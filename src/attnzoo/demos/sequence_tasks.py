"""Generated sequence-classification tasks where long-range attention matters and the answer is known.

Nothing is downloaded: each task is generated deterministically from a seed, at any length.

- ``retrieval``: a few *key* tokens open the sequence, a long stretch of filler follows, and the
  last token is a *query* ``q_i``, which asks whether key ``k_i`` is among the keys (the label).
  Queries have their own tokens and the filler another part of the vocabulary, so the answer
  depends only on the first and last tokens: a model must carry information across the whole
  length (the distance grows with the length), and finds the query by what it is, not where.
- ``listops``: nested prefix expressions over the digits 0-9 with the operators ``MAX``, ``MIN``,
  ``MED`` (median) and ``SM`` (sum modulo 10), as in ListOps (Nangia and Bowman 2018,
  arXiv:1804.06028) and its long-range version in Long Range Arena (Tay et al. 2020,
  arXiv:2011.04006). The label is the expression's value (ten classes); shorter expressions are
  padded at the end with ``<pad>`` tokens.

Token ids: 0 is ``<pad>`` and 1 ``<cls>`` (prepended to every sequence); the rest depends on the
task (``SequenceTask.vocab``).

A user's own sequences come from a text file (:func:`read_sequences`): one example per line,
``LABEL<TAB>TOKEN TOKEN ...``.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "TASKS",
    "SequenceTask",
    "evaluate_listops",
    "listops",
    "make_task",
    "read_sequences",
    "retrieval",
]

PAD, CLS = 0, 1


@dataclass(frozen=True)
class SequenceTask:
    """Token sequences (N, L) with int64 labels (N,), split into train and test."""

    name: str
    length: int
    num_classes: int
    vocab: tuple[str, ...]
    train_tokens: Tensor
    train_labels: Tensor
    test_tokens: Tensor
    test_labels: Tensor
    classes: tuple[str, ...] = ()  # the label names (a user's file); empty: the class indices

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def describe(self) -> str:
        """One line for reports: sizes and the class balance of the test split."""
        counts = torch.bincount(self.test_labels, minlength=self.num_classes)
        majority = counts.max().item() / max(1, len(self.test_labels))
        return (
            f"{self.name} at length {self.length}: {len(self.train_labels)} train / "
            f"{len(self.test_labels)} test sequences, {self.num_classes} classes, "
            f"majority class {100 * majority:.1f}% of the test split"
        )


def _check_sizes(length: int, n_train: int, n_test: int, minimum: int) -> None:
    if length < minimum:
        raise ValueError(f"length: expected at least {minimum} tokens for this task, got {length}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"n_train, n_test: expected positive counts, got {n_train} and {n_test}")


def retrieval(
    length: int, n_train: int = 2000, n_test: int = 500, *, seed: int = 0, num_keys: int = 4,
    key_vocab: int = 16, filler_vocab: int = 16,
) -> SequenceTask:  # fmt: skip
    """The retrieval task: ``<cls> k_a .. k_m f f ... f q_i``; label 1 iff k_i is one of the keys.

    Half the sequences are positive. Keys are distinct tokens drawn from ``key_vocab`` key tokens;
    the query ``q_i`` is the query token of one of them (positive) or of a key token that is not
    among them (negative). Token ids: keys ``2 .. 1 + key_vocab``, filler next, queries last
    (``query id - key id`` is the same for every i).
    """
    _check_sizes(length, n_train, n_test, num_keys + 3)
    if not 0 < num_keys < key_vocab:
        raise ValueError(f"num_keys: expected 1 .. {key_vocab - 1} (fewer than key_vocab), got {num_keys}")
    vocab = ("<pad>", "<cls>", *(f"k{i}" for i in range(key_vocab)), *(f"f{i}" for i in range(filler_vocab)),
             *(f"q{i}" for i in range(key_vocab)))  # fmt: skip
    key_ids, filler_start = list(range(2, 2 + key_vocab)), 2 + key_vocab
    query_offset = key_vocab + filler_vocab  # q_i = k_i + query_offset
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    total = n_train + n_test
    filler_length = length - num_keys - 2
    # (N, filler) random filler tokens, drawn in one call
    filler = torch.randint(
        filler_start, filler_start + filler_vocab, (total, filler_length), generator=generator
    )
    tokens = torch.empty(total, length, dtype=torch.int64)
    labels = torch.empty(total, dtype=torch.int64)
    for i in range(total):
        keys = rng.sample(key_ids, num_keys)
        positive = rng.random() < 0.5
        asked = rng.choice(keys) if positive else rng.choice([k for k in key_ids if k not in keys])
        tokens[i, 0] = CLS
        tokens[i, 1 : 1 + num_keys] = torch.tensor(keys)
        tokens[i, 1 + num_keys : -1] = filler[i]
        tokens[i, -1] = asked + query_offset
        labels[i] = int(positive)
    return SequenceTask("retrieval", length, 2, vocab, tokens[:n_train], labels[:n_train],
                        tokens[n_train:], labels[n_train:])  # fmt: skip


_OPERATORS: dict[str, Callable[[list[int]], int]] = {
    "MAX": max,
    "MIN": min,
    "MED": lambda xs: int(statistics.median_low(xs)),
    "SM": lambda xs: sum(xs) % 10,
}
_LISTOPS_VOCAB = ("<pad>", "<cls>", *(str(d) for d in range(10)), *_OPERATORS, "]")
_LISTOPS_ID = {t: i for i, t in enumerate(_LISTOPS_VOCAB)}


def evaluate_listops(expression: list[str]) -> int:
    """The value of a prefix expression given as tokens, e.g. ``["MAX", "3", "MIN", "4", "1", "]", "]"]``.

    Each operator opens a list closed by ``]`` (the bracket of ``[MAX`` is folded into the
    operator token, as in the LRA version).
    """
    stack: list[tuple[str, list[int]]] = []
    value: int | None = None
    for token in expression:
        if token in _OPERATORS:
            stack.append((token, []))
        elif token == "]":
            op, args = stack.pop()
            result = _OPERATORS[op](args)
            if stack:
                stack[-1][1].append(result)
            else:
                value = result
        else:
            digit = int(token)
            if stack:
                stack[-1][1].append(digit)
            else:
                value = digit
    if stack or value is None:
        raise ValueError(f"expression: unbalanced or empty: {' '.join(expression)}")
    return value


def _random_expression(rng: random.Random, depth: int, max_args: int, budget: int) -> list[str]:
    """A random expression of at most ``budget`` tokens and nesting ``depth``."""
    if depth == 0 or budget < 3:
        return [str(rng.randrange(10))]
    tokens = [rng.choice(list(_OPERATORS))]
    budget -= 2  # the operator and its closing bracket
    for _ in range(rng.randint(2, max_args)):
        if budget < 1:
            break
        nest = rng.random() < 0.35 and budget >= 4
        arg = _random_expression(rng, depth - 1, max_args, budget) if nest else [str(rng.randrange(10))]
        tokens += arg
        budget -= len(arg)
    return [*tokens, "]"]


def listops(
    length: int, n_train: int = 2000, n_test: int = 500, *, seed: int = 0, depth: int = 3, max_args: int = 5
) -> SequenceTask:
    """The ListOps task: ``<cls>`` then an expression of at most ``length - 1`` tokens, padded.

    ``depth`` bounds the nesting and ``max_args`` the arguments of one operator (LRA: depth 10,
    5 arguments, length 2000). Expressions are rejection-sampled so that every class occurs.
    """
    _check_sizes(length, n_train, n_test, 4)
    if depth < 1 or max_args < 2:
        raise ValueError(f"depth, max_args: expected >= 1 and >= 2, got {depth} and {max_args}")
    rng = random.Random(seed)
    total = n_train + n_test
    tokens = torch.full((total, length), PAD, dtype=torch.int64)
    labels = torch.empty(total, dtype=torch.int64)
    for i in range(total):
        expression = _random_expression(rng, depth, max_args, length - 1)
        tokens[i, 0] = CLS
        tokens[i, 1 : 1 + len(expression)] = torch.tensor([_LISTOPS_ID[t] for t in expression])
        labels[i] = evaluate_listops(expression)
    return SequenceTask("listops", length, 10, _LISTOPS_VOCAB, tokens[:n_train], labels[:n_train],
                        tokens[n_train:], labels[n_train:])  # fmt: skip


#: Task name -> generator ``(length, n_train, n_test, seed=) -> SequenceTask``.
TASKS: dict[str, Callable[..., SequenceTask]] = {"retrieval": retrieval, "listops": listops}


def make_task(name: str, length: int, n_train: int, n_test: int, *, seed: int = 0) -> SequenceTask:
    """The task called ``name`` at ``length``.

    Raises:
        ValueError: an unknown task name (the valid ones are listed).
    """
    if name not in TASKS:
        raise ValueError(f"task: expected one of {sorted(TASKS)}, got {name!r}")
    return TASKS[name](length, n_train, n_test, seed=seed)


def read_sequences(path: str | Path, *, test_fraction: float = 0.2, seed: int = 0) -> SequenceTask:
    """A user's labelled token sequences as a task: one example per line, ``LABEL<TAB>TOKENS``.

    The label is any text without a tab; the tokens are separated by spaces (any text: words,
    characters, numbers). Empty lines and lines starting with ``#`` are skipped. ``<cls>`` is
    prepended to every sequence and shorter ones are padded at the end to the longest; the token
    ``<pad>`` is padding. The examples are shuffled with ``seed`` and ``test_fraction`` of them (at
    least one) is held out.

    Raises:
        ValueError: one line naming the file and, for a bad line, its number and what was expected:
            no such file, not UTF-8, a line without a tab, an empty label or no tokens, fewer than
            two examples, one class only.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"data: no file at {file}" + (" (a folder)" if file.is_dir() else ""))
    examples: list[tuple[str, list[str]]] = []
    try:
        with file.open(encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                text = line.rstrip("\r\n")
                if not text.strip() or text.startswith("#"):
                    continue
                label, tab, rest = text.partition("\t")
                if not tab:
                    raise ValueError(f"data: {file} line {number}: expected LABEL<TAB>TOKENS, found no tab")
                tokens = rest.split()
                if not label.strip():
                    raise ValueError(f"data: {file} line {number}: empty label before the tab")
                if not tokens:
                    raise ValueError(f"data: {file} line {number}: no tokens after the label {label!r}")
                examples.append((label.strip(), tokens))
    except UnicodeDecodeError as error:
        raise ValueError(f"data: {file} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    if len(examples) < 2:
        raise ValueError(f"data: {file}: expected at least two examples, found {len(examples)}")
    classes = sorted({label for label, _ in examples})
    if len(classes) < 2:
        raise ValueError(f"data: {file}: one class only ({classes[0]!r}); expected at least two labels")
    vocab = {"<pad>": PAD, "<cls>": CLS}
    for _, tokens in examples:
        for token in tokens:
            vocab.setdefault(token, len(vocab))
    length = 1 + max(len(tokens) for _, tokens in examples)
    ids = torch.full((len(examples), length), PAD, dtype=torch.int64)
    labels = torch.tensor([classes.index(label) for label, _ in examples])
    for i, (_, tokens) in enumerate(examples):
        ids[i, 0] = CLS
        ids[i, 1 : 1 + len(tokens)] = torch.tensor([vocab[t] for t in tokens])
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed))
    ids, labels = ids[order], labels[order]
    n_test = min(max(1, round(test_fraction * len(examples))), len(examples) - 1)
    return SequenceTask(file.name, length, len(classes), tuple(vocab), ids[n_test:], labels[n_test:],
                        ids[:n_test], labels[:n_test], classes=tuple(classes))  # fmt: skip
