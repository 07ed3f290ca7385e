"""The Linearly Nearly Euclidean (LNE) metric of one layer and its inverse.

RF-DNN (Chen et al., arXiv 2302.03390, §3.3 and §5) gives each quantized layer
a Riemannian metric over its flattened latent weights ``w`` and trains with the
natural gradient ``g^-1 d`` of the STE gradient ``d = dL/dQ(w)`` (Eqs. 26-27).
The paper leaves three things open that decide how far that update is from
STE's; each is a keyword here (``docs/method.md`` gives the sentence of the
paper that supports each reading).

**metric** (which g):

=====================  ===================================================
``"rank1"``            g = I - t t^T, t = tanh(tau vec(w)): Eq. 16 as
                       printed (the default)
``"hessian_diagonal"`` g = diag(1 - t^2): the Hessian of the Bregman
                       potential of Eq. 14, Phi = sum log cosh(tau w) / tau^2,
                       which Eq. 16 was derived from (App. E.1 keeps
                       off-diagonal terms the Hessian does not have)
=====================  ===================================================

**approx** (which inverse):

=============  ===================================  =============================
               ``metric="rank1"``                   ``metric="hessian_diagonal"``
``weak``       d + t (t . d)   (Eq. 29, the paper's) (1 + t^2) d
``exact``      d + t (t . d) / (1 - s), s = |t|^2    d / (1 - t^2) = cosh^2(tau w) d
               (Sherman-Morrison; needs s < 1)
``strong``     G d, G from an MLP minimising         --
               |I - g G|^2 (Eq. 28), blocks of at
               most ``STRONG_MAX_SIZE`` weights
``none``       d (the identity metric: STE)          d
``diagonal``   alias of ``metric="hessian_diagonal", approx="exact"``
=============  ===================================  =============================

**block** (what one metric covers, so what n and s are): ``"layer"`` (one
metric over the whole kernel, §5.1 "layer-by-layer"), ``"out_channel"`` (one
per output unit: a conv kernel's (H, W, I) slice, a dense kernel's column),
``"kernel"`` (one per (I, O) spatial filter; a dense kernel's filters are
single weights), or an int k (k consecutive weights of the row-major
flattened kernel). The layer's metric is block-diagonal.

**tau**: a number (the paper's "constant factor tau", §5), ``"auto"`` (per
block, the largest tau that keeps the rank-1 metric strictly diagonally
dominant, times ``tau_scale`` = c: :func:`auto_tau`), or ``"std"`` (per layer,
``tau_scale / std(w)``: t depends on w / std(w) only, so the correction has
the same size in every layer). ``"auto"`` is refused for the diagonal metric,
which is diagonally dominant for every tau: there it would only shrink the
correction to nothing.

``(I - t t^T)(I + t t^T) = I - s t t^T``, so the rank-1 weak inverse's error
is exactly the term ``s t t^T``; inside the diagonally dominant regime the
paper requires (Def. 17), ``s < 1`` and all rank-1 inverses are finite.
Nothing here builds an n x n matrix except :func:`dense_metric` (a test
reference) and the ``strong`` approximation on tiny blocks.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array

METRICS = ("rank1", "hessian_diagonal")
APPROXIMATIONS = ("weak", "exact", "diagonal", "strong", "none")
BLOCKS = ("layer", "out_channel", "kernel")
TAU_MODES = ("auto", "std")
STRONG_MAX_SIZE = 64
"""Largest block (in weights) the ``strong`` approximation accepts: its MLP maps
the n(n+1)/2 entries of g to those of G, which is already 2,080 numbers at
n = 64 and 2.7 million for one 3x3x16x16 conv. The paper never uses it
(footnote 9); ``exact`` is the inverse a perfect strong approximation learns."""

_DIAGONAL_CLIP = 10.0  # |tau w| is clipped here in the diagonal exact inverse: cosh^2(10) ~ 1.2e8


def check_approx(approx: str) -> str:
  if approx not in APPROXIMATIONS:
    raise ValueError(f"unknown approximation {approx!r}; valid: {', '.join(APPROXIMATIONS)}")
  return approx


def resolve_metric(metric: str, approx: str) -> tuple[str, str]:
  """``(metric, approx)`` with the ``approx="diagonal"`` alias expanded, both checked."""
  if metric not in METRICS:
    raise ValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
  check_approx(approx)
  if approx == "diagonal":
    return "hessian_diagonal", "exact"
  if metric == "hessian_diagonal" and approx == "strong":
    raise ValueError(
        "approx='strong' fits an MLP to invert the rank-1 metric (Eq. 28); the Hessian-diagonal metric's "
        "inverse is elementwise and exact: use approx='exact' or 'weak' with metric='hessian_diagonal'")
  return metric, approx


def as_int(value, name: str, *, traced_ok: bool = False):
  """``value`` as a Python int if it is an integer (an int, or a 0-d integer array), else ``None``.

  ``optax.inject_hyperparams`` turns every int argument into an array, a tracer under ``jax.jit``. A size
  (``block``, ``median_window``) must be concrete, so a traced integer raises, naming ``static_args``;
  with ``traced_ok`` it is returned as it is, for the caller to use only where no size depends on it.
  """
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer, np.ndarray, jax.Array)) \
      or np.ndim(value) or not np.issubdtype(getattr(value, "dtype", np.int64), np.integer):
    return None
  if isinstance(value, jax.core.Tracer):
    if traced_ok:
      return value
    raise ValueError(f"{name} sizes arrays, so it cannot be traced (optax.inject_hyperparams under jax.jit traces "
                     f"ints): pass static_args=({name!r},) to optax.inject_hyperparams")
  return int(value)


def check_block(block: str | int) -> str | int:
  """``block`` checked; returned as a Python int if it is an integer array (see :func:`as_int`)."""
  k = block if isinstance(block, str) else as_int(block, "block")
  if not (k in BLOCKS or (isinstance(k, int) and k >= 1)):
    raise ValueError(f"unknown block {block!r}; valid: {', '.join(BLOCKS)} or a positive int (weights per block)")
  return k


def check_tau(tau, metric: str = "rank1"):
  """Rejects a tau no reading accepts: an unknown string, a concrete tau <= 0, 'auto' with the diagonal metric."""
  if isinstance(tau, str):
    if tau not in TAU_MODES:
      raise ValueError(f"tau must be a positive number or one of {', '.join(repr(m) for m in TAU_MODES)}, "
                       f"got {tau!r}")
    if tau == "auto" and metric == "hessian_diagonal":
      raise ValueError(
          "tau='auto' keeps the rank-1 metric diagonally dominant; the Hessian-diagonal metric is diagonal "
          "for every tau, where 'auto' only makes the correction vanish. Use a number (the paper's constant "
          "tau) or tau='std' (tau_scale / std(w) per layer)")
    return tau
  if not isinstance(tau, jax.core.Tracer) and not bool(jnp.all(jnp.asarray(tau) > 0)):
    raise ValueError(f"tau must be a positive number or one of {', '.join(repr(m) for m in TAU_MODES)}, got {tau!r}")
  return tau


# ----------------------------------------------------------------------------
# Blocks.
# ----------------------------------------------------------------------------


def block_shape(shape: tuple[int, ...], block: str | int) -> tuple[int, int]:
  """(number of blocks, weights per block) of a kernel of ``shape``; raises if an int block does not divide it."""
  block = check_block(block)
  n = 1
  for s in shape:
    n *= int(s)
  if block == "layer":
    return 1, n
  if block == "out_channel":
    out = int(shape[-1]) if len(shape) else 1
    return out, n // max(out, 1)
  if block == "kernel":
    if len(shape) < 2:
      return n, 1
    spatial = n // (int(shape[-1]) * int(shape[-2]))
    return n // spatial, spatial
  if n % block:
    raise ValueError(f"block={block} does not divide a kernel of shape {tuple(shape)} ({n} weights); use a "
                     f"divisor of {n} or one of {', '.join(BLOCKS)}")
  return n // block, block


def to_blocks(x: Array, block: str | int) -> Array:
  """``x`` (a kernel) as a (blocks, weights per block) float32 matrix, one row per metric."""
  b, m = block_shape(x.shape, block)
  x = x.astype(jnp.float32)
  if block == "out_channel" and x.ndim >= 1:
    return x.reshape(m, b).T
  if block == "kernel" and x.ndim >= 2:
    return x.reshape(m, b).T
  return x.reshape(b, m)


def from_blocks(y: Array, block: str | int, shape: tuple[int, ...]) -> Array:
  """The inverse of :func:`to_blocks`."""
  if block in ("out_channel", "kernel") and len(shape) >= (1 if block == "out_channel" else 2):
    return y.T.reshape(shape)
  return y.reshape(shape)


# ----------------------------------------------------------------------------
# tau and the metric's vector.
# ----------------------------------------------------------------------------


def auto_tau(w: Array, scale: float | Array = 0.5, *, per_row: bool = False) -> Array:
  r"""A tau that makes g(w) = I - t t^T strictly diagonally dominant: :math:`c/\sqrt{n \max|w| \,\mathrm{mean}|w|}`.

  Row i of g is dominant iff :math:`1 - t_i^2 > |t_i| \sum_{j \ne i} |t_j|`,
  i.e. :math:`|t_i| \sum_j |t_j| < 1`. Since :math:`|t_j| \le \tau |w_j|`, the
  worst row is below :math:`\tau^2 \max|w| \cdot n\,\mathrm{mean}|w| = c^2`, so
  any ``scale`` c < 1 guarantees dominance (and s < 1). Computed from the
  current weights with no gradient; over all of ``w``, or with ``per_row``
  one tau per row of a (blocks, m) matrix (:func:`to_blocks`).
  """
  a = jnp.abs(jax.lax.stop_gradient(w)).astype(jnp.float32)
  if per_row:
    denom = a.shape[1] * jnp.max(a, axis=1) * jnp.mean(a, axis=1)
  else:
    denom = a.size * jnp.max(a) * jnp.mean(a)
  return scale / jnp.sqrt(jnp.maximum(denom, jnp.finfo(jnp.float32).tiny))


def std_tau(w: Array, scale: float | Array = 1.0) -> Array:
  """``scale / std(w)`` over the whole layer, so that t = tanh(scale w / std(w)); no gradient."""
  sd = jnp.std(jax.lax.stop_gradient(w).astype(jnp.float32))
  return scale / jnp.maximum(sd, jnp.finfo(jnp.float32).tiny)


def resolve_tau(w: Array, tau: float | Array | str, tau_scale: float | Array = 0.5,
                block: str | int = "layer") -> Array:
  """``tau`` as float32: per block (shape (blocks,)) for ``"auto"`` with several blocks, else a scalar."""
  if not isinstance(tau, str):
    return jnp.asarray(tau, jnp.float32)
  check_tau(tau)
  if tau == "auto":
    if block == "layer":
      return auto_tau(w, tau_scale)
    return auto_tau(to_blocks(w, block), tau_scale, per_row=True)
  return std_tau(w, tau_scale)


def tau_column(tau: Array, blocks: int) -> Array:
  """tau as a (blocks, 1) column, broadcasting a scalar."""
  return jnp.broadcast_to(jnp.asarray(tau, jnp.float32).reshape(-1), (blocks,))[:, None]


def metric_vector(w: Array, tau: Array) -> Array:
  """The rank-1 factor of g(w) = I - t t^T over the whole layer: ``t = tanh(tau * vec(w))`` (Eq. 16), float32."""
  return jnp.tanh(tau * jnp.ravel(w).astype(jnp.float32))


def block_vectors(w: Array, tau: Array, block: str | int = "layer") -> Array:
  """t = tanh(tau w) per block: (blocks, weights per block) float32, tau a scalar or one per block."""
  wb = to_blocks(w, block)
  return jnp.tanh(tau_column(tau, wb.shape[0]) * wb)


def dense_metric(w: Array, tau: float | Array | str, tau_scale: float = 0.5, *, metric: str = "rank1",
                 block: str | int = "layer") -> Array:
  """The n x n matrix of the layer's metric, in the order of the flattened blocks. A test reference (<= 4,096 weights)."""
  if w.size > 4096:
    raise ValueError(f"dense_metric is a test reference for small layers (<= 4096 weights), got {w.size}")
  metric, _ = resolve_metric(metric, "weak")
  t = block_vectors(w, resolve_tau(w, tau, tau_scale, block), block)
  if metric == "hessian_diagonal":
    return jnp.diag(1.0 - jnp.ravel(t) ** 2)
  return jax.scipy.linalg.block_diag(*[jnp.eye(t.shape[1]) - jnp.outer(r, r) for r in t])


def is_diagonally_dominant(t: Array) -> Array:
  r"""Whether I - t t^T is strictly diagonally dominant (Def. 17), in O(n); per row of a 2-D ``t``.

  Row i: :math:`1 - t_i^2 > |t_i| (\sum_j |t_j| - |t_i|)`.
  """
  a = jnp.abs(t)
  return jnp.all(1.0 - a * a > a * (jnp.sum(a, axis=-1, keepdims=True) - a), axis=-1)


# ----------------------------------------------------------------------------
# Inverses.
# ----------------------------------------------------------------------------


def _weak(t, d):
  return d + t * jnp.sum(t * d, axis=-1, keepdims=True)


def _exact(t, d):
  s = jnp.sum(t * t, axis=-1, keepdims=True)
  ok = s < 1.0
  return jnp.where(ok, d + t * (jnp.sum(t * d, axis=-1, keepdims=True) / jnp.where(ok, 1.0 - s, 1.0)), _weak(t, d))


def _block_inverse(wb: Array, tau_col: Array, db: Array, metric: str, approx: str) -> Array:
  """g^-1 d on (blocks, m) matrices."""
  if approx == "none":
    return db
  if metric == "hessian_diagonal":
    if approx == "weak":
      return db * (1.0 + jnp.square(jnp.tanh(tau_col * wb)))
    z = jnp.clip(tau_col * wb, -_DIAGONAL_CLIP, _DIAGONAL_CLIP)
    return jnp.square(jnp.cosh(z)) * db
  t = jnp.tanh(tau_col * wb)
  if approx == "weak":
    return _weak(t, db)
  if approx == "exact":
    return _exact(t, db)
  if wb.shape[1] > STRONG_MAX_SIZE:
    raise ValueError(_strong_size_message(wb.shape[1]))
  inverses = jax.vmap(_strong_from_t)(t, jax.random.split(jax.random.key(0), t.shape[0]))
  return jnp.einsum("bij,bj->bi", inverses, db)


def natural_gradient(
    w: Array,
    d: Array,
    tau: float | Array | str = "auto",
    approx: str = "weak",
    *,
    tau_scale: float | Array = 0.5,
    metric: str = "rank1",
    block: str | int = "layer",
) -> Array:
  """The natural gradient g(w)^-1 d in the LNE metric of one layer (Eqs. 26-29).

  Args:
    w: the layer's latent weights (any shape; a kernel's last axis is its output).
    d: the gradient with respect to the quantized weights, shaped like ``w``.
    tau: a number, ``"auto"`` or ``"std"`` (module docstring), or an array from
      :func:`resolve_tau` (one per block).
    approx: ``"weak"``, ``"exact"``, ``"strong"``, ``"none"`` or the alias
      ``"diagonal"`` (module docstring).
    tau_scale: c of ``tau="auto"``, kappa of ``tau="std"``.
    metric: ``"rank1"`` (Eq. 16) or ``"hessian_diagonal"`` (Eq. 14's Hessian).
    block: what one metric covers: ``"layer"``, ``"out_channel"``, ``"kernel"`` or an int.

  Returns:
    g^-1 d with the shape and dtype of ``d``. Never NaN for finite inputs:
    the rank-1 ``exact`` inverse of a block with s >= 1 (an indefinite metric,
    where Sherman-Morrison does not apply) falls back to ``weak``
    (:func:`lne_diagnostics` reports it), and the diagonal ``exact`` inverse
    clips |tau w| at 10.
  """
  metric, approx = resolve_metric(metric, approx)
  if approx == "none":
    return d
  block = check_block(block)
  if isinstance(tau, str):
    check_tau(tau, metric)
  tau_v = resolve_tau(w, tau, tau_scale, block)
  wb = to_blocks(w, block)
  out = _block_inverse(wb, tau_column(tau_v, wb.shape[0]), to_blocks(d, block), metric, approx)
  return from_blocks(out, block, d.shape).astype(d.dtype)


def relative_norm(x: Array, y: Array) -> Array:
  """|x| / |y| in float32, 0 where y = 0."""
  ny = jnp.linalg.norm(jnp.ravel(y).astype(jnp.float32))
  nx = jnp.linalg.norm(jnp.ravel(x).astype(jnp.float32))
  return jnp.where(ny > 0, nx / jnp.where(ny > 0, ny, 1.0), 0.0)


class LNEDiagnostics(NamedTuple):
  """Per-layer numbers worth logging (all float32 scalars).

  Attributes:
    tau: the tau used (the mean over blocks when each block has its own).
    s: |t|^2 per block, averaged over the layer's blocks; the rank-1 block
      metric is positive definite iff its s < 1.
    s_max: the largest block's s.
    dominant: the share of blocks whose rank-1 metric is strictly diagonally
      dominant (Def. 17): 1 or 0 for ``block="layer"``; always 1 for the
      diagonal metric.
    correction: |g^-1 d - d| / |d|, how far the update is from plain STE.
  """

  tau: Array
  s: Array
  s_max: Array
  dominant: Array
  correction: Array


def lne_diagnostics(w: Array, d: Array, tau: float | Array | str = "auto", approx: str = "weak", *,
                    tau_scale: float | Array = 0.5, metric: str = "rank1", block: str | int = "layer",
                    natural: Array | None = None) -> LNEDiagnostics:
  """Diagnostics of one layer's metric and natural gradient (pass ``natural`` to reuse it)."""
  metric, approx = resolve_metric(metric, approx)
  if isinstance(tau, str):
    check_tau(tau, metric)
  tau_v = resolve_tau(w, tau, tau_scale, block)
  t = block_vectors(w, tau_v, block)
  if natural is None:
    natural = natural_gradient(w, d, tau_v, approx, metric=metric, block=block)
  diff = jnp.ravel(natural).astype(jnp.float32) - jnp.ravel(d).astype(jnp.float32)
  s = jnp.sum(t * t, axis=-1)
  dominant = (jnp.ones((), jnp.float32) if metric == "hessian_diagonal"
              else jnp.mean(is_diagonally_dominant(t).astype(jnp.float32)))
  return LNEDiagnostics(tau=jnp.mean(tau_v), s=jnp.mean(s), s_max=jnp.max(s), dominant=dominant,
                        correction=relative_norm(diff, d))


def needs_positive_definite(metric: str, approx: str) -> bool:
  """Whether the inverse needs a positive-definite metric: the rank-1 ``exact`` and ``strong`` inverses.

  The weak inverse I + t t^T (or 1 + t^2) is positive definite for every tau,
  and diag(1 - t^2) is positive definite for every finite tau w.
  """
  metric, approx = resolve_metric(metric, approx)
  return metric == "rank1" and approx in ("exact", "strong")


def check_positive_definite(w: Array, tau: float | Array | str, tau_scale: float = 0.5, name: str = "layer", *,
                            block: str | int = "layer"):
  """Raises ``ValueError`` if a block's I - t t^T is not positive definite (s >= 1) for concrete ``w``."""
  tau_v = resolve_tau(w, tau, tau_scale, block)
  t = block_vectors(w, tau_v, block)
  s = jnp.sum(t * t, axis=-1)
  worst = int(jnp.argmax(s))
  if not float(s[worst]) < 1.0:
    wb = to_blocks(w, block)
    where = "" if wb.shape[0] == 1 else f" (block {worst} of {wb.shape[0]}, {wb.shape[1]} weights each)"
    raise ValueError(
        f"the LNE metric of {name}{where} is not positive definite: s = |tanh(tau w)|^2 = {float(s[worst]):.4g} "
        f">= 1 (tau = {float(jnp.ravel(jnp.broadcast_to(tau_v, s.shape))[worst]):.4g}). The exact and strong "
        f"inverses need s < 1: use tau='auto', a tau below {float(auto_tau(wb[worst], 1.0)):.4g} (which keeps "
        "that block diagonally dominant), approx='weak', or metric='hessian_diagonal'.")


def _strong_size_message(size: int) -> str:
  return (f"the strong approximation (Eq. 28) is implemented for blocks of at most {STRONG_MAX_SIZE} weights "
          f"(its MLP maps all n(n+1)/2 metric entries); this block has {size}. Use approx='exact' "
          "(Sherman-Morrison: the inverse the MLP would learn), 'weak' (the paper's choice) or a smaller block.")


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


def _strong_from_t(t: Array, key: Array, steps: int = 300, hidden: int = 256,
                   learning_rate: float = 1e-3) -> Array:
  g = jnp.eye(t.size, dtype=jnp.float32) - jnp.outer(t, t)
  return _fit_strong(g, key, steps, hidden, learning_rate)


def strong_inverse(w: Array, tau: float | Array | str = "auto", *, steps: int = 300, hidden: int = 256,
                   learning_rate: float = 1e-3, key: Array | None = None) -> Array:
  r"""The strong approximation G of g^-1 (Eq. 28): an MLP fitted to minimise :math:`\|I - gG\|^2`.

  The paper splits g into its strictly-lower-triangular entries P and its
  diagonal A, maps (P, A) through an MLP to (P~, A~) and assembles the
  symmetric G, but gives no sizes or schedule. Ours: one tanh hidden layer of
  ``hidden`` units, a zero-initialised output added to the identity (so G
  starts at I, where the weak approximation also starts), Adam for ``steps``
  steps, refitted for each metric. ``w`` is one block (the rank-1 metric over
  all of it) of at most :data:`STRONG_MAX_SIZE` weights.
  """
  if w.size > STRONG_MAX_SIZE:
    raise ValueError(_strong_size_message(w.size))
  t = metric_vector(w, resolve_tau(w, tau))
  key = jax.random.key(0) if key is None else key
  return _strong_from_t(t, key, steps, hidden, learning_rate)
