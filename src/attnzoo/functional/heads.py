"""Pieces shared by the multi-head modules: head sizes, head layout, inputs, masks and the tail.

Used by mha, gated_mha, linformer, synthesizer, sha and graph_self_attention, so that each of
these is written once: split the projected tokens into heads (:func:`split_heads`), combine the
attention and key-padding masks for every head (:func:`merge_masks_for_heads`), and, after the
attention, merge the heads, project them and average the maps (:func:`project_heads`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from attnzoo._checks import check_input, check_mask
from attnzoo._tracing import is_eager
from attnzoo.layers import linear_parameters

__all__ = [
    "check_heads",
    "combine_masks",
    "merge_heads",
    "merge_masks_for_heads",
    "pad_mask",
    "project_heads",
    "project_shared_input",
    "resolve_key_value",
    "split_heads",
]


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


def project_shared_input(x: Tensor, projections: tuple[nn.Module, ...], num_heads: int) -> tuple[Tensor, ...]:
    """``split_heads(p(x), num_heads)`` for each projection ``p`` of one input (self-attention's q,
    k and v), from one GEMM of the stacked weights where that computes the same.

    One (B, N, D) @ (D, sum E_i) product reads x once and runs one larger GEMM instead of one per
    projection (timm's packed qkv; at B 8, N 256, d 512 the three separate products took 2.7 ms more
    of a 66 ms call, profiled). Stacking the weights copies them (sum E_i x D elements, 0.4-0.9 ms
    at d 512, mostly page faults of the fresh buffer), which costs more than it saves for few
    tokens (B 4, N 64: 8.4 against 7.6 ms): eager calls pack only from B N >= D tokens on, where
    the copy is at most 1/D of the product's work, or where the stack is small (at most 2^14
    weights: d <= 64 for q, k, v), where one call less outweighs the copy. The results are views of the one
    (B, N, sum E_i) buffer, the last dim contiguous, as the fused kernels need.

    Packed only when every projection is a plain ``nn.Linear`` without hooks (a wrapped, adapted or
    hooked projection runs as itself) and not under fx symbolic tracing (the traced graph keeps one
    call per projection module, as fx quantization and graph rewrites expect). Compiled and
    exported graphs always pack (no branch on a possibly dynamic size).

    Returns:
        One (B, h, N, E_i / h) tensor per projection.
    """
    parameters = None if isinstance(x, fx.Proxy) or len(projections) < 2 else linear_parameters(projections)
    if parameters is None:
        return tuple(split_heads(p(x), num_heads) for p in projections)
    weights, biases = parameters
    widths = [w.shape[0] for w in weights]
    # B N < D and a stack of more than 2^14 weights; smaller stacks pack whatever the tokens (one
    # product and two small copies cost less than three products: 25 against 60 us at d 32, N 1).
    # The static size first: the token count is compared in eager calls only (a comparison of a
    # dynamic size would add a guard to a traced graph)
    width = x.shape[-1]
    if width * sum(widths) > 2**14 and is_eager(x) and x.numel() < width**2:
        return tuple(split_heads(p(x), num_heads) for p in projections)
    weight = torch.cat(weights)  # (sum E_i, D)
    bias = None if biases[0] is None else torch.cat(biases)  # (sum E_i,)
    packed = F.linear(x, weight, bias)  # (B, N, D) @ (D, sum E_i) -> (B, N, sum E_i)
    if len(set(widths)) == 1:
        # one view, one permute, one unbind instead of a split and a view and a transpose per part
        # (on a GPU, where small calls are launch-bound, each operator counts):
        # (B, N, P*E) -> (B, N, P, h, d) -> (P, B, h, N, d)
        batch, length = packed.shape[0], packed.shape[1]
        parts = packed.view(batch, length, len(widths), num_heads, widths[0] // num_heads)
        return parts.permute(2, 0, 3, 1, 4).unbind(0)
    return tuple(split_heads(part, num_heads) for part in packed.split(widths, -1))


def merge_heads(x: Tensor) -> Tensor:
    """(B, h, N, d) -> (B, N, h*d), contiguous.

    In eager mode a view where ``x`` is already laid out (B, N, h, d) in memory, as the fused
    kernel's output is when q comes from one (B, N, 3, h, d) projection (:func:`project_shared_input`):
    no copy, as timm's ``transpose(1, 2).reshape``. Otherwise, and in every traced, compiled or
    exported graph, an explicit copy, not ``reshape``: ``torch.export`` records the fused kernel's
    output strides, for which the reshape is a view, and the ONNX exporter replays it on a
    decomposition with other strides, where it is not (seen with batch-sized masks and a dynamic
    batch).
    """
    batch, heads, length, width = x.shape
    merged = x.transpose(1, 2)  # (B, N, h, d)
    if not (merged.is_contiguous() and is_eager(x)):
        merged = merged.clone(memory_format=torch.contiguous_format)
    return merged.view(batch, length, heads * width)


def project_heads(
    heads: Tensor,
    out_proj: Callable[[Tensor], Tensor],
    maps: Tensor | None = None,
    *,
    average_heads: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """The multi-head tail: ``out = Concat(head_1, ..., head_h) W^O``, and the maps if any.

    Args:
        heads: (B, h, N_q, d), the attention output of every head.
        out_proj: W^O, any module or function on (B, N_q, h*d) (``nn.Linear``, or one with dropout).
        maps: (B, h, N_q, N_k) attention weights, or None when they were not requested.
        average_heads: return the maps averaged over the heads, (B, N_q, N_k).

    Returns:
        ``out`` (B, N_q, E) when ``maps`` is None, else ``(out, maps)``.
    """
    merged = merge_heads(heads)  # (B, h, N_q, d) -> (B, N_q, h*d)
    # the caller may still hold `heads`; the merged copy is ours alone: free it before returning
    out = out_proj(merged)
    del merged
    if maps is None:
        return out
    return out, (maps.mean(dim=1) if average_heads else maps)


def resolve_key_value(
    query: Tensor,
    key: Tensor | None,
    value: Tensor | None,
    *,
    embed_dim: int,
    kdim: int,
    vdim: int,
    layouts: tuple[str, ...] = ("B N D",),
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Check query/key/value and default them: key = query, value = key (self-attention).

    ``layouts`` are the query's accepted layouts (``"B N D"``, ``"N B D"`` for sequence-first,
    ``"N D"`` unbatched); key and value must have the query's. Checked in the caller's layout, so
    that messages name the dims the caller passed. ``dtype`` (the module's parameters') is the
    query's required dtype; key and value must have the query's (both checks are skipped under
    autocast).
    """
    check_input(query, "query", layouts, D=embed_dim, dtype=dtype)
    layout = next(lay for lay in layouts if len(lay.split()) == query.dim())
    dims = layout.split()
    batch = {"B": query.shape[dims.index("B")]} if "B" in dims else {}
    key = query if key is None else key
    value = key if value is None else value
    # self-attention passes one tensor three times: check it once (each check costs ~10 us, which
    # shows in short-sequence and decoding steps)
    same_dtype = {"dtype": query.dtype, "dtype_source": "query"}
    if key is not query or kdim != embed_dim:
        check_input(key, "key", layout, D=kdim, **batch, **same_dtype)
    if value is not key or vdim != kdim:
        check_input(value, "value", layout, N=key.shape[dims.index("N")], D=vdim, **batch, **same_dtype)
    return key, value


def combine_masks(mask: Tensor | None, other: Tensor | None) -> Tensor | None:
    """Both restrictions at once: bool masks (True = may attend) are and-ed, additive ones added,
    a bool mask applied to an additive one as -inf; None is no restriction."""
    if mask is None or other is None:
        return other if mask is None else mask
    if mask.dtype == torch.bool and other.dtype == torch.bool:
        return mask & other
    if mask.dtype == torch.bool:
        return other.masked_fill(~mask, float("-inf"))
    if other.dtype == torch.bool:
        return mask.masked_fill(~other, float("-inf"))
    return mask + other


def pad_mask(mask: Tensor, extra: int) -> Tensor:
    """Append ``extra`` key columns that every query may attend to (True, or additive 0)."""
    # (..., N_q, N_k) -> (..., N_q, N_k + extra)
    return F.pad(mask, (0, extra), value=True if mask.dtype == torch.bool else 0.0)


def _key_padding(
    key_mask: Tensor, batch: int, n_k: int, *, device: torch.device | None, additive: bool
) -> Tensor:
    """Check a (B, N_k) key mask and return it as (B, 1, N_k): bool (True = real key) or, where
    ``additive``, a float added to the logits of each key (-inf at padding)."""
    check_mask(key_mask, "key_mask", (batch, n_k), device=device)
    if key_mask.dim() != 2 or not (key_mask.dtype == torch.bool or additive):
        wanted = "bool (True = real key) or additive float" if additive else "bool (True = real key)"
        raise TypeError(
            f"key_mask: expected a (B, N_k) {wanted} mask, got {key_mask.dtype} of shape "
            f"{tuple(key_mask.shape)}"
        )
    return key_mask.unsqueeze(1)  # (B, N_k) -> (B, 1, N_k): the same for every query


def _attn_mask_for_heads(
    attn_mask: Tensor, *, batch: int, n_q: int, n_k: int, num_heads: int, device: torch.device | None
) -> Tensor:
    """An attention mask broadcastable to (B, h, N_q, N_k), from any of the accepted layouts."""
    accepted = (
        f"a mask of shape (N_q, N_k), (B, N_q, N_k), (B*h, N_q, N_k) or (B, h, N_q, N_k) with B={batch}, "
        f"h={num_heads}, N_q={n_q}, N_k={n_k}"
    )
    if not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask: expected {accepted}, got {type(attn_mask).__name__}")
    rank = attn_mask.dim()
    if rank not in (2, 3, 4):
        raise ValueError(f"attn_mask: expected {accepted}, got shape {tuple(attn_mask.shape)}")
    if rank == 3 and attn_mask.shape[0] not in (1, batch):
        if attn_mask.shape[0] != batch * num_heads:
            raise ValueError(f"attn_mask: expected {accepted}, got shape {tuple(attn_mask.shape)}")
        # torch's layout: one mask per (item, head), items outer, as (B*h, N_q, N_k)
        check_mask(attn_mask, "attn_mask", (batch * num_heads, n_q, n_k), device=device)
        # (B*h, N_q', N_k') -> (B, h, N_q', N_k'); N_q' and N_k' may be 1 (broadcast)
        return attn_mask.reshape(batch, num_heads, *attn_mask.shape[1:])
    target = {2: (n_q, n_k), 3: (batch, n_q, n_k), 4: (batch, num_heads, n_q, n_k)}[rank]
    check_mask(attn_mask, "attn_mask", target, device=device)
    # (B, N_q, N_k) -> (B, 1, N_q, N_k): the same mask for every head
    return attn_mask.unsqueeze(1) if rank == 3 else attn_mask


def merge_masks_for_heads(
    attn_mask: Tensor | None,
    key_mask: Tensor | None,
    *,
    batch: int,
    n_q: int,
    n_k: int,
    num_heads: int | None,
    device: torch.device | None = None,
    additive_key_mask: bool = False,
) -> Tensor | None:
    """One mask (bool True = may attend, or additive) from an attention mask and key padding.

    With ``num_heads`` the result broadcasts to (B, h, N_q, N_k): ``attn_mask`` may be (N_q, N_k),
    (B, N_q, N_k) (the same for every head), (B*h, N_q, N_k) (torch's layout: one per item and
    head, items outer) or (B, h, N_q, N_k). With ``num_heads=None`` (one head, (B, N, D)
    operands) it broadcasts to (B, N_q, N_k). ``key_mask`` is (B, N_k) bool, True at real keys,
    or with ``additive_key_mask`` also a float added to each key's logits. With ``device``
    (the input's), a mask elsewhere is an error naming both devices.
    """
    mask = None
    if attn_mask is not None:
        if num_heads is None:
            check_mask(attn_mask, "attn_mask", (batch, n_q, n_k), device=device)
            mask = attn_mask
        else:
            mask = _attn_mask_for_heads(
                attn_mask, batch=batch, n_q=n_q, n_k=n_k, num_heads=num_heads, device=device
            )
    if key_mask is not None:
        padding = _key_padding(key_mask, batch, n_k, device=device, additive=additive_key_mask)
        if num_heads is not None:
            padding = padding.unsqueeze(1)  # (B, 1, N_k) -> (B, 1, 1, N_k): every head and query
        mask = combine_masks(mask, padding)
    return mask
