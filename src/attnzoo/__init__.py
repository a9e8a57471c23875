"""attnzoo: attention mechanisms for PyTorch, faithful to their papers, fast and inspectable.

Importing the package imports every mechanism module, which fills the registry::

    import attnzoo
    attnzoo.list_modules()            # every registered name
    se = attnzoo.create("se", 64)     # build one by name
    attnzoo.get_spec("mha").paper     # where it comes from
    attnzoo.attach(my_resnet, "cbam") # add a mechanism to an existing network
    with attnzoo.capture(model) as maps: ...   # record every attention map
"""

from __future__ import annotations

import importlib
import pkgutil

# No module below imports the package itself (only its submodules), so the package has no import
# cycle: attnzoo.models.resnet looks mechanisms up through attnzoo.registry at call time.
from attnzoo import models
from attnzoo.inspect import attach, capture
from attnzoo.registry import ModuleSpec, Paper, Sizes, create, get_spec, list_modules, register

__version__ = "0.1.0"

__all__ = [
    "ModuleSpec",
    "Paper",
    "Sizes",
    "__version__",
    "attach",
    "capture",
    "create",
    "get_spec",
    "list_modules",
    "models",
    "register",
]

#: Sub-packages whose every module is imported so that its ``@register`` decorators run.
MECHANISM_PACKAGES = ("attnzoo.sequence", "attnzoo.vision", "attnzoo.graph")


def _import_mechanisms() -> None:
    # Discovery instead of a hand-kept import list: a new mechanism file registers itself, and two
    # people adding mechanisms never edit the same line.
    for package_name in MECHANISM_PACKAGES:
        package = importlib.import_module(package_name)
        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            if not info.name.startswith("_"):
                importlib.import_module(f"{package_name}.{info.name}")


_import_mechanisms()
