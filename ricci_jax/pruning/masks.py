"""Pruning masks: one bool array per params leaf, True = alive.

Masks cover *every* leaf, prunable or not, so they can be mapped over with
the params (``jax.tree.map``), masked into ``optax.partition`` and passed as
an extra argument to any optax transform (:func:`ricci_jax.pruning.keep_pruned`).
A non-prunable leaf's mask stays all True forever: the selection functions
never touch it. Which leaves are prunable is a separate tree of Python bools
(:meth:`ricci_jax.pruning.PruneRule.prunable`), so the masks stay a pure
array tree that jit and the optimizers can carry.

This follows the AP notes §9 ("State": a pytree of bools; "Masking in
optax"); the official code keeps one NumPy mask per ``weight`` tensor
(``make_mask`` of the lottery-ticket code it derives from, notes §8.1).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ricci_jax.pruning.paths import host_masks, leaf_paths, prunable_flags

__all__ = ["apply_masks", "count_alive", "init_masks", "sparsity"]


def init_masks(params: Any) -> Any:
  """All-True bool masks shaped like every leaf of ``params`` (nothing pruned)."""
  return jax.tree.map(lambda p: jnp.ones(jnp.shape(p), jnp.bool_), params)


def apply_masks(params: Any, masks: Any) -> Any:
  """``where(mask, p, 0)`` leaf by leaf: pruned weights become exactly 0 (jit-able)."""
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def sparsity(masks: Any, prunable: Any) -> dict[str, dict[str, float | int]]:
  """Alive / total / sparsity per prunable leaf and over all of them (host side).

  Returns:
    ``{leaf_path: {"alive": int, "total": int, "sparsity": float}}`` for each
    prunable leaf (``/``-joined path), plus ``"global"`` over all prunable
    leaves (weighted by size). Sparsity is the pruned share, 1 - alive/total.
  """
  flags = prunable_flags(prunable, masks, "masks")
  out: dict[str, dict[str, float | int]] = {}
  alive_all = total_all = 0
  for path, flag, m in zip(leaf_paths(masks), flags, host_masks(masks, masks, "masks")):
    if not flag:
      continue
    alive, total = int(m.sum()), int(m.size)
    out[path] = {"alive": alive, "total": total, "sparsity": 1.0 - alive / total if total else 0.0}
    alive_all += alive
    total_all += total
  out["global"] = {"alive": alive_all, "total": total_all,
                   "sparsity": 1.0 - alive_all / total_all if total_all else 0.0}
  return out


def count_alive(masks: Any, prunable: Any) -> int:
  """The number of alive weights over the prunable leaves (a Python int)."""
  flags = prunable_flags(prunable, masks, "masks")
  return sum(int(m.sum()) for flag, m in zip(flags, host_masks(masks, masks, "masks")) if flag)
