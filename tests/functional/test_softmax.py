"""softmax_: the in-place softmax of quadratic buffers, against torch.softmax."""

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
