"""Gradient estimators: the backward half of every quantizer.

A quantizer's forward (sign, a uniform staircase, ...) has a derivative that is
zero almost everywhere. An *estimator* replaces that derivative by a surrogate
``mu'(x)``, and the backward of the quantizer becomes ``g * mu'(x)`` for the
incoming cotangent ``g``. Every estimator here is such a surrogate derivative:
a pure function ``(x, **hparams) -> mu'(x)`` of the latent value ``x`` (the
whole tensor, so estimators that use tensor statistics, like DoReFa's max, can
see it) and of its hyperparameters.

Hyperparameters are arrays, never Python constants baked into the trace, so a
schedule (``ricci_jax.schedules``) can change them every step without
recompiling the train step.

Estimators are looked up by name in :data:`ESTIMATORS`; :func:`get_estimator`
raises a ``ValueError`` that lists the valid names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Hparams = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Estimator:
  """A named surrogate derivative with its hyperparameters.

  Attributes:
    name: registry name, e.g. ``"clipped_ste"``.
    surrogate: ``(x, **hparams) -> mu'(x)``, the same shape as ``x``.
    defaults: default value of every hyperparameter (the complete set of names
      the estimator accepts, plus those listed in ``optional``).
    optional: hyperparameters that may be given but have no default (they are
      derived from the others when absent, e.g. EDE's ``k`` from ``t``).
    check: validates *concrete* hyperparameter values, raising ``ValueError``.
      Traced values (inside ``jit``) cannot be checked and are passed through.
    reference: the paper (and code) the formula comes from.
  """

  name: str
  surrogate: Callable[..., Array]
  defaults: Mapping[str, float]
  optional: tuple[str, ...] = ()
  check: Callable[[Mapping[str, Any]], None] | None = None
  reference: str = ""

  def resolve(self, hparams: Hparams) -> dict[str, Array]:
    """Fills defaults, rejects unknown names, validates, converts to arrays."""
    allowed = set(self.defaults) | set(self.optional)
    unknown = sorted(set(hparams) - allowed)
    if unknown:
      raise ValueError(
          f"estimator {self.name!r} got unknown hyperparameter(s) {unknown}; "
          f"it accepts {sorted(allowed) or 'none'}"
      )
    values = {**self.defaults, **{k: v for k, v in hparams.items() if v is not None}}
    if self.check is not None:
      concrete = {k: v for k, v in values.items() if _is_concrete(v)}
      self.check({k: np.asarray(v) for k, v in concrete.items()})
    return {k: jnp.asarray(v, dtype=jnp.float32) for k, v in values.items()}

  def __call__(self, x: Array, **hparams) -> Array:
    """The surrogate derivative at ``x`` (hyperparameters resolved first)."""
    return self.surrogate(x, **self.resolve(hparams))


def _is_concrete(v) -> bool:
  """False for tracers: their values cannot be checked before the program runs."""
  return not isinstance(v, jax.core.Tracer)


def _require(condition, message: str):
  if not np.all(condition):
    raise ValueError(message)


def _sech2(x: Array) -> Array:
  """1 - tanh(x)^2, computed as 1 / cosh(x)^2 (no cancellation where tanh is near 1)."""
  return 1.0 / jnp.square(jnp.cosh(x))


# ----------------------------------------------------------------------------
# The surrogate derivatives. Each docstring states forward and backward.
# ----------------------------------------------------------------------------


def ste(x: Array) -> Array:
  r"""Straight-through estimator (Bengio, Léonard, Courville 2013).

  Forward: the quantizer's own (``sign`` for binarization).
  Backward: :math:`\partial L/\partial x = g` (identity, no clipping).
  """
  return jnp.ones_like(x)


def clipped_ste(x: Array, clip: Array) -> Array:
  r"""Clipped STE (BinaryConnect, Courbariaux et al. 2015; BNN, Hubara et al. 2016).

  Forward: ``sign(x)``.
  Backward: :math:`g \cdot 1[|x| \le c]`, ``c = clip = 1`` by default. This is
  RF-DNN Eq. 1 and the ``I`` of Eq. 25.
  """
  return (jnp.abs(x) <= clip).astype(x.dtype)


def dorefa(x: Array) -> Array:
  r"""DoReFa weight estimator (Zhou et al. 2016, as written in the MetaQuant code).

  Forward: quantize :math:`\tilde w = \tanh(w)/\max|\tanh(w)|` (for one bit the
  sign of ``w`` itself).
  Backward: :math:`g \cdot (1-\tanh^2 w)/\max|\tanh w|`, the max over the whole
  tensor and treated as a constant.
  """
  return _sech2(x) / jnp.maximum(jnp.max(jnp.abs(jnp.tanh(x))), jnp.finfo(x.dtype).tiny)


def md_tanh(x: Array, beta: Array) -> Array:
  r"""Mirror descent with the tanh mirror map, MD-tanh (Ajanthan et al. 2021).

  Forward: ``sign(x)`` (the straight-through "-S" variant; the soft variant
  uses ``tanh(beta x)`` in the forward during training).
  Backward: :math:`g \cdot \beta (1 - \tanh^2(\beta x))`, with ``beta``
  annealed upward (:func:`ricci_jax.schedules.md_tanh_beta`: x1.01 every 100
  steps in the official code).
  """
  return beta * _sech2(beta * x)


def approx_sign(x: Array) -> Array:
  r"""ApproxSign (Bi-Real Net, Liu et al. ECCV 2018).

  Forward: ``sign(x)``.
  Backward: :math:`g \cdot (2 - 2|x|)` for :math:`|x| \le 1`, else 0: the
  derivative of the piecewise-quadratic approximation of sign.
  """
  return jnp.maximum(2.0 - 2.0 * jnp.abs(x), 0.0)


def swish_sign(x: Array, beta: Array) -> Array:
  r"""SwishSign (BNN+, Darabi et al. 2018), in larq's form.

  Forward: ``sign(x)``.
  Backward: :math:`g \cdot \beta (2 - \beta x \tanh(\beta x / 2)) / (1 + \cosh(\beta x))`,
  ``beta = 5`` by default.
  """
  bx = beta * x
  return beta * (2.0 - bx * jnp.tanh(bx / 2.0)) / (1.0 + jnp.cosh(bx))


def ede(x: Array, t: Array, k: Array | None = None) -> Array:
  r"""Error decay estimator, EDE (IR-Net, Qin et al. CVPR 2020).

  Forward: ``sign(x)``.
  Backward: :math:`g \cdot k t (1 - \tanh^2(t x))` with :math:`k = \max(1/t, 1)`
  unless given. ``t`` rises log-linearly over training
  (:func:`ricci_jax.schedules.ede_t`): :math:`t = T_{min} 10^{(i/N)\log_{10}(T_{max}/T_{min})}`.
  """
  if k is None:
    k = jnp.maximum(1.0 / t, 1.0)
  return k * t * _sech2(t * x)


def reste(x: Array, o: Array, t: Array, m: Array) -> Array:
  r"""Rectified straight-through estimator, ReSTE (Wu et al. ICCV 2023).

  Forward: ``sign(x)`` (ours maps 0 to +1; the official code's torch.sign maps
  it to 0).
  Backward, exactly as the official ``Binary_ReSTE`` (equivalent forward
  :math:`f(x)=\mathrm{sign}(x)|x|^{1/o}`, ``o >= 1``):

  * :math:`g \cdot m^{1/o}/m` for :math:`|x| \le m` (the secant plateau,
    ``m = 0.1``; 4.6416 for ``o = 3``),
  * :math:`g \cdot \tfrac1o |x|^{(1-o)/o}` for :math:`m < |x| \le t`,
  * 0 for :math:`|x| > t` (``t = 1.5``).

  ``o`` follows a cosine ramp to ``o_end = 3`` (:func:`ricci_jax.schedules.reste_o`).
  """
  a = jnp.abs(x).astype(jnp.float32)
  plateau = jnp.power(m, 1.0 / o) / m
  # Evaluate the power only where it is used, so |x| = 0 never meets a negative
  # exponent (its value would be discarded, but its gradient would be NaN).
  safe = jnp.where(a > m, a, 1.0)
  power = (1.0 / o) * jnp.power(safe, (1.0 - o) / o)
  out = jnp.where(a <= m, plateau, jnp.where(a <= t, power, 0.0))
  return out.astype(x.dtype)


def identity(x: Array) -> Array:
  r"""Identity coarse STE, :math:`\mu(x) = x` (Yin et al. ICLR 2019).

  Forward: the quantized ReLU staircase.
  Backward: :math:`g` everywhere. The same numbers as :func:`ste`, kept under
  the coarse-gradient papers' name.
  """
  return jnp.ones_like(x)


def relu(x: Array) -> Array:
  r"""Vanilla-ReLU coarse STE, :math:`\mu(x) = \max(x, 0)` (Yin et al. ICLR 2019).

  Forward: the quantized ReLU staircase.
  Backward: :math:`g \cdot 1[x > 0]`.
  """
  return (x > 0).astype(x.dtype)


def clipped_relu(x: Array, upper: Array | None = None) -> Array:
  r"""Clipped-ReLU coarse STE, :math:`\mu(x) = \min(\max(x, 0), u)` (Yin et al. ICLR 2019).

  Forward: the quantized ReLU staircase
  :math:`\alpha\,\mathrm{clip}(\lceil x/\alpha\rceil, 0, 2^b-1)`.
  Backward: :math:`g \cdot 1[0 < x \le u]`, ``u = (2^b - 1) alpha`` (filled in
  by :func:`ricci_jax.quantizers.staircase_relu`; 1 otherwise).
  """
  if upper is None:
    upper = 1.0
  return ((x > 0) & (x <= upper)).astype(x.dtype)


# ----------------------------------------------------------------------------
# Validation of concrete hyperparameters.
# ----------------------------------------------------------------------------


def _positive(estimator: str, name: str, minimum: float = 0.0, strict: bool = True):
  """A check that hyperparameter ``name``, when concrete, is > (or >=) ``minimum``."""
  def check(h):
    if name in h:
      ok = h[name] > minimum if strict else h[name] >= minimum
      op = ">" if strict else ">="
      _require(ok, f"{estimator}: {name} must be {op} {minimum:g}, got {h[name]}")
  return check


def _all(*checks):
  def check(h):
    for c in checks:
      c(h)
  return check


def _check_reste_cut(h):
  if "t" in h and "m" in h:
    _require(h["t"] > h["m"], f"reste: the cut t must exceed the plateau m, got t={h['t']}, m={h['m']}")


ESTIMATORS: Mapping[str, Estimator] = {
    e.name: e
    for e in (
        Estimator("ste", ste, {}, reference="Bengio et al. 2013"),
        Estimator("clipped_ste", clipped_ste, {"clip": 1.0},
                  check=_positive("clipped_ste", "clip", strict=False),
                  reference="Courbariaux et al. 2015; Hubara et al. 2016; RF-DNN Eq. 1"),
        Estimator("dorefa", dorefa, {}, reference="Zhou et al. 2016 (MetaQuant code form)"),
        Estimator("md_tanh", md_tanh, {"beta": 1.0}, check=_positive("md_tanh", "beta"),
                  reference="Ajanthan et al. 2021"),
        Estimator("approx_sign", approx_sign, {}, reference="Liu et al. 2018 (Bi-Real Net)"),
        Estimator("swish_sign", swish_sign, {"beta": 5.0}, check=_positive("swish_sign", "beta"),
                  reference="Darabi et al. 2018 (BNN+)"),
        Estimator("ede", ede, {"t": 0.1}, optional=("k",),
                  check=_all(_positive("ede", "t"), _positive("ede", "k")),
                  reference="Qin et al. 2020 (IR-Net)"),
        Estimator("reste", reste, {"o": 3.0, "t": 1.5, "m": 0.1},
                  check=_all(_positive("reste", "o", 1.0, strict=False), _positive("reste", "m"),
                             _check_reste_cut),
                  reference="Wu et al. ICCV 2023 (official DravenALG/ReSTE code)"),
        Estimator("identity", identity, {}, reference="Yin et al. ICLR 2019"),
        Estimator("relu", relu, {}, reference="Yin et al. ICLR 2019"),
        Estimator("clipped_relu", clipped_relu, {}, optional=("upper",),
                  check=_positive("clipped_relu", "upper"),
                  reference="Yin et al. ICLR 2019; Long, Yin, Xin 2021"),
    )
}
"""Every estimator by name."""


def get_estimator(name: str) -> Estimator:
  """Returns the estimator called ``name`` or raises a ``ValueError`` listing the valid ones."""
  try:
    return ESTIMATORS[name]
  except (KeyError, TypeError):
    raise ValueError(
        f"unknown estimator {name!r}; valid estimators: {', '.join(ESTIMATORS)}"
    ) from None

