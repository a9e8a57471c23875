"""The shared softmax helpers: softmax_ (in place, against torch.softmax), masked_softmax's masks, mean_of."""

from __future__ import annotations

import pytest
import torch

from attnzoo.functional.softmax import softmax_


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_matches_softmax_in_the_same_storage(dim):
    torch.manual_seed(0)
    logits = 30 * torch.randn(4, 5, 6, dtype=torch.float64)
    expected = logits.softmax(dim)
    out = softmax_(logits, dim)
    assert out.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-15)


def test_half_precision_large_logits_and_nan():
    logits = torch.tensor([[1e4, 1e4 - 1.0, -1e4], [float("nan"), 0.0, 1.0]], dtype=torch.bfloat16)
    expected = logits[0].float().softmax(-1)
    out = softmax_(logits.clone())
    torch.testing.assert_close(out[0].float(), expected, atol=1e-2, rtol=1e-2)  # shifted: no overflow
    assert out[1].isnan().all()  # a NaN reaches its row, and only its row
    assert torch.isfinite(out[0]).all()


def test_refuses_autograd():
    with pytest.raises(RuntimeError, match="without autograd"):
        softmax_(torch.zeros(2, 3, requires_grad=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim,keepdim", [(-1, False), ((2, 3), True), (1, True)])
def test_mean_of_matches_float64_and_makes_no_float32_copy(dtype, dim, keepdim):
    """mean_of is the mean to its dtype's rounding; for bfloat16 without the float32 copy of the
    input that torch's mean makes (the pooling of SE and CBAM ran 4-10x slower with it)."""
    from attnzoo.functional import mean_of
    from attnzoo.testing import OpRecorder

    generator = torch.Generator().manual_seed(0)
    x64 = 3 + torch.randn(2, 8, 12, 10, generator=generator, dtype=torch.float64)
    x = x64.to(dtype)
    with OpRecorder() as recorder:
        got = mean_of(x, dim, keepdim=keepdim)
    expected = x.double().mean(dim=dim, keepdim=keepdim)
    assert got.dtype == dtype and got.shape == expected.shape
    tol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=0)
    if dtype == torch.bfloat16:
        # torch's bfloat16 mean kernel makes the float32 copy inside (no op a recorder sees)
        assert not recorder.ran("aten.mean"), recorder.names()


@pytest.mark.parametrize("logits_dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("mask_dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_masked_softmax_adds_a_mask_of_any_float_dtype_without_widening(logits_dtype, mask_dtype):
    """A float64 mask does not turn float32 weights into float64 (the weights' dtype is the
    logits' rule alone), and every precision of the same 0 / -inf mask gives the same weights."""
    from attnzoo.functional.softmax import additive_mask_for, masked_softmax

    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(logits_dtype)
    mask = torch.zeros(3, 5).masked_fill(torch.arange(5) >= torch.tensor([[5], [2], [0]]), float("-inf"))
    weights = masked_softmax(logits, mask.to(mask_dtype))
    assert weights.dtype == (torch.float64 if logits_dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(weights, masked_softmax(logits, mask.to(logits_dtype)), rtol=0, atol=0)
    assert torch.equal(weights[2], torch.zeros(5, dtype=weights.dtype))  # fully masked: zeros
    kept = additive_mask_for(mask.to(mask_dtype), logits_dtype)
    assert kept.dtype in (logits_dtype, torch.float32)  # the fused kernels take no other float mask
