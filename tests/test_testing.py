"""attnzoo.testing: the helpers the equation tests rely on do what those tests assume."""

from __future__ import annotations

import torch
from torch import nn

from attnzoo.testing import OpRecorder, randomize_


def block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.LayerNorm(6), nn.Linear(6, 2))


def test_randomize_moves_every_parameter_deterministically():
    fresh, module = block(), randomize_(block(), seed=3, scale=0.5)
    for (name, before), after in zip(fresh.named_parameters(), module.parameters(), strict=True):
        assert not torch.equal(before, after), name
    again = randomize_(block(), seed=3, scale=0.5)
    assert all(torch.equal(a, b) for a, b in zip(module.parameters(), again.parameters(), strict=True))
    other = randomize_(block(), seed=4, scale=0.5)
    assert not torch.equal(module[0].weight, other[0].weight)
    # normalisation weights stay around one (their sign kept), the rest around zero
    for norm in (module[1], module[2]):
        assert (norm.weight - 1).abs().max() < 3 * 0.5 and not torch.equal(norm.weight, torch.ones(6))
    assert module[0].bias.abs().max() > 0  # a zero-initialised bias is moved too


def test_randomize_shift_keeps_the_initialisation_and_sets_norm_statistics():
    fresh = block()
    module = randomize_(block(), scale=1e-3, shift=True, norm_statistics=True)
    torch.testing.assert_close(module[0].weight, fresh[0].weight, atol=5e-3, rtol=0)
    assert not torch.equal(module[0].weight, fresh[0].weight)
    bn = module[1]
    assert bn.running_mean.abs().max() > 0 and ((bn.running_var >= 0.5) & (bn.running_var <= 1.5)).all()
    assert not torch.equal(bn.running_var, torch.ones(6))


def test_op_recorder_sees_the_storage_behind_a_view_and_not_a_broadcast():
    big = torch.randn(64, 64)
    with OpRecorder() as rec:
        small_view = (big * 2)[:2, :2]  # a 64 x 64 buffer was formed, whatever the view's shape
    assert small_view.shape == (2, 2) and rec.largest_storage == 64 * 64
    with OpRecorder() as rec:
        torch.ones(1, 8).expand(1000, 8)  # broadcasting forms no 1000 x 8 buffer
    assert rec.largest_storage == 8
    assert rec.ran("expand") and not rec.ran("mul")
