"""mha against PyTorch's own test database for ``torch.nn.MultiheadAttention``.

Every sample of the ``MultiheadAttention`` ModuleInfo (``torch.testing._internal.common_modules``)
and of the ``nn.functional.multi_head_attention_forward`` OpInfo
(``torch.testing._internal.common_methods_invocations``), generated in float64, is converted with
``MultiheadAttention.from_torch`` and run with torch's inputs, bool masks inverted (True = may
attend here, True = masked in torch); outputs and weights must equal torch's to 1e-10, and so
must the gradients of the inputs where the sample asks for them. No sample is skipped.

torch's test modules import ``expecttest`` (a test-only dependency of PyTorch's own suite, not
installed with torch); a stand-in with the two names they use is registered when it is missing.
"""

from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from attnzoo.sequence.mha import MultiheadAttention
from attnzoo.testing import randomize_

F64 = torch.float64
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _import_torch_databases() -> tuple[Any, Any]:
    if "expecttest" not in sys.modules and importlib.util.find_spec("expecttest") is None:
        # the stand-in: torch's TestCase derives from expecttest.TestCase and reads ACCEPT
        stand_in = types.ModuleType("expecttest")
        stand_in.TestCase = unittest.TestCase  # type: ignore[attr-defined]
        stand_in.ACCEPT = False  # type: ignore[attr-defined]
        sys.modules["expecttest"] = stand_in
    from torch.testing._internal import common_methods_invocations, common_modules

    return common_modules, common_methods_invocations


@dataclass
class Case:
    """One database sample, ready to run: torch's module, its call, and whether to check grads."""

    name: str
    torch_module: nn.MultiheadAttention
    inputs: tuple[Tensor, Tensor, Tensor]  # query, key, value in torch's layout
    key_padding_mask: Tensor | None
    attn_mask: Tensor | None
    requires_grad: bool
    #: torch's (output, weights); None: call torch_module with the same arguments
    expected: Any = None
    #: torch's weights before dropout, where the sample's weights are after it
    expected_weights: Tensor | None = None
    seed: int | None = None


def module_cases() -> Iterator[Case]:
    """The ModuleInfo samples, in train and eval mode, with and without input gradients."""
    common_modules, _ = _import_torch_databases()
    (info,) = [m for m in common_modules.module_db if m.module_cls is nn.MultiheadAttention]
    index = 0
    for training in (False, True):
        for requires_grad in (False, True):
            samples = info.module_inputs_func(
                info, device="cpu", dtype=F64, requires_grad=requires_grad, training=training
            )
            for sample in samples:
                ctor, call = sample.constructor_input, sample.forward_input
                torch.manual_seed(index)
                module = nn.MultiheadAttention(*ctor.args, **ctor.kwargs, dtype=F64)
                # torch zero-initialises the projection biases: make every parameter count
                randomize_(module, seed=index, scale=0.3, shift=True).train(training)
                kwargs = dict(call.kwargs)
                yield Case(
                    name=f"module[{index}] {ctor.kwargs} training={training} grad={requires_grad}",
                    torch_module=module,
                    inputs=tuple(call.args),  # type: ignore[arg-type]
                    key_padding_mask=kwargs.pop("key_padding_mask", None),
                    attn_mask=kwargs.pop("attn_mask", None),
                    requires_grad=requires_grad,
                )
                assert not kwargs, f"unexpected forward kwargs {kwargs}"
                index += 1


def op_cases() -> Iterator[Case]:
    """The OpInfo samples of F.multi_head_attention_forward, each as an nn.MultiheadAttention
    holding the sample's weights (torch's module calls the same function)."""
    _, common_methods_invocations = _import_torch_databases()
    name = "nn.functional.multi_head_attention_forward"
    (op,) = [o for o in common_methods_invocations.op_db if o.name == name]
    index = 0
    for requires_grad in (False, True):
        for sample in op.sample_inputs("cpu", F64, requires_grad=requires_grad):
            (k, v, embed_dim, num_heads, in_proj_weight, in_proj_bias, bias_k, bias_v, add_zero_attn,
             dropout_p, out_proj_weight, out_proj_bias) = sample.args  # fmt: skip
            kw = sample.kwargs
            module = nn.MultiheadAttention(
                embed_dim,
                num_heads,
                dropout=dropout_p,
                add_bias_kv=bias_k is not None,
                add_zero_attn=add_zero_attn,
                dtype=F64,
            ).train(kw["training"])
            with torch.no_grad():
                if kw["use_separate_proj_weight"]:
                    # equal widths: torch's module keeps them packed, the function takes them apart
                    packed = torch.cat([kw["q_proj_weight"], kw["k_proj_weight"], kw["v_proj_weight"]])
                else:
                    packed = in_proj_weight
                module.in_proj_weight.copy_(packed)
                module.in_proj_bias.copy_(in_proj_bias)
                module.bias_k.copy_(bias_k.view(1, 1, -1))
                module.bias_v.copy_(bias_v.view(1, 1, -1))
                module.out_proj.weight.copy_(out_proj_weight)
                module.out_proj.bias.copy_(out_proj_bias)
            # torch's own call of the sample: the OpInfo's op (it seeds the generator) on its inputs
            expected = op.op(sample.input, *sample.args, **kw)
            expected_weights = None
            if kw["training"] and dropout_p > 0:
                # torch returns the weights after dropout; ours are the weights (before dropout)
                eval_kwargs = {**kw, "training": False}
                expected_weights = op.op(sample.input, *sample.args, **eval_kwargs)[1]
            yield Case(
                name=f"op[{index}] batched={sample.input.dim() == 3} heads={num_heads} E={embed_dim} "
                f"mask={None if kw['attn_mask'] is None else tuple(kw['attn_mask'].shape)} "
                f"separate={kw['use_separate_proj_weight']} dropout={dropout_p} grad={requires_grad}",
                torch_module=module,
                inputs=(sample.input, k, v),
                key_padding_mask=None,
                attn_mask=kw["attn_mask"],
                requires_grad=requires_grad,
                expected=expected,
                expected_weights=expected_weights,
                seed=42,  # wrapper_set_seed's seed: dropout draws the same mask in both
            )
            index += 1


def _ours_mask(mask: Tensor | None) -> Tensor | None:
    """torch's mask polarity to ours: bool True = masked there, True = may attend here."""
    return ~mask if mask is not None and mask.dtype == torch.bool else mask


def _leaves(inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)


def run_case(case: Case) -> str | None:
    """Compare one sample; the mismatch as text, or None when everything matches."""
    ours = MultiheadAttention.from_torch(case.torch_module)
    theirs_inputs, our_inputs = _leaves(case.inputs), _leaves(case.inputs)
    if case.seed is not None:
        torch.manual_seed(case.seed)
    if case.expected is None:
        expected = case.torch_module(
            *theirs_inputs, key_padding_mask=case.key_padding_mask, attn_mask=case.attn_mask
        )
    else:
        expected = case.expected
        if case.requires_grad:  # recompute on our own leaves, for their gradients
            if case.seed is not None:
                torch.manual_seed(case.seed)
            expected = case.torch_module(*theirs_inputs, attn_mask=case.attn_mask)
    if case.seed is not None:
        torch.manual_seed(case.seed)
    out, maps = ours(
        *our_inputs,
        key_mask=_ours_mask(case.key_padding_mask),
        attn_mask=_ours_mask(case.attn_mask),
        return_attn=True,
    )
    expected_out = expected[0]
    expected_maps = case.expected_weights if case.expected_weights is not None else expected[1]
    try:
        torch.testing.assert_close(out, expected_out, **TOL)
        torch.testing.assert_close(maps, expected_maps, **TOL)
        if case.requires_grad:
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=F64)
            ours_grads = torch.autograd.grad((out * weights).sum(), our_inputs)
            their_grads = torch.autograd.grad((expected[0] * weights).sum(), theirs_inputs)
            for mine, theirs in zip(ours_grads, their_grads):
                torch.testing.assert_close(mine, theirs, **TOL)
    except (AssertionError, RuntimeError) as error:
        return f"{case.name}: {str(error).splitlines()[0]}"
    return None


def _run_all(cases: Iterator[Case]) -> tuple[int, list[str]]:
    count, failures = 0, []
    for case in cases:
        count += 1
        try:
            failure = run_case(case)
        except Exception as error:  # a refusal (ValueError, TypeError) counts as a failure
            failure = f"{case.name}: refused: {type(error).__name__}: {error}"
        if failure is not None:
            failures.append(failure)
    return count, failures


def test_every_module_database_sample_matches_torch():
    count, failures = _run_all(module_cases())
    # 64 samples x (train, eval) x (with, without input gradients)
    assert count == 256
    assert not failures, f"{len(failures)} of {count} differ:\n" + "\n".join(failures[:20])


def test_every_functional_database_sample_matches_torch():
    count, failures = _run_all(op_cases())
    # 192 samples without gradients, 1 with (torch keeps its backward samples few)
    assert count == 193
    assert not failures, f"{len(failures)} of {count} differ:\n" + "\n".join(failures[:20])


def test_the_database_covers_every_torch_feature():
    """The samples exercise what this test is for: a database that lost them would pass vacuously."""
    cases = list(module_cases()) + list(op_cases())
    modules = [c.torch_module for c in cases]
    assert sum(m.bias_k is not None for m in modules) >= 256
    assert sum(m.add_zero_attn for m in modules) >= 64
    assert sum(not m.batch_first for m in modules) >= 128
    assert sum(c.inputs[0].dim() == 2 for c in cases) >= 256 + 96  # unbatched (N, D) inputs
    # torch's (B*h, N_q, N_k) mask layout, with B > 1
    assert any(c.attn_mask is not None and c.attn_mask.dim() == 3 and c.inputs[0].dim() == 3 for c in cases)
    assert any(c.key_padding_mask is not None for c in cases)
    assert any(c.expected_weights is not None for c in cases)  # dropout in training


@pytest.mark.parametrize("batch_first", [True, False])
def test_float_key_padding_mask_matches_torch(batch_first):
    """Not in torch's database: an additive (float) key_padding_mask."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(8, 2, batch_first=batch_first, dtype=F64)
    randomize_(theirs, seed=1, scale=0.3, shift=True).eval()
    ours = MultiheadAttention.from_torch(theirs)
    batch, length = 3, 5
    x = torch.randn((batch, length, 8) if batch_first else (length, batch, 8), dtype=F64)
    padding = torch.randn(batch, length, dtype=F64)  # (B, N_k) in either layout, as in torch
    padding[0, -2:] = float("-inf")
    expected, expected_maps = theirs(x, x, x, key_padding_mask=padding)
    out, maps = ours(x, x, x, key_mask=padding, return_attn=True)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(maps, expected_maps, **TOL)
