"""Dates written in many human formats, to be translated to ISO 8601 (YYYY-MM-DD).

A small character-level translation task for the attention decoders: the alignment between the
human format and the ISO output is easy to read (day digits attend to the day, month letters to
the month ...). Generated deterministically from a seed; nothing is downloaded.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["FORMATS", "CharVocab", "DatePairs", "date_pairs"]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


#: Human formats: each turns a date into a string. Slashes are month-first (US order) and dots
#: day-first, so every source string has exactly one reading.
FORMATS: tuple[Callable[[dt.date], str], ...] = (
    lambda d: f"{d.day} {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{MONTHS[d.month - 1][:3]} {d.day} {d.year}",
    lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}",
    lambda d: f"{d.month}/{d.day}/{d.year}",
    lambda d: f"{d.month:02d}/{d.day:02d}/{d.year}",
    lambda d: f"{DAYS[d.weekday()]}, {MONTHS[d.month - 1]} {d.day}, {d.year}",
    lambda d: f"{DAYS[d.weekday()][:3]} {d.day} {MONTHS[d.month - 1][:3]} {d.year}",
    lambda d: f"the {_ordinal(d.day)} of {MONTHS[d.month - 1]} {d.year}",
    lambda d: f"{_ordinal(d.day)} {MONTHS[d.month - 1].lower()} {d.year}",
    lambda d: f"{d.year}/{d.month}/{d.day}",
    lambda d: f"{d.day} {MONTHS[d.month - 1][:3].upper()} {d.year}",
)

PAD, BOS, EOS = 0, 1, 2
_SPECIALS = ("<pad>", "<s>", "</s>")


class CharVocab:
    """Characters <-> ids, with <pad> = 0, <s> = 1, </s> = 2."""

    def __init__(self, texts: Sequence[str]) -> None:
        chars = sorted({c for t in texts for c in t})
        self.tokens: list[str] = [*_SPECIALS, *chars]
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, texts: Sequence[str], *, bos: bool = False, eos: bool = True) -> Tensor:
        """Texts -> (N, L) ids padded with <pad>; unknown characters are an error."""
        rows = []
        for text in texts:
            missing = sorted({c for c in text if c not in self.index})
            if missing:
                raise ValueError(f"texts: characters {missing} are not in the vocabulary")
            rows.append(([BOS] if bos else []) + [self.index[c] for c in text] + ([EOS] if eos else []))
        out = torch.full((len(rows), max(len(r) for r in rows)), PAD, dtype=torch.int64)
        for i, row in enumerate(rows):
            out[i, : len(row)] = torch.tensor(row)
        return out

    def decode(self, ids: Sequence[int] | Tensor) -> str:
        """Ids -> text, stopping at </s> and skipping <pad>/<s>."""
        chars = []
        for i in ids.tolist() if isinstance(ids, Tensor) else ids:
            if i == EOS:
                break
            if i not in (PAD, BOS):
                chars.append(self.tokens[i])
        return "".join(chars)


@dataclass(frozen=True)
class DatePairs:
    """Human-format sources and ISO targets, split into train and test."""

    train_sources: list[str]
    train_targets: list[str]
    test_sources: list[str]
    test_targets: list[str]
    source_vocab: CharVocab
    target_vocab: CharVocab


def date_pairs(n_train: int = 6000, n_test: int = 500, *, seed: int = 0) -> DatePairs:
    """Random dates between 1950 and 2049 in random human formats, with their ISO forms."""
    rng = random.Random(seed)
    start = dt.date(1950, 1, 1).toordinal()
    end = dt.date(2049, 12, 31).toordinal()
    sources, targets = [], []
    for _ in range(n_train + n_test):
        date = dt.date.fromordinal(rng.randint(start, end))
        sources.append(rng.choice(FORMATS)(date))
        targets.append(date.isoformat())
    all_months = [f(dt.date(2000, m, 28)) for f in FORMATS for m in range(1, 13)]
    all_days = [f(dt.date(2024, 1, d)) for f in FORMATS for d in range(1, 8)]
    source_vocab = CharVocab(sources + all_months + all_days)
    target_vocab = CharVocab([*"0123456789-"])
    return DatePairs(sources[:n_train], targets[:n_train], sources[n_train:], targets[n_train:],
                     source_vocab, target_vocab)  # fmt: skip
