"""The library's own API from plain scripts: the docs' examples run as files with `python`, and a
script that forgets the `__main__` guard gets one clear line instead of hanging."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

DOCS = Path(__file__).resolve().parents[2] / "docs"
#: The guides whose examples start worker processes or write files: run as scripts, not exec'd.
SCRIPTED_PAGES = ["compare.md", "inspect.md"]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)\n```", text, re.S)


def run_script(path: Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@pytest.mark.parametrize("page", SCRIPTED_PAGES)
def test_docs_examples_run_as_scripts(page, tmp_path):
    blocks = python_blocks((DOCS / page).read_text())
    assert blocks, f"{page}: no python example"
    for i, block in enumerate(blocks):
        script = tmp_path / f"example_{i}.py"
        script.write_text(block + "\n")
        result = run_script(script, tmp_path)
        assert result.returncode == 0, f"{page} example {i}:\n{result.stderr[-3000:]}"
        assert "Traceback" not in result.stderr


def test_a_script_without_the_main_guard_fails_at_once_with_one_line(tmp_path):
    # spawned workers import the script again; without the guard each would start workers of its
    # own: multiprocessing refuses, and before this fix the pool respawned them forever
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from attnzoo.demos.compare import CompareConfig, run_compare\n"
        "config = CompareConfig(mechanisms=['none', 'se'], epochs=1, seeds=[0], width=4, limit=32,\n"
        "                       threads=2, workers=2, progress=False, output='out')\n"
        "run_compare(config)\n"
    )
    start = time.perf_counter()
    result = run_script(script, tmp_path, timeout=300)
    assert time.perf_counter() - start < 240  # it ends; it used to hang
    assert result.returncode != 0
    assert 'put the calls under `if __name__ == "__main__":`' in result.stderr
    assert "WorkerDied" in result.stderr or "worker process" in result.stderr
