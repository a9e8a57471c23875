"""The registry: lookup, suggestions, duplicates, filtering."""

from __future__ import annotations

import inspect

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


def test_placement_and_map_kind_vocabularies_are_checked():
    kwargs = _dummy_spec_kwargs()
    with pytest.raises(ValueError, match="placement must be one of"):
        register("fresh_name", **kwargs, placement="everywhere")
    with pytest.raises(ValueError, match="map_kind must be one of"):
        register("fresh_name", **kwargs, map_kind="heat")
    with pytest.raises(ValueError, match="sample names must be unique"):
        register("fresh_name", **kwargs, samples=(registry.Sample("a"), registry.Sample("a")))


def test_samples_build_their_module_inputs_and_masks():
    spec = attnzoo.get_spec("mha")
    assert spec.all_samples()[0].name == "default"
    names = {s.name for s in spec.all_samples()}
    assert {"key_mask", "attn_mask_3d", "attn_mask_4d", "causal", "cross"} <= names
    sizes = Sizes(batch=3, width=16, extent=6)
    sample = spec.sample("key_mask")
    (x,), kwargs = spec.sample_inputs(sample, sizes)
    mask = kwargs["key_mask"]
    assert mask.shape == (3, 6) and mask.dtype == torch.bool
    assert not mask[0, -2:].any() and mask[0, :-2].all()  # item 0: the last third padded
    assert not mask[1].any() and mask[2].all()  # item 1: wholly padded; item 2: real
    padding = sample.padding(sizes, (x,), kwargs)
    assert padding.empty_batch == (1,)
    assert torch.equal(padding.inputs[0].squeeze(-1), ~mask)
    assert torch.equal(padding.real.squeeze(-1), mask)  # self-attention: real queries only
    (q, memory), _ = spec.sample_inputs(spec.sample("cross"), sizes)
    assert memory.shape == (3, 9, 16)
    module = spec.build_sample(spec.sample("cross"), sizes)
    assert module(q, memory).shape == q.shape
    with pytest.raises(KeyError, match="no sample 'nope'"):
        spec.sample("nope")


def test_attn_mask_samples_keep_a_key_for_every_query():
    sizes = Sizes(batch=2, width=16, extent=5)
    sample = registry.attn_mask_sample(heads=4)
    _, kwargs = attnzoo.get_spec("mha").sample_inputs(sample, sizes)
    mask = kwargs["attn_mask"]
    assert mask.shape == (2, 4, 5, 5) and mask.any(-1).all()
    assert "linear_memory" in sample.skips


def test_every_variant_value_has_a_sample():
    """Both values of every ``variant=`` argument ("paper", "official") are some sample's."""
    for name in attnzoo.list_modules():
        spec = attnzoo.get_spec(name)
        parameter = inspect.signature(spec.cls).parameters.get("variant")
        if parameter is None:
            continue
        seen = {spec.sample_kwargs(s).get("variant", parameter.default) for s in spec.all_samples()}
        assert {"paper", "official"} <= seen, f"{name}: samples cover variant {sorted(seen)}"
