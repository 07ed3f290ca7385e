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

What each quantized layer reports every step (:class:`LayerDiagnostics`,
:func:`layer_diagnostics`, :func:`summarize_diagnostics`) lives in
:mod:`ricci_jax.diagnostics`; those names stay importable from here.

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
from ricci_jax.diagnostics import (
    LayerDiagnostics,
    layer_diagnostics,
    reports_diagnostics,
    summarize_diagnostics,
    zero_diagnostics,
)
from ricci_jax.ricci_flow import Shifts

__all__ = [  # LayerDiagnostics, layer_diagnostics and summarize_diagnostics: from ricci_jax.diagnostics
    "CONTROLS", "LayerDiagnostics", "ScaleByLNEState", "ScaleByRicciFlowState", "layer_diagnostics", "rf_sgd",
    "scale_by_lne", "scale_by_ricci_flow", "summarize_diagnostics",
]

Array = jax.Array
ScalarOrSchedule = float | Array | Callable[[Array], Array]


CONTROLS = ("none", "match_norm", "random_direction")
"""What is done to each layer's preconditioned update before it leaves the transform.

* ``"none"``: the update as the reading computes it.
* ``"match_norm"``: rescaled to the norm of the STE gradient d, per layer and
  step: the preconditioner's direction with STE's step size.
* ``"random_direction"`` (a null control): d plus a random vector whose norm
  is that of the reading's correction |u - d|, per layer and step: a
  perturbation of RF-DNN's size in no particular direction.
"""


def _is_concrete(tree) -> bool:
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _check_params(params, name: str):
  if params is None:
    raise ValueError(f"{name} needs the current params: call update(updates, state, params)")


def _check_number(name: str, value, allow_zero: bool):
  if value is None or not _is_concrete(value) or callable(value):
    return
  arr = np.asarray(value, np.float64)
  if not np.all(arr >= 0 if allow_zero else arr > 0):
    raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_options(tau, tau_scale, approx, metric, block, control) -> tuple[str, str, str | int]:
  """Construction-time checks shared by both transforms; returns the resolved (metric, approx, block)."""
  metric, approx = lne.resolve_metric(metric, approx)
  block = lne.check_block(block)
  lne.check_tau(tau, metric)
  _check_number("tau_scale", tau_scale, allow_zero=False)
  if control not in CONTROLS:
    raise ValueError(f"unknown control {control!r}; valid: {', '.join(CONTROLS)}")
  return metric, approx, block


def _check_state_dtype(state_dtype) -> np.dtype:
  """``state_dtype`` as a floating dtype (``None``: float32)."""
  if isinstance(state_dtype, (jax.Array, np.ndarray)):  # inject_hyperparams called a dtype as a schedule
    raise ValueError("state_dtype must be a dtype or its name; optax.inject_hyperparams calls a dtype such as "
                     "jnp.bfloat16 as a schedule: pass its name ('bfloat16') or static_args=('state_dtype',)")
  try:
    dtype = jnp.dtype(jnp.float32 if state_dtype is None else state_dtype)
  except TypeError:
    dtype = None
  if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f"state_dtype must be a floating dtype or its name (e.g. 'bfloat16'), got {state_dtype!r}")
  return dtype


def _validate_layers(params, tau, tau_scale, metric, approx, block):
  """Fail-fast checks on concrete params at init: block sizes, strong-approximation size, positive definiteness."""
  for path, w in jax.tree_util.tree_leaves_with_path(params):
    name = jax.tree_util.keystr(path) or "params"
    try:
      _, size = lne.block_shape(w.shape, block)
    except ValueError as e:
      raise ValueError(f"{name}: {e}") from None
    if approx == "strong" and size > lne.STRONG_MAX_SIZE:
      raise ValueError(
          f"approx='strong' is implemented for blocks of at most {lne.STRONG_MAX_SIZE} weights; "
          f"{name} has blocks of {size} (block={block!r}). Use 'exact' or 'weak', or a smaller block.")
    if lne.needs_positive_definite(metric, approx) and _is_concrete((w, tau, tau_scale)):
      lne.check_positive_definite(w, tau, tau_scale, name=name, block=block)


def _apply_control(control: str, nat: Array, d: Array, key: Array) -> Array:
  """The update after ``control`` (:data:`CONTROLS`), float32, shaped like ``d``."""
  if control == "match_norm":
    norm = jnp.linalg.norm(nat)
    return nat * jnp.where(norm > 0, jnp.linalg.norm(d) / jnp.where(norm > 0, norm, 1.0), 0.0)
  if control == "random_direction":
    xi = jax.random.normal(key, d.shape, jnp.float32)
    return d + jnp.linalg.norm(nat - d) * xi / jnp.maximum(jnp.linalg.norm(xi), jnp.finfo(jnp.float32).tiny)
  return nat


def _control_key(seed: int, count: Array, index: int) -> Array:
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), count), index)


def _leaves(tree, treedef):
  return treedef.flatten_up_to(tree)


@reports_diagnostics
class ScaleByLNEState(NamedTuple):
  """State of :func:`scale_by_lne`: the update count and the last step's diagnostics per layer."""

  count: Array
  diagnostics: Any


def scale_by_lne(
    tau: float | Array | str = "auto",
    approx: str = "weak",
    *,
    tau_scale: float | Array = 0.5,
    metric: str = "rank1",
    block: str | int = "layer",
    control: str = "none",
    control_seed: int = 0,
) -> optax.GradientTransformation:
  """Natural gradients in each layer's LNE metric: ``g(w)^-1 d`` (RF-DNN Eq. 27, Algorithm 1).

  Apply it to the quantized latent weights' STE gradients (route the other
  parameters elsewhere, e.g. with ``optax.partition``). Every leaf is one
  layer with its own metric (block-diagonal over ``block``).

  Args:
    tau: a number (the paper's constant), ``"auto"`` (per block
      ``tau_scale / sqrt(n max|w| mean|w|)``, which keeps the rank-1 metric
      diagonally dominant) or ``"std"`` (``tau_scale / std(w)`` per layer).
    approx: ``"weak"`` (Eq. 29, the paper's), ``"exact"``, ``"strong"`` (tiny
      blocks only), ``"none"`` (plain STE), or ``"diagonal"`` (alias of
      ``metric="hessian_diagonal", approx="exact"``).
    tau_scale: c of ``tau="auto"`` (c < 1 guarantees dominance), kappa of ``"std"``.
    metric: ``"rank1"`` (I - t t^T, Eq. 16) or ``"hessian_diagonal"``
      (diag(1 - t^2), the Hessian of Eq. 14's potential).
    block: ``"layer"``, ``"out_channel"``, ``"kernel"`` or an int (see
      :mod:`ricci_jax.lne`).
    control: ``"none"``, ``"match_norm"`` or ``"random_direction"`` (:data:`CONTROLS`).
    control_seed: the seed of ``"random_direction"``'s directions.

  Returns:
    A transformation whose ``update`` requires ``params``.
  """
  metric, approx, block = _check_options(tau, tau_scale, approx, metric, block, control)

  def init_fn(params):
    _validate_layers(params, tau, tau_scale, metric, approx, block)
    return ScaleByLNEState(jnp.zeros((), jnp.int32), jax.tree.map(zero_diagnostics, params))

  def update_fn(updates, state, params=None):
    _check_params(params, "scale_by_lne")
    leaves, treedef = jax.tree.flatten(updates)
    out_u, out_d = [], []
    for i, (d, w) in enumerate(zip(leaves, _leaves(params, treedef))):
      tau_v = lne.resolve_tau(w, tau, tau_scale, block)
      d32 = d.astype(jnp.float32)
      nat = lne.natural_gradient(w, d32, tau_v, approx, metric=metric, block=block)
      nat = _apply_control(control, nat, d32, _control_key(control_seed, state.count, i))
      diag = lne.lne_diagnostics(w, d32, tau_v, approx, metric=metric, block=block, natural=nat)
      z = jnp.zeros((), jnp.float32)
      one = jnp.ones((), jnp.float32)
      out_u.append(nat.astype(d.dtype))
      out_d.append(LayerDiagnostics(diag.tau, diag.s, diag.s_max, diag.dominant, diag.correction, z, one, z, z,
                                    jnp.full((), jnp.inf, jnp.float32), one))
    return (jax.tree.unflatten(treedef, out_u),
            ScaleByLNEState(optax.safe_increment(state.count), jax.tree.unflatten(treedef, out_d)))

  return optax.GradientTransformation(init_fn, update_fn)


@reports_diagnostics
class ScaleByRicciFlowState(NamedTuple):
  """State of :func:`scale_by_ricci_flow`.

  Attributes:
    count: number of updates so far (int32).
    previous: per layer, the four tentative metric vectors of the last step,
      shape (4, n) (blocks one after the other), order (k1, k2, j1, j2): the
      g(t)|s of Eq. 34 (one-step lag).
    diagnostics: per layer, :class:`LayerDiagnostics` of the last step.
    history: per layer, N of the last ``median_window`` steps (NaN where not
      yet filled), for ``epsilon_relative``; one unused NaN otherwise.
    open_steps: per layer, how many steps the gate let through (int32).
  """

  count: Array
  previous: Any
  diagnostics: Any
  history: Any
  open_steps: Any


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
    state_dtype: Any = None,
    metric: str = "rank1",
    block: str | int = "layer",
    rho: float | Array | None = None,
    epsilon_relative: float | Array | None = None,
    median_window: int = 100,
    control: str = "none",
    control_seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """The RF-DNN update under the discrete Ricci flow (Algorithm 2, Eqs. 32-36).

  For each layer (leaf) with latent weights W, STE gradient d and the four
  translated gradients g_s (extra argument ``translated_grads``):

  1. tentative metrics g|s from t_s = tanh(tau (W - eta g^-1 g_s)) (Eqs. 31-32);
  2. N = ||g(t+1)|k1 - g(t)|k1 + 2 Ric(g(t))||_F^2 (Eq. 35) from the stored
     g(t)|s (``reading``), in the metric the update uses (rank-1 algebra or
     elementwise for the diagonal metric; summed over blocks);
  3. d' = d + alpha dN/dW, the gradient of Algorithm 2's loss L + alpha N,
     through tanh(tau W) only;
  4. update = g^-1 d' * 1[N <= epsilon] (Eq. 36), after ``control``.

  Args:
    tau: the metric's tau: a number, ``"auto"`` or ``"std"`` (see :func:`scale_by_lne`).
    alpha: weight of the regulariser N in the loss (a raw number; see ``rho``).
    epsilon: the gate's bound on N; ``inf`` keeps the gate open whatever N is.
    approx: the inverse of g (see :func:`scale_by_lne`).
    shifts: the input translations (must match those of ``translated_grads``).
    flow_step: eta, the tentative step size: a number or a schedule of the
      update count (``rf_sgd`` passes its learning rate).
    tau_scale: c of ``tau="auto"``, kappa of ``tau="std"``.
    reading: which metrics enter Eq. 34: ``"lag"``, ``"current"`` or
      ``"two_step"`` (see :mod:`ricci_jax.ricci_flow`).
    normalize: divide N by the layer size (not in the paper).
    state_dtype: dtype (or its name) of the stored metric vectors; ``None``: float32. A default that is
      not a callable (optax's ``mu_dtype=None``): ``optax.inject_hyperparams`` takes callables for schedules.
    metric: ``"rank1"`` or ``"hessian_diagonal"`` (see :func:`scale_by_lne`).
    block: what one metric covers (see :func:`scale_by_lne`).
    rho: if given, alpha is set per layer and step so that
      |alpha dN/dW| = rho |d| (``alpha`` is then unused): N's raw scale
      depends on n, tau and the metric, a ratio does not.
    epsilon_relative: if given, the gate also closes when N exceeds this
      multiple of the median of the layer's N over the previous
      ``median_window`` steps (open while there is no history).
    median_window: steps in that running median: it sizes the state, so ``init`` needs it concrete
      when ``epsilon_relative`` is set (``update`` reads it from the state).
    control: ``"none"``, ``"match_norm"`` or ``"random_direction"`` (:data:`CONTROLS`).
    control_seed: the seed of ``"random_direction"``'s directions.

  Every number may be an array (a tracer under ``optax.inject_hyperparams``
  and ``jax.jit``) except the sizes: an int ``block`` anywhere and
  ``median_window`` in ``init`` with ``epsilon_relative`` set raise, naming
  ``static_args``, when traced.

  Returns:
    A transformation whose ``update(updates, state, params, translated_grads=...)``
    requires ``params`` and the translated gradients (a tree like ``updates``
    with a leading axis of 4 per leaf, from :func:`ricci_jax.translated_grads`)
    whenever there is at least one leaf.
  """
  metric, approx, block = _check_options(tau, tau_scale, approx, metric, block, control)
  if reading not in ricci_flow.READINGS:
    raise ValueError(f"unknown reading {reading!r}; valid: {', '.join(ricci_flow.READINGS)}")
  if not isinstance(shifts, Shifts):
    raise ValueError(f"shifts must be a ricci_jax.ricci_flow.Shifts, got {shifts!r}")
  _check_number("alpha", alpha, allow_zero=True)
  _check_number("epsilon", epsilon, allow_zero=True)
  _check_number("rho", rho, allow_zero=True)
  _check_number("epsilon_relative", epsilon_relative, allow_zero=False)
  window = lne.as_int(median_window, "median_window", traced_ok=True)
  if window is None or (_is_concrete(window) and window < 1):
    raise ValueError(f"median_window must be a positive int, got {median_window!r}")
  state_dtype = _check_state_dtype(state_dtype)

  def init_fn(params):
    # one unused entry without epsilon_relative: checkpointers refuse zero-size arrays
    size = 1 if epsilon_relative is None else lne.as_int(window, "median_window")
    _validate_layers(params, tau, tau_scale, metric, approx, block)

    def previous(w):
      tau_v = lne.resolve_tau(w, tau, tau_scale, block)
      return ricci_flow.initial_previous(w, tau_v, block).astype(state_dtype)

    return ScaleByRicciFlowState(
        count=jnp.zeros((), jnp.int32),
        previous=jax.tree.map(previous, params),
        diagnostics=jax.tree.map(zero_diagnostics, params),
        history=jax.tree.map(lambda _: jnp.full((size,), jnp.nan, jnp.float32), params),
        open_steps=jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params),
    )

  def update_fn(updates, state, params=None, *, translated_grads=None, **extra_args):
    del extra_args
    leaves, treedef = jax.tree.flatten(updates)
    count = optax.safe_increment(state.count)
    if not leaves:  # an empty partition group: nothing to precondition, nothing to ask for
      return updates, state._replace(count=count)
    _check_params(params, "scale_by_ricci_flow")
    if translated_grads is None:
      raise ValueError(
          "scale_by_ricci_flow needs the translated gradients: "
          "update(updates, state, params, translated_grads=ricci_jax.translated_grads(loss_fn, params, batch))")
    if jax.tree.structure(translated_grads) != treedef:
      raise ValueError(
          "translated_grads must have the structure of the updates (one (4, ...) array per leaf); got "
          f"{jax.tree.structure(translated_grads)} for updates {treedef}")
    eta = flow_step(state.count) if callable(flow_step) else flow_step
    eta = jnp.asarray(eta, jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    outs = []
    for i, (d, w, shifted, prev, hist, opened) in enumerate(zip(
        leaves, _leaves(params, treedef), _leaves(translated_grads, treedef), _leaves(state.previous, treedef),
        _leaves(state.history, treedef), _leaves(state.open_steps, treedef))):
      if shifted.shape != (4,) + d.shape:
        raise ValueError(f"a translated gradient has shape {shifted.shape}; expected {(4,) + d.shape}")
      tau_v = lne.resolve_tau(w, tau, tau_scale, block)

      def n_of(wv, shifted=shifted, prev=prev, tau_v=tau_v):
        return ricci_flow.residual_norm(wv, shifted, prev.astype(jnp.float32), tau_v, eta, approx, reading, shifts,
                                        normalize, metric=metric, block=block)

      (residual, store), grad_n = jax.value_and_grad(n_of, has_aux=True)(w.astype(jnp.float32))
      d32 = d.astype(jnp.float32)
      if rho is None:
        alpha_v = jnp.asarray(alpha, jnp.float32)
      else:
        gn = jnp.linalg.norm(grad_n)
        alpha_v = jnp.where(gn > 0, jnp.asarray(rho, jnp.float32) * jnp.linalg.norm(d32) / jnp.maximum(gn, tiny),
                            0.0)
      penalty = alpha_v * grad_n
      nat = lne.natural_gradient(w, d32 + penalty, tau_v, approx, metric=metric, block=block)
      nat = _apply_control(control, nat, d32, _control_key(control_seed, state.count, i))
      eps_v = jnp.asarray(epsilon, jnp.float32)
      if epsilon_relative is not None:  # the window is the history's length, concrete even if window is traced
        if _is_concrete(window) and hist.shape != (window,):
          raise ValueError(f"the state holds {hist.shape[0]} steps of N, median_window is {window}: the state "
                           "comes from a transformation with another median_window or epsilon_relative=None")
        have = jnp.any(jnp.isfinite(hist))
        median = jnp.nanmedian(jnp.where(have, hist, 0.0))
        eps_v = jnp.minimum(eps_v, jnp.where(have, jnp.asarray(epsilon_relative, jnp.float32) * median, jnp.inf))
        hist = hist.at[state.count % hist.shape[0]].set(residual)
      gate = (residual <= eps_v).astype(jnp.float32)
      opened = opened + gate.astype(jnp.int32)
      diag = lne.lne_diagnostics(w, d32, tau_v, approx, metric=metric, block=block, natural=nat)
      diag = LayerDiagnostics(diag.tau, diag.s, diag.s_max, diag.dominant, diag.correction, residual, gate,
                              lne.relative_norm(penalty, d32), alpha_v, eps_v,
                              opened.astype(jnp.float32) / count.astype(jnp.float32))
      outs.append(((gate * nat).astype(d.dtype), store.astype(state_dtype), diag, hist, opened))
    pick = lambda k: jax.tree.unflatten(treedef, [o[k] for o in outs])  # noqa: E731
    return pick(0), ScaleByRicciFlowState(
        count=count, previous=pick(1), diagnostics=pick(2), history=pick(3), open_steps=pick(4))

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
    metric: str = "rank1",
    block: str | int = "layer",
    rho: float | Array | None = None,
    epsilon_relative: float | Array | None = None,
    median_window: int = 100,
    control: str = "none",
    control_seed: int = 0,
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
      Default: every leaf with ndim >= 2. ``optax.inject_hyperparams`` takes
      every callable for a schedule: a function here needs
      ``static_args=("quantized",)`` (and one as ``weight_decay_mask``, its name).
    tau, alpha, epsilon, approx, shifts, tau_scale, reading, normalize,
      metric, block, rho, epsilon_relative, median_window, control,
      control_seed: see :func:`scale_by_ricci_flow`.
    flow_step: the tentative step size; defaults to ``learning_rate``.
    weight_decay_mask: which params are decayed (optax convention).

  Works under ``optax.inject_hyperparams`` (jitted or not) with the defaults
  and no ``static_args``; see :func:`scale_by_ricci_flow` for the sizes.

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
                  metric=metric, block=block, rho=rho, epsilon_relative=epsilon_relative,
                  median_window=median_window, control=control, control_seed=control_seed),
              *tail()),
          "sgd": optax.chain(*tail()),
      },
      param_labels,
      mask_compatible_extra_args=True,
  )
