"""The discrete Ricci flow of RF-DNN (Chen et al., arXiv 2302.03390, §6).

Per quantized layer, the metric is measured under four input translations:
vertical shifts k1, k2 and horizontal shifts j1, j2 (Fig. 5). Each translated
batch gives a gradient g_s, a *tentative* weight update and its metric
(Eqs. 31-32, §6.4)::

    g|s = I - t_s t_s^T,     t_s = tanh(tau (W - eta * natural_gradient(W, g_s))).

The tentative weights are discarded; they only define the flow's constraint.

Curvature (Eq. 32)::      -2 Ric(g) = (g|k1 - g|k2)/(k1 - k2) - (g|j1 - g|j2)/(j1 - j2)
Discrete flow (Eq. 34):   g(t+1)|k1 - g(t)|k1 = -2 Ric(g(t)),   g(0)|k1 = I - t0 t0^T
Residual N (Eq. 35):      N = || g(t+1)|k1 - g(t)|k1 - (-2 Ric(g(t))) ||_F^2
Gate (Eq. 36):            the layer's natural gradient is multiplied by 1[N <= epsilon].

The metrics are those the update uses (:mod:`ricci_jax.lne`): each block of
a layer has the rank-1 metric I - u u^T (Eq. 16) or the diagonal metric
diag(1 - u^2) (Eq. 14's Hessian), the layer's metric is block-diagonal, and N
is the sum of the blocks' squared residuals. The identities cancel in all
three expressions, so each rank-1 residual is a weighted sum of outer products
``sum_m c_m u_m u_m^T`` (:class:`Rank1Sum`) whose squared Frobenius norm needs
only the dot products of the vectors: O(M^2 n) for M outer products, never
O(n^2); the diagonal residual is elementwise.

**Which metrics enter Eq. 34** is left open by the paper (notes, ambiguity A4).
``reading`` selects:

* ``"lag"`` (default, A4 (ii)): g(t)|s are the previous step's tentative
  metrics, kept in the optimizer state; g(t+1)|k1 is this step's tentative k1
  metric. At step 0 every g(0)|s is I - t0 t0^T.
* ``"current"`` (A4 (i)): g(t)|s are all the metric of the current weights, so
  the curvature vanishes and N only penalises the tentative k1 step's change.
* ``"two_step"`` (A4 (iii), approximated): g(t)|s are this step's tentative
  metrics and g(t+1)|k1 that of a second tentative step on the k1 batch, which
  reuses the k1 gradient instead of computing a fresh one at W_k1.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ricci_jax import lne

Array = jax.Array

READINGS = ("lag", "current", "two_step")
TRANSLATION_MODES = ("roll", "pad")
STRATEGIES = ("auto", "loop", "vmap")


@dataclasses.dataclass(frozen=True)
class Shifts:
  """The four input translations in whole pixels: vertical k1, k2 and horizontal j1, j2.

  Defaults +1 / -1 (the paper only says the differences stay under 4 pixels).
  Order everywhere: (k1, k2, j1, j2).
  """

  k1: int = 1
  k2: int = -1
  j1: int = 1
  j2: int = -1

  def __post_init__(self):
    for name in ("k1", "k2", "j1", "j2"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"shift {name} must be a whole number of pixels, got {v!r}")
    if self.k1 == self.k2 or self.j1 == self.j2:
      raise ValueError(f"k1 != k2 and j1 != j2 are required (finite differences), got {self}")
    if abs(self.k1 - self.k2) >= 4 or abs(self.j1 - self.j2) >= 4:
      raise ValueError(f"|k1 - k2| and |j1 - j2| must stay under 4 pixels (RF-DNN §6.1), got {self}")

  @property
  def dk(self) -> int:
    return self.k1 - self.k2

  @property
  def dj(self) -> int:
    return self.j1 - self.j2

  def as_pixels(self) -> tuple[tuple[int, int], ...]:
    """(dy, dx) of each translation in the order k1, k2, j1, j2."""
    return ((self.k1, 0), (self.k2, 0), (0, self.j1), (0, self.j2))


def translate(images: Array, dy: int, dx: int, mode: str = "roll") -> Array:
  """Translates NHWC ``images`` by whole pixels (``dy`` down, ``dx`` right).

  ``roll`` wraps around; ``pad`` pads with zeros and crops (content shifted out
  is lost).
  """
  if mode not in TRANSLATION_MODES:
    raise ValueError(f"unknown translation mode {mode!r}; valid: {', '.join(TRANSLATION_MODES)}")
  if images.ndim != 4:
    raise ValueError(f"translate expects NHWC images, got shape {images.shape}")
  if mode == "roll":
    return jnp.roll(images, (dy, dx), axis=(1, 2))
  h, w = images.shape[1:3]
  py, px = abs(dy), abs(dx)
  padded = jnp.pad(images, ((0, 0), (py, py), (px, px), (0, 0)))
  return padded[:, py - dy: py - dy + h, px - dx: px - dx + w, :]


def subsample(batch: Any, fraction: float) -> Any:
  """Every ``round(1/fraction)``-th example of every array in ``batch`` (leading axis).

  Strided rather than a prefix, so a batch split evenly across devices selects
  the same examples as on one device.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  stride = max(1, round(1.0 / fraction))
  return jax.tree.map(lambda x: x[::stride], batch)


def translated_grads(
    loss_fn: Callable[[Any, Any], Array],
    params: Any,
    batch: Mapping[str, Array],
    shifts: Shifts = Shifts(),
    fraction: float = 0.125,
    *,
    image_key: str = "image",
    mode: str = "roll",
    strategy: str = "auto",
) -> Any:
  """The four gradients on the translated batches, computed together in one program.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``; the gradients are those of
      its value with respect to ``params`` (through each quantizer's
      estimator, so for a quantized kernel: the STE gradient).
    params: the parameters.
    batch: a mapping whose ``image_key`` entry holds NHWC images; other
      entries (labels, ...) are subsampled alongside and passed unchanged.
    shifts: the translations.
    fraction: the share of the batch used (strided, :func:`subsample`);
      1 is the paper's cost (four extra forward-backward passes).
    image_key: where the images are in ``batch``.
    mode: ``"roll"`` or ``"pad"`` (:func:`translate`).
    strategy: ``"vmap"`` batches the four passes into one; ``"loop"`` writes
      them out one after the other in the same jitted program. On the CPU the
      loop is faster (XLA's CPU convolutions handle the vmapped weight
      gradients poorly), so ``"auto"`` picks the loop on CPU and vmap on
      accelerators.

  Returns:
    A tree like ``params`` whose leaves have a leading axis of 4, in the order
    (k1, k2, j1, j2). No gradient flows back through these tentative passes.
  """
  if image_key not in batch:
    raise ValueError(f"batch has no {image_key!r} entry (keys: {sorted(batch)})")
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
  if strategy == "auto":
    strategy = "loop" if jax.default_backend() == "cpu" else "vmap"
  small = subsample(batch, fraction)
  images = small[image_key]
  moved = [translate(images, dy, dx, mode) for dy, dx in shifts.as_pixels()]

  def one(imgs):
    return jax.grad(loss_fn)(params, {**small, image_key: imgs})

  if strategy == "vmap":
    grads = jax.vmap(one)(jnp.stack(moved))
  else:
    grads = jax.tree.map(lambda *g: jnp.stack(g), *[one(m) for m in moved])
  return jax.lax.stop_gradient(grads)


# ----------------------------------------------------------------------------
# Rank-1 algebra.
# ----------------------------------------------------------------------------


class Rank1Sum(NamedTuple):
  """The symmetric matrix ``sum_m coeffs[m] * outer(vectors[m], vectors[m])``."""

  coeffs: Array  # (M,)
  vectors: Array  # (M, n)

  def frobenius_sq(self) -> Array:
    """The squared Frobenius norm in O(M^2 n), accurate when the vectors nearly coincide.

    Written directly with the u_m, ``||sum_m c_m u_m u_m^T||_F^2 =
    sum_{m,m'} c_m c_m' (u_m . u_m')^2`` subtracts terms of size |u|^4 while N
    is often 1e-6 of that, and float32 cancellation swamps it. So the vectors
    are centred on r = u_0 first: with d_m = u_m - r (m >= 1), e = sum c_m d_m
    and A = sum_m c_m,

        sum_m c_m u_m u_m^T = X + Y + Z,  X = A r r^T,  Y = r e^T + e r^T,  Z = sum c_m d_m d_m^T,

    and with the dot products of r, e and the d_m (A = 0 for the flow residual
    and the curvature, so only the small differences enter)::

        |X|^2 = A^2 (r.r)^2          |Y|^2 = 2 (r.r)(e.e) + 2 (r.e)^2
        |Z|^2 = sum c_m c_m' (d_m.d_m')^2
        <X,Y> = 2 A (r.r)(r.e)       <X,Z> = A sum c_m (r.d_m)^2
        <Y,Z> = 2 sum c_m (r.d_m)(e.d_m)

    The result is clamped at 0 (rounding).
    """
    return _frobenius_sq(self.coeffs, self.vectors)

  def dense(self) -> Array:
    """The n x n matrix (a reference for tests)."""
    return jnp.einsum("m,mi,mj->ij", self.coeffs, self.vectors, self.vectors)


def _centred_gram(coeffs: Array, vectors: Array):
  """The basis (r, e, d_1 ... d_{M-1}) of :meth:`Rank1Sum.frobenius_sq` and its Gram matrix."""
  r = vectors[0]
  d = vectors[1:] - r[None]
  e = coeffs[1:] @ d
  basis = jnp.concatenate([r[None], e[None], d], axis=0)
  return basis, basis @ basis.T


def _frobenius_from_gram(coeffs: Array, g: Array) -> Array:
  c, a = coeffs[1:], jnp.sum(coeffs)
  rr, re, ee = g[0, 0], g[0, 1], g[1, 1]
  rd, ed, dd = g[0, 2:], g[1, 2:], g[2:, 2:]
  total = (a * a * rr * rr + 2.0 * (rr * ee + re * re) + c @ (dd * dd) @ c
           + 2.0 * (2.0 * a * rr * re + a * jnp.sum(c * rd * rd) + 2.0 * jnp.sum(c * rd * ed)))
  return jnp.maximum(total, 0.0)


@jax.custom_vjp
def _frobenius_sq(coeffs: Array, vectors: Array) -> Array:
  return _frobenius_from_gram(coeffs, _centred_gram(coeffs, vectors)[1])


def _frobenius_sq_fwd(coeffs, vectors):
  basis, g = _centred_gram(coeffs, vectors)
  return _frobenius_from_gram(coeffs, g), (coeffs, basis, g)


def _frobenius_sq_bwd(residuals, cotangent):
  """dN/du_m = 4 c_m R u_m, each R u_m a combination of the basis rows: one (M x M+1) @ (M+1 x n) product.

  With u_m = r + d_m (d_0 = 0) and R = A r r^T + r e^T + e r^T + sum_k c_k d_k d_k^T:
  R u_m = (A (r.u_m) + e.u_m) r + (r.u_m) e + sum_k c_k (d_k.u_m) d_k, and every
  dot product is an entry of the Gram matrix the forward computed. The
  coefficients are constants: their cotangent is 0.
  """
  coeffs, basis, g = residuals
  c, a = coeffs[1:], jnp.sum(coeffs)
  zero = jnp.zeros((1,), g.dtype)
  r_dot_u = g[0, 0] + jnp.concatenate([zero, g[0, 2:]])  # (M,)
  e_dot_u = g[0, 1] + jnp.concatenate([zero, g[1, 2:]])
  d_dot_u = g[2:, 0][:, None] + jnp.concatenate([jnp.zeros((g.shape[0] - 2, 1), g.dtype), g[2:, 2:]], axis=1)
  k = jnp.concatenate([(a * r_dot_u + e_dot_u)[:, None], r_dot_u[:, None], (c[:, None] * d_dot_u).T], axis=1)
  grad_vectors = 4.0 * coeffs[:, None] * (k @ basis)
  return jnp.zeros_like(coeffs), cotangent * grad_vectors


_frobenius_sq.defvjp(_frobenius_sq_fwd, _frobenius_sq_bwd)


def _block_steps(w: Array, shift_grads: Array, tau: Array, flow_step: Array, approx: str, metric: str,
                 block: str | int) -> Array:
  """eta * g^-1 g_s per shift, as (4, blocks, m) float32, held constant (stop_gradient)."""
  nat = jax.vmap(lambda g: lne.natural_gradient(w, g, tau, approx, metric=metric, block=block))(shift_grads)
  blocks = jax.vmap(lambda x: lne.to_blocks(x, block))(nat)
  return jax.lax.stop_gradient(flow_step * blocks)


def tentative_steps(
    w: Array, shift_grads: Array, tau: Array, flow_step: Array, approx: str = "weak", *,
    metric: str = "rank1", block: str | int = "layer",
) -> Array:
  """eta * g^-1 g_s for each shift, flattened in block order to (4, n) float32, held constant (stop_gradient)."""
  return _block_steps(w, shift_grads, tau, flow_step, approx, metric, block).reshape(4, -1)


def tentative_vectors(
    w: Array, shift_grads: Array, tau: Array, flow_step: Array, approx: str = "weak", *,
    metric: str = "rank1", block: str | int = "layer",
) -> Array:
  """t_s = tanh(tau (W - eta g^-1 g_s)) for each shift: the metrics g|s (I - t_s t_s^T, or diag(1 - t_s^2)).

  Args:
    w: latent weights of one layer.
    shift_grads: the four translated gradients, shape (4, *w.shape).
    tau: the metric's tau (a scalar or one per block, :func:`ricci_jax.lne.resolve_tau`).
    flow_step: eta, the tentative step size.
    approx: the inverse used for the tentative natural gradient.
    metric, block: the metric and what one metric covers (:mod:`ricci_jax.lne`).

  Returns:
    (4, n) float32: one row per shift, order (k1, k2, j1, j2), each the
    layer's blocks one after the other (:func:`ricci_jax.lne.to_blocks`;
    for ``block="layer"`` the flattened kernel). The tentative step is held
    constant (stop_gradient); the result depends on ``w`` only through
    ``tanh(tau w)``.
  """
  wb = lne.to_blocks(w, block)
  steps = _block_steps(w, shift_grads, tau, flow_step, approx, metric, block)
  return jnp.tanh(lne.tau_column(tau, wb.shape[0])[None] * (wb[None] - steps)).reshape(4, -1)


def curvature(tk1: Array, tk2: Array, tj1: Array, tj2: Array, shifts: Shifts = Shifts()) -> Rank1Sum:
  r"""-2 Ric(g) of Eq. 32 for metrics I - t t^T, as a :class:`Rank1Sum`.

  :math:`\frac{g|_{k1} - g|_{k2}}{k_1-k_2} - \frac{g|_{j1} - g|_{j2}}{j_1-j_2}
  = \frac{-t_{k1}t_{k1}^T + t_{k2}t_{k2}^T}{\Delta k} + \frac{t_{j1}t_{j1}^T - t_{j2}t_{j2}^T}{\Delta j}`.
  """
  dk, dj = float(shifts.dk), float(shifts.dj)
  coeffs = jnp.array([-1.0 / dk, 1.0 / dk, 1.0 / dj, -1.0 / dj], jnp.float32)
  return Rank1Sum(coeffs, jnp.stack([tk1, tk2, tj1, tj2]))


def residual_coefficients(shifts: Shifts = Shifts()) -> Array:
  """The c_m of Eq. 34's residual over (g(t+1)|k1, g(t)|k1, g(t)|k2, g(t)|j1, g(t)|j2); they sum to 0."""
  dk, dj = float(shifts.dk), float(shifts.dj)
  return jnp.array([-1.0, 1.0 + 1.0 / dk, -1.0 / dk, -1.0 / dj, 1.0 / dj], jnp.float32)


def flow_residual(t_next_k1: Array, previous: Array, shifts: Shifts = Shifts()) -> Rank1Sum:
  r"""The residual of the discrete Ricci flow (Eq. 34) for one rank-1 metric, whose squared norm is N (Eq. 35).

  :math:`R = g(t+1)|_{k1} - g(t)|_{k1} - (-2\,\mathrm{Ric}(g(t)))` with
  g(t+1)|k1 = I - a a^T (``a = t_next_k1``) and g(t)|s = I - u_s u_s^T
  (``previous = [u_k1, u_k2, u_j1, u_j2]``); the identities cancel::

      R = -a a^T + (1 + 1/dk) u_k1 u_k1^T - (1/dk) u_k2 u_k2^T
                 - (1/dj) u_j1 u_j1^T + (1/dj) u_j2 u_j2^T
  """
  return Rank1Sum(residual_coefficients(shifts), jnp.concatenate([t_next_k1[None], previous], axis=0))


def flow_residual_dense(t_next_k1: Array, previous: Array, shifts: Shifts = Shifts()) -> Array:
  """Eq. 34's residual built from dense n x n metrics, literally as printed (test reference)."""
  n = t_next_k1.size
  metric = lambda t: jnp.eye(n, dtype=t.dtype) - jnp.outer(t, t)  # noqa: E731
  gk1, gk2, gj1, gj2 = (metric(u) for u in previous)
  ricci = (gk1 - gk2) / shifts.dk - (gj1 - gj2) / shifts.dj
  return metric(t_next_k1) - gk1 - ricci


def _diagonal_frobenius_sq(coeffs: Array, vectors: Array) -> Array:
  """|sum_m c_m diag(u_m^2)|_F^2 = sum_i (sum_m c_m u_mi^2)^2, centred on u_0 as :meth:`Rank1Sum.frobenius_sq`.

  With r = u_0, d_m = u_m - r: sum_m c_m u_m^2 = A r^2 + 2 r e + sum_m c_m d_m^2,
  e = sum_m c_m d_m, A = sum_m c_m (0 for the flow residual), so only the
  small differences enter and float32 keeps N's digits.
  """
  r = vectors[0]
  d = vectors[1:] - r[None]
  c = coeffs[1:]
  diag = jnp.sum(coeffs) * r * r + 2.0 * r * (c @ d) + c @ (d * d)
  return jnp.sum(diag * diag)


def residual_squared_norm(t_next_k1: Array, previous: Array, shifts: Shifts = Shifts(), *,
                          metric: str = "rank1", blocks: int = 1) -> Array:
  """N of Eq. 35 for a layer whose metric is block-diagonal: the sum of every block's squared residual.

  Args:
    t_next_k1: (n,) g(t+1)|k1's vector, blocks one after the other.
    previous: (4, n) the vectors of g(t)|k1, g(t)|k2, g(t)|j1, g(t)|j2.
    shifts: the translations (their differences weight the curvature).
    metric: ``"rank1"`` (each block's metric I - u u^T: the rank-1
      Frobenius algebra, O(25 n)) or ``"hessian_diagonal"`` (diag(1 - u^2)).
    blocks: number of equal blocks the n entries form.
  """
  coeffs = residual_coefficients(shifts)
  vectors = jnp.concatenate([t_next_k1[None], previous], axis=0)
  if metric == "hessian_diagonal":
    return _diagonal_frobenius_sq(coeffs, vectors)
  vectors = vectors.reshape(5, blocks, -1)
  if blocks == 1:
    return _frobenius_sq(coeffs, vectors[:, 0])
  return jnp.sum(jax.vmap(lambda v: _frobenius_sq(coeffs, v), in_axes=1)(vectors))


def flow_vectors(
    w: Array, shift_grads: Array, previous: Array, tau: Array, flow_step: Array,
    approx: str = "weak", reading: str = "lag", *, metric: str = "rank1", block: str | int = "layer",
) -> tuple[Array, Array, Array]:
  """The vectors entering Eq. 34 under ``reading``, as functions of ``w`` (blocks one after the other).

  Returns:
    ``(t_next_k1, t_prev, to_store)``: g(t+1)|k1's vector (n,), the four
    g(t)|s vectors (4, n), and the four vectors to keep in the state for the
    next step (4, n).
  """
  if reading not in READINGS:
    raise ValueError(f"unknown reading {reading!r}; valid: {', '.join(READINGS)}")
  wb = lne.to_blocks(w, block)
  tau_col = lne.tau_column(tau, wb.shape[0])
  steps = _block_steps(w, shift_grads, tau, flow_step, approx, metric, block)  # (4, B, m)
  if reading == "lag":
    # only g(t+1)|k1 depends on w: the other rows stay out of the derivative
    store = jax.lax.stop_gradient(jnp.tanh(tau_col[None] * (wb[None] - steps))).reshape(4, -1)
    return jnp.tanh(tau_col * (wb - steps[0])).reshape(-1), previous, store
  tentative = jnp.tanh(tau_col[None] * (wb[None] - steps)).reshape(4, -1)
  if reading == "current":
    t = jnp.tanh(tau_col * wb).reshape(-1)
    return tentative[0], jnp.broadcast_to(t, tentative.shape), tentative
  # two_step: a second tentative step on the k1 batch, reusing the k1 gradient
  t_next = jnp.tanh(tau_col * (wb - 2.0 * steps[0])).reshape(-1)
  return t_next, tentative, tentative


def residual_norm(
    w: Array, shift_grads: Array, previous: Array, tau: Array, flow_step: Array,
    approx: str = "weak", reading: str = "lag", shifts: Shifts = Shifts(), normalize: bool = False, *,
    metric: str = "rank1", block: str | int = "layer",
) -> tuple[Array, Array]:
  """N of Eq. 35 for one layer, and the vectors to store for the next step.

  Differentiable in ``w`` through ``tanh(tau w)`` only (the tentative steps and
  ``tau`` are held constant): ``jax.grad`` of this gives the regulariser's
  gradient. The metric is the one the update uses (``metric``, ``block``);
  ``normalize`` divides N by n (not in the paper; ambiguity A5).
  """
  metric, approx = lne.resolve_metric(metric, approx)
  t_next, t_prev, store = flow_vectors(w, shift_grads, previous, tau, flow_step, approx, reading,
                                       metric=metric, block=block)
  blocks, _ = lne.block_shape(w.shape, block)
  n = residual_squared_norm(t_next, t_prev, shifts, metric=metric, blocks=blocks)
  if normalize:
    n = n / w.size
  return n, store


def initial_previous(w: Array, tau: Array, block: str | int = "layer") -> Array:
  """g(0)|s = g(t0) for every shift (the initial condition of Eq. 34): shape (4, n), blocks in order."""
  t0 = lne.block_vectors(w, tau, block).reshape(-1)
  return jnp.broadcast_to(t0, (4, t0.size))
