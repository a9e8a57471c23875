"""call_layer: the function on a layer's parameters equals the module call, and anything that
could make them differ (hooks, a patched forward, a subclass, fx tracing) runs the module."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attnzoo.layers import call_layer, linear_parameters, plain_layer

LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), (3, 6)),
    "linear_no_bias": (lambda: nn.Linear(6, 5, bias=False), (2, 4, 6)),
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 9)),
    "conv2d_grouped_dilated": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), (2, 4, 7, 7)),
    "conv2d_same": (lambda: nn.Conv2d(4, 4, 3, padding="same", bias=False), (1, 4, 5, 6)),
    "conv2d_reflect": (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (1, 4, 5, 5)),
    "conv3d": (lambda: nn.Conv3d(2, 3, 1), (1, 2, 3, 4, 5)),
    "batch_norm1d_3d_input": (lambda: nn.BatchNorm1d(4, eps=1e-3).eval(), (2, 4, 5)),
    "batch_norm2d": (lambda: nn.BatchNorm2d(4).eval(), (2, 4, 3, 3)),
    "batch_norm2d_no_affine": (lambda: nn.BatchNorm2d(4, affine=False).eval(), (2, 4, 3, 3)),
    "batch_norm2d_training": (lambda: nn.BatchNorm2d(4), (2, 4, 3, 3)),  # the module: batch statistics
    "batch_norm2d_no_running_stats": (
        lambda: nn.BatchNorm2d(4, track_running_stats=False).eval(),
        (2, 4, 3, 3),
    ),
    "batch_norm3d": (lambda: nn.BatchNorm3d(2).eval(), (1, 2, 2, 3, 3)),
    "layer_norm": (lambda: nn.LayerNorm([4, 1, 1], eps=1e-3), (2, 4, 1, 1)),
    "layer_norm_no_affine": (lambda: nn.LayerNorm(6, elementwise_affine=False), (3, 6)),
    "relu": (lambda: nn.ReLU(), (3, 6)),
    "relu_inplace": (lambda: nn.ReLU(inplace=True), (3, 6)),
    "sigmoid": (lambda: nn.Sigmoid(), (3, 6)),
    "identity": (lambda: nn.Identity(), (3, 6)),
    "gelu": (lambda: nn.GELU(), (3, 6)),  # not in the table: the module call
}


@pytest.mark.parametrize("name", LAYERS)
def test_the_call_equals_the_module_call(name: str) -> None:
    torch.manual_seed(0)
    make, shape = LAYERS[name]
    layer = make()
    with torch.no_grad():
        for t in (*layer.parameters(), *(b for b in layer.buffers() if b.is_floating_point())):
            t.uniform_(0.5, 1.5)  # off the identity init of the norms (variances stay positive)
    x = torch.randn(shape)
    twin = copy.deepcopy(layer)  # a training BatchNorm updates its statistics: one copy each
    expected = twin(x.clone())
    torch.testing.assert_close(call_layer(layer, x.clone()), expected, rtol=0, atol=0)
    for mine, theirs in zip(layer.buffers(), twin.buffers()):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def test_a_batch_norm_of_the_wrong_rank_raises_its_own_error() -> None:
    with pytest.raises(ValueError, match="expected 4D input"):
        call_layer(nn.BatchNorm2d(4).eval(), torch.randn(2, 4, 3))


def test_hooks_a_patched_forward_and_subclasses_run_the_module() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 6)
    hooked, calls = nn.Linear(6, 6), []
    hooked.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    hooked.register_forward_hook(lambda module, args, out: 2 * out)
    torch.testing.assert_close(call_layer(hooked, x), 2 * nn.functional.linear(x, hooked.weight, hooked.bias))
    assert calls == ["pre"]
    patched = nn.Sigmoid()
    patched.forward = lambda x: x + 1
    torch.testing.assert_close(call_layer(patched, x), x + 1)

    class Negated(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return -super().forward(x)

    torch.testing.assert_close(call_layer(Negated(), x), -torch.relu(x))


def test_fx_keeps_the_module_call() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(6, 6), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return call_layer(self.act, call_layer(self.fc, x))

    block, x = Block(), torch.randn(3, 6)
    traced = torch.fx.symbolic_trace(block)
    assert [str(n.target) for n in traced.graph.nodes if n.op == "call_module"] == ["fc", "act"]
    torch.testing.assert_close(traced(x), block(x))


def test_linear_parameters_only_for_plain_linears_of_one_bias_kind() -> None:
    a, b = nn.Linear(4, 4), nn.Linear(4, 2)
    weights, biases = linear_parameters((a, b))
    assert weights[0] is a.weight and weights[1] is b.weight and biases[1] is b.bias
    assert linear_parameters((a, nn.Linear(4, 4, bias=False))) is None  # mixed: no stacked bias
    no_bias = nn.Linear(4, 4, bias=False)
    assert linear_parameters((no_bias, no_bias)) == ([no_bias.weight, no_bias.weight], [None, None])
    a.register_forward_hook(lambda *args: None)
    assert linear_parameters((a, b)) is None
    assert linear_parameters((nn.Identity(), b)) is None


def test_plain_layer_is_the_class_itself_without_hooks() -> None:
    conv = nn.Conv2d(2, 2, 1)
    assert plain_layer(conv, nn.Conv2d) and not plain_layer(conv, nn.Conv1d)
    assert not plain_layer(type("MyConv", (nn.Conv2d,), {})(2, 2, 1), nn.Conv2d)  # a subclass
    handle = conv.register_forward_pre_hook(lambda *args: None)
    assert not plain_layer(conv, nn.Conv2d)
    handle.remove()
    conv.forward = lambda x: x
    assert not plain_layer(conv, nn.Conv2d)
