"""Synthetic two-task regression data of controlled task correlation (Ma et al. 2018, section 3.2).

u1, u2 are orthogonal unit vectors in R^d; w1 = c u1 and w2 = c (p u1 + sqrt(1 - p^2) u2), so the
cosine of the two tasks' weight vectors is p. With x ~ N(0, I):
    y_i = w_i . x + sum_{j=1..m} sin(alpha_j w_i . x + beta_j) + eps,   eps ~ N(0, noise_std^2),
alpha_j, beta_j ~ N(0, 1) drawn once per data set and shared by both tasks; with ``task_seed`` they come from
that seed instead of the data's, so data sets of different seeds pose the same regression problem (the
rows and the directions u1, u2, which a rotation-invariant x cannot tell apart, still follow ``seed``).
"""

from __future__ import annotations

import numpy as np
import torch


def make_synthetic(
    n: int, *, d: int = 100, correlation: float = 0.5, c: float = 1.0, m: int = 10,
    noise_std: float = 0.01, seed: int = 0, task_seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[n, d]`` and ``y[n, 2]`` (float32); the same arguments always give the same data."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    if not isinstance(d, int) or d < 2:
        raise ValueError(f"d must be an int >= 2 (two orthogonal directions), got {d!r}")
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation!r}")
    if m < 0 or noise_std < 0:
        raise ValueError(f"m and noise_std must be non-negative, got m={m!r}, noise_std={noise_std!r}")
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((d, 2)))  # two orthonormal columns
    u1, u2 = u[:, 0], u[:, 1]
    w1 = c * u1
    w2 = c * (correlation * u1 + np.sqrt(1.0 - correlation**2) * u2)
    alpha, beta = rng.standard_normal(m), rng.standard_normal(m)
    if task_seed is not None:  # drawn above all the same, so that x is the same whichever way they come
        task_rng = np.random.default_rng([task_seed, 0x7A5C])
        alpha, beta = task_rng.standard_normal(m), task_rng.standard_normal(m)
    x = rng.standard_normal((n, d))
    ys = []
    for w in (w1, w2):
        s = x @ w
        ys.append(s + np.sin(np.outer(s, alpha) + beta).sum(axis=1) + noise_std * rng.standard_normal(n))
    y = np.stack(ys, axis=1)
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y.astype(np.float32))
