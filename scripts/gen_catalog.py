"""Regenerate the catalog table in README.md from the registry: `python scripts/gen_catalog.py`."""

from __future__ import annotations

from pathlib import Path

from attnzoo.catalog import update_readme

README = Path(__file__).resolve().parent.parent / "README.md"

if __name__ == "__main__":
    README.write_text(update_readme(README.read_text()))
    print(f"updated {README}")
