"""The progress bar of the commands: tqdm's, on stderr (``pip install 'attnzoo[demo]'`` installs it).

Without tqdm the commands run without a bar; nothing else changes.
"""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["Progress"]


class Progress:
    """A bar of ``total`` steps; each :meth:`update` shows a label and counts one step."""

    def __init__(self, total: int, *, enabled: bool = True) -> None:
        self.bar: Any = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, leave=False, unit="step")

    def update(self, label: str, *, advance: bool = True) -> None:
        """Show ``label`` beside the bar and, with ``advance``, count one more step."""
        if self.bar is None:
            return
        self.bar.set_description_str(label, refresh=not advance)
        if advance:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
