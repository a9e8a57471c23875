"""Alignment error rate (AER) of attention weights against a gold alignment.

Och and Ney (2003), "A Systematic Comparison of Various Statistical Alignment Models"
(Computational Linguistics 29(1)), as used by Luong et al. (2015, arXiv:1508.04025, Table 6) to
score attention models: with A the predicted links, S the sure and P the possible gold links
(S within P), summed over a corpus::

    AER = 1 - (|A & S| + |A & P|) / (|A| + |S|)

0 when every predicted link is possible and every sure link is predicted. Like Luong et al., each
target token is linked to the one source token it attends to most (the argmax of its row).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import Tensor

from attnzoo.demos.dates import GoldAlignment

__all__ = ["alignment_error_rate", "links_from_weights"]


def links_from_weights(weights: Tensor, target_length: int, source_length: int) -> frozenset[tuple[int, int]]:
    """(target, source) links from one sentence's (T, S) attention weights: each target row's argmax.

    Only the first ``target_length`` rows and ``source_length`` columns are real tokens (the rest
    is padding or decoding past the end).
    """
    if weights.dim() != 2:
        raise ValueError(f"weights: expected a (T, S) matrix, got shape {tuple(weights.shape)}")
    rows = min(target_length, weights.shape[0])
    best = weights[:rows, :source_length].argmax(dim=-1)  # (T,) source position per target token
    return frozenset((t, int(s)) for t, s in enumerate(best.tolist()))


def alignment_error_rate(
    predicted: Iterable[frozenset[tuple[int, int]] | set[tuple[int, int]]], gold: Sequence[GoldAlignment]
) -> float:
    """Corpus AER of predicted link sets against gold sure/possible links (one per sentence).

    Raises:
        ValueError: a different number of predicted and gold sentences, or no links at all.
    """
    predicted = list(predicted)
    if len(predicted) != len(gold):
        raise ValueError(
            f"predicted: expected {len(gold)} sentences (one per gold alignment), got {len(predicted)}"
        )
    hits_sure = sum(len(a & g.sure) for a, g in zip(predicted, gold))
    hits_possible = sum(len(a & g.possible) for a, g in zip(predicted, gold))
    total = sum(len(a) for a in predicted) + sum(len(g.sure) for g in gold)
    if total == 0:
        raise ValueError("predicted, gold: no links at all, AER is undefined")
    return 1.0 - (hits_sure + hits_possible) / total
