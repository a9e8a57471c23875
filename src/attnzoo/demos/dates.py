"""Dates written in many human formats, to be translated to ISO 8601 (YYYY-MM-DD).

A small character-level translation task for the attention decoders: the alignment between the
human format and the ISO output is easy to read (day digits attend to the day, month letters to
the month ...). Generated deterministically from a seed; nothing is downloaded.
"""

from __future__ import annotations

import datetime as dt
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "FORMATS",
    "TEMPLATES",
    "CharVocab",
    "DatePairs",
    "GoldAlignment",
    "date_pairs",
    "gold_alignment",
    "render",
]

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


#: Fields a format is built from: name -> (which ISO part it writes, how it renders a date).
#: Knowing where each field lands in the source string gives the gold alignment for free.
_FIELDS: dict[str, tuple[str, Callable[[dt.date], str]]] = {
    "yyyy": ("year", lambda d: f"{d.year}"),
    "m": ("month", lambda d: f"{d.month}"),
    "mm": ("month", lambda d: f"{d.month:02d}"),
    "Month": ("month", lambda d: MONTHS[d.month - 1]),
    "month": ("month", lambda d: MONTHS[d.month - 1].lower()),
    "Mon": ("month", lambda d: MONTHS[d.month - 1][:3]),
    "MON": ("month", lambda d: MONTHS[d.month - 1][:3].upper()),
    "d": ("day", lambda d: f"{d.day}"),
    "dd": ("day", lambda d: f"{d.day:02d}"),
    "dth": ("day", lambda d: _ordinal(d.day)),
    "Weekday": ("weekday", lambda d: DAYS[d.weekday()]),
    "Wkd": ("weekday", lambda d: DAYS[d.weekday()][:3]),
}

#: Human formats as sequences of field names (in braces) and literal text. Slashes are
#: month-first (US order) and dots day-first, so every source string has exactly one reading.
TEMPLATES: tuple[tuple[str, ...], ...] = (
    ("{d}", " ", "{Month}", " ", "{yyyy}"),
    ("{Month}", " ", "{d}", ", ", "{yyyy}"),
    ("{Mon}", " ", "{d}", " ", "{yyyy}"),
    ("{dd}", ".", "{mm}", ".", "{yyyy}"),
    ("{m}", "/", "{d}", "/", "{yyyy}"),
    ("{mm}", "/", "{dd}", "/", "{yyyy}"),
    ("{Weekday}", ", ", "{Month}", " ", "{d}", ", ", "{yyyy}"),
    ("{Wkd}", " ", "{d}", " ", "{Mon}", " ", "{yyyy}"),
    ("the ", "{dth}", " of ", "{Month}", " ", "{yyyy}"),
    ("{dth}", " ", "{month}", " ", "{yyyy}"),
    ("{yyyy}", "/", "{m}", "/", "{d}"),
    ("{d}", " ", "{MON}", " ", "{yyyy}"),
)


def render(date: dt.date, template: Sequence[str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """The text of ``date`` in ``template`` and the [start, end) span of each ISO part in it."""
    text, spans = "", {}
    for part in template:
        if part.startswith("{") and part.endswith("}"):
            iso_part, fmt = _FIELDS[part[1:-1]]
            piece = fmt(date)
            spans[iso_part] = (len(text), len(text) + len(piece))
            text += piece
        else:
            text += part
    return text, spans


def _formatter(template: Sequence[str]) -> Callable[[dt.date], str]:
    return lambda d: render(d, template)[0]


#: Human formats: each turns a date into a string (the templates rendered).
FORMATS: tuple[Callable[[dt.date], str], ...] = tuple(_formatter(t) for t in TEMPLATES)

#: Target (ISO ``YYYY-MM-DD``) character positions of each part.
_ISO_POSITIONS = {"year": range(0, 4), "month": range(5, 7), "day": range(8, 10)}


def gold_alignment(date: dt.date, template: Sequence[str]) -> GoldAlignment:
    """Which source characters produce each character of ``date.isoformat()`` + ``</s>``.

    Sure links (S) and possible links (P, with S a subset of P) as in Och and Ney (2003), between
    target position t (0..9 the ISO characters, 10 its ``</s>``) and source position s (0..len-1
    the characters, len its ``</s>``):

    - each year digit is sure-linked to the same digit in the source;
    - a numeric month or day written with as many digits as the ISO part: digit to digit (sure);
      written with one digit ("3"): the ISO leading "0" is possible-linked to it, the digit sure;
    - a month or day written in words ("March", "3rd"): both ISO digits are possible-linked to
      every character of the word (which character carries it is a matter of convention), and the
      digits of an ordinal ("3" of "3rd") are sure-linked as for numbers;
    - the hyphens are possible-linked to the separators between the fields, ``</s>`` sure-linked
      to the source's ``</s>``; a weekday produces nothing.
    """
    source, spans = render(date, template)
    iso = date.isoformat()
    sure: set[tuple[int, int]] = set()
    possible: set[tuple[int, int]] = set()
    for part, targets in _ISO_POSITIONS.items():
        start, end = spans[part]
        digits = [s for s in range(start, end) if source[s].isdigit()]
        if len(digits) == len(targets):
            sure.update(zip(targets, digits))
        elif digits:
            # one digit for a two-digit ISO part: it is the ISO part's second digit
            sure.add((targets[-1], digits[-1]))
            possible.add((targets[0], digits[-1]))
        if len(digits) != end - start:  # a word ("March") or an ordinal's suffix ("rd")
            possible.update((t, s) for t in targets for s in range(start, end))
    fields = {s for start, end in spans.values() for s in range(start, end)}
    separators = [s for s in range(len(source)) if s not in fields and not source[s].isalnum()]
    possible.update((t, s) for t, c in enumerate(iso) if c == "-" for s in separators)
    sure.add((len(iso), len(source)))
    return GoldAlignment(frozenset(sure), frozenset(sure | possible))


@dataclass(frozen=True)
class GoldAlignment:
    """Sure and possible (target position, source position) links; ``sure`` is within ``possible``."""

    sure: frozenset[tuple[int, int]]
    possible: frozenset[tuple[int, int]]


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
    #: gold alignment of each test pair (target position, source position), ``</s>`` included
    test_alignments: list[GoldAlignment] = field(default_factory=list)


def date_pairs(n_train: int = 6000, n_test: int = 500, *, seed: int = 0) -> DatePairs:
    """Random dates between 1950 and 2049 in random human formats, with their ISO forms."""
    rng = random.Random(seed)
    start = dt.date(1950, 1, 1).toordinal()
    end = dt.date(2049, 12, 31).toordinal()
    sources, targets, alignments = [], [], []
    for _ in range(n_train + n_test):
        date = dt.date.fromordinal(rng.randint(start, end))
        template = rng.choice(TEMPLATES)
        sources.append(render(date, template)[0])
        targets.append(date.isoformat())
        alignments.append(gold_alignment(date, template))
    all_months = [f(dt.date(2000, m, 28)) for f in FORMATS for m in range(1, 13)]
    all_days = [f(dt.date(2024, 1, d)) for f in FORMATS for d in range(1, 8)]
    source_vocab = CharVocab(sources + all_months + all_days)
    target_vocab = CharVocab([*"0123456789-"])
    return DatePairs(sources[:n_train], targets[:n_train], sources[n_train:], targets[n_train:],
                     source_vocab, target_vocab, alignments[n_train:])  # fmt: skip
