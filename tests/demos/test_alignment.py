"""Gold alignments of the dates task, checked by hand, and the alignment error rate (Och and Ney 2003)."""

from __future__ import annotations

import datetime as dt

import pytest
import torch

from attnzoo.demos.alignment import alignment_error_rate, links_from_weights
from attnzoo.demos.dates import TEMPLATES, GoldAlignment, date_pairs, gold_alignment, render

MARCH_3_1987 = dt.date(1987, 3, 3)


def template(text: str) -> tuple[str, ...]:
    """The template that renders 3 March 1987 as ``text``."""
    (match,) = [t for t in TEMPLATES if render(MARCH_3_1987, t)[0] == text]
    return match


def test_numeric_day_first_format_links_digit_to_digit() -> None:
    # "03.03.1987": source 0-1 day, 3-4 month, 6-9 year, 10 </s>; target "1987-03-03" + </s>
    gold = gold_alignment(MARCH_3_1987, template("03.03.1987"))
    assert gold.sure == {(0, 6), (1, 7), (2, 8), (3, 9), (5, 3), (6, 4), (8, 0), (9, 1), (10, 10)}
    # hyphens may link to the two dots; nothing else is possible
    assert gold.possible - gold.sure == {(4, 2), (4, 5), (7, 2), (7, 5)}


def test_single_digit_day_links_the_leading_zero_as_possible() -> None:
    # "3/3/1987": month at 0, day at 2, year 4-7, </s> at 8
    gold = gold_alignment(MARCH_3_1987, template("3/3/1987"))
    assert {(6, 0), (9, 2)} <= gold.sure  # the ISO second digits
    assert (5, 0) in gold.possible - gold.sure and (8, 2) in gold.possible - gold.sure
    assert (5, 0) not in gold.sure


def test_month_name_links_both_digits_to_every_letter_as_possible() -> None:
    # "the 3rd of March 1987": "3rd" at 4-6, "March" at 11-15
    gold = gold_alignment(MARCH_3_1987, template("the 3rd of March 1987"))
    assert {(5, s) for s in range(11, 16)} | {(6, s) for s in range(11, 16)} <= gold.possible
    assert not {(t, s) for t, s in gold.sure if t in (5, 6)}  # no sure link for a word
    assert (9, 4) in gold.sure  # the ordinal's digit
    assert {(8, 5), (8, 6), (9, 5)} <= gold.possible  # its suffix "rd"
    # "the" and "of" are not separators between fields: no hyphen links to them
    assert not {(t, s) for t, s in gold.possible if t in (4, 7) and s in (0, 1, 2, 8, 9)}


def test_weekday_produces_nothing() -> None:
    _, spans = render(MARCH_3_1987, template("Tuesday, March 3, 1987"))
    gold = gold_alignment(MARCH_3_1987, template("Tuesday, March 3, 1987"))
    start, end = spans["weekday"]
    assert not {(t, s) for t, s in gold.possible if start <= s < end}


@pytest.mark.parametrize("index", range(len(TEMPLATES)))
def test_every_format_links_every_iso_digit_and_sure_within_possible(index: int) -> None:
    for date in (dt.date(1999, 12, 31), dt.date(2001, 1, 9), MARCH_3_1987):
        source, _ = render(date, TEMPLATES[index])
        gold = gold_alignment(date, TEMPLATES[index])
        assert gold.sure <= gold.possible
        iso = date.isoformat()
        for t, c in enumerate(iso):
            if c.isdigit():
                assert any(tt == t for tt, _ in gold.possible), (source, t)
        # every sure link of a digit points at the same digit in the source
        for t, s in gold.sure:
            if t < len(iso):
                assert source[s] == iso[t], (source, t, s)


def test_date_pairs_carry_one_alignment_per_test_pair() -> None:
    pairs = date_pairs(20, 7, seed=3)
    assert len(pairs.test_alignments) == 7
    for source, alignment in zip(pairs.test_sources, pairs.test_alignments):
        assert (10, len(source)) in alignment.sure  # </s> to </s>


def test_aer_is_zero_for_the_sure_links_and_one_for_links_outside_possible() -> None:
    gold = gold_alignment(MARCH_3_1987, template("03.03.1987"))
    assert alignment_error_rate([gold.sure], [gold]) == 0.0
    wrong = frozenset((t, (s + 1) % 11) for t, s in gold.sure)  # every link shifted off
    assert alignment_error_rate([wrong], [gold]) == pytest.approx(1.0 - 2 * len(wrong & gold.possible) / 18)


def test_aer_by_hand() -> None:
    # S = {(0,0)}, P = {(0,0), (1,1)}; A = {(0,0), (1,2)}: 1 - (1 + 1) / (2 + 1) = 1/3
    gold = GoldAlignment(frozenset({(0, 0)}), frozenset({(0, 0), (1, 1)}))
    assert alignment_error_rate([{(0, 0), (1, 2)}], [gold]) == pytest.approx(1 / 3)
    # A = {(0,0), (1,1)}: 1 - (1 + 2) / (2 + 1) = 0
    assert alignment_error_rate([{(0, 0), (1, 1)}], [gold]) == pytest.approx(0.0)


def test_links_from_weights_take_each_rows_argmax_within_the_real_tokens() -> None:
    weights = torch.tensor([[0.1, 0.7, 0.2, 0.0], [0.5, 0.1, 0.1, 0.3], [0.0, 0.0, 0.1, 0.9]])
    # two real target tokens, three real source tokens (column 3 is padding)
    assert links_from_weights(weights, 2, 3) == {(0, 1), (1, 0)}
    with pytest.raises(ValueError, match="expected a"):
        links_from_weights(weights[0], 1, 3)
    with pytest.raises(ValueError, match="expected 2 sentences"):
        alignment_error_rate([set()], [GoldAlignment(frozenset(), frozenset())] * 2)


class _OracleAttention(torch.nn.Module):
    """A stand-in Seq2Seq whose attention puts each output character on one of its gold sure links."""

    def __init__(self, pairs: object, shift: int = 0) -> None:
        super().__init__()
        self.pairs, self.shift = pairs, shift
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor, tgt_in: torch.Tensor) -> tuple:
        batch, steps = tgt_in.shape
        attn = torch.zeros(batch, steps, src.shape[1])
        for i in range(batch):
            index = next(
                j
                for j, s in enumerate(self.pairs.test_sources)
                if self.pairs.source_vocab.encode([s])[0].tolist() == src[i, : len(s) + 1].tolist()
            )
            gold = self.pairs.test_alignments[index]
            for t in range(steps):
                sources = sorted(s for tt, s in gold.sure if tt == t) or sorted(
                    s for tt, s in gold.possible if tt == t
                )
                if sources:
                    attn[i, t, (sources[0] + self.shift) % src.shape[1]] = 1.0
        return torch.zeros(batch, steps, 3), attn


def test_translate_alignment_error_of_an_oracle_is_near_zero_and_of_a_shifted_one_high() -> None:
    from attnzoo.demos.translate import alignment_error

    pairs = date_pairs(10, 12, seed=5)
    oracle = alignment_error(_OracleAttention(pairs), pairs, batch_size=5)
    # hyphens link to a possible separator, digits to sure links: only hyphen links outside S remain
    assert oracle < 0.25
    shifted = alignment_error(_OracleAttention(pairs, shift=1), pairs, batch_size=5)
    assert shifted > 0.7 > oracle


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 6, 10, 100])
def test_one_cycle_schedule_runs_for_any_number_of_steps(steps: int) -> None:
    """torch's OneCycleLR divides by zero when 20% of the steps round to no warm-up step."""
    from attnzoo.demos.distributed import one_cycle

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=0.1)
    scheduler = one_cycle(optimizer, 0.1, steps)
    rates = []
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    assert all(r > 0 for r in rates)
