"""capture() records maps without changing outputs; attach() inserts mechanisms into a user model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnzoo
from attnzoo.inspect import Attached, attach, capture, residual_branch_ends, symbolic_trace


class Block(nn.Module):
    """A user's residual block: conv-bn-relu-conv-bn plus a projection shortcut (which also ends in
    a BatchNorm that must NOT get the attention)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return F.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.layer1 = Block(8, 8)
        self.layer2 = Block(8, 16, stride=2)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(x.mean(dim=(2, 3)))


class WithMha(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = attnzoo.create("mha", 16, 4)
        self.proj = nn.Linear(16, 2)

    def forward(self, x):
        return self.proj(self.attn(x, causal=True))


def test_residual_branch_ends_skip_the_shortcut():
    assert residual_branch_ends(TinyResNet()) == ["layer1.bn2", "layer2.bn2"]


def test_attach_cbam_infers_channels_and_trains():
    torch.manual_seed(0)
    model = attach(TinyResNet(), "cbam")
    assert isinstance(model.layer1.bn2, Attached) and isinstance(model.layer2.bn2, Attached)
    assert model.layer2.bn2.attention.channel.channels == 16
    assert not isinstance(model.layer2.shortcut[1], Attached)
    # the result trains: the loss on a fixed batch falls
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 3, (16,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.layer1.bn2.attention.channel.fc1.weight.grad is not None


def test_attach_by_names_and_predicate():
    model = attach(TinyResNet(), "se", where=["layer2.conv1"])
    assert isinstance(model.layer2.conv1, Attached) and model.layer2.conv1.attention.channels == 16
    model = attach(
        TinyResNet(),
        "eca" if "eca" in attnzoo.list_modules() else "se",
        where=lambda name, m: isinstance(m, nn.BatchNorm2d) and name.startswith("stem"),
    )
    assert isinstance(model.stem[1], Attached)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_attach_to_attnzoo_resnet_and_twice():
    """Bug: the input checks raised on an fx Proxy, so attnzoo's own ResNet (which checks its
    input) could not be traced, nor a model that already held a mechanism."""
    torch.manual_seed(0)
    model = attach(attnzoo.models.resnet(20, num_classes=10), "cbam")
    ends = [name for name, m in model.named_modules() if isinstance(m, Attached)]
    assert len(ends) == 9  # three stages of three basic blocks
    attach(model, "se")  # again: the CBAMs already inside are traced as single calls
    twice = [m for m in model.modules() if isinstance(m, Attached) and isinstance(m.module, Attached)]
    assert len(twice) == 9
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_symbolic_trace_keeps_mechanisms_as_single_calls():
    model = WithMha().eval()
    traced = symbolic_trace(model)
    calls = [node.target for node in traced.graph.nodes if node.op == "call_module"]
    assert calls == ["attn", "proj"]
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(traced(x), model(x))


def test_attach_errors():
    with pytest.raises(ValueError, match="no module named"):
        attach(TinyResNet(), "se", where=["layer9"])
    with pytest.raises(ValueError, match="cannot infer the channel count of ReLU"):
        attach(TinyResNet(), "se", where=["stem.2"])

    class Untraceable(TinyResNet):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing
                return super().forward(x)
            return super().forward(-x)

    with pytest.raises(ValueError, match="cannot trace Untraceable"):
        attach(Untraceable(), "se")


def test_capture_records_maps_without_changing_outputs():
    torch.manual_seed(1)
    model = attach(TinyResNet(), "cbam").eval()
    x = torch.randn(2, 1, 8, 8)
    expected = model(x)
    with capture(model) as maps:
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert set(maps) == {"layer1.bn2.attention", "layer2.bn2.attention"}
    assert maps["layer2.bn2.attention"]["spatial"].shape == (2, 1, 4, 4)
    # outside the context: no hooks, nothing recorded
    model(x)
    assert len(maps.calls["layer1.bn2.attention"]) == 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_capture_keeps_every_call_and_respects_callers_return_attn():
    model = WithMha()
    x = torch.randn(2, 5, 16)
    with capture(model) as maps:
        model(x)
        model(x[:, :3])
        _out, attn = model.attn(x, return_attn=True)  # the caller asked: the maps stay in the output
    assert [m.shape for m in maps.calls["attn"]] == [(2, 5, 5), (2, 3, 3), (2, 5, 5)]
    torch.testing.assert_close(attn, maps["attn"])
    assert torch.all(maps.calls["attn"][0].triu(1) == 0)  # causal maps


def test_capture_without_detach_keeps_the_graph():
    model = WithMha()
    x = torch.randn(1, 4, 16)
    with capture(model, detach=False) as maps:
        model(x)
    maps["attn"].sum().backward()
    assert model.attn.q_proj.weight.grad is not None
