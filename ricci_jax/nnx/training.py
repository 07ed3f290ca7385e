"""RF-DNN for NNX models: the functional view of a model that ``ricci_flow`` and optax need.

``rf_sgd`` and ``scale_by_lne`` are optax transforms over any pytree, so they
run on ``nnx.state(model, nnx.Param)`` as they are, through
``nnx.Optimizer(model, tx, wrt=nnx.Param)`` or through ``nnx.split`` /
``nnx.merge`` in a jitted step. The quantized-kernel mask is
:func:`ricci_jax.nnx.kernel_mask`. What is NNX-specific is the loss as a
function of the ``Param`` state, which :func:`ricci_jax.ricci_flow.translated_grads`
differentiates four times: :func:`param_loss` builds it and
:func:`translated_grads` calls the Linen-path function through it, so the
two paths share one implementation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from ricci_jax import ricci_flow
from ricci_jax.ricci_flow import Shifts


def param_loss(model: nnx.Module, loss_fn: Callable[[nnx.Module, Any], jax.Array]
               ) -> tuple[Callable[[nnx.State, Any], jax.Array], nnx.State]:
  """``(f, params)`` with ``f(params, batch) = loss_fn(model with params, batch)``.

  ``params`` is ``nnx.state(model, nnx.Param)``; every other variable
  (batch statistics, :class:`ricci_jax.nnx.QuantHparam`, rng state) is held at
  its current value. ``f`` merges a copy of the model, so whatever ``loss_fn``
  writes into it (batch statistics in train mode) is dropped: the model is
  left unchanged.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def f(p, batch):
    return loss_fn(nnx.merge(graphdef, p, rest, copy=True), batch)

  return f, params


def translated_grads(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    batch: Mapping[str, jax.Array],
    shifts: Shifts = Shifts(),
    fraction: float = 0.125,
    **kwargs: Any,
) -> nnx.State:
  """The four gradients of RF-DNN on translated batches, for an NNX model.

  :func:`ricci_jax.ricci_flow.translated_grads` applied to
  ``loss_fn(model, batch)`` as a function of the model's ``nnx.Param`` state
  (:func:`param_loss`): a tree like ``nnx.state(model, nnx.Param)`` whose
  leaves have a leading axis of 4, (k1, k2, j1, j2), pure (``nnx.as_pure``,
  as ``nnx.Optimizer.update`` hands the gradients to optax). Pass it to
  ``optimizer.update(model, grads, translated_grads=...)`` of an
  ``nnx.Optimizer`` with ``rf_sgd``. ``kwargs``: ``image_key``, ``mode``,
  ``strategy`` of the Linen-path function.
  """
  f, params = param_loss(model, loss_fn)
  return nnx.as_pure(ricci_flow.translated_grads(f, params, batch, shifts, fraction, **kwargs))
