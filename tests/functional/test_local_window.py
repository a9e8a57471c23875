"""attnzoo.functional.local_window: the shift-and-accumulate kernels against unfold references,
and their hand-written backward passes against autograd's."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnzoo.functional import local_window as lw

pytestmark = pytest.mark.usefixtures("float64_default")


def unfold_aggregate(values, weights, k, stride, padding_mode, sharing):
    """The reference: every window unfolded (k^2 copies), weights broadcast, summed over taps."""
    b, c, h, w = values.shape
    pad = k // 2
    padded = F.pad(values, (pad,) * 4, mode="reflect" if padding_mode == "reflect" else "constant")
    cols = F.unfold(padded, k, stride=stride)  # (B, C k^2, H' W')
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    cols = cols.view(b, c, k * k, out_h, out_w)
    g = weights.shape[1]
    index = torch.arange(c) % g if sharing == "interleaved" else torch.arange(c) // (c // g)
    per_channel = weights[:, index]  # (B, C, k^2, [S,] H', W')
    if weights.dim() == 6:
        cols = cols.unsqueeze(3)
    return (per_channel * cols).sum(2)


@pytest.mark.parametrize("sharing", ["contiguous", "interleaved"])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("sub", [False, True])
def test_aggregate_matches_unfold_and_its_backward_matches_autograd(
    sharing, padding_mode, stride, sub
) -> None:
    torch.manual_seed(0)
    values = torch.randn(2, 8, 7, 9, requires_grad=True)
    out_h, out_w = (7 - 1) // stride + 1, (9 - 1) // stride + 1
    shape = (2, 4, 9, 3, out_h, out_w) if sub else (2, 4, 9, out_h, out_w)
    weights = torch.randn(*shape, requires_grad=True)
    kwargs = {"stride": stride, "padding_mode": padding_mode, "sharing": sharing}
    out = lw.window_aggregate(values, weights, 3, **kwargs)  # the hand-written backward
    expected = unfold_aggregate(values, weights, 3, stride, padding_mode, sharing)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (values, weights), grad)
    want = torch.autograd.grad(expected, (values, weights), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_neg_sq_distance_and_its_backward() -> None:
    torch.manual_seed(0)
    keys = torch.randn(2, 8, 7, 9, requires_grad=True)
    query_full = torch.randn(2, 8, 7, 9, requires_grad=True)
    query = query_full[..., ::2, ::2]
    out = lw.window_neg_sq_distance(query, keys, 3, 4, stride=2)  # (B, 4, 9, 4, 5)
    cols = F.unfold(keys, 3, padding=1, stride=2).view(2, 8, 9, 4, 5)
    expected = -(query.unsqueeze(2) - cols).square().view(2, 4, 2, 9, 4, 5).sum(2)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (query_full, keys), grad)
    want = torch.autograd.grad(expected, (query_full, keys), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_border_mask_marks_taps_inside_the_map() -> None:
    mask = lw.window_border_mask(3, 4, 3)  # (9, 3, 4)
    assert mask.shape == (9, 3, 4)
    assert not mask[0, 0, 0] and mask[4].all()  # top-left tap of the corner is outside; centre inside
    assert mask[8, :2, :3].all() and not mask[8, 2].any() and not mask[8, :, 3].any()


def test_offsets_are_row_major_and_windows_must_be_odd() -> None:
    assert lw.window_offsets(3)[:4] == [(-1, -1), (-1, 0), (-1, 1), (0, -1)]
    assert lw.window_offsets(3, dilation=2)[-1] == (2, 2)
    for bad in (0, 2, 4, -1):
        with pytest.raises(ValueError, match="odd"):
            lw.check_window(bad)


def test_reflection_needs_a_map_wider_than_the_half_window() -> None:
    with pytest.raises(ValueError, match="reflection padding by 3"):
        list(lw.window_taps(torch.randn(1, 1, 3, 8), 7, padding_mode="reflect"))
