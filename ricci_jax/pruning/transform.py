"""Keeping pruned weights at zero through any optax optimizer.

The official AP code masks the gradients of weights that are exactly 0 but
keeps the SGD optimizer (momentum 0.9, weight decay 5e-4) it filled before
the prune; the stale momentum buffer moves every just-pruned weight away
from 0 at the next step, after which its gradient is no longer masked and it
trains freely (AP notes §8.5 B3): the recorded accuracies are those of a
denser network. The notes' remedy (§9 "Masking in optax") is to mask the
updates *and* re-impose the mask after every update; here both are done by
one transform at the end of the chain:

* :func:`keep_pruned` returns ``where(masks, updates, -params)``, so
  ``optax.apply_updates`` gives ``p + (-p) == 0`` exactly (IEEE-754: x + (-x)
  is +0 for every finite x) at pruned positions, whatever momentum, weight
  decay or a preconditioner did before it;
* :func:`mask_gradients` zeroes the pruned gradients *before* the optimizer,
  so momentum buffers and the RF-DNN metric statistics never see them.

Usage::

    tx = optax.chain(rj.rf_sgd(0.1, quantized=kernels), pruning.keep_pruned())
    grads = pruning.mask_gradients(grads, masks)
    updates, state = tx.update(grads, state, params, masks=masks, translated_grads=shifted)
    params = optax.apply_updates(params, updates)

``optax.chain`` passes every keyword to every member (members without extra
arguments are wrapped and drop them), and :func:`ricci_jax.rf_sgd`'s
``optax.partition`` masks a params-shaped ``masks=`` into its groups, whose
transforms ignore it; so the same call works for ``rf_sgd`` and for plain
optax optimizers (tests/test_pruning.py checks both). Re-initialise the
optimizer state after each prune (AP notes §9 "State"); keep_pruned makes
the masks hold even if one does not.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["keep_pruned", "mask_gradients"]


def mask_gradients(grads: Any, masks: Any) -> Any:
  """``where(mask, g, 0)`` leaf by leaf (jit-able)."""
  return jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads, masks)


def keep_pruned() -> optax.GradientTransformationExtraArgs:
  """An optax transform (empty state) whose update is ``where(masks, updates, -params)``.

  Its ``update(updates, state, params, *, masks, **extra_args)`` needs the
  params and the masks (a bool tree like the params, True = alive); other
  extra arguments are ignored, so it chains after transforms that take some
  (``translated_grads=`` of :func:`ricci_jax.rf_sgd`). Put it last in the
  chain: after it, ``optax.apply_updates`` leaves every pruned weight at
  exactly 0.
  """

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, *, masks=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("keep_pruned needs the current params: call update(updates, state, params, masks=masks)")
    if masks is None:
      raise ValueError("keep_pruned needs the pruning masks: call update(updates, state, params, masks=masks)")
    new = jax.tree.map(lambda u, p, m: jnp.where(m, u, -p).astype(jnp.result_type(u)), updates, params, masks)
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
