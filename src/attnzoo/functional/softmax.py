"""The one softmax every mechanism uses: float32 for half-precision logits, masks, empty rows.

Three things go wrong when each module writes its own softmax:

- float16 ends at 65504 and bfloat16 keeps 8 bits of mantissa, so a softmax over many positions
  loses the small weights (or overflows) unless it runs in float32;
- a row whose every entry is masked is ``softmax(-inf, ..., -inf) = NaN``, and that NaN reaches
  every gradient even through a later ``where``;
- masks come in two kinds (bool, True = keep; or additive float), and each site handled one.

:func:`masked_softmax` does all three. :func:`compute_dtype` is the precision rule alone, for
kernels that normalise or accumulate by other means (scatter softmax over graph edges, running
sums of the non-local family). :func:`softmax_` normalises in the logits' own storage, for quadratic
buffers that nothing else needs (no autograd). :func:`mean_of` is the pooling mean with the same
float32 accumulation, without the float32 copy of the input that torch's bfloat16 mean makes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["additive_mask_for", "compute_dtype", "masked_softmax", "mean_of", "softmax_"]

_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to normalise or accumulate in: float32 for float16/bfloat16, else ``dtype``.

    Example:
        >>> compute_dtype(torch.bfloat16), compute_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float32 if dtype in _HALF else dtype


def additive_mask_for(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """``mask`` in a dtype that adds to scores of ``dtype`` without widening them: a bool mask, or
    a floating one in ``dtype`` or float32, as it is; another floating one (a float16 mask beside
    float32 scores, a float64 one beside anything narrower) in float64 for float64 scores, else in
    float32.

    An additive mask in a precision of its own is legitimate (a float64 ALiBi table, a float16
    padding mask from a half-precision pipeline), but the fused kernels take a float mask only in
    float32 or in the query's dtype (anything else is torch's internal error), and ``scores + mask``
    would promote float32 scores, and so the weights, to float64. 0 and -inf survive every cast;
    finite biases round to the scores' own precision, where they are added anyway.

    Example:
        >>> additive_mask_for(torch.zeros(2, dtype=torch.float16), torch.float32).dtype
        torch.float32
    """
    if mask.dtype == torch.bool or mask.dtype == dtype or mask.dtype == torch.float32:
        return mask
    return mask.to(torch.float64 if dtype == torch.float64 else torch.float32)


def mean_of(x: Tensor, dim: int | tuple[int, ...], keepdim: bool = False) -> Tensor:
    """``x.mean(dim, keepdim)``; for bfloat16, the sum (accumulated in float32 inside the kernel)
    divided by the count.

    torch's bfloat16 mean on CPU first copies x to float32: the pooling means of SE, CBAM and their
    kin ran 4-10x slower than this sum (profiled at (8, 64, 64^2): 2.6 against 0.2 ms), with the
    same error (one rounding to bfloat16; max relative error 0.0037 against float64 for both).
    float16 keeps torch's mean: its sum would overflow past 65504. Other dtypes: torch's mean.
    """
    if x.dtype != torch.bfloat16:
        return x.mean(dim=dim, keepdim=keepdim)
    dims = (dim,) if isinstance(dim, int) else dim
    count = 1
    for d in dims:
        count *= x.shape[d]
    return x.sum(dim=dims, keepdim=keepdim) / count


def masked_softmax(logits: Tensor, mask: Tensor | None = None, *, dim: int = -1) -> Tensor:
    """``softmax(logits, dim)`` in float32 for half-precision logits, with masked entries at 0.

    Args:
        logits: any shape.
        mask: None, a bool tensor (True = keep) or a floating tensor added to the logits; it
            must broadcast to ``logits``.
        dim: the dimension normalised over.

    Returns:
        Weights of the shape of ``logits``: float32 for float16/bfloat16 logits (kept in float32
        so that small weights are not rounded away; cast where they meet the values), else the
        logits' dtype. A slice along ``dim`` whose every entry is masked (or -inf) is all zeros,
        with zero gradients, never NaN. NaN logits still give NaN weights (a NaN input reaches
        the output).

    Example:
        >>> w = masked_softmax(torch.zeros(2, 3), torch.tensor([[True, True, False], [False] * 3]))
        >>> w
        tensor([[0.5000, 0.5000, 0.0000],
                [0.0000, 0.0000, 0.0000]])
    """
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, float("-inf"))
        else:
            logits = logits + additive_mask_for(mask, logits.dtype)
    # None for full-precision logits: no cast node in traced and exported graphs
    dtype = torch.float32 if logits.dtype in _HALF else None
    if mask is None:
        return torch.softmax(logits, dim=dim, dtype=dtype)
    # an empty slice would be softmax(-inf, ...) = NaN: make it finite before, zero it after
    empty = torch.isneginf(logits.amax(dim=dim, keepdim=True))  # size 1 along dim
    weights = torch.softmax(logits.masked_fill(empty, 0.0), dim=dim, dtype=dtype)
    return weights.masked_fill(empty, 0.0)


def softmax_(logits: Tensor, dim: int = -1) -> Tensor:
    """``softmax(logits, dim)`` written into ``logits`` itself: no second buffer of its size.

    For large logits that nothing else reads (PSANet's (N, N) maps) when autograd does not record:
    each slice is shifted by its maximum, exponentiated and divided by its sum, in place; the sum
    is accumulated in float32 for half-precision logits (the exponentials lie in [0, 1], safe in
    float16). Every slice must hold a finite entry (an all -inf slice gives NaN, unlike
    :func:`masked_softmax`); a NaN reaches its whole slice.

    Example:
        >>> softmax_(torch.tensor([[0.0, 0.0], [1e4, 1e4]]))
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        raise RuntimeError("softmax_: in place, without autograd only (use masked_softmax)")
    logits.sub_(logits.amax(dim=dim, keepdim=True)).exp_()  # size 1 along dim, then in [0, 1]
    total = logits.sum(dim=dim, keepdim=True, dtype=compute_dtype(logits.dtype))  # size 1 along dim
    return logits.div_(total.to(logits.dtype))
