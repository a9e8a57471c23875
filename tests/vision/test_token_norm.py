"""The output norm of the residual token blocks (non_local, dnl, glore; vision/_token_norm.py):
the default is the paper's BatchNorm of the input's rank (same numerics, same state_dict keys),
norm_layer replaces it (GroupNorm, InstanceNorm2d, None) on the tokens viewed as (B, C, 1, N), the
block starts as the identity whatever the norm, and norms that reject 4-D maps are refused with a
clear error."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnzoo.testing import randomize_
from attnzoo.vision._token_norm import apply_token_norm
from attnzoo.vision.dnl import DisentangledNonLocal
from attnzoo.vision.glore import GloRe
from attnzoo.vision.non_local import NonLocalBlock

pytestmark = pytest.mark.usefixtures("float64_default")

_BN_KEYS = ["norm.weight", "norm.bias", "norm.running_mean", "norm.running_var", "norm.num_batches_tracked"]
#: the state_dict keys of the default blocks, as in earlier releases (their checkpoints load)
KEYS = {
    NonLocalBlock: [
        "theta.weight", "theta.bias", "phi.weight", "g.weight", "g.bias", "w_z.weight", *_BN_KEYS,
    ],
    DisentangledNonLocal: [
        "theta.weight", "phi.weight", "g.weight", "g.bias", "unary.weight", "w_z.weight", *_BN_KEYS,
    ],
    GloRe: [
        "state.weight", "state.bias", "projection.weight", "projection.bias", "node_conv.weight",
        "node_conv.bias", "state_conv.weight", "extend.weight", *_BN_KEYS,
    ],
}  # fmt: skip
BLOCKS = list(KEYS)
SHAPES = [(2, 16, 9), (2, 16, 4, 5), (2, 16, 2, 3, 4)]


def last_projection(module: nn.Module) -> nn.Module:
    """The layer whose output the norm normalises: W_z (non-local, DNL) or W_e (GloRe)."""
    return module.extend if isinstance(module, GloRe) else module.w_z


def perturbed(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter off its init (a zero scale would hide the norm) and non-trivial statistics."""
    return randomize_(module, seed=seed, scale=0.3, shift=True, norm_statistics=True)


def run_capturing(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The output and what the norm received, as a (B, C, *S) map."""
    captured = []
    hook = last_projection(module).register_forward_hook(lambda m, args, out: captured.append(out))
    try:
        out = module(x)
    finally:
        hook.remove()
    pre = captured[0] if isinstance(module, GloRe) else captured[0].transpose(1, 2)  # (B, C, N)
    return out, pre.unflatten(2, x.shape[2:])  # (B, C, N) -> (B, C, *S)


@pytest.mark.parametrize("shape", SHAPES, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
def test_default_is_the_papers_batchnorm_of_the_input_rank(block, shape) -> None:
    torch.manual_seed(0)
    module = perturbed(block(16))
    assert list(module.state_dict()) == KEYS[block]
    x = torch.randn(shape)
    paper_bn = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[x.dim()](16, eps=module.norm.eps)
    for training in (False, True):  # running statistics, then the batch's
        paper_bn.load_state_dict(module.norm.state_dict())
        module.train(training), paper_bn.train(training)
        out, pre = run_capturing(module, x)
        torch.testing.assert_close(out, x + paper_bn(pre), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(module.norm.running_mean, paper_bn.running_mean)


NORMS = {
    "group": functools.partial(nn.GroupNorm, 4),
    "instance": functools.partial(nn.InstanceNorm2d, affine=True),
    "none": None,
}


@pytest.mark.parametrize("norm", list(NORMS))
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
def test_norm_layer_replaces_the_output_norm(block, norm) -> None:
    torch.manual_seed(0)
    module = block(16, norm_layer=NORMS[norm]).train()
    x = torch.randn(1, 16, 3, 4, 4)  # a batch of one trains: no batch statistics needed
    assert torch.equal(module(x), x)  # the identity at init, whatever the norm
    projection = last_projection(module)
    if norm == "none":
        assert isinstance(module.norm, nn.Identity) and (projection.weight == 0).all()
        assert not any(k.startswith("norm.") for k in module.state_dict())
    else:
        assert (module.norm.weight == 0).all() and (projection.weight != 0).any()
    perturbed(module)
    out, pre = run_capturing(module, x)
    flat = pre.flatten(2)  # (B, C, *S) -> (B, C, N)
    if norm == "group":  # 4 groups of 4 channels over all positions
        expected = F.group_norm(flat, 4, module.norm.weight, module.norm.bias, module.norm.eps)
    elif norm == "instance":  # per sample and channel
        mean, var = flat.mean(-1, keepdim=True), flat.var(-1, unbiased=False, keepdim=True)
        normalised = (flat - mean) / torch.sqrt(var + module.norm.eps)
        expected = normalised * module.norm.weight[:, None] + module.norm.bias[:, None]
    else:
        expected = flat
    torch.testing.assert_close(out, x + expected.view_as(x), rtol=1e-10, atol=1e-10)
    # the norm changes the computation: the default (running statistics) on the same weights differs
    default = block(16)
    default.load_state_dict(module.state_dict(), strict=False)
    assert not torch.allclose(default.eval()(x), out)


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
def test_zero_init_without_an_affine_weight_zeroes_the_projection(block) -> None:
    module = block(16, norm_layer=functools.partial(nn.BatchNorm2d, affine=False))
    assert (last_projection(module).weight == 0).all()
    x = torch.randn(2, 16, 4, 4)
    assert torch.equal(module(x), x)


@pytest.mark.parametrize("norm_layer", [nn.BatchNorm1d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.LayerNorm])
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.__name__)
def test_map_only_norms_are_refused_with_a_clear_error(block, norm_layer) -> None:
    message = r"norm_layer: .*\(B, C, 1, N\).*nn.BatchNorm2d.*got " + norm_layer.__name__
    with pytest.raises(ValueError, match=message):
        block(16, norm_layer=norm_layer)


@pytest.mark.parametrize("training", [True, False])
def test_token_norm_gradients_are_those_of_contiguous_tokens(training):
    """The residual blocks' norm runs on the transpose of a (B, N, C) product. torch 2.13's CPU
    BatchNorm backward misreads a (B, C, N, 1) view of such tokens (strides neither contiguous
    nor channels-last) and returns wrong input, weight and bias gradients (the bias's / N);
    :func:`apply_token_norm` must give the gradients of the same norm on contiguous tokens."""
    torch.manual_seed(0)
    norm = torch.nn.BatchNorm2d(4).double().train(training)
    randomize_(norm, seed=1, norm_statistics=True)
    product = torch.randn(2, 64, 4, dtype=torch.float64, requires_grad=True)  # (B, N, C)
    direction = torch.randn(2, 4, 64, dtype=torch.float64)
    tensors = [product, norm.weight, norm.bias]
    state = {k: v.clone() for k, v in norm.state_dict().items()}
    out = apply_token_norm(norm, product.transpose(1, 2))  # (B, N, C) -> (B, C, N), a view
    got = torch.autograd.grad((out * direction).sum(), tensors)
    norm.load_state_dict(state)
    contiguous = norm(product.transpose(1, 2).contiguous().unsqueeze(-1)).squeeze(-1)
    expected = torch.autograd.grad((contiguous * direction).sum(), tensors)
    torch.testing.assert_close(out, contiguous, rtol=1e-12, atol=1e-12)
    for name, g, e in zip(("input", "weight", "bias"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")
    torch.testing.assert_close(got[2], direction.sum(dim=(0, 2)), rtol=1e-12, atol=1e-12)  # d/d bias
