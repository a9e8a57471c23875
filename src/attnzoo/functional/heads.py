"""Pieces shared by the multi-head sequence modules: head sizes, head layout, inputs and masks.

Private (not auto-imported as a mechanism). Used by mha, gated_mha, linformer, synthesizer, sha
and graph_self_attention, so that each of these is written once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnzoo._checks import check_input, check_mask
from attnzoo.functional.attend import and_masks, key_padding_to_mask

__all__ = ["check_heads", "merge_heads", "merge_masks_for_heads", "resolve_key_value", "split_heads"]


def check_heads(embed_dim: int, num_heads: int) -> int:
    """The head width ``embed_dim // num_heads``, after checking that the split is exact.

    Raises:
        ValueError: a non-positive size, or ``num_heads`` not dividing ``embed_dim``.
    """
    if embed_dim <= 0 or num_heads <= 0:
        raise ValueError(f"embed_dim, num_heads: expected positive sizes, got {embed_dim} and {num_heads}")
    if embed_dim % num_heads:
        raise ValueError(f"num_heads: expected a divisor of embed_dim={embed_dim}, got {num_heads}")
    return embed_dim // num_heads


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, h*d) -> (B, h, N, d); the last dim keeps unit stride, as the fused kernels need."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, h, N, d) -> (B, N, h*d), as a fresh contiguous tensor.

    An explicit copy, not ``reshape``: ``torch.export`` records the fused kernel's output strides,
    for which the reshape is a view, and the ONNX exporter replays it on a decomposition with other
    strides, where it is not (seen with batch-sized masks and a dynamic batch).
    """
    batch, heads, length, width = x.shape
    merged = x.transpose(1, 2).clone(memory_format=torch.contiguous_format)  # (B, N, h, d)
    return merged.view(batch, length, heads * width)


def resolve_key_value(
    query: Tensor, key: Tensor | None, value: Tensor | None, *, embed_dim: int, kdim: int, vdim: int
) -> tuple[Tensor, Tensor]:
    """Check (B, N, D) query/key/value and default them: key = query, value = key (self-attention)."""
    check_input(query, "query", "B N D", D=embed_dim)
    key = query if key is None else key
    value = key if value is None else value
    # self-attention passes one tensor three times: check it once (each check costs ~10 us, which
    # shows in short-sequence and decoding steps)
    if key is not query or kdim != embed_dim:
        check_input(key, "key", "B N D", B=query.shape[0], D=kdim)
    if value is not key or vdim != kdim:
        check_input(value, "value", "B N D", B=query.shape[0], N=key.shape[1], D=vdim)
    return key, value


def merge_masks_for_heads(
    attn_mask: Tensor | None,
    key_mask: Tensor | None,
    *,
    batch: int,
    n_q: int,
    n_k: int,
    num_heads: int | None,
) -> Tensor | None:
    """One mask (bool True = may attend, or additive) from an attention mask and key padding.

    With ``num_heads`` the result broadcasts to (B, h, N_q, N_k): ``attn_mask`` may be (N_q, N_k),
    (B, N_q, N_k) (the same for every head) or (B, h, N_q, N_k). With ``num_heads=None`` (one
    head, (B, N, D) operands) it broadcasts to (B, N_q, N_k). ``key_mask`` is (B, N_k) bool,
    True at real keys.
    """
    mask = None
    if attn_mask is not None:
        if num_heads is None:
            check_mask(attn_mask, "attn_mask", (batch, n_q, n_k))
            mask = attn_mask
        else:
            check_mask(attn_mask, "attn_mask", (batch, num_heads, n_q, n_k))
            # (B, N_q, N_k) -> (B, 1, N_q, N_k): the same mask for every head
            mask = attn_mask.unsqueeze(1) if attn_mask.dim() == 3 else attn_mask
    if key_mask is not None:
        padding = key_padding_to_mask(key_mask, batch, n_k)  # (B, 1, N_k)
        if num_heads is not None:
            padding = padding.unsqueeze(1)  # (B, 1, N_k) -> (B, 1, 1, N_k): every head and query
        mask = and_masks(mask, padding)
    return mask
