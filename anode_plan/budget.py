"""Parse a memory budget: ``"4GB"``, ``"512MiB"``, ``"1.5 GiB"`` or an int of bytes.

Decimal units are SI (``KB`` = 10³, ``MB`` = 10⁶, ``GB`` = 10⁹, ``TB`` = 10¹² bytes);
binary units are IEC (``KiB`` = 2¹⁰, ``MiB`` = 2²⁰, ``GiB`` = 2³⁰, ``TiB`` = 2⁴⁰).
Unit letters are case-insensitive, except that the final ``B`` must be present,
because ``Mb`` would be read as megabits.
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
_FORMS = '"4GB", "512MiB", "1.5 GiB" or an int number of bytes'


def parse_memory_budget(budget: int | str) -> int:
    """Return ``budget`` in bytes, or raise :class:`BudgetFormatError` saying what is wrong."""
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise BudgetFormatError(f"memory_budget={budget!r} ({type(budget).__name__}) is not a budget; "
                                f"give {_FORMS}")
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
