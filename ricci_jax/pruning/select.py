"""Exact-count selection: remove the ``count`` lowest-scored alive prunable weights.

The official AP code prunes by a percentile threshold (``np.percentile`` then
``|w| < tau``) and AP by "the element at index k, then ``<=``" (AP notes
§8.4), so ties and the threshold's interpolation decide how many go, and AP
prunes k + 1 or more (bug B8). Here the count is exact, as the notes' design
asks (§9 "Exact-k selection"):

* **candidates**: alive (mask True) entries of prunable leaves; a pruned
  weight is never revived nor counted again;
* **order**: by score ascending, ties broken by the lower flat index over the
  prunable leaves concatenated in ``jax.tree`` order (each leaf raveled in C
  order), so the result is deterministic and independent of the backend;
* **scope** ``"global"``: one ranking over all prunable leaves (GMP, LAMP);
  ``"layer"``: ``count`` is split over the leaves (each prunable leaf is a
  "layer", a BN scale selected by ``PruneRule.extra`` included) in
  proportion to their candidate counts, by the largest remainder method
  (:func:`split_count`), so the parts add up to ``count`` exactly, then each
  leaf removes its part (the original lottery-ticket code prunes layer-wise,
  AP notes §8.1);
* **rounding** of a fraction to a count: half up (:func:`rounded_count`),
  not Python's half-to-even.

All of this runs on the host in NumPy (float64 scores, exact for float32
inputs): pruning happens once per cycle, outside jit. Masks come back as
``jnp`` bool arrays.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ricci_jax.pruning.paths import host_masks, host_values, leaf_paths, prunable_flags

__all__ = ["SCOPES", "lowest", "prune_fraction", "prune_lowest", "rounded_count", "split_count"]

SCOPES = ("global", "layer")
"""Selection scopes: one ranking over all prunable leaves, or one per leaf."""


def check_scope(scope: str, name: str = "scope") -> str:
  """``scope`` if it is one of :data:`SCOPES`, else a ValueError saying what is allowed."""
  if scope not in SCOPES:
    raise ValueError(f"unknown {name} {scope!r}; allowed: {', '.join(SCOPES)}")
  return scope


def check_count(count: Any, name: str = "count") -> int:
  """``count`` as an int, or a ValueError unless it is a non-negative integer."""
  if isinstance(count, bool) or not isinstance(count, (numbers.Integral, np.integer)) or count < 0:
    raise ValueError(f"{name} must be a non-negative integer, got {count!r}")
  return int(count)


def rounded_count(x: float) -> int:
  """``x`` rounded half up to an int (``floor(x + 0.5)``): 0.5 -> 1, 2.5 -> 3."""
  return int(math.floor(float(x) + 0.5))


def split_count(count: int, sizes: Sequence[int]) -> list[int]:
  """``count`` split over ``sizes`` in proportion, by the largest remainder method.

  Part i is floor(count * size_i / total) plus one for the ``count - sum of
  floors`` parts with the largest remainders (ties: the lower index first).
  Exact integer arithmetic; the parts add up to ``count`` and part i never
  exceeds size_i when count <= total.
  """
  sizes = [int(s) for s in sizes]
  total = sum(sizes)
  if count == 0 or total == 0:
    return [0] * len(sizes)
  base = [count * s // total for s in sizes]
  rem = [count * s % total for s in sizes]
  left = count - sum(base)
  for i in sorted(range(len(sizes)), key=lambda i: (-rem[i], i))[:left]:
    base[i] += 1
  return base


def lowest(scores: Sequence[np.ndarray], eligible: Sequence[np.ndarray], count: int, scope: str,
           names: Sequence[str] | None = None) -> list[np.ndarray]:
  """The ``count`` lowest-scored eligible entries, as one flat bool array per leaf.

  ``scores`` and ``eligible`` are flat per-leaf arrays (raveled in C order);
  the module docstring gives the order, scope and tie-break. ``count`` must
  not exceed the number of eligible entries.

  Raises:
    ValueError: a NaN score on an eligible entry (naming the leaf), or
      ``count`` larger than the eligible entries.
  """
  names = list(names) if names is not None else [f"leaf {i}" for i in range(len(scores))]
  for name, s, e in zip(names, scores, eligible):
    if np.isnan(s[e]).any():
      raise ValueError(f"NaN score on an alive prunable weight of {name!r}: cannot rank it")
  sizes = [int(e.sum()) for e in eligible]
  if count > sum(sizes):
    raise ValueError(f"cannot prune {count} weights: only {sum(sizes)} alive prunable weights are left")
  removed = [np.zeros(e.shape, bool) for e in eligible]
  if count == 0:
    return removed
  if scope == "global":
    offsets = np.cumsum([0] + [e.size for e in eligible])
    idx = np.concatenate([np.flatnonzero(e) + o for e, o in zip(eligible, offsets)])
    vals = np.concatenate([s[e] for s, e in zip(scores, eligible)])
    chosen = idx[np.argsort(vals, kind="stable")[:count]]  # idx ascending: stable = lower index first
    flat = np.zeros(offsets[-1], bool)
    flat[chosen] = True
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(eligible))]
  for r, s, e, k in zip(removed, scores, eligible, split_count(count, sizes)):
    if k:
      idx = np.flatnonzero(e)
      r[idx[np.argsort(s[idx], kind="stable")[:k]]] = True
  return removed


def prune_lowest(scores: Any, masks: Any, prunable: Any, count: int, scope: str = "global") -> Any:
  """Masks with exactly ``count`` more prunable weights removed: the alive ones of lowest score.

  Args:
    scores: a tree like the params (higher = more important), e.g.
      :func:`ricci_jax.pruning.magnitude_scores`.
    masks: the current masks (bool, True = alive).
    prunable: a tree of Python bools (:meth:`ricci_jax.pruning.PruneRule.prunable`).
    count: how many alive prunable weights to remove (0 <= count <= alive).
    scope: ``"global"`` or ``"layer"`` (module docstring: split by largest remainder).

  Returns:
    The new masks (``jnp`` bool arrays); non-prunable leaves unchanged.
  """
  check_scope(scope)
  count = check_count(count)
  flags = prunable_flags(prunable, masks, "masks")
  current = host_masks(masks, masks, "masks")
  values = host_values(scores, "scores", masks, "masks")
  names = leaf_paths(masks)
  sel = [i for i, f in enumerate(flags) if f]
  removed = lowest([values[i].ravel() for i in sel], [current[i].ravel() for i in sel], count, scope,
                   [names[i] for i in sel])
  out = [jnp.asarray(m) for m in current]
  for i, r in zip(sel, removed):
    out[i] = jnp.asarray(current[i] & ~r.reshape(current[i].shape))
  return jax.tree.unflatten(jax.tree.structure(masks), out)


def prune_fraction(scores: Any, masks: Any, prunable: Any, fraction: float, scope: str = "global") -> Any:
  """:func:`prune_lowest` with count = round(fraction x alive prunable weights), rounded half up.

  Raises:
    ValueError: ``fraction`` outside [0, 1].
  """
  if not 0.0 <= float(fraction) <= 1.0:
    raise ValueError(f"fraction must be in [0, 1] (a share of the alive prunable weights), got {fraction}")
  flags = prunable_flags(prunable, masks, "masks")
  alive = sum(int(m.sum()) for f, m in zip(flags, host_masks(masks, masks, "masks")) if f)
  return prune_lowest(scores, masks, prunable, rounded_count(fraction * alive), scope)
