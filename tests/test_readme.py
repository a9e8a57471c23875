"""The README: its catalog table is generated and current, its sections are the registry's families;
CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import attnzoo
from attnzoo.catalog import CATALOG, END_MARKER, FAMILY_TITLES, START_MARKER, update_readme
from attnzoo.registry import FAMILIES, get_spec

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def table_rows() -> dict[str, str]:
    table = README[README.index(START_MARKER) : README.index(END_MARKER)]
    return {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|.*\| ([^|]+) \|$", table, re.M)}


def test_catalog_table_is_up_to_date():
    assert update_readme(README) == README, "run: python scripts/gen_catalog.py"
    site_copy = (ROOT / "docs" / "catalog.md").read_text()
    assert update_readme(site_copy, docs_prefix="") == site_copy, "run: python scripts/gen_catalog.py"


def sections() -> dict[str, list[str]]:
    """Section title -> the names listed under it, in README order."""
    table = README[README.index(START_MARKER) : README.index(END_MARKER)]
    found: dict[str, list[str]] = {}
    current = None
    for line in table.splitlines():
        if heading := re.match(r"^\| \*\*(.+?)\*\* \|", line):
            current = heading.group(1)
            found[current] = []
        elif row := re.match(r"^\| `(\w+)` \|", line):
            found[current].append(row.group(1))
    return found


def test_sections_are_the_registry_families():
    found = sections()
    titles = [FAMILY_TITLES[f] for f in FAMILIES]
    assert list(found) == [t for t in titles if t in found], "sections in FAMILIES order"
    by_title = {title: family for family, title in FAMILY_TITLES.items()}
    for title, names in found.items():
        for name in names:
            if name in attnzoo.list_modules():
                assert get_spec(name).family == by_title[title], f"{name} listed under {title!r}"
    planned = {e.name: e.family for e in CATALOG if e.name not in attnzoo.list_modules()}
    for name, family in planned.items():
        assert name in found[FAMILY_TITLES[family]], f"planned {name} not under {FAMILY_TITLES[family]!r}"


def test_every_catalog_name_has_a_row():
    assert set(table_rows()) == {entry.name for entry in CATALOG}


def test_implemented_rows_are_registered_and_registered_names_are_listed():
    rows = table_rows()
    implemented = {name for name, status in rows.items() if "implemented" in status}
    registered = set(attnzoo.list_modules())
    assert implemented <= registered, f"called implemented but not registered: {implemented - registered}"
    assert registered <= set(rows), f"registered but not in the table: {registered - set(rows)}"
    assert registered <= implemented, f"registered but not marked implemented: {registered - implemented}"


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#") and not line.startswith(("set ", "cd "))
    ]
    assert len(ci_lines) == 1
    blocks = re.findall(r"```sh\n(.*?)\n```", README, re.S)
    assert ci_lines[0] in blocks, ".ci/run must be the README's test command"
    assert any("pytest" in b for b in blocks) and any(b.endswith("attnzoo compare") for b in blocks)
