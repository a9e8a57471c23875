"""Regenerate the catalog tables from the registry: `python scripts/gen_catalog.py`.

Writes the table between the catalog markers of README.md (links into docs/) and of
docs/catalog.md (the documentation site's copy, links relative to docs/). tests/test_readme.py
fails until both are current.
"""

from __future__ import annotations

from pathlib import Path

from attnzoo.catalog import update_readme

ROOT = Path(__file__).resolve().parent.parent
#: Each page holding the catalog table, with the path from that page to docs/.
PAGES = {ROOT / "README.md": "docs/", ROOT / "docs" / "catalog.md": ""}

if __name__ == "__main__":
    for page, docs_prefix in PAGES.items():
        page.write_text(update_readme(page.read_text(), docs_prefix))
        print(f"updated {page.relative_to(ROOT)}")
