"""Stateless kernels of the global-reasoning blocks (A2-Nets, GloRe, CGNL, SpyGR, PSANet, DGMN).

Each one keeps its memory linear in the number of positions N = H*W (PSANet's predicted map aside,
which is quadratic by definition): the quadratic objects of the papers' equations (an N x N
affinity, an N x N Laplacian) are applied by associativity, never formed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo._tracing import forward_ad_active
from attnzoo.functional.softmax import compute_dtype, masked_softmax, softmax_

__all__ = [
    "compact_generalized_attention",
    "deformed_tap",
    "double_attention",
    "graph_reasoning",
    "normalized_laplacian_apply",
    "point_wise_attention_",
    "point_wise_logits",
]


def double_attention(
    features: Tensor, map_logits: Tensor, vector_logits: Tensor, *, return_weights: bool = False
) -> Tensor | tuple[Tensor, Tensor, Tensor]:
    """A2-Nets' gather and distribute steps: ``Z = (A softmax_N(B)^T) softmax_n(V)``.

    The two products are taken in this order, so the cost is O(m n N) and nothing N x N is formed
    (the other order, ``A (softmax(B)^T softmax(V))``, would be the N x N non-local form).

    Args:
        features: A, (B, m, N).
        map_logits: B, (B, n, N): n attention maps, each normalised over the N POSITIONS.
        vector_logits: V, (B, n, N): at every position the n weights are normalised over the n
            DESCRIPTORS.
        return_weights: also return both softmaxes.

    Returns:
        Z, (B, m, N), in the dtype of ``features``; with ``return_weights`` also the gather maps
        (B, n, N) (rows sum to 1 over N) and the distribute weights (B, n, N) (columns sum to 1
        over n), float32 for half-precision inputs.
    """
    gather_weights = masked_softmax(map_logits, dim=-1)  # over positions
    distribute_weights = masked_softmax(vector_logits, dim=-2)  # over the n descriptors
    dtype = compute_dtype(features.dtype)
    # (B, m, N) @ (B, N, n) -> (B, m, n): the n global descriptors (second-order attention pooling)
    descriptors = features.to(dtype) @ gather_weights.transpose(1, 2)
    out = (descriptors @ distribute_weights).to(features.dtype)  # (B, m, n) @ (B, n, N) -> (B, m, N)
    if return_weights:
        return out, gather_weights, distribute_weights
    return out


def graph_reasoning(
    state: Tensor,
    projection: Tensor,
    node_weight: Tensor | None = None,
    node_bias: Tensor | None = None,
    state_weight: Tensor | None = None,
    *,
    normalize: bool = False,
    node_layer: Callable[[Tensor], Tensor] | None = None,
    state_layer: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """GloRe's project -> graph convolution -> reverse-project, O(L (S + N) + N^2 S + S^2 N).

    ``V = state B^T`` (S x N node features, optionally / L), ``Z = W_g ReLU(V (A_g + I)^T + b)``
    (the node-wise adjacency A_g with its bias, the identity, ReLU, then the state update W_g),
    ``Y = Z B`` with the SAME projection B.

    Each of the two graph-convolution steps is given either as a weight, applied as a product, or
    as a layer called on the node features (a module: its hooks run, so pruning, adapters and
    feature taps see it), as the official code calls its two ``Conv1d``.

    Args:
        state: (B, S, L) reduced features at the L positions.
        projection: B, (B, N, L) projection weights of every position onto every node.
        node_weight: A_g, (N, N); or None with ``node_layer``.
        node_bias: (N,) or None, added after the node step (a ``node_layer`` has its own).
        state_weight: W_g, (S, S); or None with ``state_layer``.
        normalize: divide the node features by L (keeps them of order 1 whatever the input size).
        node_layer: instead of ``node_weight``, the node-wise convolution over the node axis,
            e.g. ``nn.Conv1d(N, N, 1)``: (B, N, S) -> (B, N, S), called in the dtype of ``state``.
        state_layer: instead of ``state_weight``, the state update, e.g.
            ``nn.Conv1d(S, S, 1, bias=False)``: (B, S, N) -> (B, S, N), in the dtype of ``state``.

    Returns:
        Y, (B, S, L) in the dtype of ``state``. The sums over positions, the products with the
        weights, the identity and the ReLU run in float32 for half-precision inputs; a layer gets
        the node features cast to the dtype of ``state`` and computes in its own parameters'.
    """
    if (node_weight is None) == (node_layer is None) or (state_weight is None) == (state_layer is None):
        raise ValueError(
            "graph_reasoning: expected one of node_weight and node_layer, and one of state_weight "
            "and state_layer"
        )
    dtype = compute_dtype(state.dtype)
    state_c, projection_c = state.to(dtype), projection.to(dtype)
    # (B, S, L) @ (B, L, N) -> (B, S, N): a sum over every position, in float32 for half inputs
    nodes = state_c @ projection_c.transpose(1, 2)
    if normalize:
        nodes = nodes / state.shape[-1]
    # node-wise graph convolution: h[s, i] = sum_j A_g[i, j] v[s, j] + b_i + v[s, i]
    if node_layer is None:
        hidden = nodes @ node_weight.to(dtype).t() + nodes  # type: ignore[union-attr]
    else:
        # the layer convolves along the nodes, as the official code's conv1 on V^T, in the dtype its
        # parameters have (that of state): (B, S, N) -> (B, N, S) -> layer -> (B, S, N)
        hidden = node_layer(nodes.to(state.dtype).transpose(1, 2)).transpose(1, 2).to(dtype) + nodes
    if node_bias is not None:
        hidden = hidden + node_bias.to(dtype)
    if state_layer is None:
        # state update: (S, S) @ (B, S, N) -> (B, S, N)
        reasoned = state_weight.to(dtype) @ torch.relu(hidden)  # type: ignore[union-attr]
    else:
        # the layer mixes the states: (B, S, N) -> (B, S, N), in its parameters' dtype
        reasoned = state_layer(torch.relu(hidden).to(state.dtype)).to(dtype)
    return (reasoned @ projection_c).to(state.dtype)  # (B, S, N) @ (B, N, L) -> (B, S, L)


def _taylor_powers(t: Tensor, order: int) -> Tensor:
    """(B, G, c, N) -> (B, G, order + 1, c, N): t^0, t^1, ..., t^order."""
    powers = [torch.ones_like(t)]
    for _ in range(order):
        powers.append(powers[-1] * t)
    return torch.stack(powers, dim=2)


def compact_generalized_attention(
    theta: Tensor,
    phi: Tensor,
    g: Tensor,
    groups: int,
    *,
    kernel: str = "dot",
    order: int = 3,
    gamma: float = 1e-4,
    coefficient: str = "paper",
    use_scale: bool = False,
) -> Tensor:
    """CGNL's generalized non-local operation within channel groups, O(C N) time and memory.

    In each group, every (channel, position) entry is a position of its own (M = C/G * N of them)
    and ``y_i = sum_j f(theta_i, phi_j) g_j`` over all of them. The M x M kernel matrix is never
    formed: with the Taylor expansion ``f(t, p) ~ sum_k beta(t) beta(p) a_k t^k p^k`` it factorises
    into (order + 1) scalars per group, ``z_k = sum_j beta(p_j) p_j^k g_j``, and
    ``y_i = sum_k a_k beta(t_i) t_i^k z_k``.

    Kernels:
        - ``"dot"``: f(t, p) = t p, one scalar per group: y = theta * sum_j phi_j g_j.
        - ``"gaussian"``: f(t, p) = exp(-gamma (t - p)^2)
          = exp(-gamma t^2) exp(-gamma p^2) sum_k (2 gamma)^k / k! t^k p^k, truncated at ``order``.
          ``coefficient="paper"`` keeps beta(t) = exp(-gamma t^2) per entry (the exact expansion);
          ``"official"`` replaces beta(t) beta(p) by the constant exp(-2 gamma) (the authors' code,
          which reports that the exact form trained badly).

    Args:
        theta, phi, g: (B, C', N) with C' divisible by ``groups``.
        groups: G.
        use_scale: divide the group sums by sqrt(M) (the official ``use_scale``; off there).

    Returns:
        (B, C', N) in the dtype of ``theta``; sums run in float32 for half-precision inputs.
    """
    dtype = compute_dtype(theta.dtype)
    # (B, C', N) -> (B, G, C'/G, N): the entries of one group; every group sum runs over dims 2, 3
    t, p, v = (u.to(dtype).unflatten(1, (groups, -1)) for u in (theta, phi, g))
    scale = (t.shape[2] * t.shape[3]) ** -0.5 if use_scale else 1.0
    if kernel == "dot":
        att = (p * v).sum(dim=(2, 3), keepdim=True) * scale  # (B, G, 1, 1)
        return (t * att).flatten(1, 2).to(theta.dtype)  # (B, G, C'/G, N) -> (B, C', N)
    coefficients = [(2.0 * gamma) ** k / math.factorial(k) for k in range(order + 1)]
    if coefficient == "official":
        coefficients = [c * math.exp(-2.0 * gamma) for c in coefficients]
    # (B, G, C'/G, N) -> (B, G, order + 1, C'/G, N): t^k for k = 0 .. order by repeated products
    # (pow would give NaN gradients at t = 0 for k = 0)
    t_pow, p_pow = _taylor_powers(t, order), _taylor_powers(p, order)
    if coefficient == "paper":
        t_pow = t_pow * torch.exp(-gamma * t * t).unsqueeze(2)
        p_pow = p_pow * torch.exp(-gamma * p * p).unsqueeze(2)
    weight = torch.tensor(coefficients, dtype=dtype, device=t.device)  # (order + 1,)
    z = (p_pow * v.unsqueeze(2)).sum(dim=(3, 4)) * scale  # (B, G, order + 1)
    out = ((weight * z)[..., None, None] * t_pow).sum(dim=2)  # (B, G, C'/G, N)
    return out.flatten(1, 2).to(theta.dtype)  # (B, G, C'/G, N) -> (B, C', N)


def normalized_laplacian_apply(
    x: Tensor, phi: Tensor, diagonal: Tensor, *, eps: float = 1e-6, return_adjacency: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """``L X`` with ``L = I - D^-1/2 Phi Lambda Phi^T D^-1/2``, without the N x N matrix.

    With ``A = Phi Lambda Phi^T`` (Lambda = diag(``diagonal``)) and D = diag(A 1), associativity
    gives ``deg = Phi (lambda * Phi^T 1)`` and ``L X = X - s * (Phi (lambda * (Phi^T (s * X))))``
    with ``s = (deg + eps)^-1/2``: O(N M C) time, O(N (M + C)) memory. Phi and lambda must be
    non-negative (so every degree is positive).

    Args:
        x: X, (B, N, C) node features.
        phi: Phi, (B, N, M), non-negative.
        diagonal: lambda, (B, M), non-negative.
        eps: added to the degrees before the inverse square root.
        return_adjacency: also return the normalised adjacency D^-1/2 A D^-1/2, (B, N, N) (formed
            only then).

    Returns:
        L X, (B, N, C) in the dtype of ``x`` (sums in float32 for half-precision inputs).
    """
    dtype = compute_dtype(x.dtype)
    x_c, phi_c, lam = x.to(dtype), phi.to(dtype), diagonal.to(dtype)
    # (B, N, M) @ (B, M, 1) -> (B, N, 1): row sums of A = Phi Lambda Phi^T
    degree = phi_c @ (lam * phi_c.sum(dim=1)).unsqueeze(-1)
    scale = torch.rsqrt(degree + eps)  # (B, N, 1)
    # Phi^T (s X): (B, M, N) @ (B, N, C) -> (B, M, C); then Lambda, then Phi: (B, N, C)
    propagated = phi_c @ (lam.unsqueeze(-1) * (phi_c.transpose(1, 2) @ (scale * x_c)))
    out = (x_c - scale * propagated).to(x.dtype)
    if return_adjacency:
        # (B, N, M) @ (B, M, N) -> (B, N, N), normalised on both sides
        adjacency = scale * ((phi_c * lam.unsqueeze(1)) @ phi_c.transpose(1, 2)) * scale.transpose(1, 2)
        return out, adjacency
    return out


def point_wise_logits(
    predicted: Tensor, mask_size: tuple[int, int], *, distribute: bool = False, fill: float = float("-inf")
) -> Tensor:
    """PSANet's re-indexing: over-complete per-position maps -> absolute (N, N) logits.

    Position i = (h, w) predicts a mask_h x mask_w map centred on itself: its channel
    (a, b) concerns position j = (h + a - half_h, w + b - half_w), half = (mask - 1) // 2. The
    re-indexing is one gather with index tensors of size O(H^2 + W^2) that broadcast to (N, N)
    (no N x N index tensor, no custom op); entries whose offset falls outside the mask window get
    ``fill``: -inf masks them (the paper's local window), 0 reproduces the official ``psa_mask``
    op, whose output starts as zeros and so gives them logit 0.

    Args:
        predicted: (B, mask_h * mask_w, H, W), channel-major over the window (row-major).
        mask_size: (mask_h, mask_w).
        distribute: lay the result out for the distribute branch (see Returns).
        fill: the logit of out-of-window pairs.

    Returns:
        (B, N, N) logits, N = H W. Collect: ``[i, j]`` = what i predicted for j (a query i
        normalises over the positions j it collects from). Distribute: ``[j, i]`` = what i
        predicted for j (a position j normalises over the positions i that distribute to it).
    """
    batch, _, height, width = predicted.shape
    mask_h, mask_w = mask_size
    maps = predicted.unflatten(1, (mask_h, mask_w))  # (B, mh*mw, H, W) -> (B, mh, mw, H, W)
    device = predicted.device
    rows, cols = torch.arange(height, device=device), torch.arange(width, device=device)
    # offset channel of the pair (predicting position p, target t): t - p + half, per axis
    row_offset = rows[None, :] - rows[:, None] + (mask_h - 1) // 2  # (H_p, H_t)
    col_offset = cols[None, :] - cols[:, None] + (mask_w - 1) // 2  # (W_p, W_t)
    # out-of-window pairs, per axis: (H_p, 1, H_t, 1) and (1, W_p, 1, W_t), never combined into
    # an (N, N) mask
    row_outside = ((row_offset < 0) | (row_offset >= mask_h))[:, None, :, None]
    col_outside = ((col_offset < 0) | (col_offset >= mask_w))[None, :, None, :]
    row_index = row_offset.clamp(0, mask_h - 1)[:, None, :, None]  # (H_p, 1, H_t, 1)
    col_index = col_offset.clamp(0, mask_w - 1)[None, :, None, :]  # (1, W_p, 1, W_t)
    p_row, p_col = rows[:, None, None, None], cols[None, :, None, None]
    if distribute:
        # the same pairs with the target first: (H_t, W_t, H_p, W_p)
        row_outside, col_outside = row_outside.permute(2, 3, 0, 1), col_outside.permute(2, 3, 0, 1)
        row_index, col_index = row_index.permute(2, 3, 0, 1), col_index.permute(2, 3, 0, 1)
        p_row, p_col = rows[None, None, :, None], cols[None, None, None, :]
    # one gather: (B, mh, mw, H, W) -> (B, H, W, H, W), then (B, N, N)
    logits = maps[:, row_index, col_index, p_row, p_col]
    # in place on the fresh gather, with the broadcast per-axis masks: no second (N, N) buffer
    logits = logits.masked_fill_(row_outside, fill).masked_fill_(col_outside, fill)
    logits = logits.reshape(batch, height * width, height * width)
    return logits


def covers_map(mask_size: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether a mask_h x mask_w window centred on any position of an H x W map covers the map."""
    return mask_size[0] >= 2 * size[0] - 1 and mask_size[1] >= 2 * size[1] - 1


def point_wise_attention_(
    logits: Tensor,
    values: Tensor,
    size: tuple[int, int],
    mask_size: tuple[int, int],
    *,
    distribute: bool = False,
    chunks: int = 16,
) -> Tensor:
    """PSANet's attention from position-major over-complete logits, re-indexed in their own storage.

    The same computation as :func:`point_wise_logits` + softmax + product with the values, for a
    mask window that covers the map (``mask_h >= 2H - 1``, ``mask_w >= 2W - 1``: the paper's
    setting, every pair in the window) and without autograd. Laid out position-major, the
    re-indexed logits are a strided view of the predicted ones: predictor p = (h, w) reads target
    t = (t_h, t_w) at channel ``(t_h - h + half_h, t_w - w + half_w)``, an offset linear in
    (h, w, t_h, t_w) with non-negative strides. That view is copied, a few rows of predictors at a
    time, into the front of the same storage (the (N, N) logits fit: mask_h mask_w >= N), softmaxed
    there in place and multiplied with the values: nothing quadratic beside the predicted map but
    one block of ``N / chunks`` rows. Each block's destination ends before the sources of the
    blocks after it (row p's destination starts at p N, its source at p mask_h mask_w >= p N), so
    copying the blocks in order never overwrites a logit still to be read; a block whose
    destination overlaps its own source goes through a copy of the block.

    Args:
        logits: (H, W, B, mask_h * mask_w), contiguous: at [h, w, b] the map predicted at (h, w),
            row-major over the window. Overwritten (it holds the weights afterwards).
        values: (B, N, C'), N = H W, in the logits' dtype.
        size: (H, W).
        mask_size: (mask_h, mask_w), covering the map.
        distribute: the distribute branch (each target normalises over the predictors that
            reach it) instead of collect (each predictor over its targets).
        chunks: how many blocks of predictor rows the re-indexing copies (the bound on its extra
            memory: one block).

    Returns:
        (B, N, C') contexts, row = the position whose context is formed (as
        ``softmax(point_wise_logits(...)) @ values``).
    """
    height, width = size
    mask_h, mask_w = mask_size
    batch, window = logits.shape[2], mask_h * mask_w
    n = height * width
    if not covers_map(mask_size, size) or logits.shape != (height, width, batch, window):
        raise ValueError(
            f"logits: expected ({height}, {width}, B, {window}) maps whose window covers the {height} x "
            f"{width} map, got {tuple(logits.shape)} with mask {mask_size}"
        )
    if torch.is_grad_enabled() and (logits.requires_grad or values.requires_grad):
        raise RuntimeError("point_wise_attention_: in place, without autograd only")
    if logits.numel() == 0:  # an empty batch: the strides below would be negative
        return values.new_zeros(batch, n, values.shape[-1])
    logits = logits.contiguous()
    half_h, half_w = (mask_h - 1) // 2, (mask_w - 1) // 2
    # (H_p, W_p, B, H_t, W_t): element (h, w, b, t_h, t_w) at offset
    # h W B K + w B K + b K + (t_h - h + half_h) mask_w + (t_w - w + half_w), K = mask_h mask_w
    reindexed = logits.as_strided(
        (height, width, batch, height, width),
        (width * batch * window - mask_w, batch * window - 1, window, mask_w, 1),
        logits.storage_offset() + half_h * mask_w + half_w,
    )
    # the (N, B, N) result in the front of the storage, as (H_p, W_p, B, H_t, W_t)
    compact = logits.view(-1)[: n * batch * n].view(height, width, batch, height, width)
    rows = -(-height // max(1, chunks))  # predictor rows per block
    for start in range(0, height, rows):
        stop = min(start + rows, height)
        block = reindexed[start:stop]
        if stop * n > start * window:  # the block's destination reaches its own source
            block = block.clone()
        compact[start:stop].copy_(block)
    weights = softmax_(compact.view(n, batch, n), dim=0 if distribute else -1)  # (N_p, B, N_t)
    if distribute:
        # z[b, t] = sum_p w[p, b, t] v[b, p]: (B, N_t, N_p) @ (B, N_p, C')
        return torch.matmul(weights.permute(1, 2, 0), values)
    # z[b, p] = sum_t w[p, b, t] v[b, t]: (B, N_p, N_t) @ (B, N_t, C')
    return torch.matmul(weights.permute(1, 0, 2), values)


def deformed_tap(x: Tensor, offsets: Tensor, dilation: int, tap: int, kernel: int = 3) -> Tensor:
    """Bilinear samples of ``x`` at one tap of a dilated, offset k x k neighbourhood of every position.

    Position p = (y, x) and tap t = (i, j) (row-major over the k x k grid, centred) sample
    ``x(y + d i + dy_t(p), x + d j + dx_t(p))`` with ``(dy_t, dx_t) = offsets[:, 2t], offsets[:, 2t+1]``
    (the deformable-convolution layout); points outside the map read zeros, bilinear corners
    outside the map count as zero (as deformable convolution does). Built on ``grid_sample``:
    O(C HW) memory per tap, no custom op; coordinates and sampling in float32 for half inputs.

    Args:
        x: (B, C, H, W).
        offsets: (B, 2 k^2, H, W), every tap's; or (B, 2, H, W), this tap's (dy, dx) alone. A
            caller that samples every tap passes ``offsets.unflatten(1, (k * k, 2)).unbind(1)``'s
            entries: the backward then gathers the offsets' gradient in one buffer, where indexing
            the whole map per tap zero-fills a buffer of its size per tap.
        dilation: d.
        tap: t in [0, k^2).
        kernel: k.

    Returns:
        (B, C, H, W) in the dtype of ``x``.
    """
    dtype = compute_dtype(x.dtype)
    height, width = x.shape[-2], x.shape[-1]
    i, j = tap // kernel - kernel // 2, tap % kernel - kernel // 2
    rows = torch.arange(height, device=x.device, dtype=dtype)[:, None]  # (H, 1)
    cols = torch.arange(width, device=x.device, dtype=dtype)[None, :]  # (1, W)
    # (B, 2 k^2, H, W) -> (B, 2, H, W) -> 2 x (B, H, W)
    offset_y, offset_x = (offsets if offsets.shape[1] == 2 else offsets[:, 2 * tap : 2 * tap + 2]).unbind(1)
    y = rows + dilation * i + offset_y.to(dtype)  # (B, H, W)
    xx = cols + dilation * j + offset_x.to(dtype)
    if forward_ad_active():  # grid_sample has no forward derivative (jvp, jacfwd, hessian)
        return _bilinear_samples(x.to(dtype), y, xx).to(x.dtype)
    # pixel index -> grid_sample's [-1, 1] with align_corners=False (pixel centres at (2 p + 1) / S - 1)
    grid = torch.stack([(2 * xx + 1) / width - 1, (2 * y + 1) / height - 1], dim=-1)  # (B, H, W, 2)
    sampled = F.grid_sample(x.to(dtype), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return sampled.to(x.dtype)


def _bilinear_samples(x: Tensor, y: Tensor, xx: Tensor) -> Tensor:
    """``grid_sample``'s bilinear sampling with zero padding, in plain operators (every one with a
    forward derivative): the map ``x`` (B, C, H, W) at the pixel coordinates ``(y, xx)`` (B, H', W')
    each; a corner outside the map reads zero. Returns (B, C, H', W')."""
    batch, channels, height, width = x.shape
    flat = x.reshape(batch, channels, height * width)  # (B, C, H, W) -> (B, C, HW)
    top, left = torch.floor(y), torch.floor(xx)
    # the fractions carry the derivative in the coordinates; floor's is zero
    frac_y, frac_x = y - top, xx - left
    out = x.new_zeros(batch, channels, *y.shape[1:])
    for row, weight_y in ((top, 1 - frac_y), (top + 1, frac_y)):
        for col, weight_x in ((left, 1 - frac_x), (left + 1, frac_x)):
            inside = (row >= 0) & (row <= height - 1) & (col >= 0) & (col <= width - 1)
            index = (row.clamp(0, height - 1) * width + col.clamp(0, width - 1)).long()  # (B, H', W')
            # (B, 1, H'W') -> (B, C, H'W'): the same pixel of every channel
            gathered = flat.gather(2, index.flatten(1).unsqueeze(1).expand(batch, channels, -1))
            weight = torch.where(inside, weight_y * weight_x, 0.0).unsqueeze(1)  # (B, 1, H', W')
            out = out + gathered.view_as(out) * weight
    return out
