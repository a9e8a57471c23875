"""sasa: local k x k multi-head attention with row/column relative embeddings (arXiv:1906.05909)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.sasa import SASA

pytestmark = pytest.mark.usefixtures("float64_default")


def reference(layer: SASA, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's eq. 3, one query at a time: softmax over the window's keys of
    q . (k + concat(r_row, r_col)), a dot product over each head's dimensions.

    Border keys: outside the image they are absent (masked); with ``clamp_window`` the window is
    shifted inside the image (NATTEN). Returns the output and the (B, h, H, W, k*k) weights.
    """
    batch, _, height, width = x.shape
    heads, d, size = layer.num_heads, layer.head_dim, layer.kernel_size
    radius = size // 2
    table_offset = size - 1 if layer.clamp_window else radius
    qkv = torch.einsum("bchw,oc->bohw", x, layer.qkv.weight)
    if layer.qkv.bias is not None:
        qkv = qkv + layer.qkv.bias[:, None, None]
    q, k, v = qkv.split(layer.out_channels, dim=1)
    out = torch.zeros(batch, layer.out_channels, height, width)
    weights = torch.zeros(batch, heads, height, width, size * size)
    for i in range(height):
        for j in range(width):
            if layer.clamp_window:
                top = min(max(i - radius, 0), height - size)
                left = min(max(j - radius, 0), width - size)
            else:
                top, left = i - radius, j - radius
            taps = [
                (a, b, ta * size + tb)
                for ta, a in enumerate(range(top, top + size))
                for tb, b in enumerate(range(left, left + size))
                if 0 <= a < height and 0 <= b < width
            ]
            for h in range(heads):
                channels = slice(h * d, (h + 1) * d)
                query = q[:, channels, i, j]  # (B, d)
                logits = []
                for a, b, _ in taps:
                    rel = torch.cat(
                        [layer.rel_rows[a - i + table_offset, h], layer.rel_cols[b - j + table_offset, h]]
                    )
                    logits.append((query * (k[:, channels, a, b] + rel)).sum(-1))
                w = torch.softmax(torch.stack(logits, dim=-1), dim=-1)  # (B, taps)
                values = torch.stack([v[:, channels, a, b] for a, b, _ in taps], dim=-1)  # (B, d, taps)
                out[:, channels, i, j] = (values * w[:, None, :]).sum(-1)
                for n, (_, _, tap) in enumerate(taps):
                    weights[:, h, i, j, tap] = w[:, n]
    if layer.stride > 1:
        out = F.avg_pool2d(out, layer.stride, ceil_mode=True)
    return out, weights


randomized = partial(randomize_, seed=1, scale=0.5)


@pytest.mark.parametrize(
    ("kwargs", "size"),
    [
        ({}, (9, 11)),
        ({"clamp_window": True}, (9, 11)),
        ({"block_size": 4}, (10, 7)),  # several tiles, the last one partly outside the map
        ({"kernel_size": 3, "stride": 2}, (7, 6)),
        ({"kernel_size": 5, "qkv_bias": True, "block_size": 3}, (8, 8)),
        ({}, (3, 4)),  # a 7 x 7 window on a 3 x 4 map
    ],
)
def test_matches_the_papers_equation(kwargs, size):
    layer = randomized(SASA(6, 8, num_heads=2, **kwargs))
    x = torch.randn(2, 6, *size)
    expected, expected_weights = reference(layer, x)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)
    out, weights = layer(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-10, atol=1e-10)


def test_gradients_match_the_reference():
    layer = randomized(SASA(4, 8, num_heads=2, kernel_size=5, block_size=3))
    x = torch.randn(1, 4, 6, 7, requires_grad=True)
    grad = torch.randn(1, 8, 6, 7)
    ours = torch.autograd.grad((layer(x) * grad).sum(), [x, *layer.parameters()])
    theirs = torch.autograd.grad((reference(layer, x)[0] * grad).sum(), [x, *layer.parameters()])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_one_softmax_per_head_not_per_channel():
    # leaderj1001's version multiplies q and k elementwise and softmaxes each channel on its own;
    # the paper's heads share one weight per (query, key) across their dimensions
    layer = randomized(SASA(4, 8, num_heads=2, kernel_size=3))
    x = torch.randn(1, 4, 5, 5)
    _, weights = layer(x, return_attn=True)
    assert weights.shape == (1, 2, 5, 5, 9)  # heads, not channels
    qkv = torch.einsum("bchw,oc->bohw", x, layer.qkv.weight)
    q, k, v = qkv.split(8, dim=1)
    unfold = lambda t: F.unfold(t, 3, padding=1).view(1, 8, 9, 5, 5)  # noqa: E731
    per_channel = torch.softmax(q[:, :, None] * unfold(k), dim=2)  # (1, C, 9, H, W)
    wrong = (per_channel * unfold(v)).sum(2)
    assert (layer(x) - wrong).abs().max() > 1e-2


def test_border_keys_are_masked_not_zero_padded():
    layer = randomized(SASA(4, 8, num_heads=2))
    _, weights = layer(torch.randn(1, 4, 8, 8), return_attn=True)
    corner = weights[0, :, 0, 0].reshape(2, 7, 7)
    # the corner query sees the 4 x 4 in-image quarter of its window, nothing outside the image
    assert (corner[:, :3, :] == 0).all() and (corner[:, :, :3] == 0).all()
    assert (corner[:, 3:, 3:] > 0).all()
    torch.testing.assert_close(corner.sum((-1, -2)), torch.ones(2))
    # zero-padded keys (timm HaloAttn, leaderj1001) would give the outside taps exp(q . r) weight
    assert ((weights > 0).sum(-1)[0, :, 0, 0] == 16).all()
    assert ((weights > 0).sum(-1)[0, :, 4, 4] == 49).all()


def test_clamped_windows_see_k_squared_keys_and_agree_inside():
    masked = randomized(SASA(4, 8, num_heads=2, kernel_size=3))
    clamped = SASA(4, 8, num_heads=2, kernel_size=3, clamp_window=True)
    with torch.no_grad():
        clamped.qkv.weight.copy_(masked.qkv.weight)
        # offsets -1..1 sit at rows 0..2 of the masked table, rows 1..3 of the clamped one
        clamped.rel_rows[1:4] = masked.rel_rows
        clamped.rel_cols[1:4] = masked.rel_cols
    x = torch.randn(1, 4, 6, 7)
    out_m = masked(x)
    out_c, w_c = clamped(x, return_attn=True)
    assert ((w_c > 0).sum(-1) == 9).all()  # every query attends to exactly k x k keys
    torch.testing.assert_close(out_c[..., 1:-1, 1:-1], out_m[..., 1:-1, 1:-1])
    assert (out_c[..., 0, :] - out_m[..., 0, :]).abs().max() > 1e-3  # borders differ
    assert clamped.rel_rows.shape[0] == 2 * 3 - 1  # offsets reach +-(k - 1)


def test_window_larger_than_the_map_is_global_attention_with_relative_logits():
    layer = randomized(SASA(4, 8, num_heads=2, kernel_size=9))
    x = torch.randn(1, 4, 4, 5)  # 2 * 5 - 1 = 9: every key inside every window
    out, weights = layer(x, return_attn=True)
    assert ((weights > 0).sum(-1) == 20).all()
    torch.testing.assert_close(out, reference(layer, x)[0], rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match=r"clamp_window.*expected H, W >= 9, got 4 x 5"):
        SASA(4, 8, num_heads=2, kernel_size=9, clamp_window=True)(x)


@pytest.mark.parametrize("kernel_size", [2, 4, 6])
def test_even_window_sizes_are_refused(kernel_size):
    with pytest.raises(ValueError, match=f"kernel_size: expected an odd.*got {kernel_size}"):
        SASA(8, kernel_size=kernel_size)


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="out_channels: expected a multiple of 2 \\* num_heads = 8"):
        SASA(8, 12, num_heads=4)
    with pytest.raises(ValueError, match="block_size: expected more than kernel_size // 2 = 3"):
        SASA(8, 16, num_heads=4, block_size=3)
    with pytest.raises(ValueError, match="num_heads"):
        SASA(8, num_heads=0)


def test_paper_defaults_and_learned_tables():
    layer = SASA(64)
    assert (layer.kernel_size, layer.num_heads, layer.clamp_window) == (7, 8, False)
    assert layer.qkv.bias is None
    # r_row and r_col: d_out / 2 dimensions each, split per head, one row per offset -3..3
    assert layer.rel_rows.shape == layer.rel_cols.shape == (7, 8, 4)
    names = {name for name, _ in layer.named_parameters()}
    assert {"rel_rows", "rel_cols"} <= names
    spec = attnzoo.get_spec("sasa")
    assert (spec.family, spec.placement, spec.map_kind) == ("conv_attention", "conv", "local")


def test_stride_pools_after_attention():
    layer = randomized(SASA(4, 8, num_heads=2, kernel_size=3, stride=2))
    x = torch.randn(1, 4, 7, 8)
    full = SASA(4, 8, num_heads=2, kernel_size=3)
    full.load_state_dict(layer.state_dict())
    out = layer(x)
    assert out.shape == (1, 8, 4, 4)
    torch.testing.assert_close(out, F.avg_pool2d(full(x), 2, ceil_mode=True))


def test_no_k_squared_copy_of_the_keys():
    # an unfold implementation holds (B, C, k^2, HW) keys and values: 49x the activation each;
    # the tiles hold ((b + 2r) / b)^2 = 2x the keys, widened by the 2 (b + 2r) codes (d = 16)
    layer = SASA(128).float()
    x = torch.randn(1, 128, 28, 28, dtype=torch.float32)
    with torch.no_grad(), OpRecorder() as recorder:
        layer(x)
    assert recorder.largest_storage < 49 * x.numel() / 6, recorder.largest_storage / x.numel()


def test_small_heads_take_the_tap_path_with_the_same_values_and_gradients():
    """Heads of <= 8 dimensions: shift-and-accumulate over the taps (no halo codes, which would
    be 5x the head's own dimensions), equal to the reference and to the halo tiles."""
    from attnzoo.functional.window import SMALL_HEAD_DIM, window_attention

    layer = randomized(SASA(4, 8, num_heads=2, kernel_size=5))  # d = 4 <= SMALL_HEAD_DIM
    assert layer.head_dim <= SMALL_HEAD_DIM
    x = torch.randn(1, 4, 6, 7, requires_grad=True)
    grad = torch.randn(1, 8, 6, 7)
    ours = torch.autograd.grad((layer(x) * grad).sum(), [x, *layer.parameters()])
    theirs = torch.autograd.grad((reference(layer, x)[0] * grad).sum(), [x, *layer.parameters()])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    q, k, v = torch.randn(3, 2, 2, 5, 9, 16).unbind(0)  # d = 16: both methods agree
    rows, cols = torch.randn(2, 7, 2, 8).unbind(0)
    taps = window_attention(q, k, v, rows, cols, 7, method="taps", return_weights=True)
    halo = window_attention(q, k, v, rows, cols, 7, method="halo", return_weights=True)
    for a, b in zip(taps, halo):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="clamp=False"):
        window_attention(q, k, v, rows, cols, 7, method="taps", clamp=True)
    with pytest.raises(ValueError, match="method"):
        window_attention(q, k, v, rows, cols, 7, method="unfold")
    # memory: the (B, h, k^2, HW) logits, h k^2 / C = 6.1x the input at 16 heads of 8, never 49x
    small = SASA(128, num_heads=16).float()
    x32 = torch.randn(1, 128, 28, 28, dtype=torch.float32)
    with torch.no_grad(), OpRecorder() as recorder:
        small(x32)
    assert recorder.largest_storage <= 16 * 49 * 28 * 28, recorder.largest_storage / x32.numel()


def test_nan_in_a_key_reaches_its_neighbours_only_through_the_output():
    layer = randomized(SASA(4, 8, num_heads=2, kernel_size=3))
    x = torch.randn(1, 4, 6, 6)
    x[0, :, 2, 2] = float("nan")
    out = layer(x)
    assert out[..., 1:4, 1:4].isnan().all()  # the pixel's 3 x 3 neighbourhood sees it
