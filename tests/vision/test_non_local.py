"""non_local: the paper's equations in float64 for the four pairwise functions, 1D/2D/3D inputs,
sub-sampling, identity at init, and the fused / associative / sorted paths (no N x N matrix)."""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
from torch.nn.utils import prune

import attnzoo
from attnzoo.testing import OpRecorder, randomize_
from attnzoo.vision.non_local import PAIRWISE_FUNCTIONS, NonLocalBlock, relu_pair_sum

F64 = torch.float64
SHAPES = {"1d": (2, 16, 10), "2d": (2, 16, 6, 5), "3d": (2, 16, 3, 4, 4)}


def perturbed(module: NonLocalBlock, seed: int = 0) -> NonLocalBlock:
    """Weights off their init (BN scale 0 would hide everything) and non-trivial BN statistics."""
    return randomize_(module, seed=seed, scale=0.3, shift=True, norm_statistics=True).eval()


def conv1x1(layer: torch.nn.Linear, t: torch.Tensor) -> torch.Tensor:
    """W t + b on (B, C_in, N) columns: the paper's 1x1(x1) convolution."""
    out = torch.einsum("oc,bcn->bon", layer.weight, t)
    return out if layer.bias is None else out + layer.bias[None, :, None]


def pool_reference(t: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Max over non-overlapping windows 2 / 2x2 / 1x2x2 (floor), on (B, D, N) laid out on spatial."""
    kernel = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}[len(spatial)]
    b, d = t.shape[:2]
    grid = t.reshape(b, d, *spatial)
    out_sizes = [s // k for s, k in zip(spatial, kernel)]
    pooled = torch.empty(b, d, *out_sizes, dtype=t.dtype)
    for idx in itertools.product(*(range(s) for s in out_sizes)):
        window = grid[(slice(None), slice(None), *(slice(i * k, i * k + k) for i, k in zip(idx, kernel)))]
        pooled[(slice(None), slice(None), *idx)] = window.reshape(b, d, -1).amax(-1)
    return pooled.reshape(b, d, -1)


def reference(module: NonLocalBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = BN(W_z y) + x, y_i = (1/C(x)) sum_j f(x_i, x_j) g(x_j), written from section 3."""
    b, c = x.shape[:2]
    spatial = tuple(x.shape[2:])
    cols = x.reshape(b, c, -1)  # x_i as columns, (B, C, N)
    if module.pairwise == "gaussian":
        theta, phi = cols, cols
    else:
        theta, phi = conv1x1(module.theta, cols), conv1x1(module.phi, cols)
    g = conv1x1(module.g, cols)
    if module.sub_sample:
        phi, g = pool_reference(phi, spatial), pool_reference(g, spatial)
    n, n_keys = theta.shape[-1], phi.shape[-1]
    if module.pairwise in ("embedded_gaussian", "gaussian"):
        dots = torch.einsum("bci,bcj->bij", theta, phi)
        if module.use_scale:
            dots = dots / theta.shape[1] ** 0.5
        f = torch.exp(dots)
        weights = f / f.sum(dim=-1, keepdim=True)  # C(x) = sum_j f(x_i, x_j)
    elif module.pairwise == "dot_product":
        weights = torch.einsum("bci,bcj->bij", theta, phi) / n_keys  # C(x) = N
    else:
        w_f = module.concat_project.weight[0]
        weights = torch.empty(b, n, n_keys, dtype=x.dtype)
        for bi, i, j in itertools.product(range(b), range(n), range(n_keys)):
            pair = torch.cat([theta[bi, :, i], phi[bi, :, j]])
            weights[bi, i, j] = torch.relu(w_f @ pair) / n_keys
    y = torch.einsum("bij,bcj->bci", weights, g)
    z = conv1x1(module.w_z, y)
    if isinstance(module.norm, torch.nn.BatchNorm2d):
        bn = module.norm
        z = (z - bn.running_mean[:, None]) / torch.sqrt(bn.running_var[:, None] + bn.eps)
        z = z * bn.weight[:, None] + bn.bias[:, None]
    return x + z.reshape(x.shape), weights


@pytest.mark.parametrize("sub_sample", [False, True])
@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_matches_paper_equations(pairwise: str, layout: str, sub_sample: bool) -> None:
    torch.manual_seed(0)
    module = perturbed(NonLocalBlock(16, pairwise=pairwise, sub_sample=sub_sample, dtype=F64))
    x = torch.randn(SHAPES[layout], dtype=F64)
    expected, expected_maps = reference(module, x)
    with torch.no_grad():
        fused = module(x)
        explicit, maps = module(x, return_attn=True)
    torch.testing.assert_close(fused, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-10)


def test_use_scale_divides_embedded_gaussian_logits_by_sqrt_inner_width() -> None:
    torch.manual_seed(1)
    scaled = perturbed(NonLocalBlock(16, use_scale=True, dtype=F64))
    plain = NonLocalBlock(16, dtype=F64).eval()
    plain.load_state_dict(scaled.state_dict())
    x = torch.randn(2, 16, 5, 5, dtype=F64)
    expected, expected_maps = reference(scaled, x)
    out, maps = scaled(x, return_attn=True)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(plain(x, return_attn=True)[1], maps)  # paper default: no scaling
    with pytest.raises(ValueError, match="use_scale"):
        NonLocalBlock(16, pairwise="dot_product", use_scale=True)


@pytest.mark.parametrize("norm", [True, False])
def test_block_starts_as_identity(norm: bool) -> None:
    torch.manual_seed(2)
    module = NonLocalBlock(16) if norm else NonLocalBlock(16, norm_layer=None)
    x = torch.randn(2, 16, 6, 6)
    for mode in (module.train(), module.eval()):
        torch.testing.assert_close(mode(x), x, rtol=0, atol=0)
    if norm:
        assert module.norm.weight.abs().sum() == 0 and module.w_z.bias is None  # BN scale 0, no bias
    else:
        assert module.w_z.weight.abs().sum() == 0


def test_defaults_follow_the_paper() -> None:
    module = attnzoo.create("non_local", 64)
    assert module.pairwise == "embedded_gaussian" and module.inner == 32  # C' = C/2
    assert not module.sub_sample and not module.use_scale
    assert isinstance(module.norm, torch.nn.BatchNorm2d)
    # phi's bias would be cancelled by the softmax over keys: absent
    assert module.phi.bias is None and module.theta.bias is not None
    assert NonLocalBlock(64, pairwise="dot_product").phi.bias is not None  # no softmax there


@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_no_n_by_n_matrix_without_maps(pairwise: str) -> None:
    torch.manual_seed(3)
    module = perturbed(NonLocalBlock(16, pairwise=pairwise))
    x = torch.randn(1, 16, 16, 16)  # N = 256
    n = 256
    with torch.no_grad(), OpRecorder() as recorder:
        module(x)
    names = [name for name, _ in recorder.sizes]
    big = [(name, sizes) for name, sizes in recorder.sizes if any(s >= n * n for s in sizes)]
    assert not big, f"an N x N-sized tensor was formed: {big}"
    if pairwise in ("embedded_gaussian", "gaussian"):
        assert "aten._scaled_dot_product_flash_attention_for_cpu.default" in names
    assert not any("softmax" in name for name in names)
    with torch.no_grad(), OpRecorder() as recorder:
        module(x, return_attn=True)  # the maps path does form it
    assert any(s >= n * n for _, sizes in recorder.sizes for s in sizes)


def test_concatenation_sorted_path_has_the_explicit_gradients() -> None:
    torch.manual_seed(4)
    module = perturbed(NonLocalBlock(8, pairwise="concatenation", sub_sample=True, dtype=F64))
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    weights = torch.randn(x.shape, dtype=F64)
    grads = []
    for return_attn in (False, True):
        module.zero_grad()
        xi = x.clone().requires_grad_()
        out = module(xi, return_attn=return_attn)
        out = out[0] if return_attn else out
        (out * weights).sum().backward()
        grads.append([xi.grad, *(p.grad.clone() for p in module.parameters())])
    for fused, explicit in zip(*grads):
        torch.testing.assert_close(fused, explicit, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("sub_sample", [False, True])
def test_a_hook_on_concat_project_runs_and_changes_nothing(sub_sample: bool) -> None:
    """A no-op forward hook on ``concat_project`` runs, in eval and in a training step, and the
    output, maps and gradients equal the un-hooked module's (bugs: the split-weight fast path reads
    ``concat_project.weight`` itself and skips the layer's hooks, so adapters and feature taps on
    it never run; the by-module fallback drops the ReLU, the 1/N' or the pooled keys)."""
    torch.manual_seed(9)
    plain = perturbed(NonLocalBlock(8, pairwise="concatenation", sub_sample=sub_sample, dtype=F64))
    hooked = copy.deepcopy(plain)
    pair_shapes = []
    hooked.concat_project.register_forward_hook(lambda layer, args, out: pair_shapes.append(args[0].shape))
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    n_keys = 9 if sub_sample else 36
    with torch.no_grad():
        expected, expected_maps = plain(x, return_attn=True)
        torch.testing.assert_close(hooked(x), expected, rtol=1e-10, atol=1e-10)
        out, maps = hooked(x, return_attn=True)
    # the hook saw every pair [theta_i; phi_j]: (B, N, N', 2C') with C' = 4
    assert pair_shapes == [torch.Size([2, 36, n_keys, 8])] * 2
    assert (expected_maps == 0).any() and (expected_maps > 0).any()  # the ReLU cuts some pairs
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-10)

    weights = torch.randn(x.shape, dtype=F64)
    grads = []
    for module in (plain.train(), hooked.train()):  # batch statistics
        xi = x.clone().requires_grad_()
        (module(xi) * weights).sum().backward()
        grads.append({"x": xi.grad, **{name: p.grad for name, p in module.named_parameters()}})
    assert len(pair_shapes) == 3
    assert grads[0]["concat_project.weight"].abs().sum() > 0
    for name, expected_grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], expected_grad, rtol=1e-10, atol=1e-10, msg=name)


def test_pruning_concat_project_takes_effect() -> None:
    """``prune.l1_unstructured`` on ``concat_project`` keeps ``weight_orig`` and a mask, and a
    forward pre-hook recomputes ``weight = weight_orig * mask`` on every call: an in-place change
    of ``weight_orig`` changes the output exactly as a plain layer with that masked weight (bug:
    the fast path read the ``weight`` attribute left by the last call, so the pruned block kept
    computing with a stale weight)."""
    torch.manual_seed(10)
    pruned = perturbed(NonLocalBlock(8, pairwise="concatenation", sub_sample=True, dtype=F64))
    plain = copy.deepcopy(pruned)
    prune.l1_unstructured(pruned.concat_project, "weight", amount=0.5)
    layer = pruned.concat_project
    assert int(layer.weight_mask.sum()) == layer.weight_mask.numel() // 2  # 4 of the 2C' = 8 cut
    x = torch.randn(2, 8, 6, 6, dtype=F64)
    with torch.no_grad():
        before = pruned(x)
        layer.weight_orig.copy_(torch.randn_like(layer.weight_orig))
        out, maps = pruned(x, return_attn=True)
        plain.concat_project.weight.copy_(layer.weight_orig * layer.weight_mask)
        expected, expected_maps = plain(x, return_attn=True)
        torch.testing.assert_close(pruned(x), expected, rtol=1e-10, atol=1e-10)
        plain.concat_project.weight.copy_(layer.weight_orig)
        unmasked = plain(x)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(maps, expected_maps, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(out, before)  # the new weight_orig was used
    assert not torch.allclose(out, unmasked)  # and the mask too


def test_a_biased_concat_project_keeps_its_bias_on_the_fast_path() -> None:
    """A plain ``nn.Linear(2C', 1)`` with a bias put in place of ``concat_project`` (built without
    one) is still a plain layer, read by the fast path: its bias must count there as it does when
    the layer is called on the pairs (bug: the split weight dropped the bias)."""
    torch.manual_seed(12)
    plain = perturbed(NonLocalBlock(8, pairwise="concatenation", dtype=F64))
    plain.concat_project = torch.nn.Linear(8, 1, dtype=F64)
    torch.nn.init.constant_(plain.concat_project.bias, 0.7)
    hooked = copy.deepcopy(plain)
    hooked.concat_project.register_forward_hook(lambda layer, args, out: None)
    x = torch.randn(2, 8, 5, 5, dtype=F64)
    with torch.no_grad():
        for return_attn in (False, True):
            expected = hooked(x, return_attn=return_attn)
            torch.testing.assert_close(plain(x, return_attn=return_attn), expected, rtol=1e-10, atol=1e-10)


def test_relu_pair_sum_is_exact_with_ties_and_signs() -> None:
    g = torch.Generator().manual_seed(5)
    a = torch.randn(3, 17, generator=g, dtype=F64)
    b = torch.randn(3, 11, generator=g, dtype=F64)
    b[:, :3] = -a[:, :3]  # exact ties: ReLU(0) = 0 from either side
    b[0] = 5.0  # all keys count for every query
    b[1] = -5.0  # none does
    values = torch.randn(3, 11, 4, generator=g, dtype=F64)
    brute = torch.einsum("bij,bjd->bid", torch.relu(a[:, :, None] + b[:, None, :]), values)
    torch.testing.assert_close(relu_pair_sum(a, b, values), brute, rtol=1e-12, atol=1e-12)
    assert relu_pair_sum(a, b, values)[1].abs().max() == 0


@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_softmax_weights_are_distributions_and_others_scale_by_n(pairwise: str) -> None:
    torch.manual_seed(6)
    module = perturbed(NonLocalBlock(16, pairwise=pairwise, sub_sample=True))
    _, maps = module(torch.randn(2, 16, 6, 6), return_attn=True)
    assert maps.shape == (2, 36, 9)
    if pairwise in ("embedded_gaussian", "gaussian"):
        assert maps.min() >= 0 and maps.max() <= 1
        torch.testing.assert_close(maps.sum(-1), torch.ones(2, 36))
    elif pairwise == "concatenation":
        assert maps.min() >= 0  # ReLU, divided by N', not normalised per row


def test_video_sub_sampling_pools_space_not_time() -> None:
    module = NonLocalBlock(8, sub_sample=True)
    _, maps = module(torch.randn(1, 8, 4, 6, 6), return_attn=True)
    assert maps.shape == (1, 4 * 36, 4 * 9)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_large_logits_stay_exact_on_both_paths(pairwise: str) -> None:
    torch.manual_seed(7)
    module = perturbed(NonLocalBlock(16, pairwise=pairwise))
    x = 30 * torch.randn(2, 16, 8, 8)  # logits in the thousands: a naive exp overflows
    with torch.no_grad():
        fused = module(x)
        explicit = module(x, return_attn=True)[0]
        expected = module.double()(x.double())
    assert torch.isfinite(fused).all() and torch.isfinite(explicit).all()
    assert relative_error(fused, expected) < 1e-5
    assert relative_error(explicit, expected) < 1e-5


@pytest.mark.parametrize("pairwise", PAIRWISE_FUNCTIONS)
def test_bfloat16_agrees_with_float64(pairwise: str) -> None:
    torch.manual_seed(8)
    module = perturbed(NonLocalBlock(16, pairwise=pairwise, sub_sample=True))
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        expected = module.double()(x.double())
        module.bfloat16()
        half = module(x.bfloat16())
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
    assert relative_error(half, expected) < 3e-2


def test_hooked_concat_project_keeps_the_half_precision_handling() -> None:
    """With a hook on ``concat_project`` in bfloat16 the layer runs in bfloat16 and the ReLU, 1/N'
    and sum over keys in float32, as on the fast path: the same maps dtype and an output close to
    float64 (bugs: float32 pairs fed to the bfloat16 layer fail; bfloat16 maps or sums)."""
    torch.manual_seed(11)
    plain = perturbed(NonLocalBlock(16, pairwise="concatenation", sub_sample=True))
    hooked = copy.deepcopy(plain)
    hooked.concat_project.register_forward_hook(lambda layer, args, out: None)
    x = torch.randn(2, 16, 12, 12)
    with torch.no_grad():
        expected = plain.double()(x.double())
        plain.bfloat16()
        hooked.bfloat16()
        out, maps = hooked(x.bfloat16(), return_attn=True)
        fast_maps = plain(x.bfloat16(), return_attn=True)[1]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert maps.dtype == fast_maps.dtype == torch.float32
    assert relative_error(out, expected) < 3e-2
    assert relative_error(maps, fast_maps.double()) < 3e-2


def test_bad_arguments_and_inputs() -> None:
    with pytest.raises(ValueError, match="pairwise"):
        NonLocalBlock(16, pairwise="cosine")
    with pytest.raises(ValueError, match="channels"):
        NonLocalBlock(0)
    module = NonLocalBlock(16, sub_sample=True)
    with pytest.raises(ValueError, match="at least"):
        module(torch.randn(1, 16, 1, 8))


@pytest.mark.parametrize("pairwise", ["dot_product", "concatenation"])
def test_non_softmax_forms_export(pairwise: str) -> None:
    module = perturbed(NonLocalBlock(8, pairwise=pairwise))
    x = torch.randn(2, 8, 5, 5)
    program = torch.export.export(module, (x,))
    torch.testing.assert_close(program.module()(x), module(x))


@pytest.mark.slow
def test_concatenation_runs_in_onnxruntime_with_a_dynamic_batch() -> None:
    ort = pytest.importorskip("onnxruntime")
    module = perturbed(NonLocalBlock(8, pairwise="concatenation"))
    batch = torch.export.Dim("batch", min=1, max=64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, (torch.randn(2, 8, 5, 5),), dynamo=True, dynamic_shapes=({0: batch},), verbose=False
        )
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    x = torch.randn(3, 8, 5, 5)
    result = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(result), module(x).detach(), rtol=1e-4, atol=1e-5)
