"""Docs: a page per registered mechanism, with the sections a reader needs and examples that run;
the site builds in strict mode (a broken link or a missing API reference fails)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import attnzoo

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
PAGES = sorted((DOCS / "mechanisms").glob("*.md"))
SECTIONS = ("What it computes", "When to use it", "Shapes", "Cost")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", text, re.S)


@pytest.mark.parametrize("name", attnzoo.list_modules())
def test_every_registered_mechanism_has_a_page(name):
    page = DOCS / "mechanisms" / f"{name}.md"
    assert page.exists(), f"missing docs/mechanisms/{name}.md"
    text = page.read_text()
    for section in SECTIONS:
        assert section.lower() in text.lower(), f"{page.name}: no '{section}' section"
    assert python_blocks(text), f"{page.name}: no runnable python example"


GUIDES = sorted(DOCS.glob("*.md"))


@pytest.mark.parametrize("page", [*PAGES, *GUIDES], ids=lambda p: p.name)
def test_examples_run(page):
    for block in python_blocks(page.read_text()):
        exec(compile(block, str(page), "exec"), {"__name__": "__docs__"})


def test_site_builds_in_strict_mode(tmp_path):
    """``mkdocs build --strict``: every link resolves, every ``::: module`` reference loads.

    The API reference is read from the sources (griffe, no import of torch), about 10 s on one
    core. The ``test`` extra installs mkdocs (through the ``docs`` extra), so CI runs this.
    """
    for package in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(package, reason="the docs extra is not installed: pip install -e '.[docs]'")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # material's banner, not a build warning
    command = ["build", "--strict", "--quiet", "--site-dir", str(tmp_path / "site")]
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    assert (tmp_path / "site" / "api" / "functional" / "index.html").exists()
    reference = (tmp_path / "site" / "api" / "functional" / "index.html").read_text()
    assert "masked_softmax" in reference, "the API reference is generated from the docstrings"
