"""SAN pairwise/patchwise self-attention against a float64 reference written from the paper and
the official kernels' semantics (reflection padding, interleaved channel sharing)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.san import SANAttention

pytestmark = pytest.mark.usefixtures("float64_default")


def reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Mirror an index into [0, n) without repeating the edge (the official refpad kernels)."""
    i = torch.where(i < 0, -i, i)
    return torch.where(i >= n, 2 * (n - 1) - i, i)


def conv1x1(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    out = torch.einsum("oc,bc...->bo...", conv.weight.flatten(1), x)
    if conv.bias is not None:
        out = out + conv.bias.view(1, -1, *([1] * (x.dim() - 2)))
    return out


def batch_norm_eval(x: torch.Tensor, bn: torch.nn.Module) -> torch.Tensor:
    if isinstance(bn, torch.nn.Identity):  # norm_layer=None
        return x
    shape = (1, -1, *([1] * (x.dim() - 2)))
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean.view(shape)) * scale.view(shape) + bn.bias.view(shape)


def gamma(features: torch.Tensor, mlp: torch.nn.Sequential) -> torch.Tensor:
    """BN-ReLU-1x1-BN-ReLU-1x1 applied per (pixel, tap) on any (B, C, ...) layout."""
    bn1, _, conv1, bn2, _, conv2 = mlp
    hidden = conv1x1(torch.relu(batch_norm_eval(features, bn1)), conv1)
    return conv1x1(torch.relu(batch_norm_eval(hidden, bn2)), conv2)


def reference(module: SANAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The SAN layer at stride 1, written from the paper's equations: explicit neighbour indices."""
    b, _, h, w = x.shape
    k, r = module.kernel_size, module.kernel_size // 2
    phi, psi, beta = conv1x1(x, module.query), conv1x1(x, module.key), conv1x1(x, module.value)
    ii = torch.arange(h).view(h, 1, 1, 1)
    jj = torch.arange(w).view(1, w, 1, 1)
    di = torch.arange(k).view(1, 1, k, 1) - r
    dj = torch.arange(k).view(1, 1, 1, k) - r
    rows = reflect(ii + di, h).expand(h, w, k, k).reshape(h, w, k * k)  # neighbour row of (i, j, t)
    cols = reflect(jj + dj, w).expand(h, w, k, k).reshape(h, w, k * k)
    neighbours_psi = psi[:, :, rows, cols]  # (B, r, H, W, k^2)
    if module.mode == "pairwise":
        relation = phi[..., None] - neighbours_psi  # phi(x_i) - psi(x_j)
        # p: x then y coordinates in [-1, 1]
        px = torch.linspace(-1, 1, w).view(1, w).expand(h, w)
        py = torch.linspace(-1, 1, h).view(h, 1).expand(h, w)
        dpx = px[..., None] - px[rows, cols]  # (H, W, k^2)
        dpy = py[..., None] - py[rows, cols]
        wp = module.position.weight.flatten(1)
        position = torch.einsum("oi,ihwt->ohwt", wp, torch.stack([dpx, dpy]))  # W_p (p_i - p_j)
        features = torch.cat([relation, position.expand(b, -1, -1, -1, -1)], dim=1)
        weights = torch.softmax(gamma(features, module.weight_mlp), dim=-1)  # (B, Cw, H, W, k^2)
    else:
        # [phi(x_i), psi(x_j) for j in R(i)] with the official channel order c * k^2 + t
        patch = torch.cat([phi, neighbours_psi.permute(0, 1, 4, 2, 3).reshape(b, -1, h, w)], dim=1)
        raw = gamma(patch, module.weight_mlp)  # (B, Cw k^2, H, W)
        weights = raw.view(b, module.weight_channels, k * k, h, w).permute(0, 1, 3, 4, 2)
    cw = module.weight_channels
    out = torch.zeros(b, module.out_channels, h, w)
    for c in range(module.out_channels):
        # y_c(i) = sum_j alpha_{c mod Cw}(i, j) beta_c(x_j)
        out[:, c] = (weights[:, c % cw] * beta[:, c][:, rows, cols]).sum(-1)
    return out, weights


def build(**kwargs) -> tuple[SANAttention, torch.Tensor]:
    torch.manual_seed(0)
    module = SANAttention(16, **{"rel_channels": 4, **kwargs})
    randomize_(module, seed=0, scale=0.3, shift=True, norm_statistics=True)
    return module.eval(), torch.randn(2, 16, 6, 7)


@pytest.mark.parametrize("mode", ["pairwise", "patchwise"])
@pytest.mark.parametrize("kernel_size", [3, 7])
def test_matches_float64_reference(mode: str, kernel_size: int) -> None:
    module, x = build(mode=mode, kernel_size=kernel_size, out_channels=24)
    with torch.no_grad():
        out, maps = module(x, return_attn=True)
        expected, expected_maps = reference(module, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["pairwise", "patchwise"])
def test_without_normalisation_the_weight_mlp_has_a_biased_conv_instead(mode: str) -> None:
    module, x = build(mode=mode, kernel_size=3, norm_layer=None)
    norms = [m for m in module.weight_mlp if isinstance(m, torch.nn.Identity)]
    assert len(norms) == 2 and module.weight_mlp[2].bias is not None
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    with torch.no_grad():
        out, maps = module(x, return_attn=True)
        expected, expected_maps = reference(module, x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-10)


def test_norm_layer_replaces_both_batch_norms() -> None:
    module = SANAttention(16, norm_layer=lambda n, **f: torch.nn.GroupNorm(1, n, **f))
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in module.modules()) == 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    assert module(torch.randn(1, 16, 8, 8)).shape == (1, 16, 8, 8)  # a batch of one trains


def test_pairwise_weights_are_a_softmax_over_the_footprint_patchwise_are_not() -> None:
    pair, x = build()
    patch, _ = build(mode="patchwise")
    with torch.no_grad():
        _, pair_maps = pair(x, return_attn=True)
        _, patch_maps = patch(x, return_attn=True)
    assert pair_maps.shape == (2, 2, 6, 7, 49)
    assert (pair_maps >= 0).all()
    torch.testing.assert_close(pair_maps.sum(-1), torch.ones(2, 2, 6, 7))
    # patchwise weights are used raw: signed and not normalised
    assert (patch_maps < 0).any()
    assert not torch.allclose(patch_maps.sum(-1), torch.ones(()))


def test_channel_sharing_is_interleaved() -> None:
    """Channel c uses weight map c mod (C_out / 8) (the official kernel), not the block c // 8."""
    module, x = build(out_channels=16)  # Cw = 2 weight maps shared by 16 channels
    with torch.no_grad():
        # every value channel the same field: outputs differ only through their weight maps
        module.value.weight.copy_(module.value.weight[:1].expand_as(module.value.weight))
        module.value.bias.fill_(0.5)
        out = module(x)
    torch.testing.assert_close(out[:, 0::2], out[:, :1].expand(-1, 8, -1, -1))  # all read map 0
    torch.testing.assert_close(out[:, 1::2], out[:, 1:2].expand(-1, 8, -1, -1))  # all read map 1
    assert not torch.allclose(out[:, 0], out[:, 1])  # contiguous blocks would make these equal


def test_reflection_padding_keeps_a_constant_map_constant_at_the_border() -> None:
    """With softmax weights summing to 1, a constant value map stays constant everywhere only when
    the border taps read mirrored pixels (zero padding would darken the border)."""
    module, x = build()
    with torch.no_grad():
        module.value.weight.zero_()
        module.value.bias.fill_(3.0)
        out = module(x)
    torch.testing.assert_close(out, torch.full_like(out, 3.0))


def test_position_term_uses_the_pixel_offsets() -> None:
    """The pairwise weights depend on p_i - p_j: with phi = psi = 0 they are the same for every
    interior pixel (translation invariant) but not uniform."""
    module, _ = build(kernel_size=3)
    with torch.no_grad():
        for conv in (module.query, module.key):
            conv.weight.zero_()
            conv.bias.zero_()
        _, maps = module(torch.randn(1, 16, 7, 7), return_attn=True)
    interior = maps[0, :, 1:-1, 1:-1]  # (Cw, 5, 5, 9)
    torch.testing.assert_close(interior, interior[:, :1, :1].expand_as(interior))
    assert not torch.allclose(interior[..., 0], interior[..., 4])


def test_stride_reads_the_strided_centres() -> None:
    module, x = build(kernel_size=3)
    strided = SANAttention(16, stride=2, kernel_size=3, rel_channels=4)
    strided.load_state_dict(module.state_dict())
    strided.eval()
    with torch.no_grad():
        full = module(x)
        out = strided(x)
    assert out.shape == (2, 16, 3, 4)
    torch.testing.assert_close(out, full[..., ::2, ::2])


def train_step(module: SANAttention, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One training forward and backward: the output and every parameter's gradient."""
    module.train()
    module.zero_grad(set_to_none=True)
    out = module(x)
    out.square().sum().backward()
    return out.detach(), {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("stride", [1, 2])
def test_a_hook_on_the_position_conv_runs_and_changes_nothing(stride: int) -> None:
    """A hooked W_p runs as a module, as the official ``conv_p``: on the (1, 2, H, W) coordinate
    grid, in eval and in training, with the same output and gradients as the plain module's (bug:
    W_p's weight read into a product of the layer's own, so the hook, and with it pruning,
    weight norm and feature taps, never ran)."""
    plain, x = build(kernel_size=3, stride=stride)
    hooked = copy.deepcopy(plain)
    seen = []
    hooked.position.register_forward_hook(lambda conv, args, out: seen.append(tuple(args[0].shape)))
    with torch.no_grad():
        expected = plain(x)
        out = hooked(x)
    assert seen == [(1, 2, 6, 7)]  # the whole map's coordinates, before the stride and the differences
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    expected_out, expected_grads = train_step(plain, x)
    out, grads = train_step(hooked, x)
    assert len(seen) == 2
    torch.testing.assert_close(out, expected_out, rtol=1e-12, atol=1e-12)
    assert grads["position.weight"] is not None
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_pruning_the_position_conv_takes_effect_on_every_call() -> None:
    """``prune`` recomputes ``position.weight = weight_orig * mask`` in a forward pre-hook: the
    output follows a later change to ``weight_orig`` exactly as a plain module given that weight
    (bug: the position term read the stale ``position.weight`` of the pruning call)."""
    from torch.nn.utils import prune

    module, x = build(kernel_size=3)
    with torch.no_grad():
        unpruned = module(x)
    prune.l1_unstructured(module.position, "weight", amount=0.5)
    assert int(module.position.weight_mask.sum()) == 2  # two of W_p's four entries kept
    with torch.no_grad():
        module.position.weight_orig.mul_(-2.0)  # only the pre-hook carries this into position.weight
        pruned = module(x)
    reference, _ = build(kernel_size=3)
    with torch.no_grad():
        reference.position.weight.copy_(module.position.weight_orig * module.position.weight_mask)
        expected = reference(x)
    torch.testing.assert_close(pruned, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(pruned, unpruned, rtol=0, atol=1e-6)


def test_a_biased_position_conv_gives_the_same_output_hooked_or_not() -> None:
    """The official ``conv_p`` has a bias, which cancels in ``W_p p_i - W_p p_j``: the fast path
    reads no bias, so a hooked biased conv must run before the differences, as officially (bug:
    applying the hooked conv to the offsets added its bias to every offset)."""
    module, x = build(kernel_size=3)
    weight = module.position.weight.detach().clone()
    module.position = torch.nn.Conv2d(2, 2, 1)  # official conv_p: still a plain nn.Conv2d
    with torch.no_grad():
        module.position.weight.copy_(weight)
        module.position.bias.copy_(torch.tensor([0.7, -1.3]))
        plain = module(x)
        expected, _ = reference(module, x)  # no bias anywhere
        module.position.register_forward_hook(lambda conv, args, out: None)
        hooked = module(x)
    torch.testing.assert_close(plain, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(hooked, plain, rtol=1e-12, atol=1e-12)


def test_values_are_never_unfolded() -> None:
    """No tensor of k^2 times the values' size: the aggregation visits the taps one by one."""
    module = SANAttention(64, kernel_size=7).eval()
    x = torch.randn(1, 64, 12, 12)
    with OpRecorder() as rec, torch.no_grad():
        module(x)
    values_numel = 64 * 12 * 12
    assert rec.largest_storage < 49 * values_numel / 4, rec.largest_storage


def test_nan_input_reaches_the_output() -> None:
    module, x = build()
    x = x.clone()
    x[0, :, 3, 3] = float("nan")
    with torch.no_grad():
        out = module(x)
    assert torch.isnan(out[0]).any() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize("kernel_size", [0, 2, 4, -3])
def test_even_or_non_positive_windows_are_refused(kernel_size: int) -> None:
    with pytest.raises(ValueError, match="kernel_size.*odd"):
        SANAttention(16, kernel_size=kernel_size)


def test_window_wider_than_the_map_is_a_clear_error() -> None:
    """Reflection cannot mirror more than size - 1 pixels: a 7 x 7 footprint needs maps of at
    least 4 x 4."""
    module = SANAttention(16).eval()
    module(torch.randn(1, 16, 4, 4))  # pad 3 < 4: fine
    with pytest.raises(ValueError, match=r"reflection padding by 3 .*3 x 5"):
        module(torch.randn(1, 16, 3, 5))


def test_constructor_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="mode"):
        SANAttention(16, mode="clique")
    with pytest.raises(ValueError, match="share_channels"):
        SANAttention(16, out_channels=12)


def test_parameter_layout_follows_the_official_sam() -> None:
    """Official SAM parameters, less the two cancelling biases (conv_p's 2, the last pairwise
    conv's C_out / 8)."""
    c, rel, mid, share, k = 256, 16, 64, 8, 7
    cw = mid // share

    def official(pairwise: bool) -> int:
        convs = 2 * (c * rel + rel) + c * mid + mid
        if pairwise:
            mlp = 2 * (rel + 2) + (rel + 2) * rel + 2 * rel + rel * cw + cw
            return convs + mlp + 2 * 2 + 2
        mlp = 2 * rel * (k * k + 1) + rel * (k * k + 1) * cw + 2 * cw + cw * k * k * cw + k * k * cw
        return convs + mlp

    pair = SANAttention(c, mid, mode="pairwise", rel_channels=rel)
    patch = SANAttention(c, mid, mode="patchwise", rel_channels=rel)
    assert sum(p.numel() for p in pair.parameters()) == official(True) - 2 - cw
    assert sum(p.numel() for p in patch.parameters()) == official(False)


def test_registered_as_a_conv_replacement_with_local_maps() -> None:
    spec = attnzoo.get_spec("san")
    assert spec.family == "conv_attention" and spec.placement == "conv" and spec.map_kind == "local"
    assert {s.name for s in spec.samples} >= {"mode=patchwise", "kernel_size=3"}


def test_reflect_helper_agrees_with_torch_reflection_pad() -> None:
    x = torch.arange(5.0).view(1, 1, 1, 5)
    padded = F.pad(x, (3, 3, 0, 0), mode="reflect")[0, 0, 0]
    idx = reflect(torch.arange(-3, 8), 5)
    torch.testing.assert_close(padded, x[0, 0, 0, idx])
