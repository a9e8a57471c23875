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

__all__ = [
    "FUSABLE_SCORES",
    "SCORES",
    "Score",
    "and_masks",
    "attend",
    "attention_logits",
    "attention_weights",
    "causal_mask",
    "key_padding_to_mask",
    "merge_masks",
]
