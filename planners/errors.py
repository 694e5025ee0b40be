"""Exception classes shared by the planners and the compiler.

Every error anode-plan raises derives from :class:`AnodePlanError`, so callers can
catch the whole family at once. Each subclass says what failed, with the numbers,
and how to fix it.
"""

from __future__ import annotations


def format_bytes(num_bytes: float) -> str:
    """Render a byte count for people: ``format_bytes(3 * 2**20) == '3.00 MiB'``."""
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class AnodePlanError(Exception):
    """Base class of every error raised by anode-plan."""


class InfeasibleBudgetError(AnodePlanError, ValueError):
    """No schedule fits in the memory budget.

    ``min_budget_bytes`` is the peak of the smallest schedule the planner knows, and
    ``breakdown`` maps what is live at that schedule's peak (``"states"``, ``"tapes"``,
    ``"gradients"``, ``"parameter gradients"``, ``"transient"``, and ``"workspace"``: what
    the kernel running at the peak allocates inside itself) to bytes.
    """

    def __init__(self, message: str, *, budget_bytes: int, min_budget_bytes: int,
                 breakdown: dict[str, int] | None = None) -> None:
        super().__init__(message)
        self.budget_bytes = budget_bytes
        self.min_budget_bytes = min_budget_bytes
        self.breakdown = dict(breakdown or {})


class PlanInvariantError(AnodePlanError, RuntimeError):
    """A schedule breaks a structural rule (a stage skipped, run twice, or out of order).

    Raised by :func:`planners.validate_schedule`. From a planner it means a planner bug;
    from a loaded plan file it means the file was edited or corrupted.
    """


class NothingToReconstructError(AnodePlanError, ValueError):
    """The ``reconstruct`` planner was asked to plan a chain without a reversible ODE block."""
