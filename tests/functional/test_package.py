"""attnzoo.functional re-exports every public kernel of its submodules, the same objects."""

from __future__ import annotations

import importlib
import pkgutil

import attnzoo.functional as functional


def test_every_public_kernel_is_re_exported():
    found = pkgutil.iter_modules(functional.__path__)
    submodules = [info.name for info in found if not info.name.startswith("_")]
    assert {"attend", "softmax", "heads", "window", "local_window", "global_reasoning"} <= set(submodules)
    for name in submodules:
        module = importlib.import_module(f"attnzoo.functional.{name}")
        missing = sorted(set(module.__all__) - set(functional.__all__))
        assert not missing, f"attnzoo.functional does not re-export {missing} of {name}"
        for public in module.__all__:
            assert getattr(functional, public) is getattr(module, public), public
    assert len(functional.__all__) == len(set(functional.__all__))
    assert all(hasattr(functional, public) for public in functional.__all__)
