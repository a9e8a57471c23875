"""The input checks: clear messages, transparent to torch.fx, mixed precision kept working."""

from __future__ import annotations

import inspect
import re

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


def _first_floating_parameter_dtype(module: nn.Module) -> torch.dtype | None:
    """The definition: the first floating entry of ``module.parameters()``."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def test_parameter_dtype_is_that_of_the_first_floating_parameter_in_parameters_order():
    """parameter_dtype reads the registration dicts (parameters() costs ~25 us a call); it must
    find the same parameter: the module's own first, then each child's depth first, skipping
    unset (None) parameters and parameter-free children."""
    inner = nn.Sequential(nn.ReLU(), nn.Linear(2, 2).double(), nn.Linear(2, 2).half())
    outer = nn.Sequential(nn.Identity(), nn.Linear(2, 2, bias=False).to(torch.bfloat16), inner)
    outer[1].register_parameter("bias", None)
    cases = {
        "nested": nn.Sequential(nn.ReLU(), inner),  # float64: inner's second child
        "order": outer,  # bfloat16: the first child with a parameter, before inner's
        "own first": nn.Linear(2, 2).double(),
        "none": nn.Sequential(nn.ReLU(), nn.Identity()),
    }
    own = nn.Module()
    own.child = nn.Linear(2, 2)  # float32, registered first...
    own.weight = nn.Parameter(torch.zeros(2, dtype=torch.float64))  # ...but own parameters come first
    cases["own before children"] = own
    expected = {"nested": torch.float64, "order": torch.bfloat16, "own first": torch.float64, "none": None}
    expected["own before children"] = torch.float64
    for name, module in cases.items():
        assert parameter_dtype(module) == _first_floating_parameter_dtype(module) == expected[name], name
    # every registered mechanism, with a later submodule in another dtype
    import attnzoo

    for spec_name in attnzoo.list_modules():
        spec = attnzoo.get_spec(spec_name)
        module = spec.build(spec.sizes())
        children = list(module.children())
        if children:
            children[-1].double()
        assert parameter_dtype(module) == _first_floating_parameter_dtype(module), spec_name


def test_check_pair():
    from attnzoo._checks import check_pair

    assert check_pair("mask_size", 5) == (5, 5)
    assert check_pair("mask_size", [3, 7]) == (3, 7)
    for bad in ("32", "ab", 2.5, 0, (3, 0), (1, 2, 3), (2.0, 3), None, True, (True, 2)):
        with pytest.raises(ValueError, match=r"^mask_size: expected a positive integer or a pair"):
            check_pair("mask_size", bad)


def test_check_scalar_arguments():
    """The wrapper checks the types of int and float arguments, bound as Python binds them
    (positional or keyword), lets None through where the annotation allows it, and leaves a
    missing or unknown argument to Python's own message."""
    from attnzoo._checks import check_scalar_arguments

    class Block:
        @check_scalar_arguments
        def __init__(self, channels: int, width: int | None = None, *, p: float = 0.0) -> None:
            self.args = (channels, width, p)

    assert Block(4, None, p=1).args == (4, None, 1)
    assert Block(channels=4, width=2).args == (4, 2, 0.0)
    for args, kwargs, message in [
        (("4",), {}, "channels: expected an integer, got '4'"),
        ((None,), {}, "channels: expected an integer, got None"),
        ((True,), {}, "channels: expected an integer, got True"),
        ((4, 2.5), {}, "width: expected an integer or None, got 2.5"),
        ((4,), {"p": "0.1"}, "p: expected a number, got '0.1'"),
    ]:
        with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
            Block(*args, **kwargs)
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        Block()
    assert inspect.signature(Block.__init__).parameters["channels"].annotation == "int"
