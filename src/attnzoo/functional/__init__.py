"""Stateless kernels: the generic attention core and its helpers."""

from attnzoo.functional.attend import (
    FUSABLE_SCORES,
    SCORES,
    Score,
    and_masks,
    attend,
    attention_logits,
    attention_weights,
    causal_mask,
    key_padding_to_mask,
    merge_masks,
)
from attnzoo.functional.softmax import compute_dtype, masked_softmax

__all__ = [
    "FUSABLE_SCORES",
    "SCORES",
    "Score",
    "and_masks",
    "attend",
    "attention_logits",
    "attention_weights",
    "causal_mask",
    "compute_dtype",
    "key_padding_to_mask",
    "masked_softmax",
    "merge_masks",
]
