"""Leaf paths and structure checks for the pruning package's pytrees.

Every pruning function works on up to three trees of the same structure: the
params (a Flax params pytree, nested dicts of arrays), the masks (one bool
array per leaf, True = alive) and ``prunable`` (one Python bool per leaf).
Results are keyed and errors name leaves by their ``/``-joined path
(``"conv1/kernel"``), the convention of Flax's ``traverse_util.flatten_dict``
and of :func:`ricci_jax.models.inspect.flatten`.

This module imports nothing from ``ricci_jax``: :mod:`ricci_jax.quantizers`
imports :mod:`ricci_jax.pruning.nm`, so the package must load before the
rest of the library does.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np


def key_name(key: Any) -> str:
  """One ``jax.tree_util`` path entry as a string (dict key, attribute name or index)."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def join(path: Any) -> str:
  """A ``jax.tree_util`` key path as a ``/``-joined string."""
  return "/".join(key_name(k) for k in path)


def leaf_paths(tree: Any) -> list[str]:
  """The ``/``-joined path of every leaf of ``tree``, in ``jax.tree`` order."""
  return [join(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_same_structure(name: str, tree: Any, reference: Any, reference_name: str = "params") -> None:
  """Raises a ValueError naming both trees when ``tree``'s structure is not ``reference``'s."""
  a, b = jax.tree.structure(tree), jax.tree.structure(reference)
  if a != b:
    mine, theirs = set(leaf_paths(tree)), set(leaf_paths(reference))
    raise ValueError(
        f"{name} must have the structure of {reference_name}; leaves only in {name}: "
        f"{sorted(mine - theirs)[:8]}, only in {reference_name}: {sorted(theirs - mine)[:8]}")


def prunable_flags(prunable: Any, reference: Any, reference_name: str = "params") -> list[bool]:
  """``prunable``'s leaves as Python bools, in ``jax.tree`` order, after a structure check."""
  check_same_structure("prunable", prunable, reference, reference_name)
  flags = jax.tree.leaves(prunable)
  for path, flag in zip(leaf_paths(prunable), flags):
    if not isinstance(flag, (bool, np.bool_)):
      raise ValueError(f"prunable must hold Python bools, got {flag!r} at {path!r}")
  return [bool(f) for f in flags]


def host_masks(masks: Any, reference: Any, reference_name: str = "params") -> list[np.ndarray]:
  """The mask leaves as NumPy bool arrays (host side), in ``jax.tree`` order, after a structure check."""
  check_same_structure("masks", masks, reference, reference_name)
  out = []
  for path, m, r in zip(leaf_paths(masks), jax.tree.leaves(masks), jax.tree.leaves(reference)):
    m = np.asarray(m)
    if m.dtype != np.bool_:
      raise ValueError(f"masks must be bool arrays, got dtype {m.dtype} at {path!r}")
    if m.shape != np.shape(r):
      raise ValueError(f"mask {path!r} has shape {m.shape}, its {reference_name} leaf {np.shape(r)}")
    out.append(m)
  return out


def host_values(tree: Any, name: str, reference: Any, reference_name: str = "params") -> list[np.ndarray]:
  """``tree``'s leaves as NumPy float64 arrays (exact for float16/32 inputs), after a structure check."""
  check_same_structure(name, tree, reference, reference_name)
  out = []
  for path, x, r in zip(leaf_paths(tree), jax.tree.leaves(tree), jax.tree.leaves(reference)):
    x = np.asarray(x, np.float64)
    if x.shape != np.shape(r):
      raise ValueError(f"{name} leaf {path!r} has shape {x.shape}, its {reference_name} leaf {np.shape(r)}")
    out.append(x)
  return out
