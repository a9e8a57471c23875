"""Local-window kernels without the k^2 blow-up: shift-and-accumulate over the taps of a window.

Attention over a k x k window (SAN, LR-Net, CARAFE's reassembly, SASA-style layers) is usually
written with ``F.unfold``: every key and value is copied k^2 times, a (B, C k^2, H W) tensor, and
the weighted sum is a broadcast multiply and a reduction over it. At k = 7 that is 49 times the
activation memory (a 56 x 56 map with 256 channels: 157 MB per image in float32), and as much
again for the product before the sum and for the gradient.

These kernels visit the k^2 taps one at a time instead: the tap (dy, dx) of every window is a
strided *view* of the padded map (no copy), so::

    out = sum_t  w[:, :, t] * shift_t(values)

costs k^2 fused multiply-adds into one output-sized accumulator: O(output) memory besides the
weights themselves, which the mechanisms need anyway and which are k^2 per *group* of channels,
not per channel. Every op is a pad, a slice and a multiply-add, so the graph exports to ONNX with
standard operators (Pad, Slice, Mul, Add) and runs anywhere PyTorch does.

Taps are numbered row-major: tap ``t = i * k + j`` reads the neighbour at offset
``(i - k // 2, j - k // 2) * dilation`` from the window's centre.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnzoo._tracing import is_eager

__all__ = [
    "PaddingMode",
    "check_window",
    "window_aggregate",
    "window_border_mask",
    "window_dot",
    "window_neg_sq_distance",
    "window_offsets",
    "window_output_size",
    "window_reassemble",
    "window_stack",
    "window_taps",
]

#: How a window is completed beyond the border of the map: ``"zeros"`` (taps outside read 0, the
#: caller masks them where they must not count) or ``"reflect"`` (SAN's reflection padding).
PaddingMode = Literal["zeros", "reflect"]


def check_window(kernel_size: int, name: str = "kernel_size") -> None:
    """Check a window size: a positive odd integer (a window needs a centre pixel).

    Raises:
        ValueError: naming ``name``, for an even, zero or negative size.
    """
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(
            f"{name}: expected a positive odd window size (the window is centred on its pixel), "
            f"got {kernel_size!r}"
        )


def window_offsets(kernel_size: int, dilation: int = 1) -> list[tuple[int, int]]:
    """The (dy, dx) offset of every tap from the window's centre, row-major."""
    half = kernel_size // 2
    return [
        ((i - half) * dilation, (j - half) * dilation) for i in range(kernel_size) for j in range(kernel_size)
    ]


def window_output_size(size: int, stride: int) -> int:
    """The output side of a window layer with 'same' padding: ``ceil(size / stride)``."""
    return (size - 1) // stride + 1


def window_taps(
    x: Tensor,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    padding_mode: PaddingMode = "zeros",
) -> Iterator[Tensor]:
    """Yield the k^2 shifted views of ``x`` (B, C, H, W), each (B, C, H', W'), H' = ceil(H / stride).

    View t holds, at output position (y, x), the input at ``(y * stride + dy, x * stride + dx)``
    for tap t's offset (dy, dx): zero (``"zeros"``) or mirrored (``"reflect"``) outside the map.
    The map is padded once; every view is a strided slice of it (no copy).

    Raises:
        ValueError: ``"reflect"`` with a window reaching further than the map is wide or high
            (reflection cannot mirror more than ``size - 1`` pixels).
    """
    pad = (kernel_size // 2) * dilation
    height, width = x.shape[-2], x.shape[-1]
    if padding_mode == "reflect" and pad > 0:
        if pad >= height or pad >= width:
            raise ValueError(
                f"x: reflection padding by {pad} (window {kernel_size}, dilation {dilation}) expected "
                f"a map larger than {pad} on each side, got {height} x {width} (use a smaller "
                f"kernel_size for such small maps)"
            )
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    elif pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
    else:
        padded = x
    out_h, out_w = window_output_size(height, stride), window_output_size(width, stride)
    for dy, dx in window_offsets(kernel_size, dilation):
        top, left = pad + dy, pad + dx
        # (B, C, H + 2 pad, W + 2 pad) -> (B, C, H', W'): a strided view, no copy
        yield padded[
            ...,
            top : top + stride * (out_h - 1) + 1 : stride,
            left : left + stride * (out_w - 1) + 1 : stride,
        ]


def window_stack(
    x: Tensor,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    padding_mode: PaddingMode = "zeros",
) -> Tensor:
    """All taps at once: (B, C, H, W) -> (B, C, k^2, H', W') (k^2 times the memory of ``x``).

    For small tensors whose every tap a layer needs together (SAN's patchwise relation reads
    C/16 channels), not for values: :func:`window_aggregate` never forms this.
    """
    return torch.stack(
        list(window_taps(x, kernel_size, stride=stride, dilation=dilation, padding_mode=padding_mode)), dim=2
    )


def window_border_mask(
    height: int,
    width: int,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    device: torch.device | str | None = None,
) -> Tensor:
    """Bool (k^2, H', W'): True where tap t of the window at (y, x) lies inside the map."""
    out_h, out_w = window_output_size(height, stride), window_output_size(width, stride)
    offsets = torch.tensor(window_offsets(kernel_size, dilation), device=device)  # (k^2, 2)
    rows = torch.arange(out_h, device=device) * stride  # (H',)
    cols = torch.arange(out_w, device=device) * stride  # (W',)
    tap_rows = rows.view(1, -1) + offsets[:, :1]  # (1, H') + (k^2, 1) -> (k^2, H')
    tap_cols = cols.view(1, -1) + offsets[:, 1:]  # (k^2, W')
    rows_in = (tap_rows >= 0) & (tap_rows < height)
    cols_in = (tap_cols >= 0) & (tap_cols < width)
    return rows_in.unsqueeze(-1) & cols_in.unsqueeze(-2)  # (k^2, H', 1) & (k^2, 1, W') -> (k^2, H', W')


def _group_layout(batch: int, channels: int, weights: Tensor, sharing: str) -> tuple[tuple[int, int], Tensor]:
    """The (A, B) split of the channels and the weights viewed to broadcast over it.

    Returns ``((d1, d2), w)`` with channel c at ``(c // d2, c % d2)`` and ``w`` of shape
    (B, d1 or 1, d2 or 1, k^2, [S,] H', W'), the group's map broadcast over the sharing channels.
    """
    groups = weights.shape[1]
    per_group = channels // groups
    if sharing == "interleaved":
        # (B, G, k^2, ...) -> (B, 1, G, k^2, ...): channel c = s * G + g uses map g
        return (per_group, groups), weights.unsqueeze(1)
    # (B, G, k^2, ...) -> (B, G, 1, k^2, ...): channel c = g * (C/G) + s uses map g
    return (groups, per_group), weights.unsqueeze(2)


def _aggregate_loop(
    values: Tensor,
    weights: Tensor,
    kernel_size: int,
    stride: int,
    dilation: int,
    padding_mode: str,
    sharing: str,
) -> Tensor:
    batch, channels = values.shape[0], values.shape[1]
    split, grouped_weights = _group_layout(batch, channels, weights, sharing)
    sub = weights.dim() == 6
    out: Tensor | None = None
    # unbind: one backward node that stacks the k^2 tap gradients (k^2 slices would each
    # allocate and accumulate a zero tensor of the weights' full size)
    taps = window_taps(values, kernel_size, stride=stride, dilation=dilation, padding_mode=padding_mode)  # type: ignore[arg-type]
    for tap, weight in zip(taps, grouped_weights.unbind(3)):
        shifted = tap.unflatten(1, split)  # (B, C, H', W') -> (B, d1, d2, H', W'): a view
        if sub:
            shifted = shifted.unsqueeze(3)  # (B, ., ., H', W') -> (B, ., ., 1, H', W'): all S share it
        if out is None:
            out = shifted * weight
        else:
            out = out.addcmul_(shifted, weight)  # in place: one accumulator for all k^2 taps
    assert out is not None  # k >= 1
    return out.flatten(1, 2)  # (B, d1, d2, [S,] H', W') -> (B, C, [S,] H', W')


class _WindowAggregate(torch.autograd.Function):
    """The shift-and-accumulate with a hand-written backward that also visits the taps one by one.

    Autograd's own backward of the loop is correct but slow: every tap's slice allocates a zero
    tensor of the padded values to scatter its gradient into, and every tap's weight gradient is
    a separate reduction node. This backward keeps one padded gradient buffer, adds each tap's
    contribution into a strided view of it, and writes each tap's weight gradient into one
    preallocated tensor; it saves only the values and the weights.
    """

    generate_vmap_rule = True  # torch.func's vmap and grad compose with it (per-sample gradients)

    @staticmethod
    def forward(  # type: ignore[override]
        values: Tensor,
        weights: Tensor,
        kernel_size: int,
        stride: int,
        dilation: int,
        padding_mode: str,
        sharing: str,
    ) -> Tensor:
        return _aggregate_loop(values, weights, kernel_size, stride, dilation, padding_mode, sharing)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
        values, weights, *options = inputs
        ctx.save_for_backward(values, weights)
        # kernel_size, stride, dilation, padding_mode, sharing
        ctx.options = tuple(options)  # type: ignore[attr-defined]

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        values, weights = ctx.saved_tensors  # type: ignore[attr-defined]
        kernel_size, stride, dilation, padding_mode, sharing = ctx.options  # type: ignore[attr-defined]
        need_values, need_weights = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        batch, channels, height, width = values.shape
        split, grouped_weights = _group_layout(batch, channels, weights, sharing)
        sub = weights.dim() == 6
        shared_dim = 1 if sharing == "interleaved" else 2  # the channels that share one map
        grad_out = grad_out.contiguous().unflatten(1, split)  # (B, C, ...) -> (B, d1, d2, [S,] H', W')
        pad = (kernel_size // 2) * dilation
        grad_padded = (
            values.new_zeros(batch, channels, height + 2 * pad, width + 2 * pad) if need_values else None
        )
        grad_weights = torch.empty_like(weights) if need_weights else None
        out_h, out_w = grad_out.shape[-2], grad_out.shape[-1]
        taps = window_taps(values, kernel_size, stride=stride, dilation=dilation, padding_mode=padding_mode)
        for t, (tap, weight, (dy, dx)) in enumerate(
            zip(taps, grouped_weights.unbind(3), window_offsets(kernel_size, dilation))
        ):
            shifted = tap.unflatten(1, split)  # (B, d1, d2, H', W')
            if sub:
                shifted = shifted.unsqueeze(3)  # (B, d1, d2, 1, H', W')
            if grad_weights is not None:
                # d out / d w_t = sum over the sharing channels of grad * shifted values
                grad_weights[:, :, t] = (grad_out * shifted).sum(shared_dim)
            if grad_padded is not None:
                top, left = pad + dy, pad + dx
                target = grad_padded[
                    ...,
                    top : top + stride * (out_h - 1) + 1 : stride,
                    left : left + stride * (out_w - 1) + 1 : stride,
                ].unflatten(1, split)  # a strided view of the buffer: (B, d1, d2, H', W')
                if sub:
                    target.add_((grad_out * weight).sum(3))  # the S sub-positions read the same tap
                else:
                    target.addcmul_(grad_out, weight)
        grad_values = None
        if grad_padded is not None:
            if pad == 0:
                grad_values = grad_padded
            elif padding_mode == "reflect":
                grad_values = torch.ops.aten.reflection_pad2d_backward(grad_padded, values, [pad] * 4)
            else:
                grad_values = grad_padded[..., pad : pad + height, pad : pad + width]
        return grad_values, grad_weights, None, None, None, None, None


def window_aggregate(
    values: Tensor,
    weights: Tensor,
    kernel_size: int,
    *,
    stride: int = 1,
    dilation: int = 1,
    padding_mode: PaddingMode = "zeros",
    sharing: Literal["contiguous", "interleaved"] = "contiguous",
) -> Tensor:
    """``out[c, p] = sum_t weights[g(c), t, p] * values[c, p * stride + offset_t]``, no unfold.

    G weight maps are shared by the C channels of ``values``: ``"contiguous"`` gives channel c
    the map ``c // (C / G)`` (LR-Net's groups, CARAFE's groups), ``"interleaved"`` the map
    ``c % G`` (SAN's official aggregation kernel).

    Args:
        values: (B, C, H, W).
        weights: (B, G, k^2, H', W'), or (B, G, k^2, S, H', W') for S sub-positions per output
            pixel (CARAFE's sigma^2 output pixels that share one input window). Cast to the
            values' dtype.
        kernel_size: k, odd.
        stride: output positions every ``stride`` pixels (H' = ceil(H / stride)).
        dilation: spacing of the taps.
        padding_mode: ``"zeros"`` or ``"reflect"`` (see :func:`window_taps`).
        sharing: how the G maps are shared by the C channels.

    Returns:
        (B, C, H', W'), or (B, C, S, H', W') with sub-positions.

    Memory: one accumulator of the output's size; the taps are views of the padded values. In
    eager training the backward is hand-written (:class:`_WindowAggregate`) and keeps the same
    bound; traced, compiled and exported graphs see the plain loop of standard operators.
    """
    channels, groups = values.shape[1], weights.shape[1]
    if channels % groups:
        raise ValueError(f"weights: expected a number of maps dividing the {channels} channels, got {groups}")
    if weights.shape[2] != kernel_size * kernel_size:
        raise ValueError(
            f"weights: expected {kernel_size * kernel_size} taps at dim 2 for a {kernel_size} x "
            f"{kernel_size} window, got {weights.shape[2]}"
        )
    weights = weights.to(values.dtype)
    needs_grad = torch.is_grad_enabled() and (values.requires_grad or weights.requires_grad)
    if needs_grad and is_eager(values):
        out = _WindowAggregate.apply(values, weights, kernel_size, stride, dilation, padding_mode, sharing)
        return out  # type: ignore[no-any-return]
    return _aggregate_loop(values, weights, kernel_size, stride, dilation, padding_mode, sharing)


def _reassemble_loop(values: Tensor, kernels: Tensor, kernel_size: int, scale: int) -> Tensor:
    # (B, C, sigma^2, H, W): sub-pixel s of every output block, all reading the same window
    blocks = _aggregate_loop(values, kernels, kernel_size, 1, 1, "zeros", "contiguous")
    # (B, C, s^2, H, W) -> (B, C s^2, H, W) -> pixel shuffle -> (B, C, sigma H, sigma W)
    return torch.pixel_shuffle(blocks.flatten(1, 2), scale)


class _WindowReassemble(torch.autograd.Function):
    """CARAFE's reassembly with a backward that reads the upsampled gradient in place.

    Autograd's chain (pixel shuffle after the window aggregation) would copy the (B, C, sigma H,
    sigma W) gradient back into sub-pixel blocks and form a product of that size per tap. This
    backward views the gradient as (B, C, H, sigma, W, sigma) and visits every (tap, sub-pixel)
    pair with input-sized operands only: the extra memory is one padded input-sized gradient
    buffer, the kernels' gradient and one input-sized product. It saves only the input and the
    kernels (never an upsampled tensor).
    """

    generate_vmap_rule = True  # torch.func's vmap and grad compose with it (per-sample gradients)

    @staticmethod
    def forward(  # type: ignore[override]
        values: Tensor,
        kernels: Tensor,
        kernel_size: int,
        scale: int,
    ) -> Tensor:
        return _reassemble_loop(values, kernels, kernel_size, scale)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
        values, kernels, *options = inputs
        ctx.save_for_backward(values, kernels)
        ctx.options = tuple(options)  # type: ignore[attr-defined]  # kernel_size, scale

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        values, kernels = ctx.saved_tensors  # type: ignore[attr-defined]
        kernel_size, scale = ctx.options  # type: ignore[attr-defined]
        need_values, need_kernels = ctx.needs_input_grad[0], ctx.needs_input_grad[1]  # type: ignore[attr-defined]
        batch, channels, height, width = values.shape
        groups = kernels.shape[1]
        split = (groups, channels // groups)  # channel c = g * (C / G) + s uses kernel group g
        # (B, C, sH, sW) -> (B, G, C/G, H, s, W, s): sub-pixel (i, j) of every block is a strided view
        grad_blocks = grad_out.contiguous().view(batch, *split, height, scale, width, scale)
        pad = kernel_size // 2
        grad_padded = (
            values.new_zeros(batch, channels, height + 2 * pad, width + 2 * pad) if need_values else None
        )
        grad_kernels = torch.empty_like(kernels) if need_kernels else None
        offsets = window_offsets(kernel_size)
        for sub in range(scale * scale):
            # sub-pixel (i, j) of every block, copied contiguous once (the tap loop reads it k^2
            # times, and strided operands are several times slower): (B, G, C/G, H, W)
            grad_sub = grad_blocks[:, :, :, :, sub // scale, :, sub % scale].contiguous()
            for t, (tap, (dy, dx)) in enumerate(zip(window_taps(values, kernel_size), offsets)):
                shifted = tap.unflatten(1, split)  # (B, C, H, W) -> (B, G, C/G, H, W): a view
                if grad_kernels is not None:
                    # d out / d kernel = the group's channels of gradient times shifted input
                    grad_kernels[:, :, t, sub] = (grad_sub * shifted).sum(2)
                if grad_padded is not None:
                    top, left = pad + dy, pad + dx
                    # the tap's strided view of the padded gradient buffer: (B, G, C/G, H, W)
                    target = grad_padded[..., top : top + height, left : left + width].unflatten(1, split)
                    # (B, G, H, W) -> (B, G, 1, H, W): one kernel for the group's channels
                    target.addcmul_(grad_sub, kernels[:, :, t, sub].unsqueeze(2))
        grad_values = None if grad_padded is None else grad_padded[..., pad : pad + height, pad : pad + width]
        return grad_values, grad_kernels, None, None


def window_reassemble(values: Tensor, kernels: Tensor, kernel_size: int, scale: int) -> Tensor:
    """CARAFE's reassembly: every output pixel l' a weighted sum of the k x k input window at l' // sigma.

    ``out[c, l'] = sum_t kernels[g(c), t, s(l'), l' // sigma] * values[c, l' // sigma + offset_t]``
    with s(l') = (i' mod sigma) sigma + (j' mod sigma) the sub-pixel of l' in its block, zeros
    beyond the border, channel c using the kernel group ``c // (C / G)``.

    Args:
        values: (B, C, H, W).
        kernels: (B, G, k^2, sigma^2, H, W), cast to the values' dtype.
        kernel_size: k, odd.
        scale: sigma.

    Returns:
        (B, C, sigma H, sigma W).

    The window aggregation with sub-positions (:func:`window_aggregate`) followed by a pixel
    shuffle; in eager training one autograd node (:class:`_WindowReassemble`) whose backward
    reads the upsampled gradient in place and saves only the input and the kernels.
    """
    channels, groups = values.shape[1], kernels.shape[1]
    if channels % groups:
        raise ValueError(
            f"kernels: expected a number of groups dividing the {channels} channels, got {groups}"
        )
    if kernels.shape[2] != kernel_size * kernel_size or kernels.shape[3] != scale * scale:
        raise ValueError(
            f"kernels: expected {kernel_size * kernel_size} taps at dim 2 and {scale * scale} sub-pixels at "
            f"dim 3 for a {kernel_size} x {kernel_size} window at scale {scale}, got {tuple(kernels.shape)}"
        )
    kernels = kernels.to(values.dtype)
    needs_grad = torch.is_grad_enabled() and (values.requires_grad or kernels.requires_grad)
    if needs_grad and is_eager(values):
        out = _WindowReassemble.apply(values, kernels, kernel_size, scale)
        return out  # type: ignore[no-any-return]
    return _reassemble_loop(values, kernels, kernel_size, scale)


def _neg_sq_distance_loop(query: Tensor, keys: Tensor, kernel_size: int, groups: int, stride: int) -> Tensor:
    per_tap = []
    for tap in window_taps(keys, kernel_size, stride=stride):
        # (B, K, H', W') -> (B, G, K/G, H', W') -> sum over the group's channels -> (B, G, H', W')
        per_tap.append((query - tap).square().unflatten(1, (groups, -1)).sum(2).neg())
    return torch.stack(per_tap, dim=2)  # (B, G, k^2, H', W')


class _WindowNegSqDistance(torch.autograd.Function):
    """-(q - k)^2 over every window tap, saving only q and k (the backward recomputes q - k_t)."""

    generate_vmap_rule = True  # torch.func's vmap and grad compose with it (per-sample gradients)

    @staticmethod
    def forward(  # type: ignore[override]
        query: Tensor,
        keys: Tensor,
        kernel_size: int,
        groups: int,
        stride: int,
    ) -> Tensor:
        return _neg_sq_distance_loop(query, keys, kernel_size, groups, stride)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
        query, keys, *options = inputs
        ctx.save_for_backward(query, keys)
        ctx.options = tuple(options)  # type: ignore[attr-defined]  # kernel_size, groups, stride

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        query, keys = ctx.saved_tensors  # type: ignore[attr-defined]
        kernel_size, groups, stride = ctx.options  # type: ignore[attr-defined]
        batch, key_channels, height, width = keys.shape
        pad = kernel_size // 2
        grad_query = torch.zeros_like(query)
        grad_padded = keys.new_zeros(batch, key_channels, height + 2 * pad, width + 2 * pad)
        out_h, out_w = query.shape[-2], query.shape[-1]
        taps = window_taps(keys, kernel_size, stride=stride)
        for t, (tap, (dy, dx)) in enumerate(zip(taps, window_offsets(kernel_size))):
            # d/dq -(q - k)^2 = -2 (q - k) g, d/dk = +2 (q - k) g, g broadcast over the group
            scaled = (query - tap).unflatten(1, (groups, -1)) * (2 * grad[:, :, t]).unsqueeze(2)
            scaled = scaled.flatten(1, 2)  # (B, G, K/G, H', W') -> (B, K, H', W')
            grad_query.sub_(scaled)
            top, left = pad + dy, pad + dx
            grad_padded[
                ...,
                top : top + stride * (out_h - 1) + 1 : stride,
                left : left + stride * (out_w - 1) + 1 : stride,
            ].add_(scaled)
        return grad_query, grad_padded[..., pad : pad + height, pad : pad + width], None, None, None


def window_neg_sq_distance(
    query: Tensor, keys: Tensor, kernel_size: int, groups: int, *, stride: int = 1
) -> Tensor:
    """``-sum_{c in group g} (q_c(p) - k_c(p * stride + offset_t))^2`` for every tap: (B, G, k^2, H', W').

    Args:
        query: (B, K, H', W'), the window centres (already strided).
        keys: (B, K, H, W); zero beyond the border (mask those taps: see
            :func:`window_border_mask`).
        kernel_size: k, odd.
        groups: G, dividing K: the channels of a group are summed.
        stride: the output stride.

    The keys are never unfolded: each tap is a view, and in eager training the backward
    (:class:`_WindowNegSqDistance`) saves only q and k and recomputes the differences.
    """
    if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad) and is_eager(query):
        out = _WindowNegSqDistance.apply(query, keys, kernel_size, groups, stride)
        return out  # type: ignore[no-any-return]
    return _neg_sq_distance_loop(query, keys, kernel_size, groups, stride)


def _window_dot_loop(query: Tensor, keys: Tensor, kernel_size: int, groups: int) -> Tensor:
    per_tap = []
    for tap in window_taps(keys, kernel_size):
        # (B, K, H, W) -> (B, G, K/G, H, W) -> the group's dot product -> (B, G, H, W)
        per_tap.append((query * tap).unflatten(1, (groups, -1)).sum(2))
    return torch.stack(per_tap, dim=2)  # (B, G, k^2, H, W)


class _WindowDot(torch.autograd.Function):
    """q . k over every window tap, saving only q and k (no per-tap product is kept)."""

    generate_vmap_rule = True  # torch.func's vmap and grad compose with it (per-sample gradients)

    @staticmethod
    def forward(  # type: ignore[override]
        query: Tensor,
        keys: Tensor,
        kernel_size: int,
        groups: int,
    ) -> Tensor:
        return _window_dot_loop(query, keys, kernel_size, groups)

    @staticmethod
    def setup_context(ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor) -> None:
        query, keys, *options = inputs
        ctx.save_for_backward(query, keys)
        ctx.options = tuple(options)  # type: ignore[attr-defined]  # kernel_size, groups

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        query, keys = ctx.saved_tensors  # type: ignore[attr-defined]
        kernel_size, groups = ctx.options  # type: ignore[attr-defined]
        batch, channels, height, width = keys.shape
        pad = kernel_size // 2
        split = (groups, channels // groups)
        grad_query = torch.zeros_like(query).unflatten(1, split)  # (B, G, K/G, H, W)
        grad_padded = keys.new_zeros(batch, channels, height + 2 * pad, width + 2 * pad)
        query_groups = query.unflatten(1, split)
        for t, (tap, (dy, dx)) in enumerate(zip(window_taps(keys, kernel_size), window_offsets(kernel_size))):
            weight = grad[:, :, t].unsqueeze(2)  # (B, G, H, W) -> (B, G, 1, H, W): one per group
            grad_query.addcmul_(tap.unflatten(1, split), weight)
            top, left = pad + dy, pad + dx
            target = grad_padded[..., top : top + height, left : left + width].unflatten(1, split)
            target.addcmul_(query_groups, weight)
        grad_keys = grad_padded[..., pad : pad + height, pad : pad + width]
        return grad_query.flatten(1, 2), grad_keys, None, None


def window_dot(query: Tensor, keys: Tensor, kernel_size: int, groups: int) -> Tensor:
    """``sum_{c in group g} q_c(p) k_c(p + offset_t)`` for every tap: (B, G, k^2, H, W).

    Args:
        query, keys: (B, K, H, W); the keys read zero beyond the border (mask those taps: see
            :func:`window_border_mask`).
        kernel_size: k, odd.
        groups: G, dividing K: each group's channels form one dot product (a head).

    The keys are never unfolded: each tap is a view, and in eager training the backward
    (:class:`_WindowDot`) saves only q and k.
    """
    if torch.is_grad_enabled() and (query.requires_grad or keys.requires_grad) and is_eager(query):
        out = _WindowDot.apply(query, keys, kernel_size, groups)
        return out  # type: ignore[no-any-return]
    return _window_dot_loop(query, keys, kernel_size, groups)
