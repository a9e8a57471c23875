"""Docs: a page per registered mechanism, with the sections a reader needs and examples that run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import attnzoo

DOCS = Path(__file__).resolve().parent.parent / "docs"
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
