"""Pareto frontiers of (peak bytes, cost): the value functions of the chain DP.

The rotor DP (Beaumont et al., arXiv 1911.13214) tabulates ``C(m, a, b)``, the least
cost of a sub-problem within ``m`` bytes, for every ``m`` on a grid of memory slots.
That function is a step function of ``m``; here it is kept as the list of its steps,
``[(peak_bytes, cost, recipe), ...]`` with peaks strictly increasing and costs strictly
decreasing: every point is a real schedule of the sub-problem with that exact peak.
The DP's operations on ``C(m, ·)`` become merges of these lists, and no byte count is
ever rounded, so a frontier point never under-states its peak.

``recipe`` is a small tuple saying how the point was built, so the schedule can be
rebuilt from the table afterwards.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Iterable

Point = tuple  # (peak_bytes: int, cost: float, recipe: tuple)

_peak_then_cost = itemgetter(0, 1)


def shifted(points: list[Point], shift: int, floor: int, extra_cost: float, budget: float,
            recipe: tuple = ("keep",)) -> list[Point]:
    """``{(max(floor, peak + shift), cost + extra_cost)}``; the recipe is ``recipe + (index,)``."""
    out: list[Point] = []
    for index, (peak, cost, _) in enumerate(points):
        peak = max(floor, peak + shift)
        if peak > budget:
            break
        if out and out[-1][0] == peak:
            out[-1] = (peak, cost + extra_cost, recipe + (index,))
        else:
            out.append((peak, cost + extra_cost, recipe + (index,)))
    return out


def combined(first: list[Point], first_shift: int, second: list[Point], second_shift: int, floor: int,
             extra_cost: float, tag: int, budget: float) -> list[Point]:
    """The frontier of ``{(max(floor, p1 + first_shift, p2 + second_shift), c1 + c2 + extra_cost)}``.

    Two sub-problems whose schedules are chosen independently, one after the other on
    top of different held bytes. A merge walk in O(len(first) + len(second)): for each
    peak threshold, the cheapest point of each list within it. The recipe is
    ``("region", tag, index_in_first, index_in_second)``.
    """
    out: list[Point] = []
    if not first or not second:
        return out
    last_i, last_j = len(first) - 1, len(second) - 1
    i = j = 0
    first_peak, second_peak = first[0][0] + first_shift, second[0][0] + second_shift
    while True:
        peak = first_peak if first_peak > second_peak else second_peak
        if peak < floor:
            peak = floor
        if peak > budget:
            break
        point = (peak, first[i][1] + second[j][1] + extra_cost, ("region", tag, i, j))
        if out and out[-1][0] == peak:
            out[-1] = point
        else:
            out.append(point)
        # Advance the list whose next point needs less memory (both on a tie).
        next_first = first[i + 1][0] + first_shift if i < last_i else None
        next_second = second[j + 1][0] + second_shift if j < last_j else None
        if next_first is None:
            if next_second is None:
                break
            j, second_peak = j + 1, next_second
        elif next_second is None or next_first < next_second:
            i, first_peak = i + 1, next_first
        elif next_second < next_first:
            j, second_peak = j + 1, next_second
        else:
            i, first_peak, j, second_peak = i + 1, next_first, j + 1, next_second
    return out


def lower_envelope(options: Iterable[list[Point]]) -> list[Point]:
    """The Pareto frontier of several frontiers."""
    # A stable sort: points equal in peak and cost keep the order of the options.
    merged = sorted([point for option in options for point in option], key=_peak_then_cost)
    out: list[Point] = []
    for point in merged:
        # Sorted by peak, then cost: a point survives only if it is cheaper than every
        # point with a smaller or equal peak.
        if not out or point[1] < out[-1][1]:
            out.append(point)
    return out


def thinned(points: list[Point], memory_slots: int) -> list[Point]:
    """At most ``memory_slots + 1`` points: the memory discretisation of the DP.

    The span from the smallest to the largest peak is cut into ``memory_slots`` equal
    slots, and each slot keeps only its cheapest point; the first point (the smallest
    peak) is always kept. Dropping points is conservative: every survivor is still a
    real schedule with its exact peak, the frontier only gets costlier between them.
    """
    if len(points) <= memory_slots:
        return points
    low, high = points[0][0], points[-1][0]
    span = high - low
    out = [points[0]]
    for index in range(1, len(points)):
        slot = (points[index][0] - low) * memory_slots // span
        next_slot = ((points[index + 1][0] - low) * memory_slots // span) if index + 1 < len(points) else None
        if slot != next_slot:
            out.append(points[index])
    return out
