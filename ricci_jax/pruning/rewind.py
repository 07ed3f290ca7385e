"""Rewinding after a prune: which weights the surviving network restarts from.

* lottery-ticket rewinding to the initialisation θ_0 (Frankle & Carbin,
  ICLR 2019; the official AP code's ``lt`` mode) and late rewinding to the
  weights θ_j of step j of the dense training (Frankle, Dziugaite, Roy &
  Carbin, "Linear mode connectivity and the lottery ticket hypothesis",
  ICML 2020): :func:`rewind` with ``params_rewind`` = θ_0 or θ_j;
* re-initialisation, a fresh random draw each cycle (the official AP code's
  default ``reinit`` mode, AP notes §5.1 step 1, §8.5 B4): :func:`reinit`
  with a draw the caller makes (``model.init`` with a new key);
* no rewind (fine-tuning, or learning-rate rewinding, Renda, Frankle &
  Carbin, ICLR 2020): the trained weights, masked:
  :func:`ricci_jax.pruning.apply_masks`.

In every case pruned weights come back as exactly 0. Which leaves are
rewound is the caller's choice: the official code rewinds the masked
``weight`` tensors and, in ``lt`` mode, the biases; BatchNorm running
statistics are not params and are neither rewound nor reset there (B10).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ricci_jax.pruning.masks import apply_masks
from ricci_jax.pruning.paths import check_same_structure, leaf_paths

__all__ = ["reinit", "rewind"]


def rewind(params_now: Any, params_rewind: Any, masks: Any) -> Any:
  """Every leaf takes its rewind value (cast to the current dtype), then pruned -> exactly 0.

  ``params_now`` fixes the structure, shapes and dtypes (a rewind point saved
  in another dtype is cast); its values are not used.

  Raises:
    ValueError: the trees' structures or a leaf's shape differ.
  """
  check_same_structure("params_rewind", params_rewind, params_now, "params_now")
  check_same_structure("masks", masks, params_now, "params_now")
  for path, a, b in zip(leaf_paths(params_now), jax.tree.leaves(params_now), jax.tree.leaves(params_rewind)):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(f"rewind: leaf {path!r} has shape {jnp.shape(b)} in params_rewind, {jnp.shape(a)} now")
  values = jax.tree.map(lambda a, b: jnp.asarray(b, jnp.result_type(a)), params_now, params_rewind)
  return apply_masks(values, masks)


def reinit(params_fresh: Any, masks: Any) -> Any:
  """A fresh draw of the weights (the caller draws them), pruned -> exactly 0."""
  check_same_structure("masks", masks, params_fresh, "params_fresh")
  return apply_masks(params_fresh, masks)
