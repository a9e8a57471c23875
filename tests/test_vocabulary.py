"""One argument vocabulary: the names of forward and constructor arguments mean the same everywhere."""

from __future__ import annotations

import inspect
from functools import partial

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo.registry import get_spec

SEQUENCE = attnzoo.list_modules(family="sequence")
#: Names the sequence modules used before they agreed on torch's (issue 11).
RETIRED = {"keys", "values", "source", "features", "bank", "memory", "mask", "x_mask", "y_mask"}
#: What a sequence module's forward may call its inputs (``x`` for self-attention only) and masks.
INPUT_NAMES = {"query", "key", "value", "x"}
MASK_NAMES = {"key_mask", "attn_mask", "query_mask"}


@pytest.mark.parametrize("name", SEQUENCE)
def test_sequence_modules_speak_query_key_value(name):
    params = inspect.signature(get_spec(name).cls.forward).parameters
    assert not RETIRED & set(params), f"{name}: retired argument names {sorted(RETIRED & set(params))}"
    positional = {p.name for p in params.values() if p.kind is p.POSITIONAL_OR_KEYWORD} - {"self"}
    assert positional <= INPUT_NAMES, f"{name}: inputs outside the vocabulary: {positional - INPUT_NAMES}"
    masks = {n for n in params if n.endswith("mask")}
    assert masks <= MASK_NAMES, f"{name}: masks outside the vocabulary: {sorted(masks - MASK_NAMES)}"
    if "x" in params:
        assert not {"query", "key", "value"} & set(params), f"{name}: x is for self-attention only"


NORMED = [
    name
    for name in attnzoo.list_modules()
    if "norm_layer" in inspect.signature(get_spec(name).cls.__init__).parameters
]


def _norms(module: nn.Module) -> list[type]:
    kinds = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)
    return [type(m) for m in module.modules() if isinstance(m, kinds)]


def test_norm_layer_is_offered_where_the_papers_normalise():
    expected = {"asymmetric_non_local", "bam", "co_attention", "scconv"}
    assert expected <= set(NORMED), f"no norm_layer argument: {sorted(expected - set(NORMED))}"


@pytest.mark.parametrize("name", NORMED)
def test_norm_layer_replaces_every_norm(name):
    spec = get_spec(name)
    signature = inspect.signature(spec.cls.__init__).parameters
    assert signature["norm_layer"].default in (nn.BatchNorm2d, None)
    kwargs = spec.make_kwargs(spec.default_sizes)
    if "variant" in signature:  # BAM's official variant normalises its hidden layers too; the
        # official variants of CBAM and CAN are the ones with a norm (their papers have none there)
        official = name in ("bam", "cbam", "cbam_spatial", "cross_attention_module")
        kwargs = {**kwargs, "variant": "official"} if official else kwargs
    default_norms = _norms(spec.cls(**kwargs))
    assert default_norms, f"{name}: builds no norm by default"
    group = spec.cls(**kwargs, norm_layer=partial(nn.GroupNorm, 1))
    assert _norms(group) == [nn.GroupNorm] * len(default_norms), f"{name}: a norm ignored norm_layer"
    assert not _norms(spec.cls(**kwargs, norm_layer=None)), f"{name}: norm_layer=None left a norm"
    # a norm without batch statistics trains on a single sample (no BatchNorm-only check left)
    out = group.train()(*spec.example_inputs(spec.sizes(batch=1)))
    out = out[0] if isinstance(out, tuple) else out
    assert torch.isfinite(out).all()
