"""show_attend_tell: soft and hard attention, the doubly stochastic penalty and REINFORCE terms."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnzoo
from attnzoo.sequence.show_attend_tell import (
    MovingAverageBaseline,
    ShowAttendTellAttention,
    doubly_stochastic_penalty,
    hard_attention_loss,
)
from attnzoo.testing import randomize_

pytestmark = pytest.mark.usefixtures("float64_default")


perturbed = partial(randomize_, scale=0.5)


@torch.no_grad()
def soft_reference(module, h, a):
    """e_ti = w^T tanh(W_a a_i + W_h h_{t-1} + b); alpha = softmax_i; z = beta sum_i alpha_i a_i."""
    batch, n_q, n_loc = h.shape[0], h.shape[1], a.shape[1]
    z = torch.zeros(batch, n_q, a.shape[-1])
    alpha = torch.zeros(batch, n_q, n_loc)
    beta = torch.ones(batch, n_q, 1)
    for b in range(batch):
        for t in range(n_q):
            e = torch.stack(
                [
                    module.w @ torch.tanh(module.w_a @ a[b, i] + module.w_h @ h[b, t] + module.b)
                    for i in range(n_loc)
                ]
            )
            weights = torch.exp(e - e.max()) / torch.exp(e - e.max()).sum()
            if module.f_beta is not None:
                beta[b, t, 0] = torch.sigmoid(module.f_beta.weight[0] @ h[b, t] + module.f_beta.bias[0])
            alpha[b, t] = weights
            z[b, t] = beta[b, t, 0] * sum(weights[i] * a[b, i] for i in range(n_loc))
    return z, alpha, beta


@pytest.mark.parametrize("gate", [True, False])
def test_soft_matches_float64_loop_reference(gate):
    torch.manual_seed(0)
    module = perturbed(ShowAttendTellAttention(5, 7, 6, gate=gate))
    h, a = torch.randn(2, 3, 5), torch.randn(2, 9, 7)
    expected_z, expected_alpha, expected_beta = soft_reference(module, h, a)
    z, maps = module(h, a, return_attn=True)
    torch.testing.assert_close(z, expected_z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["alpha"], expected_alpha, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(h, a), expected_z, rtol=1e-10, atol=1e-10)
    if gate:
        torch.testing.assert_close(maps["beta"], expected_beta, rtol=1e-10, atol=1e-10)
        assert maps["beta"].shape == (2, 3, 1)  # one scalar gate per step
    else:
        assert "beta" not in maps


def test_feature_map_is_flattened_to_locations():
    module = perturbed(ShowAttendTellAttention(5, 7))
    h, fmap = torch.randn(2, 3, 5), torch.randn(2, 7, 3, 4)
    flat = fmap.flatten(2).transpose(1, 2)  # (B, D, H, W) -> (B, HW, D)
    z_map, maps = module(h, fmap, return_attn=True)
    torch.testing.assert_close(z_map, module(h, flat))
    assert maps["alpha"].shape == (2, 3, 12)
    torch.testing.assert_close(maps["alpha"].sum(-1), torch.ones(2, 3))


def test_single_step_query():
    module = perturbed(ShowAttendTellAttention(5, 7))
    h, a = torch.randn(2, 3, 5), torch.randn(2, 9, 7)
    z, maps = module(h, a, return_attn=True)
    z1, maps1 = module(h[:, 1], a, return_attn=True)
    torch.testing.assert_close(z1, z[:, 1])
    torch.testing.assert_close(maps1["alpha"], maps["alpha"][:, 1])
    assert maps1["beta"].shape == (2, 1)


def test_hard_attention_samples_one_location_per_step():
    torch.manual_seed(0)
    module = perturbed(ShowAttendTellAttention(5, 7, mode="hard")).train()
    h, a = torch.randn(3, 4, 5), torch.randn(3, 9, 7)
    use_expectation = torch.tensor([False, True, False])
    z, maps = module(h, a, use_expectation=use_expectation, return_attn=True)
    soft_z, alpha, beta = soft_reference(module, h, a)
    torch.testing.assert_close(maps["alpha"], alpha)
    location = maps["location"]
    assert location.shape == (3, 4) and location.dtype == torch.long
    for b in (0, 2):  # sampled: z_t = beta_t a_{s_t}
        torch.testing.assert_close(z[b], beta[b] * a[b, location[b]])
        torch.testing.assert_close(
            maps["log_prob"][b], alpha[b].gather(-1, location[b, :, None]).squeeze(-1).log()
        )
    torch.testing.assert_close(z[1], soft_z[1])  # the expectation, with probability 0.5
    assert torch.all(maps["log_prob"][1] == 0)
    torch.testing.assert_close(maps["entropy"], -(alpha * alpha.log()).sum(-1))


def test_hard_samples_follow_alpha():
    torch.manual_seed(0)
    module = perturbed(ShowAttendTellAttention(4, 3, mode="hard", expectation_prob=0.0)).train()
    h = torch.randn(1, 1, 4).expand(1, 20000, 4)  # one distribution, sampled 20000 times
    a = torch.randn(1, 5, 3)
    _, maps = module(h, a, return_attn=True)
    frequencies = torch.bincount(maps["location"].flatten(), minlength=5).double() / 20000
    torch.testing.assert_close(frequencies, maps["alpha"][0, 0], atol=0.015, rtol=0)


def test_hard_expectation_probability_and_eval_is_deterministic():
    torch.manual_seed(0)
    module = perturbed(ShowAttendTellAttention(4, 3, mode="hard")).train()
    h, a = torch.randn(4000, 1, 4), torch.randn(4000, 5, 3)
    _, maps = module(h, a, return_attn=True)
    expected_rows = (maps["log_prob"] == 0).double().mean()
    assert abs(expected_rows - 0.5) < 0.03
    module.eval()
    z1, z2 = module(h[:5], a[:5]), module(h[:5], a[:5])
    torch.testing.assert_close(z1, z2, rtol=0, atol=0)
    torch.testing.assert_close(z1, soft_reference(module, h[:5], a[:5])[0])


def test_hard_sampled_rows_send_no_pathwise_gradient_to_the_attention():
    module = perturbed(ShowAttendTellAttention(4, 3, mode="hard", gate=False)).train()
    h, a = torch.randn(2, 3, 4), torch.randn(2, 5, 3)
    z, maps = module(h, a, use_expectation=torch.zeros(2, dtype=torch.bool), return_attn=True)
    z.sum().backward()
    assert module.w_a.grad is None or module.w_a.grad.abs().max() == 0
    module.zero_grad()
    _, maps = module(h, a, use_expectation=torch.zeros(2, dtype=torch.bool), return_attn=True)
    maps["log_prob"].sum().backward()  # the REINFORCE path does reach it
    assert module.w_a.grad.abs().sum() > 0


# -------------------------------------------------------------------------------- penalties


@torch.no_grad()
def penalty_reference(alpha, weight, mask=None):
    batch, steps, locations = alpha.shape
    total = torch.zeros(batch)
    for b in range(batch):
        for i in range(locations):
            received = sum(alpha[b, t, i] for t in range(steps) if mask is None or mask[b, t])
            total[b] += (1 - received) ** 2
    return weight * total


def test_doubly_stochastic_penalty_sums_over_time_per_location():
    alpha = torch.softmax(torch.randn(3, 5, 4), -1)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False], [True] + [False] * 4])
    expected = penalty_reference(alpha, 0.7, mask)
    torch.testing.assert_close(doubly_stochastic_penalty(alpha, 0.7, mask=mask, reduction="none"), expected)
    torch.testing.assert_close(doubly_stochastic_penalty(alpha, 0.7, mask=mask), expected.mean())
    torch.testing.assert_close(
        doubly_stochastic_penalty(alpha, 0.7, mask=mask, reduction="sum"), expected.sum()
    )
    # T = L steps spreading attention evenly: every location gets 1 in total, no penalty
    assert doubly_stochastic_penalty(torch.full((1, 4, 4), 0.25)).item() == pytest.approx(0.0)
    # all attention on one location: (1 - T)^2 + (L - 1); a sum over locations would give 0
    focused = torch.zeros(1, 4, 4)
    focused[..., 0] = 1
    assert doubly_stochastic_penalty(focused).item() == pytest.approx(9 + 3)


def test_doubly_stochastic_official_variant():
    alpha = torch.softmax(torch.randn(3, 5, 4), -1)
    # arctic-captions: alpha_c * ((1 - alphas.sum(time)) ** 2).sum(batch).mean(locations)
    expected = 0.5 * ((1 - alpha.sum(1)) ** 2).sum(0).mean()
    torch.testing.assert_close(doubly_stochastic_penalty(alpha, 0.5, variant="official"), expected)
    assert not torch.allclose(doubly_stochastic_penalty(alpha, 0.5), expected)


def test_moving_average_baseline():
    baseline = MovingAverageBaseline()
    assert baseline.value.item() == 0  # as the official code
    baseline.update(torch.tensor([-10.0, -20.0]))
    assert baseline.value.item() == pytest.approx(0.1 * -15)
    baseline.update(torch.tensor([-5.0]))
    assert baseline.value.item() == pytest.approx(0.9 * -1.5 + 0.1 * -5)
    assert "value" in baseline.state_dict()


def test_hard_attention_loss_gradient_is_the_learning_rule():
    """-d(loss) = 1/N sum [d log p(y) + lambda_r (log p(y) - b) d log p(s) + lambda_e d H]."""
    log_likelihood = torch.tensor([-3.0, -1.0], requires_grad=True)
    log_prob = torch.tensor([[-0.5, -1.0, -2.0], [-0.2, -0.1, -0.3]], requires_grad=True)
    entropy = torch.tensor([[1.0, 0.5, 0.2], [0.3, 0.3, 0.3]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    loss = hard_attention_loss(log_likelihood, log_prob, entropy, -2.0, lambda_r=0.3, lambda_e=0.1, mask=mask)
    loss.backward()
    advantage = torch.tensor([-3.0 + 2.0, -1.0 + 2.0])
    torch.testing.assert_close(log_likelihood.grad, torch.full((2,), -0.5))  # no gradient via the advantage
    torch.testing.assert_close(log_prob.grad, -0.3 * advantage[:, None] * mask / 2)
    torch.testing.assert_close(entropy.grad, -0.1 * mask.double() / 2)


def test_registered_defaults():
    module = attnzoo.get_spec("show_attend_tell").build()
    assert module.mode == "soft" and module.f_beta is not None and module.expectation_prob == 0.5
    assert module.attn_dim == module.feature_dim  # the official MLP width


def test_bad_inputs():
    with pytest.raises(ValueError, match="mode"):
        ShowAttendTellAttention(4, mode="stochastic")
    with pytest.raises(ValueError, match="expectation_prob"):
        ShowAttendTellAttention(4, expectation_prob=2)
    hard = ShowAttendTellAttention(4, 3, mode="hard").train()
    with pytest.raises(ValueError, match="use_expectation"):
        hard(torch.randn(2, 3, 4), torch.randn(2, 5, 3), use_expectation=torch.ones(2))
    with pytest.raises(ValueError, match="reduction"):
        doubly_stochastic_penalty(torch.rand(2, 3, 4), reduction="avg")
    with pytest.raises(ValueError, match="expected"):
        doubly_stochastic_penalty(torch.rand(2, 3))
    with pytest.raises(ValueError, match="momentum"):
        MovingAverageBaseline(1.5)
