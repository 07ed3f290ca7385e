"""What the RF-DNN transforms report per quantized layer, and reading it out of an optimizer state.

Every step, :func:`ricci_jax.transform.scale_by_lne` and
:func:`ricci_jax.transform.scale_by_ricci_flow` keep one
:class:`LayerDiagnostics` per quantized layer in their state (field
``diagnostics``). :func:`layer_diagnostics` finds them anywhere in an optimizer
state, keyed by parameter path; :func:`summarize_diagnostics` turns them into
scalars for logging. Both are also reachable as ``ricci_jax.transform.<name>``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ricci_jax.layers import path_names

Array = jax.Array


class LayerDiagnostics(NamedTuple):
  """What each quantized layer reports every step (float32 scalars).

  Attributes:
    tau: the metric's tau (mean over blocks).
    s: |tanh(tau w)|^2 per block, mean over the layer's blocks (a rank-1
      block metric is positive definite iff its s < 1).
    s_max: the largest block's s.
    dominant: the share of blocks whose rank-1 metric is strictly diagonally
      dominant (Def. 17).
    correction: |u - d| / |d|: how far the (ungated) update u is from the
      plain STE gradient d, regulariser and control included.
    residual: N, the squared residual of the discrete Ricci flow (Eq. 35);
      0 for :func:`ricci_jax.transform.scale_by_lne`.
    gate: 1 if the gate of Eq. 36 let this step's update through (N <= epsilon).
    regularizer: |alpha dN/dW| / |d|, the regulariser's gradient against the
      loss gradient; 0 for :func:`ricci_jax.transform.scale_by_lne`.
    alpha: the regulariser's weight used this step (``rho`` sets it per step).
    epsilon: the gate's bound this step (``epsilon_relative`` sets it from the
      running median of N); inf when the gate cannot close.
    gate_open_fraction: the share of all steps so far whose gate was open.
  """

  tau: Array
  s: Array
  s_max: Array
  dominant: Array
  correction: Array
  residual: Array
  gate: Array
  regularizer: Array
  alpha: Array
  epsilon: Array
  gate_open_fraction: Array


def zero_diagnostics(_: Any = None) -> LayerDiagnostics:
  """The diagnostics a layer starts with, before its first step (the argument, a leaf, is ignored).

  Zeros, except an open gate (``gate`` and ``gate_open_fraction`` 1) and
  ``epsilon`` inf; meant for ``jax.tree.map(zero_diagnostics, params)`` in a
  transform's ``init``.
  """
  z = jnp.zeros((), jnp.float32)
  one = jnp.ones((), jnp.float32)
  return LayerDiagnostics(z, z, z, z, z, z, one, z, z, jnp.full((), jnp.inf, jnp.float32), one)


_STATE_TYPES: list[type] = []


def reports_diagnostics(cls: type) -> type:
  """Class decorator: marks an optimizer state whose ``diagnostics`` field holds a tree of :class:`LayerDiagnostics`.

  :func:`layer_diagnostics` looks for instances of the marked classes; the
  transforms of :mod:`ricci_jax.transform` mark theirs. Returns ``cls``.
  """
  if cls not in _STATE_TYPES:
    _STATE_TYPES.append(cls)
  return cls


def layer_diagnostics(opt_state: Any) -> dict[str, LayerDiagnostics]:
  """Every quantized layer's :class:`LayerDiagnostics`, keyed by its parameter path.

  Finds the :func:`ricci_jax.transform.scale_by_lne` /
  :func:`ricci_jax.transform.scale_by_ricci_flow` states (any class marked with
  :func:`reports_diagnostics`) anywhere in ``opt_state`` (inside ``chain``,
  ``partition``, ``inject_hyperparams``, ``MultiSteps`` ...).
  """
  states = tuple(_STATE_TYPES)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, states))
           if isinstance(x, states)]
  out: dict[str, LayerDiagnostics] = {}
  for st in found:
    flat = jax.tree_util.tree_flatten_with_path(
        st.diagnostics, is_leaf=lambda x: as_layer_diagnostics(x) is not None)[0]
    for path, leaf in flat:
      diag = as_layer_diagnostics(leaf)
      if diag is not None:
        names = list(path_names(path))
        if names and names[-1] == "value":  # an NNX state's Variable (nnx.Optimizer with wrt=nnx.Param)
          names = names[:-1]
        out["/".join(names) or "params"] = diag
  return out


def as_layer_diagnostics(x: Any) -> LayerDiagnostics | None:
  """``x`` as a :class:`LayerDiagnostics`, or ``None`` if it is not one.

  Besides the NamedTuple itself this reads the form an ``nnx.Optimizer``
  gives it once its state has passed through ``nnx.jit``: a variable around
  a mapping of the same fields.
  """
  if isinstance(x, LayerDiagnostics):
    return x
  inner = x.get_value() if hasattr(x, "get_value") else x
  if isinstance(inner, Mapping) and set(inner.keys()) == set(LayerDiagnostics._fields):
    return LayerDiagnostics(**{k: inner[k] for k in LayerDiagnostics._fields})
  return None


def summarize_diagnostics(opt_state: Any) -> dict[str, Array]:
  """Scalars for logging: means over layers of s, correction, residual N, gate and dominance."""
  diags = list(layer_diagnostics(opt_state).values())
  if not diags:
    return {}
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *diags)
  return {
      "lne/s_mean": jnp.mean(stacked.s),
      "lne/s_max": jnp.max(stacked.s_max),
      "lne/correction_mean": jnp.mean(stacked.correction),
      "lne/dominant_fraction": jnp.mean(stacked.dominant),
      "ricci/residual_mean": jnp.mean(stacked.residual),
      "ricci/residual_max": jnp.max(stacked.residual),
      "ricci/gate_open_fraction": jnp.mean(stacked.gate),
      "ricci/regularizer_mean": jnp.mean(stacked.regularizer),
      "ricci/alpha_mean": jnp.mean(stacked.alpha),
  }
