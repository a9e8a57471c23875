"""Local (k x k window) and global 2-D attention with relative logits, through the fused kernel.

Two kernels shared by the "attention as convolution" family. Both fold a relative-position term
into the dot product, so that ``scaled_dot_product_attention`` (via :func:`attend`) applies and
no (HW x HW) or (HW x k^2 x C) tensor is built unless the weights are requested.

The fold (arXiv:1904.09925's 2-D relative logits, computed without its (HW)^2 "rel-to-abs" step):
a relative logit that is a sum of a row term and a column term,
``l(i, j) = t_row(i, y_j) + t_col(i, x_j)``, is the dot product of the query augmented with its
row and column terms against the key augmented with one-hot codes of its row and column::

    [q_i, t_row(i, .), t_col(i, .)] . [k_j, onehot(y_j), onehot(x_j)] = q_i . k_j + l(i, j)

The same trick masks keys: a row or column term of ``-big`` removes every key in that row or
column, and a 2-D window is the product of a row range and a column range. So local attention
over tiles with a halo needs no mask tensor at all: the window edges, the image border (keys
outside the image are masked, never zero keys that take part in the softmax) and the clamped
windows of neighbourhood attention are all rows and columns of ``-big`` in the augmented query.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, fx

from attnzoo.functional.attend import Attended, attend_with_weights
from attnzoo.functional.local_window import window_aggregate, window_border_mask, window_dot
from attnzoo.functional.softmax import masked_softmax

__all__ = ["SMALL_HEAD_DIM", "masked_value", "relative_attention_2d", "window_attention"]

#: Heads of at most this many dimensions take the shift-and-accumulate path of
#: :func:`window_attention` by default: the halo tiles' augmented dot product has 2 (b + 2r)
#: code entries besides the d real ones (40 for k = 7), so small heads would spend most of the
#: fused kernel's work on the codes.
SMALL_HEAD_DIM = 8


def masked_value(dtype: torch.dtype, width: int) -> float:
    """A finite stand-in for -inf in an augmented query of ``width`` entries.

    Finite because it meets the zero entries of the one-hot codes in a dot product (-inf * 0 is
    NaN). Small enough that the sum of a whole query row stays finite (``attend`` adds
    ``0 * sum(q)`` to carry a NaN query to its output; an overflow there would be a NaN of its
    own) and so does a row term plus a column term. Still far below any real logit: its exp
    underflows to 0 in float32 (e.g. -3e35 in float32/bfloat16, -290 in float16 for width 56).
    """
    return torch.finfo(dtype).min / (4 * width)


def _one_hot_codes(rows: int, cols: int, like: Tensor) -> Tensor:
    """(rows * cols, rows + cols): the one-hot row code and column code of each grid point."""
    row_code = torch.eye(rows, dtype=like.dtype, device=like.device)  # (rows, rows)
    col_code = torch.eye(cols, dtype=like.dtype, device=like.device)  # (cols, cols)
    return torch.cat(
        [
            row_code[:, None, :].expand(rows, cols, rows),  # (rows, cols, rows): code of y
            col_code[None, :, :].expand(rows, cols, cols),  # (rows, cols, cols): code of x
        ],
        dim=-1,
    ).reshape(rows * cols, rows + cols)  # (rows, cols, rows + cols) -> (rows * cols, rows + cols)


def relative_attention_2d(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_height: Tensor | None,
    rel_width: Tensor | None,
    *,
    scale: float,
    relative_scale: float = 1.0,
    return_weights: bool = False,
) -> Attended:
    """Global 2-D self-attention with relative logits (Bello et al. 2019, arXiv:1904.09925, eq. 3).

    ``logits(i, j) = scale * (q_i . k_j + relative_scale * (q_i . r^H[y_j - y_i] + q_i . r^W[x_j - x_i]))``

    A leaf of ``torch.fx`` graphs (its shape arithmetic needs concrete sizes).

    Args:
        q, k: (B, h, H, W, d) queries and keys on the grid.
        v: (B, h, H, W, d_v) values.
        rel_height, rel_width: (2 M_H - 1, d) and (2 M_W - 1, d) tables, row ``M - 1 + o`` for the
            offset o (M >= the map's side: a table may cover larger maps than this one), or None
            for no relative logits (plain attention).
        scale: multiplies the whole logit (the paper: 1 / sqrt(d)).
        relative_scale: multiplies the relative part before ``scale``; ``1 / scale`` adds it
            unscaled (timm's ``scale_pos_embed=False``).
        return_weights: also return the (B, h, HW, HW) weights (the explicit path).

    Returns:
        ``Attended(out, weights)``: out (B, h, HW, d_v), weights (B, h, HW, HW) or None.
    """
    batch, heads, height, width, dim = q.shape
    n = height * width
    q_flat = q.reshape(batch, heads, n, dim)  # (B, h, H, W, d) -> (B, h, HW, d)
    k_flat = k.reshape(batch, heads, n, dim)  # (B, h, H, W, d) -> (B, h, HW, d)
    v_flat = v.reshape(batch, heads, n, v.shape[-1])  # (B, h, H, W, d_v) -> (B, h, HW, d_v)
    if rel_height is None or rel_width is None:
        return attend_with_weights(
            q_flat, k_flat, v_flat, score="dot", scale=scale, return_weights=return_weights
        )
    # rows M - 1 + (y_key - y_query) of the table, for every (query row, key row) pair
    row_index = _offsets(height, q.device) + (rel_height.shape[0] + 1) // 2 - 1  # (H, H)
    col_index = _offsets(width, q.device) + (rel_width.shape[0] + 1) // 2 - 1  # (W, W)
    # t_H(i, y) = q_i . r^H[y - y_i]: (B, h, H, W, H), a factor H / HW of the logits' size
    t_rows = torch.einsum("bhyxd,yjd->bhyxj", q, rel_height[row_index].to(q.dtype))
    t_cols = torch.einsum("bhyxd,xjd->bhyxj", q, rel_width[col_index].to(q.dtype))
    q_aug = torch.cat([q, t_rows * relative_scale, t_cols * relative_scale], dim=-1)
    q_aug = q_aug.reshape(batch, heads, n, dim + height + width)  # (B, h, H, W, d') -> (B, h, HW, d')
    codes = _one_hot_codes(height, width, k)  # (HW, H + W)
    k_aug = torch.cat([k_flat, codes.expand(batch, heads, n, height + width)], dim=-1)  # (B, h, HW, d')
    return attend_with_weights(q_aug, k_aug, v_flat, score="dot", scale=scale, return_weights=return_weights)


def _offsets(n: int, device: torch.device) -> Tensor:
    """(n, n): key position minus query position, ``[i, j] = j - i``."""
    positions = torch.arange(n, device=device)
    return positions[None, :] - positions[:, None]


def _window_axis(
    n: int, block: int, padded: int, kernel_size: int, clamp: bool, device: torch.device
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The geometry of one axis of tiled window attention.

    Tiles of ``block`` queries see ``span = block + 2 r`` keys (a halo of r = k // 2 each side).

    Returns:
        gather: (tiles, span) indices of each tile's keys in the key axis padded by r in front.
        table: (padded, span) relative-table row of (query, halo key): offset + r, or offset
            + k - 1 for clamped windows (their offsets reach +-(k - 1)).
        valid: (padded, span) True where the key is in the query's window and in the image.
        taps: (padded, k) the halo index of each window tap (for returning the weights).
    """
    radius = kernel_size // 2
    span = block + 2 * radius
    tiles = padded // block
    halo = torch.arange(span, device=device)
    gather = torch.arange(tiles, device=device)[:, None] * block + halo  # (tiles, span)
    query = torch.arange(padded, device=device)[:, None]  # (padded, 1)
    tile_start = (query // block) * block
    key = tile_start - radius + halo  # (padded, span): the key's position on the axis
    offset = key - query
    if clamp:
        # neighbourhood attention (NATTEN): the window is shifted to stay inside the image
        start = (query - radius).clamp(min=0, max=max(n - kernel_size, 0))
        valid = (key >= start) & (key < start + kernel_size)
        table = (offset + kernel_size - 1).clamp(0, 2 * kernel_size - 2)
    else:
        start = query - radius
        valid = (offset.abs() <= radius) & (key >= 0) & (key < n)
        table = (offset + radius).clamp(0, kernel_size - 1)
    taps = start - tile_start + radius + torch.arange(kernel_size, device=device)  # (padded, k)
    return gather, table, valid, taps.clamp(0, span - 1)


def window_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_rows: Tensor,
    rel_cols: Tensor,
    kernel_size: int,
    *,
    clamp: bool = False,
    block_size: int | None = None,
    scale: float = 1.0,
    return_weights: bool = False,
    method: str = "auto",
) -> Attended:
    """Multi-head attention of every pixel over its k x k window, with row/column relative logits.

    Stand-alone self-attention (Ramachandran et al. 2019, arXiv:1906.05909, eq. 3)::

        y_ij = sum_{(a, b) in N_k(i, j)} softmax_ab(q_ij . k_ab + q_ij . r_{a - i, b - j}) v_ab

    with ``r_{a-i, b-j} = concat(r^row_{a-i}, r^col_{b-j})``: the first half of each head's query
    meets the row embedding, the second half the column embedding. Keys outside the image are
    masked (a border query attends over fewer keys); with ``clamp=True`` the window is shifted
    inside the image instead (neighbourhood attention, NATTEN), so every query sees k x k keys.

    Tiles of ``block_size`` x ``block_size`` queries attend to their tile grown by a halo of k // 2
    through the fused kernel; the window and the image border are folded into the augmented
    query (module docstring), so no mask and no k^2-fold copy of the keys is built.

    A leaf of ``torch.fx`` graphs (its shape arithmetic needs concrete sizes).

    Args:
        q, k: (B, h, H, W, d) with d even.
        v: (B, h, H, W, d_v).
        rel_rows, rel_cols: (T, h, d / 2) per-head embeddings of row and column offsets, row
            ``o + k // 2`` for offset o (T = k), or ``o + k - 1`` with ``clamp`` (T = 2 k - 1).
        kernel_size: k, odd.
        clamp: NATTEN's clamped windows (needs k <= H and k <= W).
        block_size: the tile side (default 2 k, the size that minimises the halo and code
            overhead for the usual k = 7); cut to the map's side on small maps.
        scale: multiplies the logits (the paper: 1).
        return_weights: also return the window weights (B, h, H, W, k * k), tap (a, b) of the
            window at index ``a * k + b`` (zero for masked keys).
        method: ``"halo"`` (tiles through the fused kernel), ``"taps"`` (shift-and-accumulate
            over the k^2 taps: the (B, h, k^2, H, W) logits, never a copy of the keys or values;
            masked windows only) or ``"auto"``: taps for heads of at most :data:`SMALL_HEAD_DIM`
            dimensions without ``clamp`` or ``block_size``, halo otherwise.

    Returns:
        ``Attended(out, weights)``: out (B, h, H, W, d_v), weights (B, h, H, W, k k) or None.
    """
    batch, heads, height, width, dim = q.shape
    if method not in ("auto", "halo", "taps"):
        raise ValueError(f"method: expected 'auto', 'halo' or 'taps', got {method!r}")
    if method == "taps" and clamp:
        raise ValueError("method: 'taps' computes masked windows only, expected clamp=False")
    if method == "taps" or (method == "auto" and dim <= SMALL_HEAD_DIM and not clamp and block_size is None):
        return _window_attention_taps(q, k, v, rel_rows, rel_cols, kernel_size, scale, return_weights)
    radius = kernel_size // 2
    side = block_size or 2 * kernel_size
    block_h, block_w = min(side, height), min(side, width)
    tiles_h, tiles_w = math.ceil(height / block_h), math.ceil(width / block_w)
    pad_h, pad_w = tiles_h * block_h, tiles_w * block_w  # the query grid, a multiple of the tile
    span_h, span_w = block_h + 2 * radius, block_w + 2 * radius
    gather_h, table_h, valid_h, taps_h = _window_axis(height, block_h, pad_h, kernel_size, clamp, q.device)
    gather_w, table_w, valid_w, taps_w = _window_axis(width, block_w, pad_w, kernel_size, clamp, q.device)

    # relative terms of each query against the rows / columns of its tile's halo
    half = dim // 2
    q = F.pad(q, (0, 0, 0, pad_w - width, 0, pad_h - height))  # (B, h, H', W', d)
    # (B, h, H', W', d) -> (.., d/2) and (.., d - d/2): one split, whose backward fills one buffer
    q_rows, q_cols = q.split([half, dim - half], -1)
    t_rows = torch.einsum("bhyxc,yjhc->bhyxj", q_rows, rel_rows[table_h].to(q.dtype))
    t_cols = torch.einsum("bhyxc,xjhc->bhyxj", q_cols, rel_cols[table_w].to(q.dtype))
    big = masked_value(q.dtype, dim + span_h + span_w)
    t_rows = t_rows.masked_fill(~valid_h[:, None, :], big)  # (B, h, H', W', span_h)
    t_cols = t_cols.masked_fill(~valid_w, big)  # (B, h, H', W', span_w)
    q_aug = torch.cat([q, t_rows, t_cols], dim=-1)
    width_aug = q_aug.shape[-1]
    tiles = batch * tiles_h * tiles_w
    # (B, h, H', W', d') -> (B, h, th, bh, tw, bw, d') -> (B, th, tw, h, bh, bw, d')
    # -> (B th tw, h, bh bw, d'): one batch item per tile
    q_aug = q_aug.view(batch, heads, tiles_h, block_h, tiles_w, block_w, width_aug)
    q_aug = q_aug.permute(0, 2, 4, 1, 3, 5, 6).reshape(tiles, heads, block_h * block_w, width_aug)

    def halo(t: Tensor) -> Tensor:
        # zero rows/columns around the image (masked by the codes, never attended)
        t = F.pad(t, (0, 0, radius, pad_w - width + radius, radius, pad_h - height + radius))
        t = t[:, :, gather_h][:, :, :, :, gather_w]  # (B, h, th, span_h, tw, span_w, c)
        # (B, h, th, sh, tw, sw, c) -> (B, th, tw, h, sh, sw, c) -> (B th tw, h, sh sw, c)
        return t.permute(0, 2, 4, 1, 3, 5, 6).reshape(tiles, heads, span_h * span_w, t.shape[-1])

    codes = _one_hot_codes(span_h, span_w, k)  # (span_h span_w, span_h + span_w)
    k_aug = torch.cat([halo(k), codes.expand(tiles, heads, *codes.shape)], dim=-1)  # (T, h, S, d')
    out, weights = attend_with_weights(
        q_aug, k_aug, halo(v), score="dot", scale=scale, return_weights=return_weights
    )

    def untile(t: Tensor) -> Tensor:
        # (B th tw, h, bh bw, c) -> (B, th, tw, h, bh, bw, c) -> (B, h, th, bh, tw, bw, c) -> (B, h, H, W, c)
        t = t.reshape(batch, tiles_h, tiles_w, heads, block_h, block_w, t.shape[-1])
        t = t.permute(0, 3, 1, 4, 2, 5, 6).reshape(batch, heads, pad_h, pad_w, t.shape[-1])
        return t[:, :, :height, :width]

    out = untile(out)  # (B, h, H, W, d_v)
    if weights is None:
        return Attended(out, None)
    # the halo index (row * span_w + column) of each window tap of each query
    taps = taps_h[:, None, :, None] * span_w + taps_w[None, :, None, :]  # (H', W', k, k)
    taps = taps.reshape(pad_h, pad_w, kernel_size * kernel_size)[:height, :width]
    window = untile(weights).gather(-1, taps.expand(batch, heads, height, width, -1))
    return Attended(out, window)  # (B, h, H, W, d_v), (B, h, H, W, k k)


def _window_attention_taps(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    rel_rows: Tensor,
    rel_cols: Tensor,
    kernel_size: int,
    scale: float,
    return_weights: bool,
) -> Attended:
    """:func:`window_attention` (masked windows) as shift-and-accumulate over the k^2 taps."""
    batch, heads, height, width, dim = q.shape
    half = dim // 2

    def maps(t: Tensor) -> Tensor:
        # (B, h, H, W, c) -> (B, h, c, H, W) -> (B, h c, H, W): head i's channels i c ... (i + 1) c - 1
        return t.permute(0, 1, 4, 2, 3).reshape(batch, heads * t.shape[-1], height, width)

    logits = window_dot(maps(q), maps(k), kernel_size, heads)  # (B, h, k^2, H, W): q . k per tap
    # q . r for every row offset and every column offset: (B, h, k, H, W) each
    # (B, h, H, W, d) -> (.., d/2) and (.., d - d/2): one split, whose backward fills one buffer
    q_rows, q_cols = q.split([half, dim - half], -1)
    t_rows = torch.einsum("bhyxc,ahc->bhayx", q_rows, rel_rows.to(q.dtype))
    t_cols = torch.einsum("bhyxc,ahc->bhayx", q_cols, rel_cols.to(q.dtype))
    # tap (a, b) at a k + b: (B, h, k, 1, H, W) + (B, h, 1, k, H, W) -> (B, h, k^2, H, W)
    relative = (t_rows.unsqueeze(3) + t_cols.unsqueeze(2)).flatten(2, 3)
    inside = window_border_mask(height, width, kernel_size, device=q.device)  # (k^2, H, W)
    # in place: the logits stay one (B, h, k^2, H, W) buffer; keys outside the image masked
    logits = logits.add_(relative).masked_fill_(~inside, float("-inf"))
    weights = masked_softmax(logits * scale if scale != 1.0 else logits, dim=2)
    out = window_aggregate(maps(v), weights, kernel_size)  # (B, h d_v, H, W), head i's weights
    # (B, h d_v, H, W) -> (B, h, d_v, H, W) -> (B, h, H, W, d_v)
    out = out.unflatten(1, (heads, -1)).permute(0, 1, 3, 4, 2)
    if not return_weights:
        return Attended(out, None)
    return Attended(out, weights.permute(0, 1, 3, 4, 2))  # (B, h, k^2, H, W) -> (B, h, H, W, k^2)


# torch.fx: the kernels' shape arithmetic needs concrete sizes, so each call is one graph node
fx.wrap("relative_attention_2d")
fx.wrap("window_attention")
