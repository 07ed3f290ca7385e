"""RF-DNN as optax gradient transformations.

* :func:`scale_by_lne` turns STE gradients into natural gradients in the LNE
  metric (Algorithm 1, Eq. 27).
* :func:`scale_by_ricci_flow` adds the discrete Ricci flow (Algorithm 2): the
  regulariser alpha * N (Eq. 35), the gate 1[N <= epsilon] (Eq. 36) and the
  natural gradient, with the metric history in its state.
* :func:`rf_sgd` is the paper's optimizer: quantized latent weights go through
  the Ricci transform, everything else (batch norm, biases, float layers)
  through plain SGD, both with Nesterov momentum and weight decay, routed with
  ``optax.partition`` (in the shape of ``optax.contrib.muon``).

Usage::

    tx = rj.rf_sgd(learning_rate=0.1, quantized=rj.layers.quantized_kernel_mask(params, kernels))
    state = tx.init(params)
    shifted = rj.translated_grads(loss_fn, params, batch)        # (4, ...) per leaf
    updates, state = tx.update(grads, state, params, translated_grads=shifted)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ricci_jax import lne, ricci_flow
from ricci_jax.ricci_flow import Shifts

Array = jax.Array
ScalarOrSchedule = float | Array | Callable[[Array], Array]


class LayerDiagnostics(NamedTuple):
  """What each quantized layer reports every step (float32 scalars).

  Attributes:
    tau: the metric's tau.
    s: |tanh(tau w)|^2 (g is positive definite iff s < 1).
    dominant: 1 if g is strictly diagonally dominant (Def. 17).
    correction: |g^-1 d - d| / |d|: how far the update is from plain STE.
    residual: N, the squared residual of the discrete Ricci flow (Eq. 35);
      0 for :func:`scale_by_lne`.
    gate: 1 if the gate of Eq. 36 let the update through (N <= epsilon).
    regularizer: |alpha dN/dW| / |d|, the regulariser's gradient against the
      loss gradient; 0 for :func:`scale_by_lne`.
  """

  tau: Array
  s: Array
  dominant: Array
  correction: Array
  residual: Array
  gate: Array
  regularizer: Array


def _zero_diagnostics(_) -> LayerDiagnostics:
  z = jnp.zeros((), jnp.float32)
  return LayerDiagnostics(z, z, z, z, z, jnp.ones((), jnp.float32), z)



def _is_concrete(tree) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _check_params(params, name: str):
  if params is None:
    raise ValueError(f"{name} needs the current params: call update(updates, state, params)")


def _validate_layers(params, tau, tau_scale, approx):
  """Fail-fast checks on concrete params at init: strong-approximation size, positive definiteness."""
  lne.check_approx(approx)
  if isinstance(tau, str):
    lne.resolve_tau(jnp.zeros(1), tau)  # validates the string
  leaves = jax.tree_util.tree_leaves_with_path(params)
  for path, w in leaves:
    name = jax.tree_util.keystr(path) or "params"
    if approx == "strong" and w.size > lne.STRONG_MAX_SIZE:
      raise ValueError(
          f"approx='strong' is implemented for layers of at most {lne.STRONG_MAX_SIZE} weights; "
          f"{name} has {w.size}. Use 'exact' or 'weak'.")
    if not isinstance(tau, str) and _is_concrete((w, tau)):
      lne.check_positive_definite(w, tau, tau_scale, name=name)


class ScaleByLNEState(NamedTuple):
  """State of :func:`scale_by_lne`: the last step's diagnostics per layer."""

  diagnostics: Any


def scale_by_lne(
    tau: float | Array | str = "auto",
    approx: str = "weak",
    *,
    tau_scale: float | Array = 0.5,
) -> optax.GradientTransformation:
  """Natural gradients in each layer's LNE metric: ``g(w)^-1 d`` (RF-DNN Eq. 27, Algorithm 1).

  Apply it to the quantized latent weights' STE gradients (route the other
  parameters elsewhere, e.g. with ``optax.partition``). Every leaf is one layer
  with its own metric g = I - t t^T, t = tanh(tau vec(w)).

  Args:
    tau: the metric's tau, or ``"auto"``: per layer and step,
      ``tau_scale / sqrt(n max|w| mean|w|)``, which keeps g diagonally dominant.
    approx: ``"weak"`` (Eq. 29, the paper's), ``"exact"``, ``"diagonal"``,
      ``"strong"`` (tiny layers only) or ``"none"`` (plain STE).
    tau_scale: c of ``tau="auto"`` (c < 1 guarantees dominance).

  Returns:
    A transformation whose ``update`` requires ``params``.
  """
  lne.check_approx(approx)

  def init_fn(params):
    _validate_layers(params, tau, tau_scale, approx)
    return ScaleByLNEState(jax.tree.map(_zero_diagnostics, params))

  def update_fn(updates, state, params=None):
    del state
    _check_params(params, "scale_by_lne")

    def leaf(d, w):
      tau_v = lne.resolve_tau(w, tau, tau_scale)
      nat = lne.natural_gradient(w, d, tau_v, approx)
      diag = lne.lne_diagnostics(w, d, tau_v, approx, natural=nat)
      z = jnp.zeros((), jnp.float32)
      return nat, LayerDiagnostics(diag.tau, diag.s, diag.dominant, diag.correction, z,
                                   jnp.ones((), jnp.float32), z)

    out = jax.tree.map(leaf, updates, params)
    is_pair = lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], LayerDiagnostics)  # noqa: E731
    new_updates = jax.tree.map(lambda p: p[0], out, is_leaf=is_pair)
    diagnostics = jax.tree.map(lambda p: p[1], out, is_leaf=is_pair)
    return new_updates, ScaleByLNEState(diagnostics)

  return optax.GradientTransformation(init_fn, update_fn)


class ScaleByRicciFlowState(NamedTuple):
  """State of :func:`scale_by_ricci_flow`.

  Attributes:
    count: number of updates so far (int32).
    previous: per layer, the four tentative metric vectors of the last step,
      shape (4, n), order (k1, k2, j1, j2): the g(t)|s of Eq. 34 (one-step lag).
    diagnostics: per layer, :class:`LayerDiagnostics` of the last step.
  """

  count: Array
  previous: Any
  diagnostics: Any


def scale_by_ricci_flow(
    tau: float | Array | str = "auto",
    alpha: float | Array = 1.0,
    epsilon: float | Array = float("inf"),
    approx: str = "weak",
    shifts: Shifts = Shifts(),
    flow_step: ScalarOrSchedule = 0.1,
    *,
    tau_scale: float | Array = 0.5,
    reading: str = "lag",
    normalize: bool = False,
    state_dtype: Any = jnp.float32,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The RF-DNN update under the discrete Ricci flow (Algorithm 2, Eqs. 32-36).

  For each layer (leaf) with latent weights W, STE gradient d and the four
  translated gradients g_s (extra argument ``translated_grads``):

  1. tentative metrics t_s = tanh(tau (W - eta g^-1 g_s)) (Eqs. 31-32);
  2. N = ||g(t+1)|k1 - g(t)|k1 + 2 Ric(g(t))||_F^2 (Eq. 35) from the stored
     g(t)|s (``reading``), in rank-1 form;
  3. d' = d + alpha dN/dW, the gradient of Algorithm 2's loss L + alpha N,
     through tanh(tau W) only;
  4. update = g^-1 d' * 1[N <= epsilon] (Eq. 36).

  Args:
    tau: the metric's tau, or ``"auto"`` (see :func:`scale_by_lne`).
    alpha: weight of the regulariser N in the loss.
    epsilon: the gate's bound on N; ``inf`` keeps the gate open.
    approx: the inverse of g (see :func:`scale_by_lne`).
    shifts: the input translations (must match those of ``translated_grads``).
    flow_step: eta, the tentative step size: a number or a schedule of the
      update count (``rf_sgd`` passes its learning rate).
    tau_scale: c of ``tau="auto"``.
    reading: which metrics enter Eq. 34: ``"lag"``, ``"current"`` or
      ``"two_step"`` (see :mod:`ricci_jax.ricci_flow`).
    normalize: divide N by the layer size (not in the paper).
    state_dtype: dtype of the stored metric vectors.
    axis_name: under ``pmap``, N and the diagnostics are averaged over it.

  Returns:
    A transformation whose ``update(updates, state, params, translated_grads=...)``
    requires ``params`` and the translated gradients (a tree like ``updates``
    with a leading axis of 4 per leaf, from :func:`ricci_jax.translated_grads`).
  """
  lne.check_approx(approx)
  if reading not in ricci_flow.READINGS:
    raise ValueError(f"unknown reading {reading!r}; valid: {', '.join(ricci_flow.READINGS)}")
  if not isinstance(shifts, Shifts):
    raise ValueError(f"shifts must be a ricci_jax.ricci_flow.Shifts, got {shifts!r}")
  for name, value in (("alpha", alpha), ("epsilon", epsilon)):
    if _is_concrete(value) and not np.all(np.asarray(value) >= 0):
      raise ValueError(f"{name} must be >= 0, got {value}")

  def init_fn(params):
    _validate_layers(params, tau, tau_scale, approx)

    def previous(w):
      return ricci_flow.initial_previous(w, lne.resolve_tau(w, tau, tau_scale)).astype(state_dtype)

    return ScaleByRicciFlowState(
        count=jnp.zeros((), jnp.int32),
        previous=jax.tree.map(previous, params),
        diagnostics=jax.tree.map(_zero_diagnostics, params),
    )

  def update_fn(updates, state, params=None, *, translated_grads=None, **extra_args):
    del extra_args
    _check_params(params, "scale_by_ricci_flow")
    if translated_grads is None:
      raise ValueError(
          "scale_by_ricci_flow needs the translated gradients: "
          "update(updates, state, params, translated_grads=ricci_jax.translated_grads(loss_fn, params, batch))")
    if jax.tree.structure(translated_grads) != jax.tree.structure(updates):
      raise ValueError(
          "translated_grads must have the structure of the updates (one (4, ...) array per leaf); got "
          f"{jax.tree.structure(translated_grads)} for updates {jax.tree.structure(updates)}")
    eta = flow_step(state.count) if callable(flow_step) else flow_step
    eta = jnp.asarray(eta, jnp.float32)

    def leaf(d, w, shifted, prev):
      if shifted.shape != (4,) + d.shape:
        raise ValueError(f"a translated gradient has shape {shifted.shape}; expected {(4,) + d.shape}")
      tau_v = lne.resolve_tau(w, tau, tau_scale)

      def n_of(wv):
        return ricci_flow.residual_norm(
            wv, shifted, prev.astype(jnp.float32), tau_v, eta, approx, reading, shifts, normalize)

      (residual, store), grad_n = jax.value_and_grad(n_of, has_aux=True)(w.astype(jnp.float32))
      if axis_name is not None:
        residual = jax.lax.pmean(residual, axis_name)
      penalty = jnp.asarray(alpha, jnp.float32) * grad_n
      d_total = d.astype(jnp.float32) + penalty
      nat = lne.natural_gradient(w, d_total, tau_v, approx)
      gate = (residual <= epsilon).astype(jnp.float32)
      diag = lne.lne_diagnostics(w, d_total, tau_v, approx, natural=nat)
      diag = LayerDiagnostics(diag.tau, diag.s, diag.dominant, diag.correction, residual, gate,
                              lne.relative_norm(penalty, d))
      if axis_name is not None:
        diag = jax.lax.pmean(diag, axis_name)
      update = (gate * nat).astype(d.dtype)
      return update, store.astype(state_dtype), diag

    out = jax.tree.map(leaf, updates, params, translated_grads, state.previous)
    is_triple = lambda x: isinstance(x, tuple) and len(x) == 3 and isinstance(x[2], LayerDiagnostics)  # noqa: E731
    pick = lambda i: jax.tree.map(lambda t: t[i], out, is_leaf=is_triple)  # noqa: E731
    return pick(0), ScaleByRicciFlowState(
        count=optax.safe_increment(state.count), previous=pick(1), diagnostics=pick(2))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _sgd_tail(learning_rate, momentum, nesterov, weight_decay, weight_decay_mask):
  return (
      optax.add_decayed_weights(weight_decay, weight_decay_mask),
      optax.trace(decay=momentum, nesterov=nesterov) if momentum is not None else optax.identity(),
      optax.scale_by_learning_rate(learning_rate),
  )


def rf_sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | Array | None = 0.9,
    nesterov: bool = True,
    weight_decay: float | Array = 5e-4,
    *,
    quantized: Any = None,
    tau: float | Array | str = "auto",
    alpha: float | Array = 1.0,
    epsilon: float | Array = float("inf"),
    approx: str = "weak",
    shifts: Shifts = Shifts(),
    flow_step: ScalarOrSchedule | None = None,
    tau_scale: float | Array = 0.5,
    reading: str = "lag",
    normalize: bool = False,
    weight_decay_mask: Any = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """The RF-DNN optimizer: Ricci-flow natural gradients for quantized weights, SGD for the rest.

  Both groups use SGD with (Nesterov) momentum and decoupled-from-the-metric
  weight decay, as in the paper's protocol (batch 128, Nesterov 0.9, wd 5e-4):
  the Ricci transform rewrites the quantized kernels' gradients, then weight
  decay is added and momentum applied.

  Args:
    learning_rate: a number or an optax schedule.
    momentum: momentum decay (``None``: plain SGD).
    nesterov: Nesterov momentum.
    weight_decay: L2 coefficient added to every gradient (masked by
      ``weight_decay_mask`` if given).
    quantized: a tree of bools like the params (True: a quantized latent
      kernel) or a function of the params returning one, e.g.
      ``lambda p: ricci_jax.layers.quantized_kernel_mask(p, kernels)``.
      Default: every leaf with ndim >= 2.
    tau, alpha, epsilon, approx, shifts, tau_scale, reading, normalize,
      axis_name: see :func:`scale_by_ricci_flow`.
    flow_step: the tentative step size; defaults to ``learning_rate``.
    weight_decay_mask: which params are decayed (optax convention).

  Returns:
    A ``GradientTransformationExtraArgs``; pass ``translated_grads=`` to
    ``update``.
  """
  if flow_step is None:
    flow_step = learning_rate

  def param_labels(params):
    if quantized is None:
      mask = jax.tree.map(lambda x: jnp.ndim(x) >= 2, params)
    else:
      mask = quantized(params) if callable(quantized) else quantized
    return jax.tree.map(lambda m: "ricci" if m else "sgd", mask)

  tail = lambda: _sgd_tail(learning_rate, momentum, nesterov, weight_decay, weight_decay_mask)  # noqa: E731
  return optax.partition(
      {
          "ricci": optax.chain(
              scale_by_ricci_flow(
                  tau=tau, alpha=alpha, epsilon=epsilon, approx=approx, shifts=shifts,
                  flow_step=flow_step, tau_scale=tau_scale, reading=reading, normalize=normalize,
                  axis_name=axis_name),
              *tail()),
          "sgd": optax.chain(*tail()),
      },
      param_labels,
      mask_compatible_extra_args=True,
  )


# ----------------------------------------------------------------------------
# Reading diagnostics out of an optimizer state.
# ----------------------------------------------------------------------------


def layer_diagnostics(opt_state: Any) -> dict[str, LayerDiagnostics]:
  """Every quantized layer's :class:`LayerDiagnostics`, keyed by its parameter path.

  Finds the :func:`scale_by_lne` / :func:`scale_by_ricci_flow` states anywhere
  in ``opt_state`` (inside ``chain``, ``partition``, ``inject_hyperparams``,
  ``MultiSteps`` ...).
  """
  states = (ScaleByRicciFlowState, ScaleByLNEState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, states))
           if isinstance(x, states)]
  out: dict[str, LayerDiagnostics] = {}
  for st in found:
    flat = jax.tree_util.tree_flatten_with_path(
        st.diagnostics, is_leaf=lambda x: isinstance(x, LayerDiagnostics))[0]
    for path, diag in flat:
      if isinstance(diag, LayerDiagnostics):
        key = "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
        out[key or "params"] = diag
  return out


def summarize_diagnostics(opt_state: Any) -> dict[str, Array]:
  """Scalars for logging: means over layers of s, correction, residual N, gate and dominance."""
  diags = list(layer_diagnostics(opt_state).values())
  if not diags:
    return {}
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *diags)
  return {
      "lne/s_mean": jnp.mean(stacked.s),
      "lne/s_max": jnp.max(stacked.s),
      "lne/correction_mean": jnp.mean(stacked.correction),
      "lne/dominant_fraction": jnp.mean(stacked.dominant),
      "ricci/residual_mean": jnp.mean(stacked.residual),
      "ricci/residual_max": jnp.max(stacked.residual),
      "ricci/gate_open_fraction": jnp.mean(stacked.gate),
      "ricci/regularizer_mean": jnp.mean(stacked.regularizer),
  }
