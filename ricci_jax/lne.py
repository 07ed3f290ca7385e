"""The Linearly Nearly Euclidean (LNE) metric of one layer and its inverse.

RF-DNN (Chen et al., arXiv 2302.03390, §3.3 and §5) gives each quantized layer
a Riemannian metric over its flattened latent weights ``w`` (Eq. 16)::

    g(w) = I - t t^T,        t = tanh(tau * vec(w)),

and trains with the natural gradient ``g^-1 d`` of the STE gradient
``d = dL/dQ(w)`` (Eqs. 26-27). The metric is kept in rank-1 form: nothing here
builds an n x n matrix except :func:`dense_metric`, a reference for tests on
small layers, and the ``strong`` approximation, which only exists for tiny
layers.

Inverses (``approx``):

=============  ============================================================
``weak``       d + t (t . d)                       Eq. 29, the paper's choice
``exact``      d + t (t . d) / (1 - s), s = |t|^2  Sherman-Morrison; needs s < 1
``diagonal``   d / (1 - t^2) = cosh^2(tau w) d     Hessian metric of the mirror
                                                   potential (Eq. 14), ablation
``strong``     G d, G from an MLP minimising       Eq. 28, layers of at most
               |I - g G|^2                         ``STRONG_MAX_SIZE`` weights
``none``       d                                   the identity metric (STE)
=============  ============================================================

``(I - t t^T)(I + t t^T) = I - s t t^T``, so the weak inverse's error is
exactly the term ``s t t^T``; inside the diagonally dominant regime the paper
requires (Def. 17), ``s < 1`` and all inverses are finite.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array

APPROXIMATIONS = ("weak", "exact", "diagonal", "strong", "none")
STRONG_MAX_SIZE = 64
"""Largest layer (in weights) the ``strong`` approximation accepts: its MLP maps
the n(n+1)/2 entries of g to those of G, which is already 2,080 numbers at
n = 64 and 2.7 million for one 3x3x16x16 conv. The paper never uses it
(footnote 9); ``exact`` is the inverse a perfect strong approximation learns."""

_DIAGONAL_CLIP = 10.0  # |tau w| is clipped here in the diagonal inverse: cosh^2(10) ~ 1.2e8


def check_approx(approx: str) -> str:
  if approx not in APPROXIMATIONS:
    raise ValueError(f"unknown approximation {approx!r}; valid: {', '.join(APPROXIMATIONS)}")
  return approx


def auto_tau(w: Array, scale: float | Array = 0.5) -> Array:
  r"""A tau that makes g(w) strictly diagonally dominant: :math:`c/\sqrt{n \max|w| \,\mathrm{mean}|w|}`.

  Row i of g is dominant iff :math:`1 - t_i^2 > |t_i| \sum_{j \ne i} |t_j|`,
  i.e. :math:`|t_i| \sum_j |t_j| < 1`. Since :math:`|t_j| \le \tau |w_j|`, the
  worst row is below :math:`\tau^2 \max|w| \cdot n\,\mathrm{mean}|w| = c^2`, so
  any ``scale`` c < 1 guarantees dominance (and s < 1). Computed from the
  current weights with no gradient.
  """
  a = jnp.abs(jax.lax.stop_gradient(w)).astype(jnp.float32)
  denom = a.size * jnp.max(a) * jnp.mean(a)
  return scale / jnp.sqrt(jnp.maximum(denom, jnp.finfo(jnp.float32).tiny))


def resolve_tau(w: Array, tau: float | Array | str, tau_scale: float | Array = 0.5) -> Array:
  """``tau`` as a float32 array: :func:`auto_tau` for ``"auto"``, else the given value."""
  if isinstance(tau, str):
    if tau != "auto":
      raise ValueError(f"tau must be a positive number or 'auto', got {tau!r}")
    return auto_tau(w, tau_scale)
  return jnp.asarray(tau, jnp.float32)


def metric_vector(w: Array, tau: Array) -> Array:
  """The rank-1 factor of g(w) = I - t t^T: ``t = tanh(tau * vec(w))`` (Eq. 16), float32."""
  return jnp.tanh(tau * jnp.ravel(w).astype(jnp.float32))


def dense_metric(w: Array, tau: float | Array | str, tau_scale: float = 0.5) -> Array:
  """The n x n matrix I - t t^T. A reference for tests: refuses layers above 4,096 weights."""
  if w.size > 4096:
    raise ValueError(f"dense_metric is a test reference for small layers (<= 4096 weights), got {w.size}")
  t = metric_vector(w, resolve_tau(w, tau, tau_scale))
  return jnp.eye(t.size, dtype=t.dtype) - jnp.outer(t, t)


def is_diagonally_dominant(t: Array) -> Array:
  r"""Whether I - t t^T is strictly diagonally dominant (Def. 17), in O(n).

  Row i: :math:`1 - t_i^2 > |t_i| (\sum_j |t_j| - |t_i|)`.
  """
  a = jnp.abs(t)
  return jnp.all(1.0 - a * a > a * (jnp.sum(a) - a))


def _weak(t, d):
  return d + t * jnp.vdot(t, d)


def natural_gradient(
    w: Array,
    d: Array,
    tau: float | Array | str = "auto",
    approx: str = "weak",
    *,
    tau_scale: float | Array = 0.5,
) -> Array:
  """The natural gradient g(w)^-1 d in the LNE metric of one layer (Eqs. 26-29).

  Args:
    w: the layer's latent weights (any shape).
    d: the gradient with respect to the quantized weights, shaped like ``w``.
    tau: the metric's tau, or ``"auto"`` (:func:`auto_tau`).
    approx: one of :data:`APPROXIMATIONS` (see the module docstring).
    tau_scale: the constant c of ``tau="auto"``.

  Returns:
    g^-1 d with the shape and dtype of ``d``. Never NaN for finite inputs:
    ``exact`` with s >= 1 (an indefinite metric, where Sherman-Morrison does
    not apply) falls back to ``weak`` (:func:`lne_diagnostics` reports it),
    and ``diagonal`` clips |tau w| at 10.
  """
  check_approx(approx)
  if approx == "none":
    return d
  tau = resolve_tau(w, tau, tau_scale)
  df = jnp.ravel(d).astype(jnp.float32)
  if approx == "diagonal":
    z = jnp.clip(tau * jnp.ravel(w).astype(jnp.float32), -_DIAGONAL_CLIP, _DIAGONAL_CLIP)
    out = jnp.square(jnp.cosh(z)) * df
  elif approx == "strong":
    out = strong_inverse(w, tau) @ df
  else:
    t = metric_vector(w, tau)
    if approx == "weak":
      out = _weak(t, df)
    else:  # exact
      s = jnp.vdot(t, t)
      safe = jnp.where(s < 1.0, 1.0 - s, 1.0)
      out = jnp.where(s < 1.0, df + t * (jnp.vdot(t, df) / safe), _weak(t, df))
  return out.reshape(d.shape).astype(d.dtype)


def relative_norm(x: Array, y: Array) -> Array:
  """|x| / |y| in float32, 0 where y = 0."""
  ny = jnp.linalg.norm(jnp.ravel(y).astype(jnp.float32))
  nx = jnp.linalg.norm(jnp.ravel(x).astype(jnp.float32))
  return jnp.where(ny > 0, nx / jnp.where(ny > 0, ny, 1.0), 0.0)


class LNEDiagnostics(NamedTuple):
  """Per-layer numbers worth logging (all float32 scalars).

  Attributes:
    tau: the tau used.
    s: |t|^2; g is positive definite iff s < 1.
    dominant: 1 if g is strictly diagonally dominant (Def. 17), else 0.
    correction: |g^-1 d - d| / |d|, how far the update is from plain STE
      (for ``weak``: |t (t . d)| / |d|).
  """

  tau: Array
  s: Array
  dominant: Array
  correction: Array


def lne_diagnostics(w: Array, d: Array, tau: float | Array | str = "auto", approx: str = "weak", *,
                    tau_scale: float | Array = 0.5, natural: Array | None = None) -> LNEDiagnostics:
  """Diagnostics of one layer's metric and natural gradient (pass ``natural`` to reuse it)."""
  tau_v = resolve_tau(w, tau, tau_scale)
  t = metric_vector(w, tau_v)
  if natural is None:
    natural = natural_gradient(w, d, tau_v, approx)
  diff = jnp.ravel(natural).astype(jnp.float32) - jnp.ravel(d).astype(jnp.float32)
  correction = relative_norm(diff, d)
  return LNEDiagnostics(
      tau=tau_v, s=jnp.vdot(t, t), dominant=is_diagonally_dominant(t).astype(jnp.float32),
      correction=correction)


def check_positive_definite(w: Array, tau: float | Array | str, tau_scale: float = 0.5, name: str = "layer"):
  """Raises ``ValueError`` if I - t t^T is not positive definite (s >= 1) for concrete ``w``."""
  t = metric_vector(w, resolve_tau(w, tau, tau_scale))
  s = float(jnp.vdot(t, t))
  if not s < 1.0:
    raise ValueError(
        f"the LNE metric of {name} is not positive definite: s = |tanh(tau w)|^2 = {s:.4g} >= 1 "
        f"(tau = {float(resolve_tau(w, tau, tau_scale)):.4g}, {w.size} weights). Use tau='auto' or a "
        f"tau below {float(auto_tau(w, 1.0)):.4g}, which keeps g diagonally dominant.")


# ----------------------------------------------------------------------------
# The strong approximation (Eq. 28, Fig. 4), for tiny layers only.
# ----------------------------------------------------------------------------


class _StrongInverseMLP(nn.Module):
  """(P, A) -> (P~, A~): strictly-lower-triangular and diagonal entries of g to those of G."""

  hidden: int = 256

  @nn.compact
  def __call__(self, features):
    h = nn.tanh(nn.Dense(self.hidden)(features))
    # zero-initialised output: G starts at the identity (our choice, see strong_inverse)
    return nn.Dense(features.shape[-1], kernel_init=nn.initializers.zeros)(h)


@functools.partial(jax.jit, static_argnames=("steps", "hidden"))
def _fit_strong(g: Array, key: Array, steps: int, hidden: int, learning_rate: float) -> Array:
  n = g.shape[0]
  lower = jnp.tril_indices(n, -1)
  features = jnp.concatenate([g[lower], jnp.diag(g)])
  mlp = _StrongInverseMLP(hidden)

  def assemble(out):
    p, a = out[: lower[0].size], out[lower[0].size:]
    m = jnp.zeros((n, n), g.dtype).at[lower].set(p)
    return jnp.eye(n, dtype=g.dtype) + m + m.T + jnp.diag(a)

  def loss(params):
    return jnp.sum(jnp.square(jnp.eye(n, dtype=g.dtype) - g @ assemble(mlp.apply(params, features))))

  params = mlp.init(key, features)
  opt = optax.adam(learning_rate)

  def step(carry, _):
    params, state = carry
    grads = jax.grad(loss)(params)
    updates, state = opt.update(grads, state)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=steps)
  return assemble(mlp.apply(params, features))


def strong_inverse(w: Array, tau: float | Array | str = "auto", *, steps: int = 300, hidden: int = 256,
                   learning_rate: float = 1e-3, key: Array | None = None) -> Array:
  r"""The strong approximation G of g^-1 (Eq. 28): an MLP fitted to minimise :math:`\|I - gG\|^2`.

  The paper splits g into its strictly-lower-triangular entries P and its
  diagonal A, maps (P, A) through an MLP to (P~, A~) and assembles the
  symmetric G, but gives no sizes or schedule. Ours: one tanh hidden layer of
  ``hidden`` units, a zero-initialised output added to the identity (so G
  starts at I, where the weak approximation also starts), Adam for ``steps``
  steps, refitted for each metric. Only for layers of at most
  :data:`STRONG_MAX_SIZE` weights.
  """
  if w.size > STRONG_MAX_SIZE:
    raise ValueError(
        f"the strong approximation (Eq. 28) is implemented for layers of at most {STRONG_MAX_SIZE} "
        f"weights (its MLP maps all n(n+1)/2 metric entries); this layer has {w.size}. Use "
        f"approx='exact' (Sherman-Morrison: the inverse the MLP would learn) or 'weak' (the paper's choice).")
  t = metric_vector(w, resolve_tau(w, tau))
  g = jnp.eye(w.size, dtype=jnp.float32) - jnp.outer(t, t)
  key = jax.random.key(0) if key is None else key
  return _fit_strong(g, key, steps, hidden, learning_rate)
