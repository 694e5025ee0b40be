"""Run torchdiffeq's own test suite against ``anode_plan.odeint``, and count what passes, per test.

Use it to check the drop-in claim the way a torchdiffeq user would: fetch torchdiffeq
(``git clone https://github.com/rtqichen/torchdiffeq``; the counts in ``docs/torchdiffeq.md``
are from commit 657943a, April 2025), then::

    PYTHONPATH=. python tools/torchdiffeq_suite.py /path/to/torchdiffeq [--checkpoints 3] [-k gradient]

Its ``tests/`` run unchanged, with ``torchdiffeq.odeint``, ``odeint_adjoint`` and
``odeint_event`` routed to anode_plan's for the methods anode_plan implements
(:data:`anode_plan.ode.solve.METHODS`, and torchdiffeq's default ``dopri5`` when none is
named); every other method still runs torchdiffeq's own solver. A subtest (or a test with no
subtests) is counted when it reached anode_plan's code, and the counts are printed per test.
``--checkpoints N`` / ``--memory-budget B`` add that option to every routed call, so the suite
runs with a backward that recomputes. ``--only-ours`` skips (instead of running) the subtests
whose method is torchdiffeq's, which is much faster.

A few subtests cannot pass by design; :data:`BY_DESIGN` lists them with the reason, and they
are counted apart. The suite is torchdiffeq's (MIT licensed) and is not copied here: the
project's own tests (``tests/test_odeint_surface.py`` and ``tests/test_adaptive.py``) check
each behaviour it checks.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
import unittest
from collections import defaultdict
from pathlib import Path

BY_DESIGN = {
    ("norm_tests.TestNorms.test_adjoint_norm", ""):
        "it reads torchdiffeq's adjoint internals (`xs.grad_fn.adjoint_options['norm']`) and expects the adjoint "
        "ODE's norm to be called on (t, y, adj_y, adj_params) in backward; anode_plan's odeint_adjoint is exact "
        "backprop through the forward's steps (the adjoint_* arguments are accepted and have nothing to control), "
        "so there is no adjoint solve and no adjoint norm",
    ("odeint_tests.TestDiscontinuities.test_odeint_perturb", "adjoint=True"):
        "with perturb=False it expects backward to evaluate func at t=1.0, where torchdiffeq's adjoint starts its "
        "backward solve; anode_plan's backward re-runs the forward's euler/midpoint steps, whose stages never sit at "
        "the end time (rk4's last stage does, so rk4 passes). The perturb=True half, that no stage sits on the grid, "
        "passes",
}
"""Subtests that cannot pass by design: (test id, text in the subtest's description) → reason.
``docs/torchdiffeq.md`` lists the same."""


def _by_design(test_id: str, label: str) -> bool:
    return any(test_id == key and text in label for key, text in BY_DESIGN)

TEST_MODULES = ("api_tests", "event_tests", "gradient_tests", "norm_tests", "odeint_tests")


class _Router:
    """Routes torchdiffeq's entry points to anode_plan's for anode_plan's methods, and counts the routed calls."""

    def __init__(self, torchdiffeq, anode_plan, methods, extra_options, only_ours):
        self.calls = 0
        self.last_ours = False  # whether the latest call ran anode_plan's solver (else torchdiffeq's own)
        self.torchdiffeq, self.anode_plan, self.methods = torchdiffeq, anode_plan, methods
        self.extra, self.only_ours = extra_options, only_ours
        self.original = {name: getattr(torchdiffeq, name) for name in ("odeint", "odeint_adjoint", "odeint_event")}

    def install(self):
        for name in self.original:
            setattr(self.torchdiffeq, name, self._route(name))

    def _route(self, name):
        def routed(*args, **kwargs):
            method = kwargs.get("method") or "dopri5"
            self.last_ours = method in self.methods
            if method in self.methods:
                self.calls += 1
                ours = getattr(self.anode_plan, name, None)
                if ours is None:
                    raise NotImplementedError(f"anode_plan has no {name}")
                if self.extra:
                    kwargs["options"] = {**(kwargs.get("options") or {}), **self.extra}
                return ours(*args, **kwargs)
            if self.only_ours:
                raise unittest.SkipTest(f"method {method!r} is torchdiffeq's own")
            return self.original[name](*args, **kwargs)
        return routed


class _Counting(unittest.TestResult):
    """Counts, per test, the subtests (or the whole test) that reached anode_plan's code."""

    def __init__(self, router, verbose):
        super().__init__()
        self.router, self.verbose = router, verbose
        self.counts = defaultdict(lambda: [0, 0, 0, 0])  # test id -> [passed, failed, by design, upstream]
        self.failures_seen = defaultdict(list)
        self._mark = 0
        self._had_subtests = False

    def _unit(self, test_id, label, err):
        reached = self.router.calls > self._mark
        self._mark = self.router.calls
        if not reached:
            return
        designed = err is not None and _by_design(test_id, label)
        upstream = err is not None and not designed and not self.router.last_ours
        self.counts[test_id][0 if err is None else 2 if designed else 3 if upstream else 1] += 1
        if upstream:
            label += " [after anode_plan's calls passed, in a call to torchdiffeq's own solver]"
        if err is not None and not designed:
            message = " ".join(traceback.format_exception_only(err[0], err[1])).strip().replace("\n", " ")[:300]
            self.failures_seen[test_id].append(f"{label}: {message}")
            if self.verbose:
                print(f"FAIL {test_id} {label}: {message}", flush=True)

    @staticmethod
    def _id(test):
        return test.id()

    def startTest(self, test):
        super().startTest(test)
        self._mark = self.router.calls
        self._had_subtests = False

    def addSubTest(self, test, subtest, err):
        self._had_subtests = True
        if err is not None and issubclass(err[0], unittest.SkipTest):
            self._mark = self.router.calls
            return
        self._unit(self._id(test), subtest._subDescription(), err)

    def addSuccess(self, test):
        if not self._had_subtests:
            self._unit(self._id(test), "(whole test)", None)
        self._mark = self.router.calls

    def addFailure(self, test, err):
        self._unit(self._id(test), "(outside subtests)", err)

    def addError(self, test, err):
        self._unit(self._id(test), "(outside subtests)", err)

    def addSkip(self, test, reason):
        self._mark = self.router.calls


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a fetched torchdiffeq repository (with tests/ and torchdiffeq/)")
    parser.add_argument("-k", default="", help="run only tests whose id contains this")
    parser.add_argument("--checkpoints", type=int, help="add options['checkpoints'] to every routed call")
    parser.add_argument("--memory-budget", help="add options['memory_budget'] to every routed call")
    parser.add_argument("--only-ours", action="store_true", help="skip the subtests of torchdiffeq's own methods")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each failure as it happens")
    args = parser.parse_args(argv)

    sys.path[:0] = [str(args.checkout / "tests"), str(args.checkout)]
    import torchdiffeq  # the fetched copy, which its tests import

    import anode_plan
    from anode_plan.ode import solve

    methods = getattr(solve, "METHODS", ("dopri5", "bosh3", "tsit5"))

    extra = {}
    if args.checkpoints is not None:
        extra["checkpoints"] = args.checkpoints
    if args.memory_budget is not None:
        extra["memory_budget"] = args.memory_budget
    router = _Router(torchdiffeq, anode_plan, tuple(methods), extra, args.only_ours)
    router.install()

    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for name in TEST_MODULES:
        module = __import__(name)
        for test in _flatten(loader.loadTestsFromModule(module)):
            if args.k in test.id():
                suite.addTest(test)
    result = _Counting(router, args.verbose)
    started = time.perf_counter()
    for test in suite:
        test_started = time.perf_counter()
        test(result)
        counts = result.counts.get(test.id())
        if counts:
            print(f"{test.id():60s} {counts[0]:4d} passed {counts[1]:4d} failed {counts[2]:4d} by design "
                  f"{counts[3]:4d} upstream "
                  f"({time.perf_counter() - test_started:.0f} s)", flush=True)

    print(f"\nmethods routed to anode_plan: {', '.join(methods)}; options added: {extra or 'none'}")
    print("(upstream: failed in a call to torchdiffeq's own solver made after the routed calls; such a test fails "
          "against torchdiffeq alone too)")
    print(f"{'test':60s} {'passed':>6s} {'failed':>6s} {'by design':>9s} {'upstream':>8s}")
    total = [0, 0, 0, 0]
    for test_id in sorted(result.counts):
        counts = result.counts[test_id]
        print(f"{test_id:60s} {counts[0]:6d} {counts[1]:6d} {counts[2]:9d} {counts[3]:8d}")
        total = [a + b for a, b in zip(total, counts)]
    print(f"{'total':60s} {total[0]:6d} {total[1]:6d} {total[2]:9d} {total[3]:8d}")
    print(f"{len(result.counts)} tests reached anode_plan, {sum(total)} subtests, "
          f"{time.perf_counter() - started:.0f} s")
    for test_id, messages in sorted(result.failures_seen.items()):  # failed and upstream
        print(f"\n{test_id}: {len(messages)} failing")
        for message in messages[:6]:
            print(f"  {message}")
    for (test_id, text), reason in BY_DESIGN.items():
        print(f"\nby design, {test_id}{f' ({text})' if text else ''}: {reason}")
    return 0 if total[1] == 0 else 1


def _flatten(suite):
    for item in suite:
        if isinstance(item, unittest.TestSuite):
            yield from _flatten(item)
        else:
            yield item


if __name__ == "__main__":
    sys.exit(main())
