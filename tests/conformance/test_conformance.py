"""Properties every registered mechanism must have; a new module gets them by registering.

The registry is a test database: each spec holds samples (its default configuration, then one per
variant, input form and mask kind, see :class:`attnzoo.registry.Sample`), and every test here is
parametrised over ``(name, sample)``. Cheap properties run on every sample; the expensive ones
(dtypes, compile, export, ONNX) on the default sample and on samples marked ``thorough``.

The suite is device-generic: it runs on ``$ATTNZOO_TEST_DEVICE`` when set, else on CUDA when
present, else on the CPU; noise and masks are built on the modules' device.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import os
import pickle
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

import attnzoo
from attnzoo._checks import check_input
from attnzoo.inspect import symbolic_trace
from attnzoo.registry import MAP_KINDS, PLACEMENTS, ModuleSpec, Sample, Sizes
from attnzoo.testing import OpRecorder, randomize_

DEVICE = torch.device(
    os.environ.get("ATTNZOO_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
)
NAMES = attnzoo.list_modules()
#: inductor compiles cost 10-15 s each here: a few representative modules only.
INDUCTOR_NAMES = [n for n in ("mha", "cbam", "attention") if n in NAMES]


@dataclass(frozen=True)
class Case:
    """One (mechanism, sample) pair of the test database."""

    spec: ModuleSpec
    sample: Sample

    def skip_unless_applies(self, prop: str) -> None:
        if prop in self.sample.skips:
            pytest.skip(self.sample.skips[prop])

    def sizes(self, **overrides: Any) -> Sizes:
        return self.spec.sizes(device=DEVICE, **overrides)

    def build(self, seed: int = 0, **overrides: Any) -> tuple[nn.Module, tuple[Tensor, ...], dict[str, Any]]:
        """The sample's module (parameters moved off their initialisation), inputs and kwargs."""
        torch.manual_seed(seed)
        sizes = self.sizes(**overrides)
        module = self.spec.build_sample(self.sample, sizes)
        # off the initial values, so that zero-initialised gates (gamma = 0, zero last convs) do not
        # hide whether gradients reach the parameters before them
        randomize_(module, seed=seed, scale=0.1, shift=True)
        inputs, kwargs = self.spec.sample_inputs(self.sample, sizes)
        return module, inputs, kwargs


def _cases(thorough_only: bool = False) -> list[Any]:
    cases = []
    for name in NAMES:
        spec = attnzoo.get_spec(name)
        for sample in spec.all_samples():
            if thorough_only and sample.name != "default" and not sample.thorough:
                continue
            cases.append(pytest.param(Case(spec, sample), id=f"{name}-{sample.name}"))
    return cases


CASES = _cases()
THOROUGH = _cases(thorough_only=True)


def first(result: Tensor | tuple) -> Tensor:
    """The output tensor of a forward call (drops the maps of ``return_attn``)."""
    return result[0] if isinstance(result, tuple) else result


def tensors_in(obj: object) -> list[Tensor]:
    """Every tensor in a (nested) attention result: a tensor, a mapping or a sequence."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, Mapping):
        return [t for value in obj.values() for t in tensors_in(value)]
    if isinstance(obj, Sequence) and not isinstance(obj, str):
        return [t for value in obj for t in tensors_in(value)]
    return []


def noise(shape: Sequence[int], like: Tensor, seed: int = 1) -> Tensor:
    """Deterministic N(0, 1) noise on ``like``'s device and dtype (drawn on the CPU)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=generator).to(like.device, like.dtype)


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def expected_shape(spec: ModuleSpec, inputs: tuple[Tensor, ...], out: Tensor) -> None:
    if spec.shape_preserving:
        assert out.shape == inputs[0].shape, (
            f"{spec.name}: {tuple(out.shape)} != input {tuple(inputs[0].shape)} (shape_preserving)"
        )
    if spec.batch_dim is not None:
        assert out.shape[0] == inputs[0].shape[0], f"{spec.name}: batch changed"


def floating(inputs: tuple[Tensor, ...]) -> list[int]:
    return [i for i, x in enumerate(inputs) if x.is_floating_point()]


@pytest.fixture(params=NAMES)
def spec(request: pytest.FixtureRequest) -> ModuleSpec:
    return attnzoo.get_spec(request.param)


@pytest.fixture(params=CASES)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


@pytest.fixture(params=THOROUGH)
def thorough(request: pytest.FixtureRequest) -> Case:
    return request.param


# ---------------------------------------------------------------------------------------------
# the spec itself


def test_spec_is_complete(spec: ModuleSpec) -> None:
    assert spec.paper.arxiv or spec.paper.venue, "the paper needs an arXiv id or a venue"
    assert spec.equation.strip(), "the spec needs its defining equation"
    assert spec.cost.strip(), "the spec needs its asymptotic cost"
    doc = spec.cls.__doc__ or ""
    assert "Shape:" in doc, f"{spec.cls.__name__} docstring needs a Shape: section"
    module_doc = __import__(spec.cls.__module__, fromlist=["_"]).__doc__ or ""
    link = spec.paper.url or ""
    assert link in module_doc or (spec.paper.venue or "@@") in module_doc, (
        "the module docstring must cite the paper's link or venue"
    )


def test_spec_declares_placement_map_kind_and_layout(spec: ModuleSpec) -> None:
    """Facts that ``models.resnet``, ``show``, ``compare`` and ``capture`` read from the spec."""
    (x, *_) = spec.example_inputs(spec.sizes(batch=1))
    image = spec.channel_dim == 1 and x.dim() == 4
    if image:
        assert spec.placement in PLACEMENTS, f"{spec.name}: an image mechanism needs placement="
    else:
        assert spec.placement is None, f"{spec.name}: placement is for image mechanisms"
    if spec.returns_attn:
        assert spec.map_kind in MAP_KINDS, f"{spec.name}: returns maps, so it needs map_kind="
    else:
        assert spec.map_kind is None
    # layout: vision modules are channels-first, sequence and graph modules channels-last
    if spec.family in ("sequence", "graph"):
        assert spec.channel_dim == -1, f"{spec.name}: sequences are (B, N, C), channels last"
    else:
        assert spec.channel_dim == 1, f"{spec.name}: feature maps are (B, C, ...), channels first"


def test_factory_kwargs_reach_every_parameter(spec: ModuleSpec) -> None:
    module = spec.build(spec.sizes(device="meta"))
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        assert t.device.type == "meta", f"{spec.name}: device= does not reach {name}"
    module = spec.build(spec.sizes(dtype=torch.float64))
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point():
            assert t.dtype == torch.float64, f"{spec.name}: dtype= does not reach {name}"


#: integer constructor arguments for which 0 is meaningful (every other integer must be positive)
ZERO_ALLOWED = {
    ("aa_conv", "min_key_head_dim"): "0: no floor on the key width per head",
    ("bam", "num_dilated"): "0: no dilated convs in the spatial branch",
    ("cgnl", "order"): "0: the Gaussian kernel's Taylor expansion to its constant term",
    ("graph_self_attention", "num_edge_types"): "0: no edge-type embeddings",
    ("sag_mask", "num_convs"): "0: the attention directly on the RoI features",
}


def test_scalar_constructor_arguments_are_checked(spec: ModuleSpec) -> None:
    """Every argument annotated ``int`` or ``float`` (optionally ``| None``) rejects a value of
    the wrong type (a string, a bool, None where it is not optional, a float for an integer) with
    a TypeError naming it, and every integer rejects -1, and 0 unless meaningful
    (``ZERO_ALLOWED``), with a ValueError naming it. Before, ``channels=None`` failed inside the
    constructor with "unsupported operand type(s) for *: 'NoneType' and 'float'", ``mask_size="32"``
    built a module, and ``key_dim=0``, ``kdim=0`` or ``out_channels=0`` silently meant the default
    (``key_dim or query_dim``)."""
    kwargs = spec.make_kwargs(spec.default_sizes) if spec.make_kwargs else {}
    for name, parameter in inspect.signature(spec.cls.__init__).parameters.items():
        annotation = parameter.annotation
        if annotation not in ("int", "int | None", "float", "float | None"):
            continue
        wrong_types: list[object] = ["8", True]
        if "None" not in annotation:
            wrong_types.append(None)
        if annotation.startswith("int"):
            wrong_types.append(2.5)
        for value in wrong_types:
            with pytest.raises(TypeError, match=f"^{name}: expected"):
                spec.cls(**{**kwargs, name: value})
        if not annotation.startswith("int"):
            continue
        out_of_range = [-1] if (spec.name, name) in ZERO_ALLOWED else [-1, 0]
        for value in out_of_range:
            with pytest.raises(ValueError, match=name):
                spec.cls(**{**kwargs, name: value})


# ---------------------------------------------------------------------------------------------
# every sample


def test_forward_shape_and_finite(case: Case) -> None:
    module, inputs, kwargs = case.build()
    out = first(module(*inputs, **kwargs))
    expected_shape(case.spec, inputs, out)
    assert torch.isfinite(out).all()
    if case.sample.reference is not None:
        module64 = module.double().eval()
        cast = tuple(x.double() if x.is_floating_point() else x for x in inputs)
        with torch.no_grad():
            expected = case.sample.reference(module64, cast, kwargs)
            assert_close(first(module64(*cast, **kwargs)), expected, rtol=1e-9, atol=1e-9)


def test_gradients_reach_every_parameter(case: Case) -> None:
    case.skip_unless_applies("gradients")
    module, inputs, kwargs = case.build()
    module.train()
    inputs = tuple(x.requires_grad_() if x.is_floating_point() else x for x in inputs)
    out = first(module(*inputs, **kwargs))
    # a random projection of the output: a plain sum can cancel (softmax rows sum to one)
    (out * noise(out.shape, out)).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{case.spec.name}: no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"{case.spec.name}: non-finite gradient in {name}"
        assert p.grad.abs().sum() > 0, f"{case.spec.name}: zero gradient in {name}"
    for i, x in enumerate(inputs):
        if x.is_floating_point():
            assert x.grad is not None and torch.isfinite(x.grad).all(), f"input {i} gradient"


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_gradients_are_the_derivative(case: Case, mode: str) -> None:
    """Autograd's gradients, of every parameter and floating input at once, along a random
    direction u equal the central difference (L(p + e u) - L(p - e u)) / 2e of the loss, in
    float64 (torch.autograd.gradcheck's fast mode, in one direction for all of them together).

    Non-zero gradients (the property above) can still be wrong: a hand-written backward, a wrong
    saved tensor, or a kernel's bug on some layout (torch 2.13's CPU BatchNorm backward on a
    (B, C, N, 1) view of transposed tokens returned the bias gradient / N, in both modes, for
    non_local and dnl; glore's on channels-last inputs, the property below). In both modes:
    eval-mode normalisation and fast paths differ.

    A ReLU or a max between p - e u and p + e u (a kink) bends the difference: two step sizes
    must agree before it counts, else another direction is drawn. A real error is the same at
    both steps and in every direction. The tolerance is 1e-5 of the terms' mass, sum |g u|: the
    rounding of a float64 loss over a few thousand outputs, divided by the step."""
    case.skip_unless_applies("gradients")
    case.skip_unless_applies("derivative")
    module, inputs, kwargs = case.build()
    module = module.double().train(mode == "train")
    leaves = [x.double().detach().requires_grad_() if x.is_floating_point() else x for x in inputs]
    tensors = [*(x for x in leaves if x.requires_grad), *module.parameters()]
    # BatchNorm's running statistics move with every training forward: the same ones for each
    buffers = [(b, b.clone()) for b in module.buffers()]
    projection: list[Tensor] = []

    def loss() -> Tensor:
        with torch.no_grad():  # before the forward: eval-mode BatchNorm saves them for its backward
            for buffer, kept in buffers:
                buffer.copy_(kept)
        out = first(module(*leaves, **kwargs))
        if not projection:  # a random projection: a plain sum can cancel (softmax rows sum to one)
            projection.append(noise(out.shape, out, seed=12))
        return (out * projection[0]).sum()

    value = loss()
    grads = torch.autograd.grad(value, tensors, allow_unused=True)
    with torch.no_grad():
        # (not bitwise: no-grad calls may take inference paths that round differently)
        if not torch.allclose(loss(), value, rtol=1e-10, atol=1e-12):
            pytest.skip(f"the forward is random in {mode} mode (dropout, sampled gates or noise)")

    def central_difference(direction: list[Tensor], step: float) -> Tensor:
        with torch.no_grad():
            for t, u in zip(tensors, direction):
                t.add_(step * u)
            plus = loss()
            for t, u in zip(tensors, direction):
                t.sub_(2 * step * u)
            minus = loss()
            for t, u in zip(tensors, direction):
                t.add_(step * u)
        return (plus - minus) / (2 * step)

    generator = torch.Generator().manual_seed(11)
    for _ in range(6):
        direction = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in tensors]
        terms = [g * u for g, u in zip(grads, direction) if g is not None]
        analytic = sum(t.sum() for t in terms)
        # relative to the terms' mass, not to their sum (which can cancel)
        tolerance = 1e-5 * float(sum(t.abs().sum() for t in terms)) + 1e-7
        numeric = central_difference(direction, 1e-6)
        if abs(float(numeric - central_difference(direction, 2e-7))) > tolerance:
            continue  # a kink between the points: not this direction
        assert abs(float(analytic) - float(numeric)) <= tolerance, (
            f"{case.spec.name}: the gradients give {float(analytic):.8g} along u, the central "
            f"difference {float(numeric):.8g} (tolerance {tolerance:.2g})"
        )
        return
    pytest.fail(f"{case.spec.name}: the loss is not smooth in six random directions")


def test_gradients_differentiate_again(case: Case) -> None:
    """Double backward (``create_graph=True``) runs and is right: the Hessian-vector product
    u^T H w of the loss, over every parameter and floating input, equals the central difference
    of the gradients' projection on w along u. Gradient penalties (R1, WGAN-GP) through an
    attention discriminator, second-order meta-learning and influence functions need it; the
    fused kernels have no double backward of their own (torch raises), nor has hardsigmoid.
    Float64, eval mode; kinks as in the first-order property (two steps must agree)."""
    case.skip_unless_applies("gradients")
    module, inputs, kwargs = case.build()
    module = module.double().eval()
    leaves = [x.double().detach().requires_grad_() if x.is_floating_point() else x for x in inputs]
    tensors = [*(x for x in leaves if x.requires_grad), *module.parameters()]
    generator = torch.Generator().manual_seed(21)
    weights = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in tensors]
    projection: list[Tensor] = []

    def projected_gradient(create_graph: bool) -> Tensor:
        out = first(module(*leaves, **kwargs))
        if not projection:
            projection.append(noise(out.shape, out, seed=22))
        grads = torch.autograd.grad(
            (out * projection[0]).sum(), tensors, create_graph=create_graph, allow_unused=True
        )
        return sum(
            ((g * w).sum() for g, w in zip(grads, weights) if g is not None), torch.zeros((), dtype=out.dtype)
        )

    second = torch.autograd.grad(projected_gradient(True), tensors, allow_unused=True)

    def central_difference(direction: list[Tensor], step: float) -> float:
        with torch.no_grad():
            for t, u in zip(tensors, direction):
                t.add_(step * u)
        plus = projected_gradient(False)
        with torch.no_grad():
            for t, u in zip(tensors, direction):
                t.sub_(2 * step * u)
        minus = projected_gradient(False)
        with torch.no_grad():
            for t, u in zip(tensors, direction):
                t.add_(step * u)
        return float(plus - minus) / (2 * step)

    for _ in range(6):
        direction = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device) for t in tensors]
        terms = [g * u for g, u in zip(second, direction) if g is not None]
        analytic = float(sum((t.sum() for t in terms), torch.zeros((), dtype=torch.float64)))
        tolerance = (
            1e-5 * float(sum((t.abs().sum() for t in terms), torch.zeros((), dtype=torch.float64))) + 1e-6
        )
        # smaller steps than the first-order property's: a kink crossed moves a gradient by O(1)
        numeric = central_difference(direction, 1e-7)
        if abs(numeric - central_difference(direction, 3e-8)) > tolerance:
            continue  # a kink between the points: not this direction
        assert abs(analytic - numeric) <= tolerance, (
            f"{case.spec.name}: double backward gives {analytic:.8g} along u, the central difference "
            f"of the gradients {numeric:.8g} (tolerance {tolerance:.2g})"
        )
        return
    pytest.fail(f"{case.spec.name}: the gradient is not smooth in six random directions")


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")
def test_per_sample_gradients_with_torch_func(case: Case) -> None:
    """``vmap(grad(loss))`` over the batch (torch.func's per-sample gradients, as differential
    privacy and influence functions compute them) gives, item by item, the parameter gradients of
    a batch of one through autograd. A custom autograd Function in the old style (``forward``
    taking ``ctx``) raises under these transforms, and one without a vmap rule raises under vmap;
    float64, eval mode (vmap cannot update BatchNorm's running statistics per item)."""
    case.skip_unless_applies("gradients")
    if case.spec.batch_dim is None:
        pytest.skip("no batch dimension (graph node features)")
    module, inputs, kwargs = case.build()
    module = module.double().eval()
    if not any(True for _ in module.parameters()):
        pytest.skip("no parameters")
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}
    options = {k: v for k, v in kwargs.items() if k not in tensor_kwargs}
    names = list(tensor_kwargs)
    buffers = dict(module.named_buffers())
    with torch.no_grad():  # the projection is drawn outside vmap (random ops inside it raise)
        one = first(
            module(*(x[:1] for x in inputs), **options, **{n: m[:1] for n, m in tensor_kwargs.items()})
        )
    projection = noise(one.shape, one, seed=12)

    def loss(params: dict[str, Tensor], *items: Tensor) -> Tensor:
        xs, masks = items[: len(inputs)], items[len(inputs) :]
        batched_kwargs = {**options, **{n: m.unsqueeze(0) for n, m in zip(names, masks)}}
        out = first(
            torch.func.functional_call(
                module, {**params, **buffers}, tuple(x.unsqueeze(0) for x in xs), batched_kwargs
            )
        )
        return (out * projection).sum()

    params = {n: p.detach() for n, p in module.named_parameters()}
    in_dims = (None, *[0] * (len(inputs) + len(names)))
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=in_dims)(
        params, *inputs, *tensor_kwargs.values()
    )
    leaves = {n: p.detach().requires_grad_() for n, p in module.named_parameters()}
    for i in range(inputs[0].shape[0]):
        value = loss(leaves, *(x[i] for x in inputs), *(m[i] for m in tensor_kwargs.values()))
        expected = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        for (name, leaf), want in zip(leaves.items(), expected):
            want = torch.zeros_like(leaf) if want is None else want
            assert_close(per_sample[name][i], want, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("api", ["torch.func.jvp", "dual tensors"])
def test_forward_mode_derivatives(case: Case, api: str) -> None:
    """Forward-mode AD runs and is right: the output's derivative J u along a random tangent u of
    every parameter and floating input (as ``torch.func.jvp``, ``jacfwd``, ``hessian``'s outer
    level and ``torch.autograd.forward_ad``'s dual tensors compute it) satisfies the dot-product
    test w^T (J u) = (J^T w)^T u against reverse mode, whose gradients the first-order property
    holds to finite differences. Exact to rounding, so a ReLU or a max tie on the way does not
    blur it as a finite difference would. The fused attention kernels, ``grid_sample`` and
    hand-written autograd Functions have no forward derivative (torch raises), nor has torch
    2.13's ``group_norm`` on channels-last maps: 92 (jvp) and 116 (dual tensors) of 216 cases
    failed before. Float64, eval mode, with parameters that require gradients (so that the
    training-step paths run)."""
    case.skip_unless_applies("gradients")
    module, inputs, kwargs = case.build()
    module = module.double().eval()
    xs = [x.double() if x.is_floating_point() else x for x in inputs]
    where = [i for i, x in enumerate(xs) if x.is_floating_point()]
    params = dict(module.named_parameters())
    buffers = dict(module.named_buffers())

    def forward(parameters: dict[str, Tensor], *floats: Tensor) -> Tensor:
        args = list(xs)
        for i, x in zip(where, floats):
            args[i] = x
        return first(torch.func.functional_call(module, {**parameters, **buffers}, tuple(args), kwargs))

    generator = torch.Generator().manual_seed(31)

    def tangent_like(t: Tensor) -> Tensor:
        return torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)

    floats = [xs[i] for i in where]
    param_tangents = {n: tangent_like(p) for n, p in params.items()}
    input_tangents = [tangent_like(x) for x in floats]
    if api == "torch.func.jvp":
        derivative = torch.func.jvp(forward, (params, *floats), (param_tangents, *input_tangents))[1]
    else:
        with forward_ad.dual_level():
            duals = {n: forward_ad.make_dual(p, param_tangents[n]) for n, p in params.items()}
            out = forward(duals, *(forward_ad.make_dual(x, u) for x, u in zip(floats, input_tangents)))
            tangent = forward_ad.unpack_dual(out).tangent
        assert tangent is not None, f"{case.spec.name}: the output carries no tangent"
        derivative = tangent
    leaves = [x.detach().requires_grad_() for x in floats]
    out = forward(params, *leaves)
    assert derivative.shape == out.shape, f"{case.spec.name}: J u {derivative.shape}, output {out.shape}"
    w = tangent_like(out)
    grads = torch.autograd.grad((out * w).sum(), [*leaves, *params.values()], allow_unused=True)
    tangents = [*input_tangents, *param_tangents.values()]
    reverse = [g * u for g, u in zip(grads, tangents) if g is not None]
    forward_terms = derivative.detach() * w
    # relative to the terms' mass: both sums can cancel
    mass = float(forward_terms.abs().sum() + sum(t.detach().abs().sum() for t in reverse))
    forward_value, reverse_value = float(forward_terms.sum()), float(sum(t.detach().sum() for t in reverse))
    assert abs(forward_value - reverse_value) <= 1e-9 * mass + 1e-12, (
        f"{case.spec.name} ({api}): w^T (J u) = {forward_value:.12g} in forward mode, "
        f"(J^T w)^T u = {reverse_value:.12g} in reverse mode"
    )


def test_torch_func_differentiates_twice(case: Case) -> None:
    """``torch.func.grad`` of ``torch.func.grad`` (MAML's inner step inside its outer one, as
    torch.func's own MAML example writes it; ``jacrev(jacrev(f))``) runs and gives plain
    autograd's double backward, which the property above holds to finite differences: the
    gradient of w^T grad L over every parameter and floating input. Under torch.func the fused
    kernels' Function is not used, and the kernels have no double backward of their own (79 of
    216 cases raised before). Float64, eval mode."""
    case.skip_unless_applies("gradients")
    module, inputs, kwargs = case.build()
    module = module.double().eval()
    xs = [x.double() if x.is_floating_point() else x for x in inputs]
    where = [i for i, x in enumerate(xs) if x.is_floating_point()]
    floats = [xs[i] for i in where]
    params = {n: p.detach() for n, p in module.named_parameters()}
    buffers = dict(module.named_buffers())
    with torch.no_grad():
        projection = noise(first(module(*xs, **kwargs)).shape, floats[0], seed=32)
    generator = torch.Generator().manual_seed(33)
    weights = [
        torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
        for t in [*floats, *params.values()]
    ]

    def loss(parameters: dict[str, Tensor], *values: Tensor) -> Tensor:
        args = list(xs)
        for i, x in zip(where, values):
            args[i] = x
        out = first(torch.func.functional_call(module, {**parameters, **buffers}, tuple(args), kwargs))
        return (out * projection).sum()

    arguments = tuple(range(len(floats) + 1))

    def projected_gradient(parameters: dict[str, Tensor], *values: Tensor) -> Tensor:
        grads = torch.func.grad(loss, argnums=arguments)(parameters, *values)
        flat = [*grads[1:], *grads[0].values()]
        return sum(((g * w).sum() for g, w in zip(flat, weights)), torch.zeros((), dtype=torch.float64))

    second = torch.func.grad(projected_gradient, argnums=arguments)(params, *floats)
    got = [*second[1:], *second[0].values()]
    leaves = [t.detach().requires_grad_() for t in [*floats, *params.values()]]
    value = loss(dict(zip(params, leaves[len(floats) :])), *leaves[: len(floats)])
    grads = torch.autograd.grad(value, leaves, create_graph=True, allow_unused=True)
    zero = torch.zeros((), dtype=torch.float64)
    projected = sum(((g * w).sum() for g, w in zip(grads, weights) if g is not None), zero)
    if projected.requires_grad:
        expected = list(torch.autograd.grad(projected, leaves, allow_unused=True))
    else:  # gradients constant in every argument (a linear module)
        expected = [None] * len(leaves)
    for g, e in zip(got, expected):
        assert_close(g, torch.zeros_like(g) if e is None else e, rtol=1e-7, atol=1e-9)


#: views whose backward zero-fills a buffer the size of the tensor they index
_INDEXING_BACKWARDS = {"SliceBackward0", "SelectBackward0"}


def _tensors_indexed_repeatedly(out: Tensor) -> list[tuple[str, int, tuple[int, ...]]]:
    """(producer, how many index views read it, its shape) for every autograd node whose output is
    read through two or more slices or selects, in the graph behind ``out``."""
    readers: dict[Any, list[Any]] = {}
    seen, stack = set(), [out.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for producer, _ in node.next_functions:
            if producer is None:
                continue
            if node.name() in _INDEXING_BACKWARDS:
                readers.setdefault(producer, []).append(node)
            stack.append(producer)
    return [
        (producer.name(), len(nodes), tuple(int(s) for s in nodes[0]._saved_self_sym_sizes))
        for producer, nodes in readers.items()
        if len(nodes) >= 2
    ]


def test_backward_fills_one_gradient_buffer_per_tensor(case: Case) -> None:
    """A large tensor read piecewise is split or unbound once, not sliced or indexed per piece: each
    slice's or select's backward zero-fills a buffer the size of the whole tensor and adds it to
    the others, where split's and unbind's write every piece's gradient into one buffer. Two slices
    of criss-cross's (B, H, W, H + W) map added 8 MiB to the peak of a (1, 64, 128^2) training step
    (94 -> 86 MiB with a split), more than mmcv's whole lead. Tensors under a quarter of the largest
    input's size are let through (a few small parameters or tap offsets)."""
    case.skip_unless_applies("gradients")
    module, inputs, kwargs = case.build()
    module.train()
    inputs = tuple(x.requires_grad_() if x.is_floating_point() else x for x in inputs)
    out = first(module(*inputs, **kwargs))
    threshold = max(x.numel() for x in inputs) // 4
    large = [
        (producer, count, shape)
        for producer, count, shape in _tensors_indexed_repeatedly(out)
        if torch.Size(shape).numel() >= threshold
    ]
    assert not large, (
        f"{case.spec.name}: tensors read through several slices or selects (producer, reads, shape): "
        f"{large}; split or unbind them once"
    )


def test_backward_keeps_no_large_tensor_for_its_shape_alone(case: Case) -> None:
    """``index_add``'s backward keeps its whole ``source`` (to expand the gathered gradient to its
    shape); where the source is an edge- or position-sized intermediate, that is one more such
    buffer kept to the backward, as graph_self_attention's weighted messages were (64 of 268 MiB
    saved at 2 x 1024 tokens, bfloat16). A backward that keeps the index alone (graph_self_attention's
    ``_SumIntoTargets``), or ``scatter_add`` with an expanded index, does not."""
    case.skip_unless_applies("gradients")
    module, inputs, kwargs = case.build()
    module.train()
    inputs = tuple(x.requires_grad_() if x.is_floating_point() else x for x in inputs)
    out = first(module(*inputs, **kwargs))
    threshold = max(x.numel() for x in inputs) // 4
    seen, stack, kept = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "IndexAddBackward0" and node._saved_source.numel() >= threshold:
            kept.append(tuple(node._saved_source.shape))
        stack.extend(producer for producer, _ in node.next_functions)
    assert not kept, f"{case.spec.name}: index_add keeps sources of shapes {kept} for the backward"


def test_return_attn_matches_plain_path(case: Case) -> None:
    if not case.spec.returns_attn:
        pytest.skip("returns no attention maps")
    module, inputs, kwargs = case.build()
    module.eval()
    with torch.no_grad():
        plain = first(module(*inputs, **kwargs))
        result = module(*inputs, **kwargs, return_attn=True)
    assert isinstance(result, tuple) and len(result) == 2
    assert_close(result[0], plain)
    maps = tensors_in(result[1])
    assert maps, f"{case.spec.name}: return_attn gave no tensors"
    for m in maps:
        assert torch.isfinite(m).all()


def test_non_default_sizes(case: Case) -> None:
    """A width and extent other than the defaults: catches hard-coded sizes."""
    base = case.spec.default_sizes
    module, inputs, kwargs = case.build(batch=3, width=base.width + 16, extent=base.extent + 3)
    module.eval()
    with torch.no_grad():
        out = first(module(*inputs, **kwargs))
    expected_shape(case.spec, inputs, out)
    assert torch.isfinite(out).all()


@contextlib.contextmanager
def deterministic() -> Iterator[None]:
    """Bitwise-repeatable kernels, as a user asks for them: CUDA's atomic adds (index_add,
    scatter_add) sum in a different order on every call by default; in this mode torch runs its
    deterministic implementations, or raises where an op has none."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def test_each_batch_item_is_computed_as_if_alone(case: Case) -> None:
    """In eval mode, item i of a batch gives what it gives in a batch of one: a reshape that mixes
    the batch with heads, groups or positions (``view`` where ``permute`` was needed), a pooling or
    normalisation over the wrong dims, or a mask broadcast onto the wrong items all break this,
    and a symmetric random batch hides them from the shape and finiteness checks. Every tensor
    input and mask leads with the batch (``batch_dim`` 0); float64, so that the batched and
    single-item GEMMs' different blockings do not blur a real difference."""
    if case.spec.batch_dim is None:
        pytest.skip("no batch dimension (graph node features)")
    base = case.spec.default_sizes
    batch = 3  # not a size any other dim has, so no unbatched tensor is mistaken for a batched one
    module, inputs, kwargs = case.build(batch=batch, extent=base.extent + 3)
    module = module.double().eval()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, Tensor)}
    options = {k: v for k, v in kwargs.items() if k not in tensor_kwargs}  # causal=True, ...
    for name, x in [*((f"input {i}", x) for i, x in enumerate(inputs)), *tensor_kwargs.items()]:
        assert x.shape[0] == batch, f"{case.spec.name}: {name} does not lead with the batch"
    tensor_kwargs = {k: v.double() if v.is_floating_point() else v for k, v in tensor_kwargs.items()}
    with torch.no_grad():
        whole = first(module(*inputs, **options, **tensor_kwargs))
        for i in range(batch):
            alone = first(
                module(
                    *(x[i : i + 1] for x in inputs),
                    **options,
                    **{k: v[i : i + 1] for k, v in tensor_kwargs.items()},
                )
            )
            assert_close(alone, whole[i : i + 1], rtol=1e-9, atol=1e-12)


def test_state_dict_round_trip_and_determinism(case: Case) -> None:
    source, inputs, kwargs = case.build(seed=0)
    target, _, _ = case.build(seed=1)
    target.load_state_dict(source.state_dict())
    source.eval(), target.eval()
    with torch.no_grad(), deterministic():
        expected = first(source(*inputs, **kwargs))
        assert_close(first(source(*inputs, **kwargs)), expected, rtol=0, atol=0)
        assert_close(first(target(*inputs, **kwargs)), expected, rtol=0, atol=0)


def test_a_no_op_hook_on_every_sub_layer_runs_and_changes_nothing(case: Case) -> None:
    """Sub-layers run as functions on their parameters where a module call would compute the same
    (:func:`attnzoo.layers.call_layer`; weights read into a product of the module's own, as mha's
    stacked q, k, v and criss_cross's stacked 1x1 convs): a hook must make each a module call
    again. With a no-op forward hook on every leaf sub-module the output must not change, and
    every leaf whose parameters the output depends on must have run its hook (bug classes: a
    shortcut that drops one of a layer's options; one that skips its hooks, and so pruning,
    adapters and feature taps)."""
    module, inputs, kwargs = case.build()
    module.eval()
    with torch.no_grad():
        plain = first(module(*inputs, **kwargs))
    leaves = {
        name: sub
        for name, sub in module.named_modules()
        if name and not any(True for _ in sub.children())  # Linear, Conv, norms, gates
    }
    called: set[str] = set()
    handles = [
        sub.register_forward_hook(lambda sub, args, out, name=name: called.add(name))
        for name, sub in leaves.items()
    ]
    try:
        module.zero_grad(set_to_none=True)
        hooked = first(module(*inputs, **kwargs))
        if hooked.requires_grad:  # else no parameter reaches the output
            hooked.float().sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    assert_close(hooked.detach(), plain)
    used = {
        name for name, sub in leaves.items() if any(p.grad is not None for p in sub.parameters(recurse=False))
    }
    skipped = used - called
    assert not skipped, f"{case.spec.name}: hooks skipped on {sorted(skipped)}"


class _Doubled(nn.Module):
    """A parametrization: the weight a layer computes with is twice its stored one."""

    def forward(self, weight: Tensor) -> Tensor:
        return 2 * weight


def test_a_parametrized_weight_is_the_weight_every_sub_layer_computes_with(case: Case) -> None:
    """``torch.nn.utils.parametrize`` (weight_norm, spectral_norm, orthogonal, ...) turns a layer's
    ``weight`` into a property computed on access, and its class into a subclass: a module reading
    the stored tensor (``_parameters["weight"]``) or taking a shortcut meant for the plain class
    would compute with the wrong weight. Every leaf's ``weight`` is parametrized to twice its
    value: the output must equal that of a copy whose weights are doubled in place, and a
    training step must reach every parametrized weight that the copy's step reaches."""
    module, inputs, kwargs = case.build()
    # float64: the shortcut and the module call may sum in different orders, and doubled weights
    # amplify float32's rounding past the tolerance (glore without normalisation: 5e-5 of 0.3)
    module.eval().double()
    inputs = tuple(x.double() if isinstance(x, Tensor) and x.is_floating_point() else x for x in inputs)
    doubled = copy.deepcopy(module)
    parametrized = []
    for name, sub in module.named_modules():
        weight = sub._parameters.get("weight") if name and not any(True for _ in sub.children()) else None
        if isinstance(weight, nn.Parameter) and weight.is_floating_point():
            nn.utils.parametrize.register_parametrization(sub, "weight", _Doubled())
            with torch.no_grad():
                doubled.get_submodule(name).weight.mul_(2)
            parametrized.append(name)
    if not parametrized:
        pytest.skip("no sub-layer with a weight")
    with torch.no_grad():
        assert_close(first(module(*inputs, **kwargs)), first(doubled(*inputs, **kwargs)))
    for model in (module, doubled):
        model.zero_grad(set_to_none=True)
        out = first(model(*inputs, **kwargs))
        if out.requires_grad:
            out.float().sum().backward()
    for name in parametrized:
        stored = module.get_submodule(name).parametrizations.weight.original
        reached = doubled.get_submodule(name).weight.grad is not None
        assert (stored.grad is not None) == reached, (
            f"{case.spec.name}: {name}'s parametrization was bypassed"
        )


def _poisoned(x: Tensor, where: Tensor, value: float) -> Tensor:
    return torch.where(where.to(x.device), torch.full_like(x, value), x)


@pytest.mark.parametrize("return_attn", [False, True], ids=["fused", "maps"])
def test_nan_in_an_input_reaches_the_output(case: Case, return_attn: bool) -> None:
    """A user's NaN is a bug they need to see: it reaches the output on every path, and the paths
    agree on where (bug: the fused kernel turned a NaN query into a finite output)."""
    if return_attn and not case.spec.returns_attn:
        pytest.skip("returns no attention maps")
    case.skip_unless_applies("nan")
    # an odd length: the fused CPU kernel's blocks lost a NaN query for N_k = 5 or 11, not 8
    module, inputs, kwargs = case.build(extent=case.spec.default_sizes.extent + 3)
    module.eval()
    for i in floating(inputs):
        x = inputs[i].clone()
        if i == 0:
            x.view(-1)[0] = float("nan")  # one entry of the first (query) input, a real position
        else:
            x.fill_(float("nan"))  # a whole memory: local attention may skip any one position
        poisoned = (*inputs[:i], x, *inputs[i + 1 :])
        with torch.no_grad():
            plain = first(module(*poisoned, **kwargs))
            assert plain.isnan().any(), f"{case.spec.name}: a NaN in input {i} vanished"
            if not return_attn:  # training paths too (sampling, batch statistics, dropout)
                assert first(module.train()(*poisoned, **kwargs)).isnan().any(), "vanished in training"
                module.eval()
            if return_attn:
                out = first(module(*poisoned, **kwargs, return_attn=True))
                assert out.isnan().any(), f"{case.spec.name}: a NaN in input {i} vanished with maps"
                # a masked weight of exactly 0 times a NaN value is NaN on the explicit path only
                # (the fused kernel skips masked keys): compare where both paths are finite
                finite = ~(plain.isnan() | out.isnan())
                assert_close(out[finite], plain[finite])


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("return_attn", [False, True], ids=["fused", "maps"])
def test_padded_positions_never_reach_real_outputs(case: Case, value: float, return_attn: bool) -> None:
    """Whatever padded (masked) positions hold, even NaN or Inf, real outputs do not change."""
    if case.sample.padding is None:
        pytest.skip("no padded positions")
    if return_attn and not case.spec.returns_attn:
        pytest.skip("returns no attention maps")
    module, inputs, kwargs = case.build()
    module.eval()
    padding = case.sample.padding(case.sizes(), inputs, kwargs)
    poisoned = tuple(
        _poisoned(x, padding.inputs[i], value) if i in padding.inputs else x for i, x in enumerate(inputs)
    )
    with torch.no_grad():
        clean = first(module(*inputs, **kwargs, **({"return_attn": True} if return_attn else {})))
        dirty = first(module(*poisoned, **kwargs, **({"return_attn": True} if return_attn else {})))
    real = torch.ones_like(clean, dtype=torch.bool)
    if padding.real is not None:
        real = real & padding.real.to(clean.device)
    assert real.any()
    assert_close(dirty[real], clean[real])


def test_fully_masked_rows_give_zero_maps_and_no_gradient(case: Case) -> None:
    """A batch item whose every key is masked: finite outputs and gradients, zero maps, and no
    gradient reaches its keys (softmax over nothing must not be NaN)."""
    if case.sample.padding is None:
        pytest.skip("no padded positions")
    module, inputs, kwargs = case.build()
    padding = case.sample.padding(case.sizes(), inputs, kwargs)
    if not padding.empty_batch:
        pytest.skip("no fully masked batch item")
    module.eval()
    inputs = tuple(x.requires_grad_() if x.is_floating_point() else x for x in inputs)
    result = (
        module(*inputs, **kwargs, return_attn=True) if case.spec.returns_attn else module(*inputs, **kwargs)
    )
    out = first(result)
    assert torch.isfinite(out).all()
    key_lengths = {inputs[i].shape[1] for i in padding.inputs}
    if case.spec.returns_attn and case.spec.map_kind in ("pairwise", "alignment"):
        # maps over the masked keys (not over compressed ones, as Linformer's): zero rows
        for m in (m for m in tensors_in(result[1]) if m.shape[-1] in key_lengths):
            for b in padding.empty_batch:
                assert torch.equal(m[b], torch.zeros_like(m[b])), "a fully masked row has weights"
    empty = torch.zeros(out.shape[0], dtype=torch.bool, device=out.device)
    empty[list(padding.empty_batch)] = True
    projection = noise(out.shape, out) * empty.view(-1, *[1] * (out.dim() - 1))
    (out * projection).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient in {name}"
    for i, pad in padding.inputs.items():
        grad = inputs[i].grad
        assert grad is not None and torch.isfinite(grad).all()
        reached = grad.masked_select(pad.to(grad.device).expand_as(grad))
        assert torch.equal(reached, torch.zeros_like(reached)), "gradient reached masked keys"


def test_channels_last_input_gives_the_same_output(case: Case) -> None:
    x = case.spec.example_inputs(case.sizes(batch=1))[0]
    if x.dim() != 4 or case.spec.channel_dim != 1:
        pytest.skip("not a (B, C, H, W) module")
    module, inputs, kwargs = case.build()
    module.eval()
    strided = tuple(
        t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 and t.is_floating_point() else t
        for t in inputs
    )
    with torch.no_grad():
        assert_close(first(module(*strided, **kwargs)), first(module(*inputs, **kwargs)))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_channels_last_input_gives_the_same_gradients(case: Case, mode: str) -> None:
    """A training step on a channels-last input gives the gradients of the contiguous one, for the
    input and every parameter, with the output's gradient in the input's layout (as the next layer
    of such a network hands it back). Kernels pick their backward by the layouts they see: torch
    2.13's CPU BatchNorm misread a (B, C, N, 1) view of transposed tokens against a gradient of
    another layout, so non_local and dnl had wrong gradients on contiguous inputs and glore on
    channels-last ones; each layout must be checked, float64."""
    case.skip_unless_applies("gradients")
    x = case.spec.example_inputs(case.sizes(batch=1))[0]
    if x.dim() != 4 or case.spec.channel_dim != 1:
        pytest.skip("not a (B, C, H, W) module")
    module, inputs, kwargs = case.build()
    module = module.double().train(mode == "train")
    buffers = [(b, b.clone()) for b in module.buffers()]

    def step(channels_last: bool) -> list[Tensor]:
        with torch.no_grad():
            for buffer, kept in buffers:
                buffer.copy_(kept)
        layouts = {4: torch.channels_last, 5: torch.channels_last_3d} if channels_last else {}
        leaves = [
            t.double()
            .contiguous(memory_format=layouts.get(t.dim(), torch.contiguous_format))
            .requires_grad_()
            if t.is_floating_point()
            else t
            for t in inputs
        ]
        out = first(module(*leaves, **kwargs))
        tensors = [*(t for t in leaves if t.requires_grad), *module.parameters()]
        # the output's gradient in the input's layout, as the next layer of a channels-last network
        # hands it back
        projection = noise(out.shape, out, seed=5)
        projection = projection.contiguous(memory_format=layouts.get(out.dim(), torch.contiguous_format))
        grads = torch.autograd.grad((out * projection).sum(), tensors, allow_unused=True)
        return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]

    contiguous = step(False)
    if not all(torch.allclose(a, b, rtol=1e-12, atol=1e-14) for a, b in zip(step(False), contiguous)):
        pytest.skip(f"the forward is random in {mode} mode (dropout, sampled gates or noise)")
    for a, b in zip(step(True), contiguous):
        assert_close(a, b, rtol=1e-9, atol=1e-11)


def _strided_copy(x: Tensor) -> Tensor:
    """``x``'s values in a view whose last dim has stride 2 (every other column of a wider buffer):
    what a slice or a split of a larger tensor hands a module."""
    wide = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
    wide[..., ::2] = x
    return wide[..., ::2]


def test_inputs_are_read_never_written_and_any_strides_work(case: Case) -> None:
    """A training step and an inference call leave every input and mask as they were (an in-place
    op on an input corrupts the caller's tensor, or raises on an expanded one), and the output
    does not depend on the inputs' strides: a strided view, and a batch expanded from one item
    (stride 0 on the batch dim), give the contiguous input's output."""
    module, inputs, kwargs = case.build()
    given = [*inputs, *(v for v in kwargs.values() if isinstance(v, Tensor))]
    before = [t.clone() for t in given]
    module.train()
    leaves = tuple(x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs)
    out = first(module(*leaves, **kwargs))
    (out * noise(out.shape, out)).sum().backward()
    for i, (t, copy_) in enumerate(zip([*leaves, *given[len(inputs) :]], before)):
        assert torch.equal(t.detach(), copy_), f"{case.spec.name}: input {i} was modified in place"
    module.eval()
    with torch.no_grad():
        expected = first(module(*inputs, **kwargs))
        for i, (t, copy_) in enumerate(zip(given, before)):
            assert torch.equal(t, copy_), f"{case.spec.name}: input {i} was modified in place (no grad)"
        strided = tuple(_strided_copy(x) if x.is_floating_point() else x for x in inputs)
        assert_close(first(module(*strided, **kwargs)), expected)
        if case.spec.batch_dim is not None:
            expanded = tuple(x[:1].expand_as(x) if x.is_floating_point() else x for x in inputs)
            contiguous = tuple(x.contiguous() for x in expanded)
            assert_close(first(module(*expanded, **kwargs)), first(module(*contiguous, **kwargs)))


def _channel_dim(spec: ModuleSpec, inputs: tuple[Tensor, ...], i: int) -> int:
    """Where input ``i`` keeps its channels: an input of the first one's rank shares its layout;
    a feature map beside a sequence (show-attend-tell's annotations) is channels-first."""
    return spec.channel_dim if inputs[i].dim() == inputs[0].dim() else 1


def _extent_dim(channel_dim: int, x: Tensor) -> int:
    """The last position axis: W for channels-first maps, N for channels-last sequences."""
    return x.dim() - 1 if channel_dim == 1 else x.dim() - 2


def _replaced(inputs: tuple[Tensor, ...], i: int, x: Tensor) -> tuple[Tensor, ...]:
    return (*inputs[:i], x, *inputs[i + 1 :])


def test_bad_input_errors(case: Case) -> None:
    """Every input (the query and each memory, key or second map) of the wrong dtype, rank, channel
    count or batch: an error naming what was expected, not torch's internal message."""
    case.skip_unless_applies("bad_input")
    if case.sample.forward_kwargs is not None:
        pytest.skip("the input checks are those of the sample without forward kwargs")
    spec = case.spec
    module, inputs, _ = case.build()
    module.eval()
    x, rest = inputs[0], inputs[1:]
    with pytest.raises(TypeError, match="float"):
        module(x.to(torch.int64), *rest)
    lower = x[0]  # one rank too few
    try:
        with torch.no_grad():
            unbatched = first(module(lower, *(r[0] for r in rest)))
    except ValueError as error:
        assert "expected" in str(error), f"{spec.name}: unclear message for a rank too few: {error}"
    else:
        # accepted as the unbatched form (torch's convention for sequences): it must mean exactly
        # that, the result of the one-item batch without its batch axis; one rank less still fails
        with torch.no_grad():
            batched = first(module(x[:1], *(r[:1] for r in rest)))[0]
        assert_close(unbatched, batched)
        with pytest.raises(ValueError, match="expected"):
            module(lower[0], *(r[0] for r in rest))
    for i in floating(inputs):
        t, channel_dim = inputs[i], _channel_dim(spec, inputs, i)
        wrong = torch.cat([t, t.narrow(channel_dim, 0, 1)], dim=channel_dim)
        with pytest.raises(ValueError, match=str(t.shape[channel_dim])):
            module(*_replaced(inputs, i, wrong))
        if i == 0:
            continue
        # a memory of its own: each of its checks, whatever the query
        with pytest.raises(TypeError, match="float"):
            module(*_replaced(inputs, i, t.to(torch.int64)))
        with pytest.raises(ValueError, match="expected"):
            module(*_replaced(inputs, i, t[0]))
        if spec.batch_dim is not None and t.shape[0] == x.shape[0] > 1:
            with pytest.raises(ValueError, match=f"B={x.shape[0]}"):
                module(*_replaced(inputs, i, t[:1]))


def test_empty_dimensions(case: Case) -> None:
    case.skip_unless_applies("bad_input")
    if case.sample.forward_kwargs is not None:
        pytest.skip("the input checks are those of the sample without forward kwargs")
    spec = case.spec
    module, inputs, _ = case.build()
    module.eval()
    # an empty sequence/spatial/node dimension, in the query or in any memory, is an error ...
    for i in floating(inputs):
        t = inputs[i]
        empty_extent = t.narrow(_extent_dim(_channel_dim(spec, inputs, i), t), 0, 0)
        with pytest.raises(ValueError, match="empty"):
            module(*_replaced(inputs, i, empty_extent))
    # ... but an empty batch passes through, as elsewhere in PyTorch (zero RoIs, say)
    if spec.batch_dim is not None:
        empty = tuple(t.narrow(0, 0, 0) for t in inputs)
        with torch.no_grad():
            out = first(module(*empty))
        assert out.shape[0] == 0


def test_bad_masks_are_clear_errors(case: Case) -> None:
    """A mask of a non-bool, non-float dtype or of a shape that does not fit the inputs: an error
    naming the argument, not torch's broadcast message (or a silent misuse by the fused kernel)."""
    module, inputs, kwargs = case.build()
    module.eval()
    masks = {k: v for k, v in kwargs.items() if isinstance(v, Tensor) and v.dtype == torch.bool}
    if not masks:
        pytest.skip("no mask argument")
    for key, mask in masks.items():
        with pytest.raises(TypeError, match=rf"(?s){key}.*bool"):
            module(*inputs, **{**kwargs, key: mask.to(torch.int64)})
        short = mask.narrow(-1, 0, mask.shape[-1] - 1)  # one key too few
        with pytest.raises(ValueError, match=rf"(?s){key}.*shape"):
            module(*inputs, **{**kwargs, key: short})


def test_an_additive_mask_in_any_float_dtype_is_the_same_mask(case: Case) -> None:
    """A module that takes additive masks takes them in every floating dtype, with the result of
    the same mask in the inputs' dtype: a float16 padding mask beside float32 inputs, or a float64
    bias table, is no reason for torch's internal "attn_mask dtype" error, nor for float64 maps
    beside float32 inputs. A module that takes bool masks only rejects every float one alike."""
    module, inputs, kwargs = case.build()
    module.eval()
    masks = {k: v for k, v in kwargs.items() if isinstance(v, Tensor) and v.dtype == torch.bool}
    if not masks:
        pytest.skip("no mask argument")
    dtype = inputs[0].dtype
    call = (lambda **kw: module(*inputs, **kw, return_attn=True)) if case.spec.returns_attn else (
        lambda **kw: module(*inputs, **kw)
    )  # fmt: skip
    for key, mask in masks.items():
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
        with torch.no_grad():
            try:
                expected = call(**{**kwargs, key: additive})
            except TypeError as error:
                assert key in str(error), f"{case.spec.name}: a float {key} is rejected without naming it"
                for other in (torch.float64, torch.float16, torch.bfloat16):
                    with pytest.raises(TypeError, match=key):
                        call(**{**kwargs, key: additive.to(other)})
                continue
            for other in (torch.float64, torch.float16, torch.bfloat16):
                result = call(**{**kwargs, key: additive.to(other)})
                for got, want in zip(tensors_in(result), tensors_in(expected)):
                    assert got.dtype == want.dtype, f"{case.spec.name}: a {other} {key} gives {got.dtype}"
                    assert_close(got, want, rtol=0, atol=0)


def test_dtype_mismatch_is_one_clear_error(case: Case) -> None:
    """An input of another dtype than the parameters, or two inputs of two float dtypes: one
    error naming both dtypes and the argument, not torch's internal matmul/conv message."""
    module, inputs, kwargs = case.build()
    module.eval()
    has_parameters = any(p.is_floating_point() for p in module.parameters())
    for i in floating(inputs):
        if i > 0 or has_parameters:
            cast = (*inputs[:i], inputs[i].double(), *inputs[i + 1 :])
            with pytest.raises(TypeError, match=r"(?s)(float64.*float32|float32.*float64)"):
                module(*cast, **kwargs)


def test_autocast_keeps_working(case: Case) -> None:
    """Mixed precision: under autocast, inputs legitimately differ from the parameters' dtype."""
    module, inputs, kwargs = case.build()
    module.eval()
    dtype = torch.bfloat16
    with torch.no_grad(), torch.autocast(DEVICE.type, dtype=dtype):
        out = first(module(*inputs, **kwargs))
        if case.spec.returns_attn:
            assert torch.isfinite(first(module(*inputs, **kwargs, return_attn=True))).all()
    assert torch.isfinite(out).all()
    with torch.no_grad():
        reference = first(module(*inputs, **kwargs)).float()
    error = (out.float() - reference).norm() / reference.norm().clamp_min(1e-12)
    assert error < 5e-2, f"{case.spec.name}: relative error {error:.2e} under autocast"


def test_runs_on_the_meta_device(case: Case) -> None:
    """Every tensor a module makes is made on its input's device (bug: the causal mask was made on
    the default device, the CPU, and every causal call on CUDA failed). On the meta device a tensor
    made elsewhere is an error, so the CPU suite catches what only a GPU run showed; shape inference
    and deferred initialisation run modules there too. The shapes agree with a real call's."""
    case.skip_unless_applies("meta")
    module, inputs, kwargs = case.build()
    module.eval()
    flags = [{}, {"return_attn": True}] if case.spec.returns_attn else [{}]
    with torch.no_grad():
        expected = [tensors_in(module(*inputs, **kwargs, **flag)) for flag in flags]
    module.to("meta")
    meta_inputs = tuple(x.to("meta") for x in inputs)
    meta_kwargs = {k: v.to("meta") if isinstance(v, Tensor) else v for k, v in kwargs.items()}
    for flag, real in zip(flags, expected):
        with torch.no_grad():
            out = tensors_in(module(*meta_inputs, **meta_kwargs, **flag))
        assert [t.shape for t in out] == [t.shape for t in real], f"{case.spec.name} {flag}"
        assert all(t.device.type == "meta" for t in out)


def _elsewhere() -> torch.device:
    return torch.device("meta") if DEVICE.type == "cpu" else torch.device("cpu")


def test_mask_on_another_device_is_a_clear_error(case: Case) -> None:
    """A mask or an edge index on another device than the input: a clear error, never a read of
    garbage by the fused kernel or an error deep inside torch."""
    module, inputs, kwargs = case.build()
    module.eval()
    moved_kwargs = {k for k, v in kwargs.items() if isinstance(v, Tensor)}
    moved_inputs = [i for i, x in enumerate(inputs) if i > 0 and not x.is_floating_point()]
    if not moved_kwargs and not moved_inputs:
        pytest.skip("no mask or index argument")
    for key in moved_kwargs:
        with pytest.raises(ValueError, match=rf"(?s){key}.*device"):
            module(*inputs, **{**kwargs, key: kwargs[key].to(_elsewhere())})
    for i in moved_inputs:
        moved = (*inputs[:i], inputs[i].to(_elsewhere()), *inputs[i + 1 :])
        with pytest.raises(ValueError, match="device"):
            module(*moved, **kwargs)


class _Model(nn.Module):
    """A user's model around a mechanism: its own input check, the mechanism, an addition (the
    mechanism's other inputs and kwargs are constants of the model)."""

    def __init__(self, mechanism: nn.Module, rest: tuple[Tensor, ...], kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.mechanism, self.rest, self.kwargs = mechanism, rest, kwargs

    def forward(self, x: Tensor) -> Tensor:
        check_input(x, "x", ("N C", "B N C", "B C H W", "B C T H W"))
        return first(self.mechanism(x, *self.rest, **self.kwargs)) + 1.0


def test_fx_traces_models_holding_it(case: Case) -> None:
    """Input checks are transparent to torch.fx, and a model holding the mechanism traces (bug: the
    checks raised on a Proxy, so ``attach`` failed on attnzoo's own ResNet and when attaching
    twice). The mechanism is one node of the graph (:func:`attnzoo.inspect.symbolic_trace`)."""
    module, (x, *rest), kwargs = case.build()
    model = _Model(module, tuple(rest), kwargs).eval()
    traced = symbolic_trace(model)
    assert any(node.op == "call_module" and node.target == "mechanism" for node in traced.graph.nodes)
    with torch.no_grad():
        assert_close(traced(x), model(x))


def test_linear_memory_without_maps(case: Case) -> None:
    """The declared promise: without maps, no buffer grows with N_q x N_k. With 4x the positions,
    the largest storage any op produced (the op recorder sees the storage behind every output)
    grows about 4x (8x for N (H + W) criss-cross or relative-position terms), not 16x."""
    if not case.spec.linear_memory:
        pytest.skip("the spec does not promise linear memory")
    case.skip_unless_applies("linear_memory")
    image = case.spec.channel_dim == 1
    largest = []
    for extent in (12, 24) if image else (128, 512):  # N = 144 -> 576 or 128 -> 512 positions
        module, inputs, kwargs = case.build(batch=1, extent=extent)
        module.eval()
        with torch.no_grad(), OpRecorder() as recorder:
            module(*inputs, **kwargs)
        largest.append(recorder.largest_storage)
    growth = largest[1] / largest[0]
    # a parameter may grow with N by design (Linformer's k x N projections): a copy of it is fine
    biggest_parameter = max((p.numel() for p in module.parameters()), default=0)
    assert growth < 10 or largest[1] <= 2 * biggest_parameter, (
        f"{case.spec.name}: the largest buffer grew {growth:.1f}x ({largest[0]} -> {largest[1]} "
        "elements) for 4x the positions: something pairwise was formed"
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_large_logits_in_half_precision(case: Case, dtype: torch.dtype) -> None:
    """Large inputs (logits in the hundreds) in bfloat16/float16 stay finite: the softmax is
    formed in float32 and the half-precision paths do not overflow."""
    case.skip_unless_applies("large_logits")
    if DEVICE.type == "cpu" and dtype == torch.float16 and case.spec.channel_dim == 1:
        pytest.skip("float16 convolutions are slow on CPU; bfloat16 covers the CPU")
    module, inputs, kwargs = case.build()
    module.eval().to(dtype)
    # bfloat16 has float32's range: much larger logits; float16 ends at 65504
    factor = 30.0 if dtype == torch.bfloat16 else 4.0
    big = tuple(factor * x.to(dtype) if x.is_floating_point() else x for x in inputs)
    with torch.no_grad():
        out = first(module(*big, **kwargs))
        assert out.dtype == dtype and torch.isfinite(out).all()
        if case.spec.returns_attn:
            result = module(*big, **kwargs, return_attn=True)
            assert torch.isfinite(result[0]).all()
            assert all(torch.isfinite(m).all() for m in tensors_in(result[1]))


def test_non_square_maps(case: Case) -> None:
    """H != W: catches height and width swapped in a reshape or a relative-position table."""
    module, inputs, kwargs = case.build()
    x = inputs[0]
    if case.spec.channel_dim != 1 or x.dim() != 4 or len(inputs) != 1 or kwargs:
        pytest.skip("not a single-input (B, C, H, W) module")
    x = torch.cat([x, x[:, :, :, :3]], dim=3)  # (B, C, H, W) -> (B, C, H, W + 3)
    module.eval()
    with torch.no_grad():
        out = first(module(x))
        if case.spec.returns_attn:
            assert_close(first(module(x, return_attn=True)), out)
    if case.spec.shape_preserving:
        assert out.shape == x.shape
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# the expensive properties: the default sample and the samples marked thorough


def test_pickle_and_deepcopy(thorough: Case) -> None:
    module, inputs, kwargs = thorough.build()
    module.eval()
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clones = [loaded, pickle.loads(pickle.dumps(module)), copy.deepcopy(module)]
    with torch.no_grad(), deterministic():
        expected = first(module(*inputs, **kwargs))
        for clone in clones:
            assert_close(first(clone(*inputs, **kwargs)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_agree_with_float32(thorough: Case, dtype: torch.dtype) -> None:
    module, inputs, kwargs = thorough.build()
    module.eval()
    with torch.no_grad():
        reference = first(module(*inputs, **kwargs)).double()
        module.to(dtype)
        cast = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
        cast_kwargs = {
            k: v.to(dtype) if isinstance(v, Tensor) and v.is_floating_point() else v
            for k, v in kwargs.items()
        }
        out = first(module(*cast, **cast_kwargs))
    assert out.dtype == dtype, f"{thorough.spec.name}: output is {out.dtype}, not {dtype}"
    assert torch.isfinite(out).all()
    error = (out.double() - reference).norm() / reference.norm().clamp_min(1e-12)
    limit = 1e-5 if dtype == torch.float64 else 3e-2
    assert error < limit, f"{thorough.spec.name}: relative error {error:.2e} in {dtype}"


def test_compile_fullgraph_aot_eager(thorough: Case) -> None:
    module, inputs, kwargs = thorough.build()
    module.eval()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(first(compiled(*inputs, **kwargs)), first(module(*inputs, **kwargs)))


#: AOTAutograd traces these modules' per-tap loops for 18-32 s each on two cores (dynamo alone: 5-7 s);
#: the compiled training property runs them on dynamo's graph with eager autograd, which runs the
#: same plain operators
_AOT_TOO_SLOW = {"dgmn", "local_relation", "san", "sasa"}


@pytest.mark.slow
def test_compiled_training_step_is_the_eager_one(spec: ModuleSpec) -> None:
    """A training step of the compiled module (``fullgraph=True``, a dynamic batch, aot_eager:
    dynamo's graph and AOTAutograd's backward; ``_AOT_TOO_SLOW``: dynamo's graph and autograd)
    gives eager's output and gradients, of every parameter and floating input, at two batch
    sizes. The eager-only paths (hand-written backwards, in-place buffers) give way to plain
    operators inside the graph; this checks that both compute the same, in training mode, where
    the inference compile property above does not look."""
    case = Case(spec, spec.all_samples()[0])
    module, _, _ = case.build()
    module.train()
    torch._dynamo.reset()
    backend = "eager" if spec.name in _AOT_TOO_SLOW else "aot_eager"
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    for batch in (2, 3):
        _, inputs, kwargs = case.build(batch=batch)
        results = []
        for fn in (module, compiled):
            module.load_state_dict(buffers, strict=False)  # the same running statistics for both
            leaves = [x.detach().requires_grad_() if x.is_floating_point() else x for x in inputs]
            if fn is compiled and spec.batch_dim is not None:
                for x in leaves:  # a dynamic batch (every size dynamic makes the window loops slow)
                    torch._dynamo.mark_dynamic(x, spec.batch_dim)
            torch.manual_seed(3)  # the same dropout masks and sampled gates
            out = first(fn(*leaves, **kwargs))
            targets = [*(x for x in leaves if x.requires_grad), *module.parameters()]
            loss = (out * noise(out.shape, out, seed=4)).sum()
            results.append((out.detach(), torch.autograd.grad(loss, targets, allow_unused=True)))
        (eager_out, eager_grads), (compiled_out, compiled_grads) = results
        assert_close(compiled_out, eager_out)
        for got, want in zip(compiled_grads, eager_grads):
            assert (got is None) == (want is None), f"{spec.name}: a gradient reaches one and not the other"
            if got is not None:
                assert_close(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("name", INDUCTOR_NAMES)
def test_compile_inductor(name: str) -> None:
    module, inputs, kwargs = Case(attnzoo.get_spec(name), Sample("default")).build()
    module.eval()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        assert_close(first(compiled(*inputs, **kwargs)), first(module(*inputs, **kwargs)))


def test_torch_export(thorough: Case) -> None:
    if not thorough.spec.exportable:
        pytest.skip(thorough.spec.notes or "not exportable")
    module, inputs, kwargs = thorough.build()
    module.eval()
    program = torch.export.export(module, inputs, kwargs=kwargs)
    with torch.no_grad():
        assert_close(first(program.module()(*inputs, **kwargs)), first(module(*inputs, **kwargs)))


def test_onnx_export_runs_in_onnxruntime(thorough: Case) -> None:
    spec = thorough.spec
    if not spec.exportable:
        pytest.skip(spec.notes or "not exportable")
    thorough.skip_unless_applies("onnx")
    ort = pytest.importorskip("onnxruntime")
    # onnxruntime runs on the CPU here: build there whatever the suite's device
    torch.manual_seed(0)
    sizes = spec.sizes()
    module = randomize_(spec.build_sample(thorough.sample, sizes), seed=0, scale=0.1, shift=True)
    inputs, kwargs = spec.sample_inputs(thorough.sample, sizes)
    module.eval()
    dynamic = None
    if spec.batch_dim is not None and not kwargs:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic = tuple({0: batch} for _ in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # optimize=False: the onnxscript optimizer's pass took more than half of the export time
        # of the largest graphs (dgmn's 4,872 nodes: 77 s with it, 33 s without) and is not what
        # this checks; mha's, synthesizer's and non_local's own ONNX tests run it (the default)
        program = torch.onnx.export(
            module,
            inputs,
            kwargs=kwargs or None,
            dynamo=True,
            dynamic_shapes=dynamic,
            verbose=False,
            optimize=False,
        )
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    # run at another batch size than the one exported, when the batch is dynamic
    run_inputs, run_kwargs = (
        spec.sample_inputs(thorough.sample, spec.sizes(batch=3)) if dynamic else (inputs, kwargs)
    )
    tensors = [*run_inputs, *run_kwargs.values()]
    feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), tensors)}
    result = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        assert_close(result, first(module(*run_inputs, **run_kwargs)), rtol=1e-4, atol=1e-4)
