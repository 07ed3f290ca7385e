"""Importance scores for pruning: higher = more important, the lowest go first.

==================  ===========================================================
``magnitude``       |w|: global magnitude pruning (GMP) and iterative magnitude
                    pruning / the lottery ticket hypothesis (Frankle & Carbin,
                    ICLR 2019); the official AP code's only host (AP notes §6).
``lamp``            LAMP (Lee, Park, Mo, Ahn & Shin, "Layer-adaptive sparsity
                    for the magnitude-based pruning", ICLR 2021): a magnitude
                    normalised within its layer, so one global threshold gives
                    layer-adaptive sparsities (AP notes §6 table).
``random``          uniform noise: the null control a score has to beat.
==================  ===========================================================

Every function returns a tree shaped like the params (all leaves; the
selection reads only the prunable, alive ones).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ricci_jax.pruning.paths import host_masks, host_values

__all__ = ["SCORES", "lamp_scores", "magnitude_scores", "random_scores"]

SCORES = ("magnitude", "lamp", "random")
"""The host scores :class:`ricci_jax.pruning.PruningSchedule` accepts (``method``)."""


def magnitude_scores(params: Any) -> Any:
  """``|w|`` leaf by leaf (jit-able)."""
  return jax.tree.map(jnp.abs, params)


def lamp_leaf(w: np.ndarray, alive: np.ndarray) -> np.ndarray:
  """LAMP scores of one leaf (float64, host side); pruned entries get +inf.

  score(u) = w_u^2 / sum of w_v^2 over the alive v of the leaf with
  |w_v| >= |w_u| (itself included). Tied magnitudes share the denominator,
  as the definition's ">=" says (the public implementations' cumulative sum
  over a sorted order gives tied weights different scores; the definition
  does not). When every such w_v is 0 (so is w_u), the score is 0.
  """
  sq = np.square(np.asarray(w, np.float64)).ravel()
  alive = np.asarray(alive, bool).ravel()
  out = np.full(sq.shape, np.inf)
  vals = sq[alive]
  if vals.size:
    order = np.argsort(vals, kind="stable")
    sorted_sq = vals[order]
    # suffix[i] = sum of sorted_sq[i:]; a tie group's denominator starts at its first member
    suffix = np.cumsum(sorted_sq[::-1])[::-1]
    first = np.searchsorted(sorted_sq, sorted_sq, side="left")
    denom = suffix[first]
    scores_sorted = np.divide(sorted_sq, denom, out=np.zeros_like(sorted_sq), where=denom > 0)
    leaf_scores = np.empty_like(vals)
    leaf_scores[order] = scores_sorted
    out[alive] = leaf_scores
  return out.reshape(np.shape(w))


def lamp_scores(params: Any, masks: Any) -> Any:
  """LAMP scores of every leaf (NumPy float64 arrays, host side); pruned weights get +inf.

  Within each leaf, the alive weights sorted by w^2 ascending; score(u) =
  w_u^2 / sum of w_v^2 over the alive v of the same leaf with |w_v| >= |w_u|
  (Lee et al., ICLR 2021; AP notes §6). Each leaf's largest weight
  scores 1, so ranking globally by LAMP never empties a layer.
  """
  values = host_values(params, "params", params)
  alive = host_masks(masks, params)
  return jax.tree.unflatten(jax.tree.structure(params), [lamp_leaf(w, m) for w, m in zip(values, alive)])


def random_scores(params: Any, key: jax.Array) -> Any:
  """Uniform [0, 1) scores, an independent draw per leaf from ``key`` (a null control)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, max(len(leaves), 1))
  return jax.tree.unflatten(treedef, [jax.random.uniform(k, jnp.shape(p)) for k, p in zip(keys, leaves)])
