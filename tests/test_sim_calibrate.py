"""The cpu-local fit recovers known coefficients and scores held-out traces."""

from __future__ import annotations

import numpy as np

from alignedserve.sim.calibrate import FEATURES, Trace, abs_pct_errors, features, fit


def test_features_by_backend():
    assert features(3, (10, 20, 40), 0, "dense") == [1.0, 3.0, 120.0, 3.0, 0.0, 0.0, 0.0]
    assert features(3, (10, 20, 40), 8, "varlen") == [1.0, 11.0, 0.0, 0.0, 70.0, 3.0, 32.0]
    assert features(0, (), 16, "") == [1.0, 16.0, 0.0, 0.0, 0.0, 0.0, 128.0]


def _trace(rng, coef, n=400, noise=0.0) -> Trace:
    rows = []
    for _ in range(n):
        k = int(rng.integers(1, 40))
        lens = tuple(int(v) for v in rng.integers(16, 900, size=k))
        pre = int(rng.integers(0, 300)) if rng.random() < 0.2 else 0
        rows.append(features(k, lens, pre, "dense" if rng.random() < 0.5 else "varlen"))
    x = np.asarray(rows)
    y = x @ coef * (1 + noise * rng.standard_normal(n))
    return Trace("synthetic", x, y)


def test_fit_recovers_coefficients_and_clips_negatives():
    rng = np.random.default_rng(0)
    true = np.array([2e-3, 4e-4, 2e-7, 1e-5, 3e-7, 5e-5, 1e-8])
    assert len(true) == len(FEATURES)
    coef = fit([_trace(rng, true)])
    np.testing.assert_allclose(coef, true, rtol=1e-6)
    noisy = fit([_trace(rng, true, noise=0.05)])
    assert (noisy >= 0).all()
    held = _trace(np.random.default_rng(1), true, noise=0.05)
    assert np.median(abs_pct_errors(noisy, held)) < 6.0  # ~5% noise, well predicted
    wrong = np.array([0.0, 1e-5, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert np.median(abs_pct_errors(wrong, held)) > 50.0  # the score can fail
