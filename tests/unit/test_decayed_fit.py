"""The cost model's moving-average least squares against numpy's solve of the same system."""

from __future__ import annotations

import random

import numpy as np
import pytest

from kvtier.core.decayed_fit import DecayedLinearFit


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fit_solves_the_decayed_ridge_system(n: int) -> None:
    rng = random.Random(n)
    prior = [rng.uniform(0.1, 1.0) for _ in range(n)]
    scale = [rng.uniform(0.5, 2.0) for _ in range(n)]
    weight, decay = 0.3, 0.9
    fit = DecayedLinearFit(prior, scale, weight, decay)
    truth = [rng.uniform(1.0, 3.0) for _ in range(n)]
    xtx, xty = np.zeros((n, n)), np.zeros(n)
    for _ in range(25):
        x = [rng.uniform(0.5, 5.0) for _ in range(n)]
        y = sum(t * v for t, v in zip(truth, x, strict=True)) * rng.uniform(0.9, 1.1)
        fit.observe(x, y)
        xtx = decay * xtx + np.outer(x, x)
        xty = decay * xty + np.array(x) * y
        ridge = np.diag([weight * s * s for s in scale])
        want = np.linalg.solve(xtx + ridge, xty + ridge @ np.array(prior))
        assert fit.theta == pytest.approx(list(want), rel=1e-9)


def test_a_negative_coefficient_is_fixed_at_zero() -> None:
    fit = DecayedLinearFit([1.0, 1.0], [1.0, 1.0], 1e-6, 1.0)
    for x0, x1 in ((1.0, 1.0), (2.0, 1.0), (3.0, 1.0)):
        fit.observe([x0, x1], 5.0 - x0)  # y falls with x0: its coefficient would be negative
    theta = fit.theta
    assert theta[0] == 0.0
    assert theta[1] == pytest.approx(3.0, rel=1e-3)  # y ~ theta1 * x1 alone: mean of 4, 3, 2
