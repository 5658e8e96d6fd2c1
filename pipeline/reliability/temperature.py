"""Temperature scaling (Guo et al. 2017): one scalar T, softmax(z / T), fitted by minimising NLL.

The NLL of softmax(beta * z) is convex in beta = 1 / T (log-sum-exp is convex, the rest is linear), so
Newton's method on beta with a backtracking line search finds the global minimum in a handful of
steps: gradient ``mean(E_p[z] - z_y)``, curvature ``mean(Var_p[z]) >= 0``. gpleiss/temperature_scaling
uses LBFGS on T from T = 1.5; both minimise the same objective.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

T_MIN, T_MAX = 0.01, 100.0


@dataclass(frozen=True)
class TemperatureFit:
    temperature: float
    nll_before: float  # at T = 1
    nll_after: float
    iterations: int
    converged: bool
    at_bound: bool  # T clipped to [T_MIN, T_MAX]: the data prefer a more extreme temperature

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _nll_grad_hess(z: np.ndarray, y: np.ndarray, beta: float) -> tuple[float, float, float]:
    s = beta * z
    m = s.max(axis=1, keepdims=True)
    e = np.exp(s - m)
    tot = e.sum(axis=1, keepdims=True)
    p = e / tot
    lse = (m + np.log(tot))[:, 0]
    zy = z[np.arange(len(z)), y]
    ez = (p * z).sum(axis=1)
    ez2 = (p * z * z).sum(axis=1)
    nll = float(np.mean(lse - beta * zy))
    grad = float(np.mean(ez - zy))
    hess = float(np.mean(np.maximum(ez2 - ez * ez, 0.0)))
    return nll, grad, hess


def fit_temperature(logits: np.ndarray, labels: np.ndarray, max_iter: int = 100, tol: float = 1e-10) -> TemperatureFit:
    """The T minimising the mean NLL of ``softmax(logits / T)`` on ``labels``."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(z) == 0:
        raise ValueError("cannot fit a temperature on zero samples")
    lo, hi = 1.0 / T_MAX, 1.0 / T_MIN
    beta = 1.0
    f, g, h = _nll_grad_hess(z, y, beta)
    nll_before = f
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        if abs(g) < tol:
            converged = True
            break
        step = -g / h if h > 1e-12 else -np.sign(g) * beta
        t = 1.0
        while True:
            nb = float(np.clip(beta + t * step, lo, hi))
            nf, ng, nh = _nll_grad_hess(z, y, nb)
            if nf <= f + 1e-4 * g * (nb - beta) or t < 1e-8:  # Armijo
                break
            t *= 0.5
        if abs(nb - beta) < 1e-12 * max(1.0, beta):
            converged = abs(ng) < 1e-6 or nb in (lo, hi)
            beta, f, g, h = nb, nf, ng, nh
            break
        beta, f, g, h = nb, nf, ng, nh
    temperature = 1.0 / beta
    return TemperatureFit(temperature=float(temperature), nll_before=nll_before, nll_after=f, iterations=it,
                          converged=bool(converged or abs(g) < 1e-6), at_bound=bool(beta in (lo, hi)))
