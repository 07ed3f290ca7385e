"""Comparing training methods across seeds: paired differences, multiple-comparison correction.

Two methods run with the same seeds on a deterministic machine start from the
same initialisation and see the same batches, so their per-seed results pair:
the difference per seed removes the seed's own luck, and the spread of those
differences is what a test of "A beats B" must be measured against. Where
runs are not deterministic (GPUs), pairing is only valid after measuring the
noise floor with duplicate runs.

* :func:`paired_difference`: mean, standard error, 95% interval, the paired
  t-test and an exact sign-flip permutation test of per-seed differences.
* :func:`paired_variance_test`: whether two paired samples have the same spread
  (Pitman-Morgan), for claims that a method is "more stable" across seeds.
* :func:`holm`: Holm's step-down adjustment of several p-values (a family of
  comparisons against one control).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.stats

EXACT_PERMUTATION_MAX_PAIRS = 20
"""Up to this many pairs the sign-flip test enumerates all 2^n sign patterns."""


def sign_flip_pvalue(differences: Sequence[float]) -> float:
  """Two-sided exact permutation p-value of mean(differences) = 0 under random signs.

  Under the null hypothesis that the two methods are exchangeable, each
  per-seed difference is as likely to have either sign; the p-value is the
  share of the 2^n sign patterns whose |mean| is at least the observed one.
  """
  d = np.asarray(differences, np.float64)
  if d.size == 0:
    return float("nan")
  if d.size > EXACT_PERMUTATION_MAX_PAIRS:
    raise ValueError(f"the exact sign-flip test enumerates 2^n patterns; got n = {d.size} > "
                     f"{EXACT_PERMUTATION_MAX_PAIRS} pairs")
  observed = abs(d.mean())
  signs = np.array(list(itertools.product((1.0, -1.0), repeat=d.size)))
  means = np.abs(signs @ d) / d.size
  return float(np.mean(means >= observed - 1e-12 * max(1.0, observed)))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
  """Statistics of the per-seed differences a - b (same seeds, in the same order).

  Returns:
    ``n``, ``mean``, ``std`` (of the differences, ddof 1), ``se``, ``ci95``
    (t interval), ``t``, ``p`` (two-sided paired t-test), ``p_sign_flip``
    (exact permutation test), ``wins`` (pairs with a > b) and ``differences``.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired_difference needs two equal-length 1-D sequences, got shapes {a.shape} and {b.shape}")
  d = a - b
  n = d.size
  out: dict[str, Any] = {"n": int(n), "mean": float(d.mean()) if n else float("nan"),
                         "differences": [float(x) for x in d], "wins": int(np.sum(d > 0))}
  if n < 2:
    out.update(std=float("nan"), se=float("nan"), ci95=[float("nan")] * 2, t=float("nan"), p=float("nan"),
               p_sign_flip=sign_flip_pvalue(d))
    return out
  std = float(d.std(ddof=1))
  se = std / np.sqrt(n)
  half = float(scipy.stats.t.ppf(0.975, n - 1)) * se
  if se > 0:
    t = float(d.mean() / se)
    p = float(2.0 * scipy.stats.t.sf(abs(t), n - 1))
  else:  # identical differences: no spread to test against
    t, p = (float("nan"), float("nan")) if d.mean() == 0 else (float("inf") * np.sign(d.mean()), 0.0)
  out.update(std=std, se=float(se), ci95=[float(d.mean() - half), float(d.mean() + half)], t=t, p=p,
             p_sign_flip=sign_flip_pvalue(d))
  return out


def paired_variance_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
  """Pitman-Morgan test of var(a) = var(b) for paired samples (same seeds).

  var(a) - var(b) = cov(a + b, a - b), so equal spreads mean zero correlation
  between the pairs' sums and differences; the test is Pearson's r of those
  with a t statistic on n - 2 degrees of freedom. Pairing matters: the seeds'
  shared luck makes the two samples correlated, which an unpaired F-test ignores.

  Returns:
    ``ratio`` (std(a) / std(b), ddof 1), ``r``, ``t``, ``p`` (two-sided), ``n``.
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1 or a.size < 3:
    raise ValueError(f"paired_variance_test needs two equal-length 1-D sequences of 3 or more, got {a.shape}, {b.shape}")
  n = a.size
  s, d = a + b, a - b
  ratio = float(a.std(ddof=1) / b.std(ddof=1)) if b.std() > 0 else float("inf")
  if s.std() == 0 or d.std() == 0:
    return {"ratio": ratio, "r": float("nan"), "t": float("nan"), "p": float("nan"), "n": int(n)}
  r = float(np.corrcoef(s, d)[0, 1])
  t = r * np.sqrt((n - 2) / max(1.0 - r * r, 1e-300))
  return {"ratio": ratio, "r": r, "t": float(t), "p": float(2.0 * scipy.stats.t.sf(abs(t), n - 2)), "n": int(n)}


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
  """Holm's step-down adjusted p-values (family-wise error control, any dependence).

  The k-th smallest of m p-values is multiplied by (m - k + 1), then a running
  maximum keeps the adjusted values in the order of the raw ones, capped at 1.
  NaN p-values are left out of the family and stay NaN.
  """
  items = sorted(((p, k) for k, p in pvalues.items() if not np.isnan(p)), key=lambda x: x[0])
  m = len(items)
  out = {k: float("nan") for k in pvalues}
  running = 0.0
  for rank, (p, key) in enumerate(items):
    running = max(running, min(1.0, (m - rank) * p))
    out[key] = running
  return out
