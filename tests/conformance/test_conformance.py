"""Properties every registered mechanism must have; a new module gets them by registering.

Each test is parametrised over ``attnzoo.list_modules()`` and uses only the spec: its example
inputs, its constructor kwargs for a size, and its capability flags.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Mapping, Sequence

import pytest
import torch
from torch import Tensor, nn

import attnzoo
from attnzoo.registry import ModuleSpec
from attnzoo.testing import randomize_

NAMES = attnzoo.list_modules()
#: inductor compiles cost 10-15 s each here: a few representative modules only.
INDUCTOR_NAMES = [n for n in ("mha", "cbam", "attention") if n in NAMES]


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


def build(spec: ModuleSpec, seed: int = 0, **size_overrides) -> tuple[nn.Module, tuple[Tensor, ...]]:
    torch.manual_seed(seed)
    sizes = spec.sizes(**size_overrides)
    module = spec.build(sizes)
    # off the initial values, so that zero-initialised gates (gamma = 0, zero last convs) do not
    # hide whether gradients reach the parameters before them
    randomize_(module, seed=seed, scale=0.1, shift=True)
    return module, spec.example_inputs(sizes)


def assert_close(actual: Tensor, expected: Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def expected_shape(spec: ModuleSpec, inputs: tuple[Tensor, ...], out: Tensor) -> None:
    if spec.shape_preserving:
        assert out.shape == inputs[0].shape, (
            f"{spec.name}: {tuple(out.shape)} != input {tuple(inputs[0].shape)}"
        )
    if spec.batch_dim is not None:
        assert out.shape[0] == inputs[0].shape[0], f"{spec.name}: batch changed"


@pytest.fixture(params=NAMES)
def spec(request: pytest.FixtureRequest) -> ModuleSpec:
    return attnzoo.get_spec(request.param)


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


def test_forward_shape_and_finite(spec: ModuleSpec) -> None:
    module, inputs = build(spec)
    out = first(module(*inputs))
    expected_shape(spec, inputs, out)
    assert torch.isfinite(out).all()


def test_gradients_reach_every_parameter(spec: ModuleSpec) -> None:
    module, inputs = build(spec)
    module.train()
    inputs = tuple(x.requires_grad_() if x.is_floating_point() else x for x in inputs)
    out = first(module(*inputs))
    # a random projection of the output: a plain sum can cancel (softmax rows sum to one)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * weights).sum().backward()
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{spec.name}: no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"{spec.name}: non-finite gradient in {name}"
        assert p.grad.abs().sum() > 0, f"{spec.name}: zero gradient in {name}"
    for i, x in enumerate(inputs):
        if x.is_floating_point():
            assert x.grad is not None and torch.isfinite(x.grad).all(), f"input {i} gradient"


def test_return_attn_matches_plain_path(spec: ModuleSpec) -> None:
    if not spec.returns_attn:
        pytest.skip("returns no attention maps")
    module, inputs = build(spec)
    module.eval()
    with torch.no_grad():
        plain = first(module(*inputs))
        result = module(*inputs, return_attn=True)
    assert isinstance(result, tuple) and len(result) == 2
    assert_close(result[0], plain)
    maps = tensors_in(result[1])
    assert maps, f"{spec.name}: return_attn gave no tensors"
    for m in maps:
        assert torch.isfinite(m).all()


def test_non_default_sizes(spec: ModuleSpec) -> None:
    """A width and extent other than the defaults: catches hard-coded sizes."""
    base = spec.default_sizes
    module, inputs = build(spec, batch=3, width=base.width + 16, extent=base.extent + 3)
    module.eval()
    with torch.no_grad():
        out = first(module(*inputs))
    expected_shape(spec, inputs, out)
    assert torch.isfinite(out).all()


def test_factory_kwargs_reach_every_parameter(spec: ModuleSpec) -> None:
    module = spec.build(spec.sizes(device="meta"))
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        assert t.device.type == "meta", f"{spec.name}: device= does not reach {name}"
    module = spec.build(spec.sizes(dtype=torch.float64))
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.is_floating_point():
            assert t.dtype == torch.float64, f"{spec.name}: dtype= does not reach {name}"


def test_state_dict_round_trip(spec: ModuleSpec) -> None:
    source, inputs = build(spec, seed=0)
    target, _ = build(spec, seed=1)
    target.load_state_dict(source.state_dict())
    source.eval(), target.eval()
    with torch.no_grad():
        assert_close(first(target(*inputs)), first(source(*inputs)), rtol=0, atol=0)


def test_pickle_and_deepcopy(spec: ModuleSpec) -> None:
    module, inputs = build(spec)
    module.eval()
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    clones = [loaded, pickle.loads(pickle.dumps(module)), copy.deepcopy(module)]
    with torch.no_grad():
        expected = first(module(*inputs))
        for clone in clones:
            assert_close(first(clone(*inputs)), expected, rtol=0, atol=0)


def test_eval_is_deterministic(spec: ModuleSpec) -> None:
    module, inputs = build(spec)
    module.eval()
    with torch.no_grad():
        assert_close(first(module(*inputs)), first(module(*inputs)), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_dtypes_agree_with_float32(spec: ModuleSpec, dtype: torch.dtype) -> None:
    module, inputs = build(spec)
    module.eval()
    with torch.no_grad():
        reference = first(module(*inputs)).double()
        module.to(dtype)
        cast = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
        out = first(module(*cast))
    assert out.dtype == dtype, f"{spec.name}: output is {out.dtype}, not {dtype}"
    assert torch.isfinite(out).all()
    error = (out.double() - reference).norm() / reference.norm().clamp_min(1e-12)
    limit = 1e-5 if dtype == torch.float64 else 3e-2
    assert error < limit, f"{spec.name}: relative error {error:.2e} in {dtype}"


def test_bad_input_errors(spec: ModuleSpec) -> None:
    module, inputs = build(spec)
    module.eval()
    x, rest = inputs[0], inputs[1:]
    with pytest.raises(TypeError, match="float"):
        module(x.to(torch.int64), *rest)
    with pytest.raises(ValueError, match="expected"):
        module(x[0], *rest)  # one rank too few
    wrong = torch.cat([x, x.narrow(spec.channel_dim, 0, 1)], dim=spec.channel_dim)
    with pytest.raises(ValueError, match=str(x.shape[spec.channel_dim])):
        module(wrong, *rest)


def test_empty_dimensions(spec: ModuleSpec) -> None:
    module, inputs = build(spec)
    module.eval()
    x, rest = inputs[0], inputs[1:]
    # an empty sequence/spatial/node dimension is an error ...
    extent_dim = x.dim() - 1 if spec.channel_dim in (1,) else x.dim() - 2
    with pytest.raises(ValueError, match="empty"):
        module(x.narrow(extent_dim, 0, 0), *rest)
    # ... but an empty batch passes through, as elsewhere in PyTorch (zero RoIs, say)
    if spec.batch_dim is not None:
        empty = tuple(t.narrow(0, 0, 0) for t in inputs)
        with torch.no_grad():
            out = first(module(*empty))
        assert out.shape[0] == 0


def test_compile_fullgraph_aot_eager(spec: ModuleSpec) -> None:
    module, inputs = build(spec)
    module.eval()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_close(first(compiled(*inputs)), first(module(*inputs)))


@pytest.mark.slow
@pytest.mark.parametrize("name", INDUCTOR_NAMES)
def test_compile_inductor(name: str) -> None:
    spec = attnzoo.get_spec(name)
    module, inputs = build(spec)
    module.eval()
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True)
    with torch.no_grad():
        assert_close(first(compiled(*inputs)), first(module(*inputs)))


def test_torch_export(spec: ModuleSpec) -> None:
    if not spec.exportable:
        pytest.skip(spec.notes or "not exportable")
    module, inputs = build(spec)
    module.eval()
    program = torch.export.export(module, inputs)
    with torch.no_grad():
        assert_close(first(program.module()(*inputs)), first(module(*inputs)))


def test_onnx_export_runs_in_onnxruntime(spec: ModuleSpec) -> None:
    if not spec.exportable:
        pytest.skip(spec.notes or "not exportable")
    ort = pytest.importorskip("onnxruntime")
    module, inputs = build(spec)
    module.eval()
    dynamic = None
    if spec.batch_dim is not None:
        batch = torch.export.Dim("batch", min=1, max=1024)
        dynamic = tuple({0: batch} for _ in inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, inputs, dynamo=True, dynamic_shapes=dynamic, verbose=False)
    session = ort.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    # run at another batch size than the one exported, when the batch is dynamic
    run_inputs = spec.example_inputs(spec.sizes(batch=3)) if dynamic else inputs
    feeds = {arg.name: x.numpy() for arg, x in zip(session.get_inputs(), run_inputs)}
    result = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        assert_close(result, first(module(*run_inputs)), rtol=1e-4, atol=1e-4)


def test_non_square_maps(spec: ModuleSpec) -> None:
    """H != W: catches height and width swapped in a reshape or a relative-position table."""
    module, inputs = build(spec)
    x = inputs[0]
    if spec.channel_dim != 1 or x.dim() != 4 or len(inputs) != 1:
        pytest.skip("not a single-input (B, C, H, W) module")
    x = torch.cat([x, x[:, :, :, :3]], dim=3)  # (B, C, H, W) -> (B, C, H, W + 3)
    module.eval()
    with torch.no_grad():
        out = first(module(x))
        if spec.returns_attn:
            assert_close(first(module(x, return_attn=True)), out)
    if spec.shape_preserving:
        assert out.shape == x.shape
    assert torch.isfinite(out).all()
