"""CARAFE against a float64 reference written from the paper (pixel shuffle, softmax, loops over
the reassembly window), its init, the overflow check, and the no-unfold memory claim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.carafe import CARAFE

pytestmark = pytest.mark.usefixtures("float64_default")


def reference(module: CARAFE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, h, w = x.shape
    sigma, k, groups = module.scale, module.up_kernel, module.groups
    r = k // 2
    # kernel prediction module: compressor, content encoder, pixel shuffle, softmax over k^2
    compressed = F.conv2d(x, module.compressor.weight, module.compressor.bias)
    enc = module.encoder
    encoded = F.conv2d(compressed, enc.weight, enc.bias, padding=enc.padding, dilation=enc.dilation)
    shuffled = F.pixel_shuffle(encoded, sigma)  # (B, G k^2, sigma H, sigma W)
    kernels = torch.softmax(shuffled.view(b, groups, k * k, sigma * h, sigma * w), dim=2)
    out = torch.zeros(b, c, sigma * h, sigma * w)
    per_group = c // groups
    for i2 in range(sigma * h):
        for j2 in range(sigma * w):
            i, j = i2 // sigma, j2 // sigma  # the source location l = floor(l' / sigma)
            for t in range(k * k):
                y, xx = i + t // k - r, j + t % k - r
                if not (0 <= y < h and 0 <= xx < w):
                    continue  # zeros outside the map
                weight = kernels[:, :, t, i2, j2].repeat_interleave(per_group, dim=1)  # (B, C)
                out[:, :, i2, j2] += weight * x[:, :, y, xx]
    return out, kernels.permute(0, 1, 3, 4, 2)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"scale": 3, "up_kernel": 3},
        {"groups": 2, "encoder_kernel": 5, "encoder_dilation": 2},
        {"compressed_channels": 16},
    ],
)
def test_matches_float64_reference(kwargs: dict) -> None:
    torch.manual_seed(0)
    module = randomize_(CARAFE(8, **kwargs), seed=0, scale=0.3, shift=True).eval()
    x = torch.randn(2, 8, 4, 5)
    with torch.no_grad():
        out, maps = module(x, return_attn=True)
        expected, expected_maps = reference(module, x)
    assert out.shape == (2, 8, 4 * module.scale, 5 * module.scale)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-10)


def test_paper_defaults_and_init() -> None:
    torch.manual_seed(0)
    module = CARAFE(256)
    assert module.compressor.out_channels == 64
    assert module.encoder.kernel_size == (3, 3) and module.encoder.out_channels == 2 * 2 * 25
    # encoder N(0, 0.001), zero biases: the kernels start as a near-uniform 5 x 5 average
    assert abs(module.encoder.weight.std().item() - 0.001) < 1e-4
    assert (module.encoder.bias == 0).all() and (module.compressor.bias == 0).all()
    x = torch.randn(1, 256, 6, 6)
    with torch.no_grad():
        _, maps = module(x, return_attn=True)
    torch.testing.assert_close(maps, torch.full_like(maps, 1 / 25), atol=1e-2, rtol=0)
    # about 74K parameters at C = 256, as the paper's cost table gives
    assert sum(p.numel() for p in module.parameters()) == 256 * 64 + 64 + 64 * 9 * 100 + 100


def test_kernels_sum_to_one_and_border_taps_read_zeros() -> None:
    torch.manual_seed(0)
    module = randomize_(CARAFE(4, up_kernel=5), seed=1, scale=0.3, shift=True).eval()
    with torch.no_grad():
        _, maps = module(torch.randn(1, 4, 3, 3), return_attn=True)
        # a constant map: interior outputs keep the constant, border outputs lose the weight of
        # the outside taps (the softmax spans all k^2 taps; mmcv's semantics)
        out = module(torch.ones(1, 4, 3, 3))
    torch.testing.assert_close(maps.sum(-1), torch.ones(1, 1, 6, 6))
    assert (out < 1 - 1e-6).all()  # every window of a 3 x 3 map reaches outside with k = 5
    window_larger_than_map = module(torch.randn(1, 4, 1, 1))
    assert window_larger_than_map.shape == (1, 4, 2, 2)


def test_input_is_never_unfolded() -> None:
    module = CARAFE(64).eval()
    x = torch.randn(1, 64, 12, 12)
    with OpRecorder() as rec, torch.no_grad():
        module(x)
    # the output is 4 x the input; an unfold would be 25 x, an upsampled unfold 100 x
    assert rec.largest_storage <= 4 * x.numel(), rec.largest_storage


def test_half_precision_forward_and_backward() -> None:
    """The official op had no fp16 backward (mmdetection#2834); here every dtype works."""
    module = CARAFE(8, dtype=torch.bfloat16)
    x = torch.randn(2, 8, 5, 5, dtype=torch.bfloat16, requires_grad=True)
    out = module(x)
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()
    assert module.encoder.weight.grad is not None


def test_overflowing_output_size_is_a_clear_error() -> None:
    module = CARAFE(1, 4, device="meta", dtype=torch.float32)
    huge = torch.empty(1, 1, 2**29, 2**29, device="meta", dtype=torch.float32)  # 2^60 bytes: valid
    with pytest.raises(ValueError, match=r"scale=4 .*2147483648 x 2147483648.*2\*\*63 - 1"):
        module(huge)


@pytest.mark.parametrize("name,value", [("up_kernel", 4), ("encoder_kernel", 2), ("up_kernel", 0)])
def test_even_kernels_are_refused(name: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"{name}.*odd"):
        CARAFE(8, **{name: value})


def test_constructor_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="groups"):
        CARAFE(6, groups=4)
    with pytest.raises(ValueError, match="scale"):
        CARAFE(6, scale=0)


def test_registered_as_an_upsampler() -> None:
    spec = attnzoo.get_spec("carafe")
    assert spec.family == "conv_attention" and spec.map_kind == "local"
    assert spec.placement == "head" and not spec.shape_preserving and spec.linear_memory
