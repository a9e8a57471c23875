"""cgnl: the generalized non-local operation in float64 with the explicit (C/G N)^2 kernel matrix
per group (dot and Gaussian-Taylor kernels), the official coefficient, init and memory."""

from __future__ import annotations

import math

import pytest
import torch

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.cgnl import CompactGeneralizedNonLocal

pytestmark = pytest.mark.usefixtures("float64_default")


def kernel_matrix(t, p, kind, gamma, order, official):
    """The M x M matrix f(t_i, p_j) of the paper, entry by entry."""
    m = t.numel()
    out = torch.empty(m, m)
    for i in range(m):
        for j in range(m):
            if kind == "dot":
                out[i, j] = t[i] * p[j]
            elif kind == "exact":
                out[i, j] = torch.exp(-gamma * (t[i] - p[j]) ** 2)
            else:
                series = sum(
                    (2 * gamma) ** k / math.factorial(k) * t[i] ** k * p[j] ** k for k in range(order + 1)
                )
                beta = math.exp(-2 * gamma) if official else torch.exp(-gamma * (t[i] ** 2 + p[j] ** 2))
                out[i, j] = beta * series
    return out


def cgnl_reference(m: CompactGeneralizedNonLocal, x, kind, use_scale=False, official=False):
    """vec(Y_g) = K_g vec(g_g) per group (K from kernel_matrix), Z = X + GN(W_z Y)."""
    batch, channels = x.shape[:2]
    cols = x.reshape(batch, channels, -1)
    theta = torch.einsum("oc,bcn->bon", m.theta.weight[..., 0], cols)
    phi = torch.einsum("oc,bcn->bon", m.phi.weight[..., 0], cols)
    g = torch.einsum("oc,bcn->bon", m.g.weight[..., 0], cols)
    per = m.inner_channels // m.groups
    y = torch.empty_like(theta)
    for b in range(batch):
        for grp in range(m.groups):
            rows = slice(grp * per, (grp + 1) * per)
            t, p, v = theta[b, rows].flatten(), phi[b, rows].flatten(), g[b, rows].flatten()
            k = kernel_matrix(t, p, kind, m.gamma, m.order, official)
            if use_scale:
                k = k / math.sqrt(t.numel())
            y[b, rows] = (k @ v).view(per, -1)
    z = torch.nn.functional.conv1d(y, m.out_proj.weight, groups=m.groups)
    z = torch.nn.functional.group_norm(z, m.groups, m.norm.weight, m.norm.bias, m.norm.eps)
    return (cols + z).view_as(x)


@pytest.mark.parametrize(
    ("kernel", "variant", "use_scale"),
    [
        ("dot", "paper", False),
        ("dot", "paper", True),
        ("gaussian", "paper", False),
        ("gaussian", "official", False),
    ],
)
def test_matches_paper(kernel, variant, use_scale):
    torch.manual_seed(0)
    module = randomize_(
        CompactGeneralizedNonLocal(
            8, groups=2, kernel=kernel, variant=variant, use_scale=use_scale, gamma=0.05
        )
    )
    x = torch.randn(2, 8, 3, 4)
    kind = "dot" if kernel == "dot" else "taylor"
    expected = cgnl_reference(module, x, kind, use_scale=use_scale, official=variant == "official")
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)


def test_taylor_order_3_approximates_the_gaussian_kernel():
    # the paper's expansion (with the exact coefficient) converges to exp(-gamma (t - p)^2)
    torch.manual_seed(1)
    module = randomize_(CompactGeneralizedNonLocal(8, groups=2, kernel="gaussian"))
    x = torch.randn(1, 8, 3, 3)
    taylor = cgnl_reference(module, x, "taylor")
    exact = cgnl_reference(module, x, "exact")
    torch.testing.assert_close(module(x), exact, rtol=1e-9, atol=1e-9)  # gamma = 1e-4: tiny remainder
    assert not torch.equal(taylor, exact)


def test_official_coefficient_differs_from_the_paper():
    torch.manual_seed(2)
    paper = randomize_(CompactGeneralizedNonLocal(16, groups=2, kernel="gaussian", gamma=0.1))
    official = CompactGeneralizedNonLocal(16, groups=2, kernel="gaussian", gamma=0.1, variant="official")
    official.load_state_dict(paper.state_dict())
    x = torch.randn(2, 16, 4, 4) * 2
    assert (paper(x) - official(x)).abs().max() > 1e-3


def test_official_defaults_and_identity_at_init():
    module = CompactGeneralizedNonLocal(64)
    assert module.groups == 8 and module.inner_channels == 32 and module.order == 3 and module.gamma == 1e-4
    assert module.out_proj.groups == 8 and module.norm.num_groups == 8
    assert module.theta.bias is None and module.out_proj.bias is None
    assert (module.norm.weight == 0).all() and (module.norm.bias == 0).all()
    assert module.theta.weight.std() < 0.02  # N(0, 0.01)
    x = torch.randn(2, 64, 5, 5)
    assert torch.equal(module(x), x)


def test_dot_kernel_is_one_scalar_per_group():
    # scaling phi*g of one group rescales only that group's output
    torch.manual_seed(3)
    module = randomize_(CompactGeneralizedNonLocal(16, groups=2))
    with torch.no_grad():
        module.norm.weight.fill_(1.0)
        module.norm.bias.zero_()
    flat = torch.randn(1, 16, 12)
    y = module.theta(flat)
    from attnzoo.functional.global_reasoning import compact_generalized_attention

    out = compact_generalized_attention(y, module.phi(flat), module.g(flat), 2)
    ratio = out / y
    assert torch.allclose(ratio[:, :4], ratio[:, :1, :1].expand(1, 4, 12))
    assert not torch.allclose(ratio[:, :1, :1], ratio[:, 4:5, :1])


def test_memory_linear_in_positions():
    module = CompactGeneralizedNonLocal(32, kernel="gaussian").float()
    x = torch.randn(1, 32, 32, 32, dtype=torch.float32)
    with torch.no_grad(), OpRecorder() as rec:
        module(x)
    # the largest buffer is the stack of (order + 1) powers of theta: 4 x (16 x 1024)
    assert rec.largest_storage <= 4 * 16 * 32 * 32


def test_errors():
    with pytest.raises(ValueError, match="groups"):
        CompactGeneralizedNonLocal(24, groups=8)  # inner 12 is not divisible by 8
    with pytest.raises(ValueError, match="kernel"):
        CompactGeneralizedNonLocal(16, kernel="rbf")
    with pytest.raises(ValueError, match="variant"):
        CompactGeneralizedNonLocal(16, variant="official")  # only for the Gaussian kernel
    spec = attnzoo.get_spec("cgnl")
    assert spec.family == "non_local" and spec.placement == "stage" and not spec.returns_attn
