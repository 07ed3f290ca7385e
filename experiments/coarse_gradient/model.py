r"""The two-linear-layer binarized-ReLU model of Yin et al. (ICLR 2019) and its closed forms.

Model (Yin et al. 2019, Sec. 2). A sample is a Gaussian matrix
:math:`Z \in \mathbb{R}^{m \times n}` with i.i.d. N(0, 1) entries; the
network output is :math:`y(Z; v, w) = v^\top \sigma(Z w)` with the binarized
ReLU :math:`\sigma(x) = 1[x > 0]`, a shared filter :math:`w \in \mathbb{R}^n`
and output weights :math:`v \in \mathbb{R}^m`. The teacher is
:math:`y^*(Z) = v^{*\top} \sigma(Z w^*)` with :math:`\|w^*\| = 1`, the sample
loss :math:`\ell = \tfrac12 (v^\top\sigma(Zw) - y^*(Z))^2` and the objective
the population loss :math:`f(v, w) = E_Z[\ell]`.

:math:`\sigma` is :func:`ricci_jax.staircase_relu` with ``bits=1`` and
``alpha=1`` (``clip(ceil(x), 0, 1) = 1[x > 0]``), so the sampled coarse
gradients below are plain ``jax.grad`` through the library's quantizer, with
the STE picked by name (``identity``: mu' = 1, ``relu``: mu' = 1[x > 0],
``clipped_relu``: mu' = 1[0 < x <= 1]).

Closed forms (Lemmas 1, 2, 4, 7 of the ICLR'19 submission text; re-derived and
checked against Monte Carlo in ``tests/test_coarse_gradient.py``), with
:math:`\theta = \angle(w, w^*)`, :math:`\hat w = w/\|w\|`:

* :math:`f = \tfrac18[v^\top(I+11^\top)v - 2v^\top((1-2\theta/\pi)I + 11^\top)v^* + v^{*\top}(I+11^\top)v^*]`
* :math:`\partial f/\partial v = \tfrac14(I+11^\top)v - \tfrac14((1-2\theta/\pi)I+11^\top)v^*`
* :math:`\partial f/\partial w = -\frac{v^\top v^*}{2\pi\|w\|}\frac{(I-\hat w\hat w^\top)w^*}{\|(I-\hat w\hat w^\top)w^*\|}`
* :math:`E[g_{relu}] = \frac{h(v,v^*)}{2\sqrt{2\pi}}\hat w - \frac{\cos(\theta/2)\, v^\top v^*}{\sqrt{2\pi}}\frac{\hat w + w^*}{\|\hat w + w^*\|}`,
  :math:`h = \|v\|^2 + (1^\top v)^2 - (1^\top v)(1^\top v^*) + v^\top v^*`
* :math:`E[g_{id}] = \frac{1}{\sqrt{2\pi}}(\|v\|^2 \hat w - (v^\top v^*) w^*)`

The notes give no closed form for the clipped-ReLU STE. We derived one
(:func:`expected_coarse_grad_clipped_relu`, involving the normal cdf; our
work, not the paper's) and check it against Monte Carlo in the tests; the
Monte-Carlo path (:func:`mc_coarse_grad_w`, fresh Gaussian samples) is kept
and used as a cross-check in the experiments.

Every printed formula above agreed with our Monte-Carlo checks; none had to
be corrected. Two facts the notes do not state, checked here and in the tests:

* the spurious point of Theorem 1 is a local minimiser only when
  :math:`v^\top v^* < 0` there, i.e. :math:`(1^\top v^*)^2 < \frac{m+1}{2}\|v^*\|^2`
  (:func:`spurious_is_local_min`); otherwise it is a saddle;
* at the spurious point the ReLU and clipped-ReLU expected coarse gradients
  vanish exactly (h = 0 there, and at theta = pi the teacher term
  :math:`1[Z_i w^* > 0] = 1 - \sigma(Z_i w)`), so the spurious point is a fixed
  point of Algorithm 1 for those STEs but not for the identity STE.

Everything is float32 and pure; functions of one point (``v``, ``w``) are
``jit``/``vmap``-able.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import ricci_jax as rj

Array = jax.Array

SQRT_2PI = math.sqrt(2.0 * math.pi)
STES = ("identity", "relu", "clipped_relu")
"""The coarse STEs of Yin et al. 2019, as named in :mod:`ricci_jax.estimators`."""
CLOSED_FORM_STES = ("identity", "relu", "clipped_relu")
"""The STEs with a closed-form expected coarse gradient (clipped ReLU: ours)."""


def prng_key(seed: int) -> Array:
  """The experiments' PRNG key: JAX's ``rbg`` implementation.

  Its random bits come from XLA's RngBitGenerator, which compiles several
  times faster on CPU than the default threefry (whose unrolled hash dominated
  the compile time of the short runs). Streams differ from threefry's.
  """
  return jax.random.key(seed, impl="rbg")


class Teacher(NamedTuple):
  """The teacher parameters ``(v*, w*)``; ``w*`` has unit norm."""

  v_star: Array
  w_star: Array


def make_teacher(v_star, w_star) -> Teacher:
  """Builds a :class:`Teacher`, normalising ``w*`` to unit norm (the model's assumption).

  Raises:
    ValueError: if the shapes are not 1-D or ``w*`` is zero.
  """
  v_star = jnp.asarray(v_star, jnp.float32)
  w_star = jnp.asarray(w_star, jnp.float32)
  if v_star.ndim != 1 or w_star.ndim != 1:
    raise ValueError(f"v* and w* must be vectors, got shapes {v_star.shape} and {w_star.shape}")
  norm = float(jnp.linalg.norm(w_star))
  if not norm > 0:
    raise ValueError("w* must be nonzero")
  return Teacher(v_star, w_star / norm)


def random_teacher(rng: np.random.Generator, m: int, n: int) -> Teacher:
  """A teacher with ``v* ~ N(0, I_m)`` and ``w*`` uniform on the unit sphere of R^n.

  Set-up draws use NumPy (no XLA compilation); JAX keys are kept for the
  Monte-Carlo samples inside compiled code.
  """
  return make_teacher(rng.standard_normal(m), rng.standard_normal(n))


def random_teachers(rng: np.random.Generator, num: int, m: int, n: int) -> Teacher:
  """``num`` independent :func:`random_teacher` draws, stacked (leading axis ``num``)."""
  w_star = rng.standard_normal((num, n))
  w_star /= np.linalg.norm(w_star, axis=1, keepdims=True)
  return Teacher(jnp.asarray(rng.standard_normal((num, m)), jnp.float32),
                 jnp.asarray(w_star, jnp.float32))


# ----------------------------------------------------------------------------
# Geometry.
# ----------------------------------------------------------------------------


def _safe_unit(x: Array) -> Array:
  """``x / ||x||``, and 0 where ``x`` is 0 (no NaN in values or gradients)."""
  sq = jnp.sum(x * x)
  ok = sq > 0
  return jnp.where(ok, x * jax.lax.rsqrt(jnp.where(ok, sq, 1.0)), 0.0)


def angle(w: Array, w_star: Array) -> Array:
  """The angle theta = angle(w, w*) in [0, pi].

  Computed as ``atan2(||(I - w^ w^T) w*||, w^ . w*)``, which stays accurate
  near 0 and pi, where ``arccos`` loses half the float32 digits.
  """
  u = _safe_unit(w)
  c = jnp.dot(u, w_star)
  s = jnp.linalg.norm(w_star - c * u)
  return jnp.arctan2(s, c)


# ----------------------------------------------------------------------------
# Closed forms.
# ----------------------------------------------------------------------------


def population_loss(v: Array, w: Array, teacher: Teacher) -> Array:
  r"""The population loss f(v, w) (Yin et al. 2019; the submission's closed form).

  :math:`f = \tfrac18[v^\top(I+11^\top)v - 2v^\top((1-2\theta/\pi)I+11^\top)v^* + v^{*\top}(I+11^\top)v^*]`.
  """
  vs = teacher.v_star
  theta = angle(w, teacher.w_star)
  vav = jnp.dot(v, v) + jnp.sum(v) ** 2
  vbv = (1.0 - 2.0 * theta / jnp.pi) * jnp.dot(v, vs) + jnp.sum(v) * jnp.sum(vs)
  sas = jnp.dot(vs, vs) + jnp.sum(vs) ** 2
  return (vav - 2.0 * vbv + sas) / 8.0


def grad_v(v: Array, w: Array, teacher: Teacher) -> Array:
  r"""The true partial gradient :math:`\partial f/\partial v` (Yin et al. 2019).

  :math:`\tfrac14(I+11^\top)v - \tfrac14((1-2\theta/\pi)I + 11^\top)v^*`.
  """
  vs = teacher.v_star
  theta = angle(w, teacher.w_star)
  return 0.25 * (v + jnp.sum(v)) - 0.25 * ((1.0 - 2.0 * theta / jnp.pi) * vs + jnp.sum(vs))


def grad_w(v: Array, w: Array, teacher: Teacher) -> Array:
  r"""The true partial gradient :math:`\partial f/\partial w` (Yin et al. 2019).

  :math:`-\frac{v^\top v^*}{2\pi\|w\|}\frac{(I-\hat w\hat w^\top)w^*}{\|(I-\hat w\hat w^\top)w^*\|}`,
  the derivative of :math:`\theta\,v^\top v^*/(2\pi)`. f is not differentiable
  at theta = 0 or pi (the direction is undefined there); we return 0 there.
  """
  ws = teacher.w_star
  norm_w = jnp.linalg.norm(w)
  u = w / norm_w
  perp = ws - jnp.dot(u, ws) * u
  return -jnp.dot(v, teacher.v_star) / (2.0 * jnp.pi * norm_w) * _safe_unit(perp)


def expected_coarse_grad_identity(v: Array, w: Array, teacher: Teacher) -> Array:
  r"""E_Z[g_id], the expected coarse gradient of the identity STE (Yin et al. 2019).

  :math:`\frac{1}{\sqrt{2\pi}}(\|v\|^2 \hat w - (v^\top v^*) w^*)`.
  """
  u = w / jnp.linalg.norm(w)
  return (jnp.dot(v, v) * u - jnp.dot(v, teacher.v_star) * teacher.w_star) / SQRT_2PI


def relu_h(v: Array, v_star: Array) -> Array:
  r""":math:`h(v, v^*) = \|v\|^2 + (1^\top v)^2 - (1^\top v)(1^\top v^*) + v^\top v^*` (Yin et al. 2019)."""
  return jnp.dot(v, v) + jnp.sum(v) ** 2 - jnp.sum(v) * jnp.sum(v_star) + jnp.dot(v, v_star)


def expected_coarse_grad_relu(v: Array, w: Array, teacher: Teacher) -> Array:
  r"""E_Z[g_relu], the expected coarse gradient of the vanilla-ReLU STE (Yin et al. 2019).

  :math:`\frac{h}{2\sqrt{2\pi}}\hat w - \frac{\cos(\theta/2)\,v^\top v^*}{\sqrt{2\pi}}\frac{\hat w+w^*}{\|\hat w+w^*\|}`.
  Since :math:`\|\hat w + w^*\| = 2\cos(\theta/2)` the second term equals
  :math:`\frac{v^\top v^*}{2\sqrt{2\pi}}(\hat w + w^*)`, which is how it is
  evaluated (no 0/0 at theta = pi).
  """
  u = w / jnp.linalg.norm(w)
  vv = jnp.dot(v, teacher.v_star)
  return (relu_h(v, teacher.v_star) * u - vv * (u + teacher.w_star)) / (2.0 * SQRT_2PI)


def _clipped_terms(w: Array, teacher: Teacher, upper: float):
  """``(w_hat, e, p1, a, b)`` of :func:`expected_coarse_grad_clipped_relu`."""
  norm_w = jnp.linalg.norm(w)
  w_hat = w / norm_w
  c = jnp.dot(w_hat, teacher.w_star)
  perp = teacher.w_star - c * w_hat
  s = jnp.linalg.norm(perp)
  e = _safe_unit(perp)
  r = upper / norm_w
  phi0 = 1.0 / SQRT_2PI
  phi_r = jnp.exp(-0.5 * r * r) / SQRT_2PI
  s_safe = jnp.maximum(s, jnp.finfo(jnp.float32).tiny)
  # Phi(r / sin) - 1/2 and Phi(r cot); the ratios go to +-inf (not NaN) as sin -> 0
  half_gap = jax.scipy.special.ndtr(r / s_safe) - 0.5
  cdf_cot = jax.scipy.special.ndtr(r * c / s_safe)
  p1 = phi0 - phi_r
  a = 0.5 * phi0 - phi_r * cdf_cot + c * phi0 * half_gap
  b = s * phi0 * half_gap
  return w_hat, e, p1, a, b


def expected_coarse_grad_clipped_relu(v: Array, w: Array, teacher: Teacher,
                                      upper: float = 1.0) -> Array:
  r"""E_Z[g_crelu] for the clipped-ReLU STE :math:`\mu' = 1[0 < x \le u]` (our derivation).

  Not in the notes (which give no closed form for the clipped ReLU); derived
  here the same way as the ReLU case and checked against Monte Carlo in the
  tests. With :math:`r = u/\|w\|`, :math:`\varphi` and :math:`\Phi` the
  standard normal pdf and cdf, :math:`e = (I-\hat w\hat w^\top)w^*/\sin\theta`:

  .. math::
     E[g_{crelu}] = \tfrac12 p_1 h(v, v^*)\,\hat w - (v^\top v^*)(A\hat w + B e),

  :math:`p_1 = \varphi(0) - \varphi(r)`,
  :math:`A = \tfrac12\varphi(0) - \varphi(r)\Phi(r\cot\theta) + \cos\theta\,\varphi(0)(\Phi(r/\sin\theta) - \tfrac12)`,
  :math:`B = \sin\theta\,\varphi(0)(\Phi(r/\sin\theta) - \tfrac12)`.
  As :math:`u \to \infty` this is the ReLU STE's :func:`expected_coarse_grad_relu`.
  The derivation: :math:`E[z\,1[0<z^\top\hat w\le r]] = p_1\hat w` and
  :math:`E[z\,1[0<z^\top\hat w\le r]\,1[z^\top w^*>0]] = A\hat w + Be`
  (integrate by parts in the plane of :math:`\hat w, w^*`).
  """
  w_hat, e, p1, a, b = _clipped_terms(w, teacher, upper)
  vv = jnp.dot(v, teacher.v_star)
  return 0.5 * p1 * relu_h(v, teacher.v_star) * w_hat - vv * (a * w_hat + b * e)


def correlation_clipped_relu(v: Array, w: Array, teacher: Teacher, upper: float = 1.0) -> Array:
  r"""Our closed form of :math:`\langle E[g_{crelu}], \partial f/\partial w\rangle` (>= 0).

  :math:`\frac{\sin\theta\,(v^\top v^*)^2}{(\sqrt{2\pi})^3\|w\|}(\Phi(u/(\|w\|\sin\theta)) - \tfrac12)`,
  between 0 and the ReLU STE's value, which it reaches as :math:`u \to \infty`.
  """
  _, _, _, _, b = _clipped_terms(w, teacher, upper)
  return jnp.dot(v, teacher.v_star) ** 2 * b / (2.0 * jnp.pi * jnp.linalg.norm(w))


def expected_coarse_grad(v: Array, w: Array, teacher: Teacher, estimator: str) -> Array:
  """The closed-form E_Z[g_mu] for ``estimator`` in :data:`CLOSED_FORM_STES` (clipped at u = 1)."""
  if estimator == "identity":
    return expected_coarse_grad_identity(v, w, teacher)
  if estimator == "relu":
    return expected_coarse_grad_relu(v, w, teacher)
  if estimator == "clipped_relu":
    return expected_coarse_grad_clipped_relu(v, w, teacher)
  raise ValueError(
      f"no closed-form expected coarse gradient for {estimator!r}; closed forms exist for "
      f"{list(CLOSED_FORM_STES)} (use the Monte-Carlo mc_coarse_grad_w)")


def correlation_formula(v: Array, w: Array, teacher: Teacher, estimator: str) -> Array:
  r"""The printed inner product :math:`\langle E[g_\mu], \partial f/\partial w\rangle`.

  ReLU: :math:`\frac{\sin\theta}{2(\sqrt{2\pi})^3\|w\|}(v^\top v^*)^2`; identity: twice
  that (Yin et al. 2019, submission text). Clipped ReLU (u = 1): our
  :func:`correlation_clipped_relu`.
  """
  if estimator == "clipped_relu":
    return correlation_clipped_relu(v, w, teacher)
  theta = angle(w, teacher.w_star)
  base = jnp.sin(theta) * jnp.dot(v, teacher.v_star) ** 2 / (2.0 * SQRT_2PI**3 * jnp.linalg.norm(w))
  if estimator == "relu":
    return base
  if estimator == "identity":
    return 2.0 * base
  raise ValueError(f"no correlation formula for {estimator!r}; valid: {list(STES)}")


# ----------------------------------------------------------------------------
# The spurious minimum of Theorem 1.
# ----------------------------------------------------------------------------


def spurious_v(v_star: Array) -> Array:
  r""":math:`v = (I + 11^\top)^{-1}(11^\top - I)v^*`, the v of the spurious minima.

  Since :math:`(I+11^\top)^{-1} = I - 11^\top/(m+1)` this is
  :math:`-v^* + \frac{2\,1^\top v^*}{m+1}1`.
  """
  m = v_star.shape[0]
  return -v_star + 2.0 * jnp.sum(v_star) / (m + 1.0)


def spurious_point(teacher: Teacher, w_norm: float = 1.0) -> tuple[Array, Array]:
  """``(v, w)`` at the spurious point: theta = pi (``w = -w_norm * w*``) and :func:`spurious_v`."""
  return spurious_v(teacher.v_star), -w_norm * teacher.w_star


def spurious_identity_norm(v_star: Array) -> Array:
  r"""The printed :math:`\|E[g_{id}]\|` at the spurious point (Theorem 1):
  :math:`\frac{2(m-1)(1^\top v^*)^2}{\sqrt{2\pi}(m+1)^2}`."""
  m = v_star.shape[0]
  return 2.0 * (m - 1.0) * jnp.sum(v_star) ** 2 / (SQRT_2PI * (m + 1.0) ** 2)


def spurious_is_local_min(v_star) -> bool:
  r"""Whether the spurious point is a local minimiser of f (our check, not printed in the notes).

  At theta = pi, :math:`\partial f/\partial v = 0` for the spurious v, and f
  changes to first order as :math:`(v^\top v^*/2\pi)\,d\theta` with
  :math:`d\theta \le 0`: a (non-smooth) local minimum needs
  :math:`v^\top v^* < 0`, i.e. :math:`(1^\top v^*)^2 < \frac{m+1}{2}\|v^*\|^2`.
  Otherwise the point is a saddle.
  """
  v_star = np.asarray(v_star, np.float64)
  m = v_star.shape[0]
  return bool(v_star.sum() ** 2 < (m + 1) / 2 * np.dot(v_star, v_star))


# ----------------------------------------------------------------------------
# Sampled losses and gradients (through ricci_jax.staircase_relu).
# ----------------------------------------------------------------------------


def binary_relu(x: Array, estimator: str = "relu") -> Array:
  """sigma(x) = 1[x > 0] as ``staircase_relu(x, bits=1, alpha=1)``; backward: the STE."""
  return rj.staircase_relu(x, 1, alpha=1.0, estimator=estimator)


def sample_inputs(key: Array, num: int, m: int, n: int) -> Array:
  """``num`` i.i.d. Gaussian inputs Z, shape ``(num, m, n)``."""
  return jax.random.normal(key, (num, m, n), jnp.float32)


def sample_loss(v: Array, w: Array, z: Array, teacher: Teacher, estimator: str = "relu") -> Array:
  r"""The sample loss :math:`\ell(v, w; Z) = \tfrac12(v^\top\sigma(Zw) - y^*(Z))^2` of one ``z``.

  Its ``jax.grad`` in ``v`` is Eq. (3) and in ``w`` the coarse gradient
  :math:`g_\mu` of Eq. (5) for the STE ``estimator``.
  """
  target = jnp.dot(teacher.v_star, (z @ teacher.w_star > 0).astype(z.dtype))
  return 0.5 * (jnp.dot(v, binary_relu(z @ w, estimator)) - target) ** 2


@functools.partial(jax.jit, static_argnames="estimator")
def per_sample_grads(v: Array, w: Array, z: Array, teacher: Teacher, estimator: str):
  """Per-sample ``(loss, dl/dv, g_mu)`` for a batch ``z`` of shape ``(num, m, n)``."""
  fn = jax.value_and_grad(sample_loss, argnums=(0, 1))
  loss, (gv, gw) = jax.vmap(fn, in_axes=(None, None, 0, None, None))(v, w, z, teacher, estimator)
  return loss, gv, gw


class MCEstimate(NamedTuple):
  """A Monte-Carlo mean and its standard error (same shape)."""

  mean: Array
  stderr: Array


def _mean_se(x: Array) -> MCEstimate:
  n = x.shape[0]
  return MCEstimate(jnp.mean(x, 0), jnp.std(x, 0, ddof=1) / jnp.sqrt(n))


@functools.partial(jax.jit, static_argnames=("estimator", "num"))
def mc_estimates(v: Array, w: Array, teacher: Teacher, estimator: str, key: Array,
                 num: int) -> dict[str, MCEstimate]:
  """Monte-Carlo estimates of f, df/dv and E[g_mu] at (v, w) from ``num`` fresh samples.

  Returns:
    ``{"loss", "grad_v", "coarse_grad_w"}``, each an :class:`MCEstimate`.
  """
  m, n = v.shape[0], w.shape[0]
  z = sample_inputs(key, num, m, n)
  loss, gv, gw = per_sample_grads(v, w, z, teacher, estimator)
  return {"loss": _mean_se(loss), "grad_v": _mean_se(gv), "coarse_grad_w": _mean_se(gw)}


@functools.partial(jax.jit, static_argnames=("estimator", "num"))
def mc_inner(v: Array, w: Array, teacher: Teacher, estimator: str, key: Array, num: int,
             direction: Array) -> MCEstimate:
  """Monte-Carlo estimate of ``<E[g_mu], direction>`` with the standard error of the mean."""
  z = sample_inputs(key, num, v.shape[0], w.shape[0])
  _, _, gw = per_sample_grads(v, w, z, teacher, estimator)
  return _mean_se(gw @ direction)


def mc_coarse_grad_w(v: Array, w: Array, teacher: Teacher, estimator: str, key: Array,
                     num: int) -> Array:
  """A Monte-Carlo estimate of E_Z[g_mu] from ``num`` fresh samples (jit-able; no stderr)."""
  z = sample_inputs(key, num, v.shape[0], w.shape[0])

  def batch_loss(w):
    return jnp.mean(jax.vmap(sample_loss, (None, None, 0, None, None))(v, w, z, teacher, estimator))

  return jax.grad(batch_loss)(w)


# ----------------------------------------------------------------------------
# Algorithm 1: full-batch coarse gradient descent.
# ----------------------------------------------------------------------------


class Trajectory(NamedTuple):
  """Per-iteration records of Algorithm 1 (index t is the iterate before step t+1)."""

  loss: Array  # f(v^t, w^t), closed form
  theta: Array  # angle(w^t, w*)
  v_err: Array  # ||v^t - v*||
  w_norm: Array  # ||w^t||
  coarse_norm: Array  # ||E[g_mu](v^t, w^t)|| as used by the step
  v: Array  # final v
  w: Array  # final w


@functools.partial(jax.jit, static_argnames=("estimator", "steps", "mc_samples"))
def coarse_gradient_descent(v0: Array, w0: Array, teacher: Teacher, *, estimator: str, lr: float,
                            steps: int, mc_samples: int | None = None,
                            key: Array | None = None) -> Trajectory:
  r"""Algorithm 1 of Yin et al. 2019 (full-batch coarse gradient descent).

  :math:`v^{t+1} = v^t - \eta\,\partial f/\partial v(v^t, w^t)`,
  :math:`w^{t+1} = w^t - \eta\,E_Z[g_\mu(v^t, w^t; Z)]`.

  The v step always uses the closed-form :func:`grad_v`. The w step uses the
  closed-form expectation (:func:`expected_coarse_grad`; for ``clipped_relu``
  our derived form) when ``mc_samples is None``; otherwise a Monte-Carlo
  average over ``mc_samples`` fresh Gaussian inputs per step.

  Args:
    v0, w0: the initial point.
    teacher: the teacher (v*, w*).
    estimator: ``identity``, ``relu`` or ``clipped_relu``.
    lr: the step size eta.
    steps: the number of iterations T.
    mc_samples: None for closed forms, else the Monte-Carlo sample size.
    key: PRNG key, required when ``mc_samples`` is given.

  Returns:
    A :class:`Trajectory` of ``steps + 1`` records (t = 0..T).
  """
  if estimator not in STES:
    raise ValueError(f"unknown coarse STE {estimator!r}; valid: {list(STES)}")
  if mc_samples is not None and key is None:
    raise ValueError("a Monte-Carlo coarse gradient needs a PRNG key")

  def coarse(v, w, t):
    if mc_samples is None:
      return expected_coarse_grad(v, w, teacher, estimator)
    return mc_coarse_grad_w(v, w, teacher, estimator, jax.random.fold_in(key, t), mc_samples)

  def record(v, w, g):
    return (population_loss(v, w, teacher), angle(w, teacher.w_star),
            jnp.linalg.norm(v - teacher.v_star), jnp.linalg.norm(w), jnp.linalg.norm(g))

  def step(carry, t):
    v, w = carry
    g = coarse(v, w, t)
    rec = record(v, w, g)
    return (v - lr * grad_v(v, w, teacher), w - lr * g), rec

  (v, w), recs = jax.lax.scan(step, (v0, w0), jnp.arange(steps))
  last = record(v, w, coarse(v, w, steps))
  recs = [jnp.concatenate([r, l[None]]) for r, l in zip(recs, last)]
  return Trajectory(*recs, v=v, w=w)
