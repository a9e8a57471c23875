"""The registry: lookup, suggestions, duplicates, filtering."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnzoo
from attnzoo import registry
from attnzoo.registry import Paper, Sizes, example_sequence, register


def test_create_builds_the_registered_class():
    module = attnzoo.create("se", 64)
    assert type(module) is attnzoo.get_spec("se").cls


def test_unknown_name_suggests_the_closest():
    with pytest.raises(KeyError, match="did you mean 'cbam_channel'"):
        attnzoo.create("cbam_chanel")
    with pytest.raises(KeyError, match="unknown attention module 'zzzz'"):
        attnzoo.get_spec("zzzz")


def test_list_modules_filters_by_pattern_and_family():
    assert {"cbam", "cbam_channel", "cbam_spatial"} <= set(attnzoo.list_modules("cbam*"))
    assert all(n.startswith("cbam") for n in attnzoo.list_modules("cbam*"))
    gating = attnzoo.list_modules(family="gating")
    assert "se" in gating and "mha" not in gating
    assert attnzoo.list_modules() == sorted(attnzoo.list_modules())
    with pytest.raises(ValueError, match="family must be one of"):
        attnzoo.list_modules(family="nope")


def _dummy_spec_kwargs():
    return {
        "family": "sequence",
        "paper": Paper("x", "0000.00000"),
        "equation": "y = x",
        "make_kwargs": lambda s: {},
        "make_inputs": lambda s: (example_sequence(s),),
    }


def test_duplicate_name_is_an_error():
    with pytest.raises(ValueError, match="duplicate registry name 'mha'"):

        @register("mha", **_dummy_spec_kwargs())
        class Again(nn.Module):
            pass


def test_unknown_family_is_an_error():
    kwargs = {**_dummy_spec_kwargs(), "family": "nope"}
    with pytest.raises(ValueError, match="family must be one of"):
        register("fresh_name", **kwargs)


def test_spec_fields_and_example_inputs():
    spec = attnzoo.get_spec("mha")
    assert spec.family == "sequence" and spec.paper.url == "https://arxiv.org/abs/1706.03762"
    assert spec.defaults == {"embed_dim": 32, "num_heads": 4}
    assert spec.num_inputs == 1 and spec.supports_mask and spec.returns_attn
    (x,) = spec.example_inputs(Sizes(batch=3, width=16, extent=5, dtype=torch.float64))
    assert x.shape == (3, 5, 16) and x.dtype == torch.float64
    # deterministic example inputs
    assert torch.equal(spec.example_inputs()[0], spec.example_inputs()[0])
    assert attnzoo.get_spec("attention").num_inputs == 2


def test_every_spec_names_a_known_family():
    for name in attnzoo.list_modules():
        assert attnzoo.get_spec(name).family in registry.FAMILIES
