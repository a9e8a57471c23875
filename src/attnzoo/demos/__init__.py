"""Embedded datasets and small training tasks (nothing is downloaded).

Kept light: ``attnzoo --help`` reads :data:`DEFAULT_MECHANISMS` from here without importing the
demos themselves.
"""

#: What ``attnzoo compare`` trains by default: the plain network and seven mechanisms.
DEFAULT_MECHANISMS: tuple[str, ...] = ("none", "se", "eca", "cbam", "bam", "gc", "sk", "non_local")

#: The third-party packages the demos need, by import name (installed by ``attnzoo[demo]``).
DEMO_PACKAGES: tuple[str, ...] = ("matplotlib", "sklearn", "PIL", "tqdm")


def missing_demo_packages() -> list[str]:
    """The demo packages that cannot be imported here (empty when ``attnzoo[demo]`` is installed)."""
    import importlib.util

    missing = []
    for name in DEMO_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, or broken
            found = False
        if not found:
            missing.append(name)
    return missing
