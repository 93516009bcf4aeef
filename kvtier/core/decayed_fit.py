"""Least squares over observations that fade: the moving-average fits of the onboarding cost
model (``kvtier.core.onboard_cost``), pure Python so the scheduler half stays torch-free.

Why not numpy's ``lstsq``: the systems are 2x2 and solved once per new observation on the
scheduler's hot path, where a Python elimination costs microseconds and needs no array setup.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["DecayedLinearFit"]


class DecayedLinearFit:
    """Least squares ``y ~ x . theta`` over observations that fade by ``decay`` each, pulled
    towards a prior ``theta0`` with a fixed weight (ridge: ``weight * sum_i (scale_i * (theta_i -
    theta0_i))^2``, ``scale_i`` a typical size of feature ``i``). Coefficients are kept >= 0 (a
    negative cost is noise: such a coefficient is fixed at 0 and the rest solved again)."""

    def __init__(
        self, prior: Sequence[float], scale: Sequence[float], weight: float, decay: float
    ) -> None:
        if len(prior) != len(scale) or not prior:
            raise ValueError("DecayedLinearFit: prior and scale must have the same, non-zero size")
        if not 0.0 < decay <= 1.0 or weight <= 0.0:
            raise ValueError(
                f"DecayedLinearFit: need 0 < decay <= 1 and weight > 0 ({decay}, {weight})"
            )
        n = len(prior)
        self._n = n
        self._decay = decay
        self._prior = [float(p) for p in prior]
        self._ridge = [weight * float(s) * float(s) for s in scale]
        self._xtx = [[0.0] * n for _ in range(n)]
        self._xty = [0.0] * n
        self.observations = 0
        self.last_outlier = False  # for OnboardCostModel: was the last observation an outlier
        self._theta: list[float] | None = list(self._prior)

    def observe(self, x: Sequence[float], y: float) -> None:
        d = self._decay
        for i in range(self._n):
            row = self._xtx[i]
            xi = x[i]
            for j in range(self._n):
                row[j] = d * row[j] + xi * x[j]
            self._xty[i] = d * self._xty[i] + xi * y
        self.observations += 1
        self._theta = None

    @property
    def theta(self) -> list[float]:
        if self._theta is None:
            self._theta = self._solve()
        return self._theta

    def predict(self, x: Sequence[float]) -> float:
        th = self.theta
        if self._n == 2:  # the cost model's fits: called several times per decision
            return th[0] * x[0] + th[1] * x[1]
        return sum(th[i] * x[i] for i in range(self._n))

    def _solve(self) -> list[float]:
        free = list(range(self._n))
        while True:
            theta = [0.0] * self._n
            if free:
                a = [
                    [self._xtx[i][j] + (self._ridge[i] if i == j else 0.0) for j in free]
                    for i in free
                ]
                b = [self._xty[i] + self._ridge[i] * self._prior[i] for i in free]
                for i, v in zip(free, _gauss(a, b), strict=True):
                    theta[i] = v
            negative = [i for i in free if theta[i] < 0.0]
            if not negative:
                return theta
            free = [i for i in free if i not in negative]


def _gauss(a: list[list[float]], b: list[float]) -> list[float]:
    """Solve ``a x = b`` (symmetric positive definite thanks to the ridge) by elimination; the
    sizes the cost model uses (1 and 2) in closed form, solved once per load that lands."""
    n = len(b)
    if n == 1:
        return [b[0] / a[0][0]]
    if n == 2:
        (a00, a01), (a10, a11) = a
        det = a00 * a11 - a01 * a10
        return [(b[0] * a11 - a01 * b[1]) / det, (a00 * b[1] - a10 * b[0]) / det]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(a[r][c]))
        a[c], a[p] = a[p], a[c]
        b[c], b[p] = b[p], b[c]
        piv = a[c][c]
        for r in range(c + 1, n):
            f = a[r][c] / piv
            if f:
                for k in range(c, n):
                    a[r][k] -= f * a[c][k]
                b[r] -= f * b[c]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        s = b[r] - sum(a[r][k] * x[k] for k in range(r + 1, n))
        x[r] = s / a[r][r]
    return x
