"""Embedded Runge–Kutta pairs with error control and dense output, for :func:`anode_plan.odeint`.

Three FSAL pairs (the last stage's derivative is the next step's first, so a state is
carried with its derivative ``f``):

* ``dopri5``: Dormand and Prince, "A family of embedded Runge-Kutta formulae", J. Comput.
  Appl. Math. 6(1), 1980 (order 5, error order 4), with Shampine's midpoint weights for dense
  output ("Some practical Runge-Kutta formulas", Math. Comp. 46, 1986);
* ``bosh3``: Bogacki and Shampine, "A 3(2) pair of Runge-Kutta formulas", Appl. Math.
  Lett. 2(4), 1989;
* ``tsit5``: Tsitouras, "Runge-Kutta pairs of order 5(4) satisfying only the first column
  simplifying assumption", Comput. Math. Appl. 62(2), 2011, with its interpolant at ½.

Step-size control is the usual one, as torchdiffeq has it, so that both take the same
steps: the error ratio is the RMS norm of ``err / (atol + rtol·max(|y₀|, |y₁|))``
(a tuple state: the largest over its parts), a step is accepted when it is at most 1,
and the next step is ``dt·min(10, max(0.9·ratio^(-1/order), 0.2))`` (no shrinking after
an accepted step). The first step is Hairer, Nørsett and Wanner's (Solving ODEs I, §II.4)
unless given. Dense output is the quartic through ``y₀``, ``y₁``, the midpoint value and
the two end derivatives.

Everything here is a plain function of tensors, differentiable where it is used with a
tape (:func:`rk_step`, :func:`interpolate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from anode_plan.ode.fixed_grid import PREV

Func = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Tableau:
    """An embedded explicit FSAL Runge–Kutta pair: nodes, stage weights, solution weights, error weights."""

    name: str
    order: int
    alpha: tuple[float, ...]
    beta: tuple[tuple[float, ...], ...]
    c_sol: tuple[float, ...]
    c_error: tuple[float, ...]
    c_mid: tuple[float, ...]

    @property
    def stages(self) -> int:
        return len(self.alpha) + 1


_DOPRI5 = Tableau(
    "dopri5", 5,
    alpha=(1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    beta=((1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
          (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
          (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
          (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
    c_sol=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    c_error=(35 / 384 - 1951 / 21600, 0.0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
             -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1.0 / 60.0),
    c_mid=(6025192743 / 30085553152 / 2, 0.0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
           187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2),
)

_BOSH3 = Tableau(
    "bosh3", 3,
    alpha=(1 / 2, 3 / 4, 1.0),
    beta=((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
    c_sol=(2 / 9, 1 / 3, 4 / 9, 0.0),
    c_error=(2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8),
    c_mid=(0.0, 0.5, 0.0, 0.0),
)


def _tsit5_mid(x: float) -> tuple[float, ...]:
    return (-1.0530884977290216 * x * (x - 1.329989018975412) * (x * x - 1.4364028541716351 * x + 0.7139816917074209),
            0.1017 * x * x * (x * x - 2.1966568338249754 * x + 1.2949852507374631),
            2.490627285651252793 * x * x * (x * x - 2.38535645472061657 * x + 1.57803468208092486),
            -16.54810288924490272 * (x - 1.21712927295533244) * (x - 0.61620406037800089) * x * x,
            47.37952196281928122 * (x - 1.203071208372362603) * (x - 0.658047292653547382) * x * x,
            -34.87065786149660974 * (x - 1.2) * (x - 2 / 3) * x * x,
            2.5 * (x - 1) * (x - 0.6) * x * x)


_TSIT5_B = (.9646076681806522951816731316512876333711995238157997181903319145764851595234062815396e-1,
            1 / 100,
            .4798896504144995747752495322905965199130404621990332488332634944254542060153074523509,
            1.379008574103741893192274821856872770756462643091360525934940067397245698027561293331,
            -3.290069515436080679901047585711363850115683290894936158531296799594813811049925401677,
            2.324710524099773982415355918398765796109060233222962411944060046314465391054716027841)
_TSIT5_B_HAT = (.9468075576583945807478876255758922856117527357724631226139574065785592789071067303271e-1,
                .9183565540343253096776363936645313759813746240984095238905939532922955247253608687270e-2,
                .4877705284247615707855642599631228241516691959761363774365216240304071651579571959813,
                1.234297566930478985655109673884237654035539930748192848315425833500484878378061439761,
                -2.707712349983525454881109975059321670689605166938197378763992255714444407154902012702,
                1.866628418170587035753719399566211498666255505244122593996591602841258328965767580089,
                1 / 66)

_TSIT5 = Tableau(
    "tsit5", 5,
    alpha=(161 / 1000, 327 / 1000, 9 / 10, .9800255409045096857298102862870245954942137979563024768854764293221195950761,
           1.0, 1.0),
    beta=((161 / 1000,),
          (-.8480655492356988544426874250230774675121177393430391537369234245294192976164141156943e-2,
           .3354806554923569885444268742502307746751211773934303915373692342452941929761641411569),
          (2.897153057105493432130432594192938764924887287701866490314866693455023795137503079289,
           -6.359448489975074843148159912383825625952700647415626703305928850207288721235210244366,
           4.362295432869581411017727318190886861027813359713760212991062156752264926097707165077),
          (5.325864828439256604428877920840511317836476253097040101202360397727981648835607691791,
           -11.74888356406282787774717033978577296188744178259862899288666928009020615663593781589,
           7.495539342889836208304604784564358155658679161518186721010132816213648793440552049753,
           -.9249506636175524925650207933207191611349983406029535244034750452930469056411389539635e-1),
          (5.861455442946420028659251486982647890394337666164814434818157239052507339770711679748,
           -12.92096931784710929170611868178335939541780751955743459166312250439928519268343184452,
           8.159367898576158643180400794539253485181918321135053305748355423955009222648673734986,
           -.7158497328140099722453054252582973869127213147363544882721139659546372402303777878835e-1,
           -.2826905039406838290900305721271224146717633626879770007617876201276764571291579142206e-1),
          _TSIT5_B),
    # The solution is the fifth-order row (FSAL: the last stage's node), and the error its difference from the
    # embedded fourth-order weights b̂ (torchdiffeq 0.2.5's tsit5 carries b̂'s fourth-order solution instead,
    # while its carried derivative is the fifth-order point's; tests/test_adaptive.py's order test fails for it).
    c_sol=_TSIT5_B + (0.0,),
    c_error=tuple(b - b_hat for b, b_hat in zip(_TSIT5_B + (0.0,), _TSIT5_B_HAT)),
    c_mid=_tsit5_mid(0.5),
)

TABLEAUS = {tableau.name: tableau for tableau in (_DOPRI5, _BOSH3, _TSIT5)}
"""The adaptive methods, by name."""


def _combine(base: torch.Tensor, ks: Sequence[torch.Tensor], weights: Sequence[float], dt: torch.Tensor
             ) -> torch.Tensor:
    out = base
    for k, w in zip(ks, weights):
        if w != 0.0:
            out = out + (w * dt) * k
    return out


def rk_step(func: Func, tableau: Tableau, y0: torch.Tensor, f0: torch.Tensor, t0: torch.Tensor,
            dt: torch.Tensor, t1: torch.Tensor, end_perturb: bool = False
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One step from ``(y0, f0 = func(t0, y0))``: ``(y1, f1, error estimate, stage derivatives)``.

    ``t0``, ``dt``, ``t1`` are 0-d tensors; ``t1`` is given (not ``t0 + dt``) so the last node
    lands on the step's end exactly. ``end_perturb``: the step ends on a discontinuity
    (``jump_t``), so the stages at its end see ``func`` just before it (``func(t, y, PREV)``).
    """
    dtype = y0.dtype
    t0_, dt_, t1_ = t0.to(dtype), dt.to(dtype), t1.to(dtype)
    ks = [f0]
    y = y0
    for alpha, beta in zip(tableau.alpha, tableau.beta):
        ti = t1_ if alpha == 1.0 else t0_ + alpha * dt_
        y = _combine(y0, ks, beta, dt_)
        ks.append(func(ti, y, PREV) if end_perturb and alpha == 1.0 else func(ti, y))
    if not (tableau.c_sol[-1] == 0 and tuple(tableau.c_sol[:-1]) == tuple(tableau.beta[-1])):
        y = _combine(y0, ks, tableau.c_sol, dt_)
    error = _combine(torch.zeros_like(y0), ks, tableau.c_error, dt_)
    return y, ks[-1], error, ks


def interpolation(tableau: Tableau, y0: torch.Tensor, y1: torch.Tensor, ks: Sequence[torch.Tensor],
                  dt: torch.Tensor) -> list[torch.Tensor]:
    """The quartic's coefficients ``[e, d, c, b, a]`` on the step, in ``x = (t − t0)/dt ∈ [0, 1]``."""
    dt = dt.to(y0.dtype)
    y_mid = _combine(y0, ks, tableau.c_mid, dt)
    f0, f1 = ks[0], ks[-1]
    a = 2 * dt * (f1 - f0) - 8 * (y1 + y0) + 16 * y_mid
    b = dt * (5 * f0 - 3 * f1) + 18 * y0 + 14 * y1 - 32 * y_mid
    c = dt * (f1 - 4 * f0) - 11 * y0 - 5 * y1 + 16 * y_mid
    return [y0, dt * f0, c, b, a]


def interpolate(coefficients: Sequence[torch.Tensor], t0: torch.Tensor, t1: torch.Tensor, t: torch.Tensor
                ) -> torch.Tensor:
    """The dense output at ``t`` in ``[t0, t1]``."""
    x = ((t - t0) / (t1 - t0)).to(coefficients[0].dtype)
    total = coefficients[0] + x * coefficients[1]
    power = x
    for coefficient in coefficients[2:]:
        power = power * x
        total = total + power * coefficient
    return total


def error_ratio(error: torch.Tensor, rtol: torch.Tensor, atol: torch.Tensor, y0: torch.Tensor, y1: torch.Tensor,
                norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    return norm(error / (atol + rtol * torch.max(y0.abs(), y1.abs()))).abs()


def next_step(dt: torch.Tensor, ratio: torch.Tensor, order: int, safety: float = 0.9, ifactor: float = 10.0,
              dfactor: float = 0.2) -> torch.Tensor:
    """The next step size after a step of size ``dt`` with error ratio ``ratio`` (accepted or not)."""
    ratio = float(ratio.detach())  # finite: the caller checks
    if ratio == 0:
        return dt * ifactor
    low = 1.0 if ratio < 1 else dfactor
    factor = min(ifactor, max(safety / ratio ** (1.0 / order), low))
    return dt * factor


def initial_step(func: Func, t0: torch.Tensor, y0: torch.Tensor, f0: torch.Tensor, order: int, rtol: torch.Tensor,
                 atol: torch.Tensor, norm: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Hairer, Nørsett and Wanner's first step for a method of ``order`` (not differentiated)."""
    scale = atol + torch.abs(y0) * rtol
    d0, d1 = norm(y0 / scale).abs(), norm(f0 / scale).abs()
    h0 = torch.tensor(1e-6, dtype=y0.dtype, device=y0.device) if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = h0.abs()
    f1 = func(t0 + h0.to(t0.dtype), y0 + h0 * f0)
    d2 = torch.abs(norm((f1 - f0) / scale) / h0)
    if d1 <= 1e-15 and d2 <= 1e-15:
        h1 = torch.max(torch.tensor(1e-6, dtype=y0.dtype, device=y0.device), h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / order)
    return torch.min(100 * h0, h1.abs()).to(t0.dtype)


def rms_norm(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.abs().pow(2).mean().sqrt()
