"""N:M structured sparsity: keep N of every M consecutive weights along an axis.

N:M patterns (2:4 above all) are the sparsity that sparse tensor cores
accelerate (Mishra et al., "Accelerating Sparse Deep Neural Networks",
arXiv 2104.08378; Zhou et al., "Learning N:M Fine-grained Structured Sparse
Neural Networks From Scratch", ICLR 2021): every group of M consecutive
weights along the contraction (input) axis keeps its N largest magnitudes.

* :func:`nm_sparsity_mask`: the pattern of one array (also used by the ridge
  dequantization, :func:`ricci_jax.quantizers.ridge_quantize`, which is why
  this module imports nothing heavy: the quantizers import it);
* :func:`nm_masks`: the pattern of every prunable kernel of a params tree,
  intersected with the current pruning masks.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ricci_jax.pruning.paths import host_masks, leaf_paths, prunable_flags

__all__ = ["check_nm", "nm_keep", "nm_masks", "nm_sparsity_mask", "parse_sparsity"]

Array = jax.Array

DEFAULT_AXIS = -2
"""The contraction (input) axis of a Flax kernel: axis 0 of a Dense ``(in, out)``
kernel, the ``I`` axis of a Conv ``HWIO`` kernel."""


def check_nm(n: Any, m: Any) -> tuple[int, int]:
  """``(n, m)`` as ints, or a ValueError unless they are integers with 0 < N < M."""
  try:
    n_i, m_i = int(n), int(m)
  except (TypeError, ValueError):
    raise ValueError(f"an N:M sparsity pattern needs integers 0 < N < M, got {n!r}:{m!r}") from None
  if isinstance(n, bool) or isinstance(m, bool) or n_i != n or m_i != m or not 0 < n_i < m_i:
    raise ValueError(f"an N:M sparsity pattern needs 0 < N < M, got {n}:{m}")
  return n_i, m_i


def parse_sparsity(sparsity: Any) -> tuple[int, int] | None:
  """``"2:4"`` or ``(2, 4)`` as ``(2, 4)``; ``None`` stays ``None`` (the ridge code's ``sparsity=``)."""
  if sparsity is None:
    return None
  if isinstance(sparsity, str):
    try:
      n, m = (int(p) for p in sparsity.split(":"))
    except ValueError:
      raise ValueError(f"sparsity must look like '2:4' (keep N of every M), got {sparsity!r}") from None
  else:
    n, m = sparsity
  return int(n), int(m)


def nm_keep(scores: Array, n: int, m: int, axis: int = 0) -> Array:
  """Bool mask: True for the ``n`` highest ``scores`` of every ``m`` consecutive along ``axis``.

  Ties keep the earlier element (a stable sort). The axis length must be a
  multiple of ``m`` (the caller names the array in its error; here a generic
  ValueError).
  """
  n, m = check_nm(n, m)
  axis = axis % scores.ndim
  if scores.shape[axis] % m:
    raise ValueError(
        f"{n}:{m} sparsity needs the axis length divisible by {m}; axis {axis} has "
        f"length {scores.shape[axis]}")
  moved = jnp.moveaxis(scores, axis, -1)
  groups = moved.reshape(moved.shape[:-1] + (moved.shape[-1] // m, m))
  # rank of each element inside its group (0 = highest); stable for ties
  order = jnp.argsort(-groups, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True)
  keep = (ranks < n).reshape(moved.shape)
  return jnp.moveaxis(keep, -1, axis)


def nm_sparsity_mask(x: Array, n: int, m: int, axis: int = 0) -> Array:
  """Keeps the ``n`` largest-magnitude values of every ``m`` consecutive along ``axis``.

  Returns a {0, 1} mask of ``x``'s shape and dtype (2:4 keeps two of four).
  Ties keep the earlier element.
  """
  return nm_keep(jnp.abs(x), n, m, axis).astype(x.dtype)


def nm_masks(params: Any, masks: Any, prunable: Any, n: int, m: int, axis: int = DEFAULT_AXIS) -> Any:
  """An N:M pattern on every prunable kernel, intersected with the current masks.

  For each prunable leaf with at least two dimensions (a kernel), every group
  of ``m`` consecutive weights along ``axis`` (default -2, the contraction
  axis of Dense ``(in, out)`` and Conv ``HWIO`` kernels) keeps its ``n``
  largest ``|w|``; already-pruned weights rank below every alive one (so a
  group's ``n`` slots go to alive weights first) and stay pruned. Prunable
  leaves of fewer dimensions (a BN scale selected by ``PruneRule.extra``) and
  non-prunable leaves keep their masks.

  Raises:
    ValueError: unless 0 < N < M; when ``m`` does not divide a kernel's axis
      (naming the leaf, its axis length and M).
  """
  n, m = check_nm(n, m)
  flags = prunable_flags(prunable, params)
  current = host_masks(masks, params)
  out = []
  for path, flag, w, mask in zip(leaf_paths(params), flags, jax.tree.leaves(params), current):
    mask = jnp.asarray(mask)
    if not flag or jnp.ndim(w) < 2:
      out.append(mask)
      continue
    w = jnp.asarray(w)
    if not -w.ndim <= axis < w.ndim:
      raise ValueError(f"nm_masks: axis {axis} is out of range for {path!r} of shape {w.shape}")
    length = w.shape[axis]
    if length % m:
      raise ValueError(
          f"nm_masks: a {n}:{m} pattern needs the axis length divisible by M; leaf {path!r} has "
          f"length {length} along axis {axis} (M = {m})")
    scores = jnp.where(mask, jnp.abs(w).astype(jnp.promote_types(w.dtype, jnp.float32)), -1.0)
    out.append(mask & nm_keep(scores, n, m, axis))
  return jax.tree.unflatten(jax.tree.structure(params), out)
