"""Memory budgets: parse one (``"4GB"``, ``"512MiB"``, ``"1.5 GiB"``, or a number of bytes), and
say how much of it a plan may use.

Decimal units are SI (``KB`` = 10³, ``MB`` = 10⁶, ``GB`` = 10⁹, ``TB`` = 10¹² bytes);
binary units are IEC (``KiB`` = 2¹⁰, ``MiB`` = 2²⁰, ``GiB`` = 2³⁰, ``TiB`` = 2⁴⁰).
Unit letters are case-insensitive, except that the final ``B`` must be present,
because ``Mb`` would be read as megabits.

A plan uses all of a budget but :data:`PREDICTION_RESERVE` (and, without calibration,
the stated workspace margin): :func:`usable_bytes` is what the planner gets, and
:func:`budget_for_peak` the smallest budget under which a schedule of a given predicted
peak is accepted.
"""

from __future__ import annotations

import math
import re

from anode_plan.errors import BudgetFormatError

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_FORMS = '"4GB", "512MiB", "1.5 GiB" or a number of bytes'


def parse_memory_budget(budget: int | float | str) -> int:
    """Return ``budget`` in bytes, or raise :class:`BudgetFormatError` saying what is wrong.

    A float is a number of bytes, rounded down (``0.8 * total_memory``, as budgets are
    often written); it must be finite and at least 1.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise BudgetFormatError(f"memory_budget={budget!r} ({type(budget).__name__}) is not a budget; "
                                f"give {_FORMS}")
    if isinstance(budget, float):
        if not math.isfinite(budget) or budget < 1:
            raise BudgetFormatError(f"memory_budget={budget!r} bytes is not a budget: a float budget is a number "
                                    f"of bytes, finite and at least 1 (it is rounded down); give {_FORMS}")
        return int(budget)
    if isinstance(budget, int):
        if budget <= 0:
            raise BudgetFormatError(f"memory_budget={budget} bytes must be positive; give {_FORMS}")
        return budget
    match = _PATTERN.match(budget)
    if match is None:
        raise BudgetFormatError(f"memory_budget={budget!r} is not a number followed by a unit; give {_FORMS}")
    number, unit = match.groups()
    if unit.endswith("b") and unit != "b" and unit[-2:] != "ib":
        raise BudgetFormatError(f"memory_budget={budget!r}: {unit!r} reads as bits; write bytes with a capital B, "
                                f"as in {_FORMS}")
    scale = _UNITS.get(unit.lower() if unit else "b")
    if scale is None:
        raise BudgetFormatError(f"memory_budget={budget!r}: unknown unit {unit!r}; use B, KB, MB, GB, TB (SI) or "
                                f"KiB, MiB, GiB, TiB (IEC), as in {_FORMS}")
    value = float(number) * scale
    if not math.isfinite(value) or value < 1:
        raise BudgetFormatError(f"memory_budget={budget!r} is {value:g} bytes; a budget must be at least 1 byte")
    return int(value)


PREDICTION_RESERVE = 1e-4
"""The share of the budget no plan uses. A prediction can fall a few hundred bytes short of
the allocator's peak (a kernel's small buffers, measured once by calibration, land at
another moment in a full step): 0.002% at most in the tests, so plans keep 0.01% free and
the allocator's peak stays within the budget."""


def usable_bytes(budget_bytes: int, workspace_margin: float = 0.0) -> int:
    """What of ``budget_bytes`` a plan may use: :data:`PREDICTION_RESERVE` and ``workspace_margin`` kept free."""
    return int(budget_bytes * (1.0 - workspace_margin - PREDICTION_RESERVE))


def budget_for_peak(peak_bytes: int, workspace_margin: float = 0.0) -> int:
    """The smallest budget whose usable part (:func:`usable_bytes`) holds a schedule peaking at ``peak_bytes``.

    Use it to turn a predicted peak (``plan.predicted_peak_bytes``) into a budget to compile with.
    """
    budget = max(1, int(peak_bytes / (1.0 - workspace_margin - PREDICTION_RESERVE)))
    while usable_bytes(budget, workspace_margin) < peak_bytes:
        budget += 1
    while budget > 1 and usable_bytes(budget - 1, workspace_margin) >= peak_bytes:
        budget -= 1
    return budget
