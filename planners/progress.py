"""Progress of long planning work, through :mod:`logging`.

Libraries stay silent unless asked: every message goes to the ``"anode_plan"`` logger
hierarchy at ``INFO``, which Python does not print until a handler is configured
(``logging.basicConfig(level=logging.INFO)``; ``tools/plan_report.py`` does it). A task
logs only once it has run ``after_s`` seconds, and then at most once every ``every_s``,
so quick plans say nothing and long ones say where they are.
"""

from __future__ import annotations

import logging
import time


class Progress:
    """Rate-limited progress lines for one task: ``step`` as it goes, ``done`` at the end.

    Use it in any loop that can take more than a couple of seconds (measuring stages,
    a DP's levels, a solver's search).
    """

    def __init__(self, logger: logging.Logger, task: str, *, after_s: float = 2.0, every_s: float = 2.0) -> None:
        self.logger = logger
        self.task = task
        self.after_s = after_s
        self.every_s = every_s
        self.started = time.perf_counter()
        self._last = self.started
        self._spoke = False

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def step(self, message: str) -> None:
        """Log ``message`` if the task has run long enough and the last line is old enough."""
        now = time.perf_counter()
        if now - self.started >= self.after_s and (not self._spoke or now - self._last >= self.every_s):
            self.logger.info("%s: %s (%.1f s)", self.task, message, now - self.started)
            self._last, self._spoke = now, True

    def done(self, message: str) -> None:
        """Log the task's end, if it took long enough that its progress was worth showing."""
        elapsed = self.elapsed_s()
        if elapsed >= self.after_s:
            self.logger.info("%s: %s in %.1f s", self.task, message, elapsed)
