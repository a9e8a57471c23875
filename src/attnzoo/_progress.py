"""A dependency-free progress bar on stderr (one line per update when stderr is not a terminal)."""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    """``[#####.....] 3/10 label  12s`` redrawn in place on a terminal."""

    def __init__(self, total: int, *, enabled: bool = True, width: int = 30) -> None:
        self.total, self.done, self.enabled, self.width = total, 0, enabled, width
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def update(self, label: str, *, advance: bool = True) -> None:
        """Show ``label`` with the bar at the current count, then count one more step."""
        if self.enabled:
            filled = self.width * self.done // max(self.total, 1)
            elapsed = time.perf_counter() - self.start
            bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total}"
            bar += f" {label}  {elapsed:.0f}s"
            sys.stderr.write(("\r\033[K" + bar) if self.tty else (bar + "\n"))
            sys.stderr.flush()
        if advance:
            self.done += 1

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
