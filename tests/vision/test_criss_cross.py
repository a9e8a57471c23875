"""criss_cross: CCNet's equations in float64 (loops over positions), the H+W-1 keys, recurrence."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.criss_cross import CrissCrossAttention, criss_cross_attention

F64 = torch.float64


def randomised(module: torch.nn.Module, seed: int = 0, gamma: float = 0.7) -> torch.nn.Module:
    randomize_(module, seed=seed, scale=0.5)
    if getattr(module, "gamma", None) is not None:
        with torch.no_grad():
            module.gamma.fill_(gamma)
    return module


def conv1x1(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[None, :, None, None]


def reference_step(module: CrissCrossAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper Eqs. 1-2 position by position: keys = u's column without u, then u's row (with u)."""
    q, k, v = (conv1x1(c, x) for c in (module.query_conv, module.key_conv, module.value_conv))
    batch, _, height, width = x.shape
    out = torch.empty_like(x)
    maps = torch.zeros(batch, height, width, height + width, dtype=x.dtype)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                column = [(r, j) for r in range(height) if r != i]
                row = [(i, c) for c in range(width)]
                keys = column + row  # H + W - 1 positions, the centre once
                energies = torch.stack([q[b, :, i, j] @ k[b, :, r, c] for r, c in keys])
                a = torch.softmax(energies, dim=0)
                out[b, :, i, j] = sum(a[n] * v[b, :, r, c] for n, (r, c) in enumerate(keys))
                for n, (r, c) in enumerate(keys):
                    maps[b, i, j, r if n < len(column) else height + c] = a[n]
    gamma = module.gamma if module.gamma is not None else 1.0
    return gamma * out + x, maps


def test_matches_paper_equations_with_shared_recurrence():
    torch.manual_seed(0)
    module = randomised(CrissCrossAttention(16, dtype=F64)).eval()
    x = torch.randn(2, 16, 4, 5, dtype=F64)  # H != W catches a swapped row/column axis
    ref, _ = reference_step(module, x)
    ref, ref_maps = reference_step(module, ref)  # R = 2 with the SAME weights
    out, maps = module(x, return_attn=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, ref_maps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(x), out, rtol=0, atol=0)


def test_defaults_reduction_and_recurrence():
    module = attnzoo.create("criss_cross", 64)
    assert module.query_conv.out_channels == module.key_conv.out_channels == 8  # C/8
    assert module.value_conv.out_channels == 64
    assert module.recurrence == 2
    single = CrissCrossAttention(64, recurrence=1)
    # the recurrence shares weights: R = 2 has no more parameters than R = 1
    assert sum(p.numel() for p in module.parameters()) == sum(p.numel() for p in single.parameters())
    # and never a zero-width projection on thin inputs
    assert CrissCrossAttention(4).inner_channels == 1


def test_gamma_zero_at_init_is_identity():
    module = CrissCrossAttention(16).eval()
    assert module.gamma.item() == 0.0
    x = torch.randn(2, 16, 5, 6)
    torch.testing.assert_close(module(x), x, rtol=0, atol=0)


def test_paper_equation_without_gamma():
    module = randomised(CrissCrossAttention(8, recurrence=1, gamma=False, dtype=F64)).eval()
    assert module.gamma is None
    x = torch.randn(1, 8, 3, 4, dtype=F64)
    torch.testing.assert_close(module(x), reference_step(module, x)[0], rtol=1e-10, atol=1e-10)


def test_maps_layout_centre_counted_once_and_normalised():
    module = randomised(CrissCrossAttention(8, dtype=F64)).eval()
    height, width = 5, 3
    _, maps = module(torch.randn(2, 8, height, width, dtype=F64), return_attn=True)
    assert maps.shape == (2, height, width, height + width)
    assert (maps >= 0).all() and (maps <= 1).all()
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, height, width, dtype=F64))
    rows = torch.arange(height)
    # the centre's slot in the column part is exactly zero: it is counted in the row part
    assert (maps[:, rows, :, rows] == 0).all()
    assert ((maps > 0).sum(-1) == height + width - 1).all()


def test_two_recurrences_reach_every_position():
    """One pass sees the row and column; two passes see the whole image (the point of R = 2)."""
    torch.manual_seed(1)
    height, width = 4, 5

    def influence(recurrence: int) -> torch.Tensor:
        module = randomised(CrissCrossAttention(8, recurrence=recurrence, dtype=F64))
        x = torch.randn(1, 8, height, width, dtype=F64, requires_grad=True)
        module(x)[0, :, 0, 0].sum().backward()
        return x.grad.abs().sum(1)[0] > 0  # (H, W): which inputs reach output (0, 0)

    one = influence(1)
    expected = torch.zeros(height, width, dtype=torch.bool)
    expected[0, :] = expected[:, 0] = True
    assert torch.equal(one, expected)
    assert influence(2).all()


def test_large_logits_and_half_precision_stay_finite():
    module = randomised(CrissCrossAttention(16, dtype=F64)).eval()
    with torch.no_grad():
        module.query_conv.weight.mul_(1e3)
        module.key_conv.weight.mul_(1e3)
    x = torch.randn(1, 16, 6, 6, dtype=F64)
    out = module(x)
    assert torch.isfinite(out).all()
    for dtype in (torch.float16, torch.bfloat16):
        half = CrissCrossAttention(16, dtype=dtype).eval()
        half.load_state_dict({k: v.to(dtype) for k, v in module.state_dict().items()})
        # fp16 products of these logits would overflow to inf (inf - inf = NaN in the softmax)
        result, maps = half(x.to(dtype), return_attn=True)
        assert result.dtype == dtype and torch.isfinite(result).all()
        assert maps.dtype == torch.float32 and torch.isfinite(maps).all()


def test_bfloat16_energies_in_float32_values_in_bfloat16():
    """Unscaled logits of ~50 here: bfloat16 energies would move weights by ~0.2; float32 ones
    keep the maps within bfloat16's rounding of the inputs and weights."""
    module = randomised(CrissCrossAttention(16, dtype=F64)).eval()
    x = torch.randn(2, 16, 7, 6, dtype=F64)
    expected, expected_maps = module(x, return_attn=True)
    half = CrissCrossAttention(16, dtype=torch.bfloat16).eval()
    half.load_state_dict({k: v.to(torch.bfloat16) for k, v in module.state_dict().items()})
    out, maps = half(x.to(torch.bfloat16), return_attn=True)
    assert maps.dtype == torch.float32 and out.dtype == torch.bfloat16
    assert (maps.double() - expected_maps).abs().max() < 0.1  # bfloat16 energies: 0.21
    assert (out.double() - expected).abs().max() < 0.6  # bfloat16 energies: 1.34 (|out| ~ 11)


def test_no_hw_by_hw_matrix():
    module = CrissCrossAttention(16, recurrence=1).eval()
    side = 16
    x = torch.randn(1, 16, side, side)
    with torch.no_grad(), OpRecorder() as probe:
        module(x)
    assert probe.largest_storage <= side * side * 2 * side  # O(HW (H + W)), not (HW)^2 = 65536
    assert probe.largest_storage < (side * side) ** 2 // 4


def test_functional_form_on_tiny_maps():
    # H = 1: the column holds only the (masked) centre; the row carries all the weight
    q, k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4), torch.randn(1, 3, 1, 4)
    out, maps = criss_cross_attention(q, k, v)
    assert torch.isfinite(out).all() and maps[..., 0].eq(0).all()
    expected = torch.einsum(
        "bwk,bck->bcw", F.softmax(torch.einsum("bcw,bck->bwk", q[:, :, 0], k[:, :, 0]), -1), v[:, :, 0]
    )
    torch.testing.assert_close(out[:, :, 0], expected)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"channels": 0}, "channels"),
        ({"channels": 8, "recurrence": 0}, "recurrence"),
        ({"channels": 8, "rd_ratio": 0.0}, "rd_ratio"),
    ],
)
def test_constructor_errors_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CrissCrossAttention(**kwargs)


def test_fused_projection_equals_the_three_convolutions():
    """q, k and v come from one GEMM of the stacked 1x1 weights; each equals its own convolution."""
    module = randomised(CrissCrossAttention(16, dtype=F64))
    x = torch.randn(2, 16, 5, 3, dtype=F64)
    for got, conv in zip(module.project(x), (module.query_conv, module.key_conv, module.value_conv)):
        torch.testing.assert_close(got, conv(x), rtol=1e-12, atol=1e-12)


def test_compacted_gradients_equal_autograd(monkeypatch):
    """Eager training copies the aggregation's incoming gradient compact: the gradients to x and to
    every parameter are those of the plain graph (float64, two recurrences)."""
    import attnzoo.vision.criss_cross as module_file

    module = randomised(CrissCrossAttention(16, dtype=F64))
    x = torch.randn(2, 16, 5, 4, dtype=F64, requires_grad=True)
    inputs = (x, *module.parameters())
    got = torch.autograd.grad(module(x).square().sum(), inputs)
    monkeypatch.setattr(module_file, "_compact_gradient", lambda t: t)
    expected = torch.autograd.grad(module(x).square().sum(), inputs)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 2, 1, 4), (1, 2, 4, 1), (2, 2, 17, 6)])
@pytest.mark.parametrize("blocks", ["one", "many"])
def test_half_precision_function_equals_autograd_of_the_joint_softmax(shape, blocks, monkeypatch):
    """The half-precision path's hand-written backward run in float64, in one block of query rows
    and in up to eight (17 rows: five of 3 and a short last one): its output and gradients are
    autograd's on the plain path."""
    import attnzoo.vision.criss_cross as module_file
    from attnzoo.vision.criss_cross import _HalfPrecisionCrissCross

    if blocks == "many":
        monkeypatch.setattr(module_file, "_BLOCK_ELEMENTS", 1)

    batch, _, height, width = shape
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(shape, dtype=F64, generator=generator, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, 3, height, width, dtype=F64, generator=generator, requires_grad=True)
    out = _HalfPrecisionCrissCross.apply(q, k, v)[0]
    expected = criss_cross_attention(q, k, v)[0]
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grad = torch.randn(out.shape, dtype=F64, generator=generator)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_row_blocks_cover_every_row_and_split_on_the_cpu_only():
    """The blocks of query rows tile range(H) on the CPU (up to eight at 64 x 64); on any other
    device one block (on a GPU the blocks' launches made bfloat16 4-5x slower than mmcv's)."""
    from attnzoo.vision.criss_cross import _row_blocks

    cpu = _row_blocks(1, 64, 64, torch.device("cpu"))
    assert len(cpu) == 8 and cpu[0][0] == 0 and cpu[-1][1] == 64
    assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(cpu))
    for device in ("meta", "cuda"):
        assert _row_blocks(1, 64, 64, torch.device(device)) == [(0, 64)]


def test_bfloat16_without_maps_keeps_no_float32_map(monkeypatch):
    """bfloat16 training without return_attn never forms a (B, H, W, H + W) buffer (the float32
    map, kept for the backward, is what made its peak memory 1.6x the peers'), and gives the
    output and gradients of the path that does (the maps' path), within bfloat16's rounding."""
    import attnzoo.vision.criss_cross as module_file

    module = randomised(CrissCrossAttention(16, dtype=torch.bfloat16))
    side = 16
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, side, side, generator=generator).to(torch.bfloat16).requires_grad_()
    # not the key bias: it shifts all of a query's logits alike, its exact gradient is 0 (noise here)
    names = [name for name, _ in module.named_parameters() if name != "key_conv.bias"]

    def gradients(m: torch.nn.Module, inp: torch.Tensor) -> tuple[torch.Tensor, ...]:
        params = dict(m.named_parameters())
        return torch.autograd.grad(m(inp).double().square().sum(), (inp, *(params[n] for n in names)))

    with OpRecorder() as probe:
        out = module(x)
        got = gradients(module, x)
    assert probe.largest_storage < side * side * 2 * side
    maps_out, _ = module(x, return_attn=True)  # R = 2: the first pass takes the same path
    torch.testing.assert_close(out, maps_out)  # the softmax's float32 rounding may differ

    monkeypatch.setattr(module_file, "criss_cross_context", lambda q, k, v: criss_cross_attention(q, k, v)[0])
    with OpRecorder() as probe:
        expected = gradients(module, x)
    assert probe.largest_storage >= side * side * 2 * side  # the maps' path forms the map
    # Both against float64: bfloat16 moves the query projection's gradients by 3-30 % on either
    # path (they cancel across keys), so the two paths differ from each other by as much, and a
    # direct comparison passes or fails with the draw. The half path must be as accurate as the
    # maps' path: its worst relative error at most 1.5x the maps' worst (0.95-1.26x over 8 draws).
    truth = gradients(copy.deepcopy(module).double(), x.detach().double().requires_grad_())

    def worst_error(grads: tuple[torch.Tensor, ...]) -> float:
        return max(float((g.double() - t).norm() / t.norm()) for g, t in zip(grads, truth))

    assert worst_error(got) <= 1.5 * worst_error(expected)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_half_precision_per_sample_gradients_with_torch_func():
    """Under torch.func's transforms the half-precision path (``out=`` products into slices, which
    vmap has no rule for) gives way to the plain operators: vmap(grad(loss)) runs in bfloat16 and
    gives each image's gradients up to bfloat16 rounding."""
    module = CrissCrossAttention(16).to(torch.bfloat16)
    randomize_(module, seed=0, scale=0.1, shift=True)
    x = torch.randn(2, 16, 6, 6, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)

    def loss(params, image):
        return torch.func.functional_call(module, params, (image.unsqueeze(0),)).float().square().sum()

    params = {n: p.detach() for n, p in module.named_parameters()}
    per_image = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(2):
        leaves = {n: p.detach().requires_grad_() for n, p in module.named_parameters()}
        expected = torch.autograd.grad(loss(leaves, x[i]), list(leaves.values()))
        # one scale for all: the key bias's gradient is zero but for rounding (a per-query constant)
        scale = max(float(want.float().abs().max()) for want in expected)
        for name, want in zip(leaves, expected):
            assert (per_image[name][i].float() - want.float()).abs().max() <= 2e-2 * scale, name


def test_half_precision_backward_gets_no_zero_filled_weight_gradients(monkeypatch):
    """The half-precision Function returns the two weight maps as outputs only to keep them; their
    gradients must reach its backward as None, not as two zero-filled map-sized buffers at the
    backward's peak (autograd's default for outputs nothing differentiates)."""
    from attnzoo.vision.criss_cross import _HalfPrecisionCrissCross

    received = []
    backward = _HalfPrecisionCrissCross.backward

    def recording(ctx, grad, grad_col, grad_row):
        received.append((grad_col, grad_row))
        return backward(ctx, grad, grad_col, grad_row)

    monkeypatch.setattr(_HalfPrecisionCrissCross, "backward", staticmethod(recording))
    module = CrissCrossAttention(16).to(torch.bfloat16)
    x = torch.randn(1, 16, 6, 6, dtype=torch.bfloat16, requires_grad=True)
    module(x).float().sum().backward()
    assert received and all(pair == (None, None) for pair in received)  # one per recurrence
    assert x.grad is not None and torch.isfinite(x.grad.float()).all()
