"""The input checks: clear messages, transparent to torch.fx, mixed precision kept working."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

from attnzoo._checks import check_device, check_dtypes, check_input, check_mask, parameter_dtype


class Checked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        check_input(x, "x", "B N C", C=4, dtype=parameter_dtype(self))
        check_mask(mask, "mask", (x.shape[0], x.shape[1]), device=x.device)
        return self.proj(x) * mask.unsqueeze(-1)


def test_checks_are_transparent_to_fx_tracing():
    """Bug: the checks raised on a Proxy (not a tensor), so no model holding them could be traced."""
    module = Checked()
    traced = fx.symbolic_trace(module)
    x, mask = torch.randn(2, 3, 4), torch.ones(2, 3)
    torch.testing.assert_close(traced(x, mask), module(x, mask))


def test_dtype_errors_name_the_argument_and_both_dtypes():
    module = Checked()
    mask = torch.ones(2, 3)
    expected = r"x: expected torch.float32 \(the dtype of the module's parameters\), got torch.float64"
    with pytest.raises(TypeError, match=expected):
        module(torch.randn(2, 3, 4, dtype=torch.float64), mask)
    a, b = torch.randn(2), torch.randn(2, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"key: expected torch.float32 \(the dtype of query\), got"):
        check_dtypes(module, query=a, key=b)


def test_autocast_inputs_may_differ_from_the_parameters():
    module = Checked()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(torch.randn(2, 3, 4).bfloat16(), torch.ones(2, 3))  # no dtype error
    assert torch.isfinite(out).all()


def test_device_errors_name_the_argument_and_both_devices():
    with pytest.raises(ValueError, match="mask: expected a tensor on cpu .* got one on meta"):
        check_mask(torch.ones(2, 3, device="meta"), "mask", (2, 3), device=torch.device("cpu"))
    with pytest.raises(ValueError, match="edge_index: .* meta"):
        check_device(torch.ones(2, device="meta"), "edge_index", torch.device("cpu"))
    check_device(torch.ones(2), "edge_index", None)  # None skips
