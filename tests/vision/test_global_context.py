"""gc: the paper's equation in float64 (attention pooling, add fusion, zero init) and the official options."""

from __future__ import annotations

from functools import partial

import pytest
import torch

import attnzoo
from attnzoo.testing import randomize_
from attnzoo.vision.global_context import GlobalContext

F64 = torch.float64


randomise = partial(randomize_, scale=0.5)


def layer_norm(v, weight, bias, eps):
    mean = v.mean(-1, keepdim=True)
    var = ((v - mean) ** 2).mean(-1, keepdim=True)
    return (v - mean) / torch.sqrt(var + eps) * weight + bias


def gc_reference(m: GlobalContext, x):
    """z_i = x_i + W_v2 relu(LN(W_v1 sum_j alpha_j x_j)), alpha_j = softmax_j(W_k x_j), loop over j."""
    batch, channels, h, w = x.shape
    wk = m.key.weight.flatten()
    alpha = torch.zeros(batch, h * w, dtype=x.dtype)
    context = torch.zeros(batch, channels, dtype=x.dtype)
    for b in range(batch):
        logits = torch.stack([wk @ x[b, :, j // w, j % w] for j in range(h * w)])
        e = torch.exp(logits - logits.max())
        alpha[b] = e / e.sum()
        for j in range(h * w):
            context[b] += alpha[b, j] * x[b, :, j // w, j % w]
    hidden = context @ m.fc1.weight.T + m.fc1.bias
    hidden = torch.relu(layer_norm(hidden, m.norm.weight, m.norm.bias, m.norm.eps))
    term = hidden @ m.fc2.weight.T + m.fc2.bias
    return x + term[:, :, None, None], alpha.view(batch, 1, h, w), term


def test_matches_equation():
    torch.manual_seed(0)
    module = GlobalContext(48, dtype=F64)
    randomise(module)
    x = torch.randn(2, 48, 5, 6, dtype=F64)
    expected, alpha, term = gc_reference(module, x)
    out, maps = module(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["position"], alpha, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["channel"], term[:, :, None, None], rtol=1e-10, atol=1e-10)


def test_softmax_is_over_positions_and_sums_to_one():
    torch.manual_seed(1)
    module = GlobalContext(32, dtype=F64)
    randomise(module)
    x = torch.randn(3, 32, 7, 4, dtype=F64)
    position = module(x, return_attn=True)[1]["position"]
    assert position.shape == (3, 1, 7, 4)
    assert (position >= 0).all()
    torch.testing.assert_close(position.sum(dim=(2, 3)), torch.ones(3, 1, dtype=F64))


def test_starts_as_identity_with_zero_last_layer():
    module = GlobalContext(64)
    assert (module.fc2.weight == 0).all() and (module.fc2.bias == 0).all()
    x = torch.randn(2, 64, 5, 5)
    assert torch.equal(module(x), x)
    # ... but W_v1 and W_k are not zero, so the gradient reaches W_v2 at once
    module(x).mul(torch.randn_like(x)).sum().backward()
    assert module.fc2.weight.grad.abs().sum() > 0


def test_bottleneck_ratio_and_no_key_bias():
    module = GlobalContext(256)
    assert module.fc1.out_features == 16 and module.norm.normalized_shape == (16,)
    # a bias on W_k cancels in the softmax (the official code has one that never learns)
    assert module.key.bias is None


def test_layer_norm_never_sees_a_single_unit():
    # LN over one unit outputs its bias whatever the input: the context would be cut off
    module = GlobalContext(16)
    assert module.rd_channels == 2
    randomise(module)
    x = torch.randn(2, 16, 4, 4)
    module(x).mul(torch.randn_like(x)).sum().backward()
    assert module.fc1.weight.grad.abs().sum() > 0 and module.key.weight.grad.abs().sum() > 0
    assert GlobalContext(16, rd_channels=1).rd_channels == 1  # explicit widths are kept


def test_scale_fusion_is_sigmoid_gate():
    torch.manual_seed(2)
    module = GlobalContext(32, fusion="scale", dtype=F64)
    x = torch.randn(2, 32, 4, 4, dtype=F64)
    torch.testing.assert_close(module(x), 0.5 * x)  # sigmoid(0) with the zero last layer
    randomise(module, seed=3)
    _, _, term = gc_reference(module, x)
    out, maps = module(x, return_attn=True)
    torch.testing.assert_close(out, x * torch.sigmoid(term)[:, :, None, None], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["channel"], torch.sigmoid(term)[:, :, None, None])


def test_avg_pooling_is_global_average():
    torch.manual_seed(4)
    module = GlobalContext(32, pooling="avg", dtype=F64)
    randomise(module)
    assert module.key is None
    x = torch.randn(2, 32, 3, 5, dtype=F64)
    out, maps = module(x, return_attn=True)
    torch.testing.assert_close(maps["position"], torch.full((2, 1, 3, 5), 1 / 15, dtype=F64))
    hidden = torch.relu(module.norm(x.mean(dim=(2, 3)) @ module.fc1.weight.T + module.fc1.bias))
    expected = x + (hidden @ module.fc2.weight.T + module.fc2.bias)[:, :, None, None]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_registered_and_errors():
    assert isinstance(attnzoo.create("gc", 16), GlobalContext)
    with pytest.raises(ValueError, match="pooling"):
        GlobalContext(16, pooling="max")
    with pytest.raises(ValueError, match="fusion"):
        GlobalContext(16, fusion="mul")


def test_scale_add_fusion_has_two_transforms_and_matches_equation():
    """Official fusion_types=('channel_mul', 'channel_add'): z = x * sigmoid(T_mul(c)) + T_add(c)."""
    torch.manual_seed(4)
    module = GlobalContext(32, fusion="scale_add", dtype=F64)
    x = torch.randn(2, 32, 4, 5, dtype=F64)
    torch.testing.assert_close(module(x), 0.5 * x)  # both last layers zero: sigmoid(0) x + 0
    randomise(module, seed=5)
    _, alpha, add_term = gc_reference(module, x)  # fc1 / norm / fc2: the added transform
    # the scale's own transform, by hand from the reference context
    context = torch.einsum("bchw,bhw->bc", x, alpha[:, 0])
    hidden = context @ module.scale_fc1.weight.T + module.scale_fc1.bias
    hidden = torch.relu(layer_norm(hidden, module.scale_norm.weight, module.scale_norm.bias, 1e-5))
    gate = torch.sigmoid(hidden @ module.scale_fc2.weight.T + module.scale_fc2.bias)
    out, maps = module(x, return_attn=True)
    expected = x * gate[:, :, None, None] + add_term[:, :, None, None]
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["gate"], gate[:, :, None, None], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps["channel"], add_term[:, :, None, None], rtol=1e-10, atol=1e-10)
    assert module.scale_fc1.weight.data_ptr() != module.fc1.weight.data_ptr()
    with pytest.raises(ValueError, match="fusion"):
        GlobalContext(32, fusion="mul")


def test_layer_norm_eps_reaches_the_normalisation():
    module = GlobalContext(32, layer_norm_eps=1e-6, dtype=F64)
    assert module.norm.eps == 1e-6
    randomise(module, seed=6)
    x = torch.randn(2, 32, 3, 3, dtype=F64) * 1e-3  # tiny context: the epsilon dominates the variance
    expected, _, _ = gc_reference(module, x)  # the reference reads eps from the module's LayerNorm
    torch.testing.assert_close(module(x), expected, rtol=1e-10, atol=1e-10)
    other = GlobalContext(32, dtype=F64)
    other.load_state_dict(module.state_dict())
    assert not torch.allclose(other(x), module(x), rtol=0, atol=1e-12)  # 1e-5 gives another output
    with pytest.raises(ValueError, match="layer_norm_eps"):
        GlobalContext(32, layer_norm_eps=0.0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_hand_written_pooling_backward_matches_autograd(layout, monkeypatch):
    """Eager training runs the pooling's own backward: gradients to x and W_k, through the output
    and through the returned weights, equal autograd's on the plain operators (gradcheck too)."""
    from attnzoo.vision.global_context import _attention_pool, _AttentionPool

    torch.manual_seed(3)
    x = torch.randn(2, 6, 3, 5, dtype=F64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    key = torch.randn(1, 6, dtype=F64)
    x.requires_grad_(), key.requires_grad_()
    torch.autograd.gradcheck(lambda a, b: _AttentionPool.apply(a, b), (x, key))
    g_context, g_weights = torch.randn(2, 6, dtype=F64), torch.randn(2, 15, dtype=F64)
    expected = torch.autograd.grad(_attention_pool(x, key), (x, key), (g_context, g_weights))
    got = torch.autograd.grad(_AttentionPool.apply(x, key), (x, key), (g_context, g_weights))
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)
    # and the module takes that path in training, with the same gradients as the plain operators
    module = GlobalContext(6, dtype=F64)
    randomise(module)
    calls = []

    def plain(a, b):
        calls.append(1)
        return _attention_pool(a, b)

    grads = torch.autograd.grad(module(x).square().sum(), (x, module.key.weight))
    monkeypatch.setattr(_AttentionPool, "apply", plain)
    expected = torch.autograd.grad(module(x).square().sum(), (x, module.key.weight))
    assert calls  # the patched path ran: the first call went through the hand-written backward
    for e, g in zip(expected, grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inference_pools_without_casts_and_the_same_context(dtype):
    """Without maps, alpha stays in x's dtype (the softmax kernel accumulates in float32 anyway):
    no cast operators, and the output of the float32-alpha path that returns the maps."""
    from attnzoo.testing import OpRecorder

    torch.manual_seed(0)
    gc = GlobalContext(16).eval()
    randomize_(gc)
    gc = gc.to(dtype)
    x = torch.randn(2, 16, 9, 9).to(dtype)
    with torch.no_grad(), OpRecorder() as recorder:
        plain = gc(x)
    assert not [name for name in recorder.names() if "_to_copy" in name]
    with torch.no_grad():
        out, maps = gc(x, return_attn=True)
    assert maps["position"].dtype == torch.float32
    torch.testing.assert_close(plain, out, rtol=0, atol=0)


def test_training_allocates_no_gradient_for_the_unused_pooling_weights():
    """The hand-written pooling backward gets None for alpha when nothing differentiates it (the
    maps were not asked for), not a zero-filled (B, HW) gradient to allocate and add."""
    from attnzoo.testing import OpRecorder

    torch.manual_seed(0)
    gc = GlobalContext(16).train()
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    out = gc(x)
    with OpRecorder() as recorder:
        out.sum().backward()
    names = recorder.names()
    assert not [name for name in names if "zeros" in name or "fill" in name], names
    assert x.grad is not None and gc.key.weight.grad is not None


def test_a_hook_on_the_key_runs_and_changes_nothing():
    """A hooked key runs as a module (bug: the pooling read ``key.weight`` directly and skipped the
    hook), with the un-hooked output and gradients, in inference and in a training step."""
    torch.manual_seed(5)
    module = GlobalContext(16, dtype=F64)
    randomise(module)
    x = torch.randn(2, 16, 3, 5, dtype=F64)
    params = (module.key.weight, module.fc1.weight)

    def run():
        module.eval()
        with torch.no_grad():
            out, maps = module(x, return_attn=True)
        module.train()
        x_grad = x.clone().requires_grad_()
        grads = torch.autograd.grad(module(x_grad).square().sum(), (x_grad, *params))
        return out, maps["position"], grads

    expected_out, expected_position, expected_grads = run()
    calls = []
    handle = module.key.register_forward_hook(lambda layer, args, out: calls.append(out.shape))
    out, position, grads = run()
    handle.remove()
    assert calls == [(2, 15, 1), (2, 15, 1)]  # eval and training each called the key on the positions
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(position, expected_position, rtol=1e-12, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_pruning_the_key_takes_effect_on_every_call():
    """``prune`` recomputes ``key.weight = weight_orig * mask`` in a forward pre-hook: the output
    follows a later change to ``weight_orig`` (bug: the pooling read the stale ``key.weight``)."""
    from torch.nn.utils import prune

    torch.manual_seed(6)
    module = GlobalContext(16, dtype=F64).eval()
    randomise(module)
    x = torch.randn(2, 16, 4, 3, dtype=F64)
    with torch.no_grad():
        unpruned = module(x)
    prune.l1_unstructured(module.key, "weight", amount=0.5)
    with torch.no_grad():
        module.key.weight_orig.mul_(-2.0)  # only the pre-hook carries this into key.weight
        pruned = module(x)
    reference = GlobalContext(16, dtype=F64).eval()
    # all but the key (pruning renamed its weight key.weight_orig and added key.weight_mask)
    others = {name: value for name, value in module.state_dict().items() if not name.startswith("key.")}
    assert reference.load_state_dict(others, strict=False).missing_keys == ["key.weight"]
    with torch.no_grad():
        reference.key.weight.copy_(module.key.weight_orig * module.key.weight_mask)
        expected = reference(x)
    torch.testing.assert_close(pruned, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(pruned, unpruned, rtol=0, atol=1e-6)
