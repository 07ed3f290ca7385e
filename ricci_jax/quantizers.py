"""Quantizers: pure, jit- and vmap-able forwards whose backward is an estimator.

Every quantizer here is a ``jax.custom_vjp`` whose forward is the discrete map
(sign, a uniform staircase, the quantized ReLU) and whose backward is
``g * mu'(x)`` for the surrogate derivative ``mu'`` of the chosen estimator
(``ricci_jax.estimators``). The output keeps the input's dtype.

=====================  ======================================================
``binarize``           sign with sign(0) = +1, values in {-1, +1}. RF-DNN Eq. 37.
``uniform``            k-bit uniform levels on [-1, 1]. RF-DNN Eq. 38.
``dorefa_weights``     tanh(w) / max|tanh(w)|, then ``binarize`` / ``uniform``.
``staircase_relu``     alpha * clip(ceil(x / alpha), 0, 2^b - 1), the coarse-
                       gradient papers' quantized ReLU.
``ridge_dequantize``   quantize, then the ridge-regression denoising
                       dequantization of Ye et al. (arXiv 2409.09245).
``binary_scale``       the weight scale modes: none, per-tensor or
                       per-channel mean|W|.
=====================  ======================================================

**A NaN never becomes a code**, so a corrupted latent tensor shows up as a NaN
loss instead of training on: sign and the staircase pass a NaN on at its
position; a NaN or inf in Eq. 38's max|x| or a ridge block's min/max (a NaN
in DoReFa's max|tanh w|) makes that scale non-finite, and its whole slice (the
tensor for ``axis=None``) is NaN. Infinities are the formulas' limits where those exist:
sign(+-inf) = +-1, the staircase's top level / 0, DoReFa's tanh(+-inf) = +-1.

``nm_sparsity_mask`` (the ridge code's N:M sparsity) lives in
:mod:`ricci_jax.pruning.nm` and stays importable from here.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ricci_jax.estimators import ESTIMATORS, get_estimator
from ricci_jax.pruning.nm import nm_sparsity_mask, parse_sparsity  # re-exported: quantizers.nm_sparsity_mask

__all__ = [
    "ESTIMATORS",
    "STAIRCASE_ALPHA",
    "SCALE_MODES",
    "sign",
    "binarize",
    "uniform",
    "dorefa_weights",
    "staircase_relu",
    "ridge_dequantize",
    "ridge_quantize",
    "ridge_fit",
    "nm_sparsity_mask",
    "binary_scale",
    "check_bits",
]

Array = jax.Array

STAIRCASE_ALPHA = {1: 1.2221, 2: 0.6511, 4: 0.1946}
"""Fixed staircase resolutions alpha (Lloyd's algorithm on half-Gaussian data,
from the coarse-gradient papers' code), by number of bits."""

SCALE_MODES = ("none", "tensor", "channel")
"""Binary-weight scale modes: none (RF-DNN), per-tensor mean|W| (ReSTE),
per-output-channel mean|W| (XNOR-Net)."""

COARSE_ESTIMATORS = ("identity", "relu", "clipped_relu")
"""The estimators that :func:`staircase_relu` accepts."""


def check_bits(bits) -> int:
  """Returns ``bits`` as an int, or raises if it is not an integer in [1, 16]."""
  if isinstance(bits, (bool, np.bool_)) or not isinstance(bits, numbers.Integral):
    raise ValueError(f"bits must be an integer in [1, 16], got {bits!r}")
  if not 1 <= int(bits) <= 16:
    raise ValueError(f"bits must be an integer in [1, 16], got {bits}")
  return int(bits)


def sign(x: Array) -> Array:
  """Sign that never returns 0: +1 for x >= 0, -1 otherwise (input dtype); NaN stays NaN.

  RF-DNN Eq. 37 with sign(0) = +1. ``x >= 0`` is False for NaN, which would
  read as -1, a valid code; NaN is passed on instead, as ``jnp.sign`` does.
  """
  s = jnp.where(x >= 0, 1, -1).astype(x.dtype)
  return jnp.where(jnp.isnan(x), x, s)


# ----------------------------------------------------------------------------
# The one straight-through core: a static forward, an estimator backward.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Forward:
  """The discrete forward map, hashable so it can be a static argument."""

  kind: str  # "sign" | "uniform" | "staircase"
  bits: int = 1
  axis: tuple[int, ...] | None = None  # uniform: axes of the max (None = all)
  alpha: float = 1.0  # staircase resolution

  def __call__(self, x: Array) -> Array:
    if self.kind == "sign":
      return sign(x)
    xf = x.astype(jnp.float32)
    if self.kind == "uniform":
      n = 2.0**self.bits - 1.0
      mx = jnp.max(jnp.abs(xf), axis=self.axis, keepdims=True)
      # a NaN or inf in the slice: an inf max would put every finite entry on the middle level
      mx = jnp.where(jnp.isfinite(mx), jnp.maximum(mx, jnp.finfo(jnp.float32).tiny), jnp.nan)
      q = 2.0 / n * jnp.round(n * (xf / (2.0 * mx) + 0.5)) - 1.0
    elif self.kind == "staircase":
      q = self.alpha * jnp.clip(jnp.ceil(xf / self.alpha), 0.0, 2.0**self.bits - 1.0)
    else:  # pragma: no cover - constructed only in this module
      raise AssertionError(self.kind)
    return q.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _straight_through(forward: _Forward, estimator: str, x: Array, hparams: dict) -> Array:
  del estimator, hparams
  return forward(x)


def _straight_through_fwd(forward, estimator, x, hparams):
  return forward(x), (x, hparams)


def _straight_through_bwd(forward, estimator, residuals, g):
  del forward
  x, hparams = residuals
  # Surrogates are evaluated in at least float32 so bfloat16 inputs keep their
  # accuracy (and float64 ones theirs).
  ct = jnp.promote_types(x.dtype, jnp.float32)
  d = ESTIMATORS[estimator].surrogate(x.astype(ct), **hparams)
  dx = (g.astype(ct) * d).astype(g.dtype)
  return dx, jax.tree.map(jnp.zeros_like, hparams)


_straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def _apply(forward: _Forward, x: Array, estimator: str, hparams: dict) -> Array:
  est = get_estimator(estimator)
  return _straight_through(forward, est.name, jnp.asarray(x), est.resolve(hparams))


# ----------------------------------------------------------------------------
# Public quantizers.
# ----------------------------------------------------------------------------


def binarize(x: Array, estimator: str = "clipped_ste", **hparams) -> Array:
  r"""Binarizes ``x`` to {-1, +1} (RF-DNN Eq. 37, :math:`Q_1(x) = \mathrm{sign}(x)`).

  Forward: ``sign(x)`` with sign(0) = +1, never 0; a NaN stays NaN (:func:`sign`).
  Backward: ``g * mu'(x)`` for the estimator's surrogate derivative ``mu'``.

  Args:
    x: latent values (weights or activations), any float dtype; kept.
    estimator: a name in :data:`ESTIMATORS`.
    **hparams: the estimator's hyperparameters (arrays or floats; traced values
      are allowed and never recompile), e.g. ``clip=1.0`` or ``o=o_schedule(step)``.
  """
  return _apply(_Forward("sign"), x, estimator, hparams)


def uniform(
    x: Array,
    bits: int,
    estimator: str = "clipped_ste",
    *,
    axis: int | Sequence[int] | None = None,
    **hparams,
) -> Array:
  r"""k-bit uniform quantizer on [-1, 1] (RF-DNN Eq. 38).

  Forward: :math:`Q_k(x) = \frac{2}{2^k-1}\,\mathrm{round}\!\left[(2^k-1)\left(\frac{x}{2\max|x|}+\frac12\right)\right] - 1`,
  ``2^k`` levels uniform on [-1, 1] (k = 2 gives {-1, -1/3, 1/3, 1}); ties
  round to even. ``bits = 1`` is :func:`binarize`. A NaN or inf in a slice
  makes its max|x| non-finite, and the whole slice is NaN (no level is read
  off a broken scale).
  Backward: ``g * mu'(x)`` (RF-DNN Eq. 25: the STE passes the gradient with
  respect to Q(x) straight to x; no 1/max|x| factor).

  Args:
    x: latent values.
    bits: an integer in [1, 16].
    estimator: a name in :data:`ESTIMATORS`.
    axis: the axes over which ``max|x|`` is taken; ``None`` (the paper) takes
      it over the whole tensor.
    **hparams: the estimator's hyperparameters.
  """
  bits = check_bits(bits)
  if bits == 1:
    return binarize(x, estimator, **hparams)
  axis = _normalize_axes(axis, jnp.ndim(x)) if axis is not None else None
  return _apply(_Forward("uniform", bits=bits, axis=axis), x, estimator, hparams)


def dorefa_weights(w: Array, bits: int = 1, estimator: str = "ste", **hparams) -> Array:
  r"""DoReFa-Net weight quantizer (Zhou et al. 2016).

  Forward: :math:`\tilde w = \tanh(w)/\max|\tanh(w)|` in [-1, 1], then
  :func:`binarize` (k = 1) or :func:`uniform` (k > 1, which on
  :math:`\tilde w` is exactly DoReFa's k-bit quantizer). One NaN makes the
  max NaN, so the whole tensor is NaN; tanh(+-inf) = +-1 saturates.
  Backward: through the tanh normalisation with the max held constant, then
  the estimator (identity by default):
  :math:`g \cdot \mu'(\tilde w)(1-\tanh^2 w)/\max|\tanh w|`. With the default
  estimator this equals ``binarize(w, "dorefa")``'s gradient.
  """
  bits = check_bits(bits)
  t = jnp.tanh(w)
  w_tilde = t / jax.lax.stop_gradient(
      jnp.maximum(jnp.max(jnp.abs(t)), jnp.finfo(t.dtype).tiny))
  return uniform(w_tilde, bits, estimator, **hparams)


def staircase_relu(
    x: Array,
    bits: int,
    alpha: float | None = None,
    estimator: str = "clipped_relu",
    **hparams,
) -> Array:
  r"""Quantized ReLU of the coarse-gradient papers (Yin et al. ICLR 2019; Long, Yin, Xin 2021).

  Forward: :math:`\alpha\,\mathrm{clip}(\lceil x/\alpha \rceil, 0, 2^b - 1)`,
  values :math:`\{0, \alpha, \dots, (2^b-1)\alpha\}`, with a fixed resolution
  ``alpha`` (default :data:`STAIRCASE_ALPHA`: 1.2221, 0.6511, 0.1946 for
  b = 1, 2, 4). NaN stays NaN; +inf gives the top level, -inf 0.
  Backward: a coarse STE, ``identity`` (1), ``relu`` (1[x > 0]) or
  ``clipped_relu`` (1[0 < x <= (2^b - 1) alpha]). No gradient reaches alpha.
  """
  bits = check_bits(bits)
  if alpha is None:
    if bits not in STAIRCASE_ALPHA:
      raise ValueError(
          f"staircase_relu has default resolutions only for bits in {sorted(STAIRCASE_ALPHA)}; "
          f"pass alpha explicitly for bits={bits}")
    alpha = STAIRCASE_ALPHA[bits]
  if not float(alpha) > 0:
    raise ValueError(f"staircase_relu: alpha must be > 0, got {alpha}")
  if estimator not in COARSE_ESTIMATORS:
    raise ValueError(
        f"staircase_relu takes a coarse STE, one of {list(COARSE_ESTIMATORS)}; got {estimator!r}")
  if estimator == "clipped_relu" and hparams.get("upper") is None:
    hparams = {**hparams, "upper": (2.0**bits - 1.0) * float(alpha)}
  return _apply(_Forward("staircase", bits=bits, alpha=float(alpha)), x, estimator, hparams)


# ----------------------------------------------------------------------------
# Weight scaling for binary (or k-bit) weights.
# ----------------------------------------------------------------------------


def binary_scale(
    w: Array, mode: str = "none", reduce_axes: int | Sequence[int] | None = None
) -> Array:
  """The scale that multiplies quantized weights, with its gradient kept.

  Args:
    w: latent weights.
    mode: ``"none"`` (1, the RF-DNN paper), ``"tensor"`` (mean|W| over the
      whole tensor, ReSTE; the gradient flows through the mean as in the
      official code) or ``"channel"`` (mean|W| per output channel, XNOR-Net,
      gradient kept likewise).
    reduce_axes: for ``"channel"``, the axes averaged over (every axis but the
      output-channel one).

  Returns:
    An array that broadcasts against ``w``.
  """
  if mode == "none":
    return jnp.ones((), w.dtype)
  if mode == "tensor":
    return jnp.mean(jnp.abs(w))
  if mode == "channel":
    if reduce_axes is None:
      raise ValueError("binary_scale(mode='channel') needs reduce_axes (all but the output axis)")
    return jnp.mean(jnp.abs(w), axis=_normalize_axes(reduce_axes, w.ndim), keepdims=True)
  raise ValueError(f"unknown scale mode {mode!r}; valid modes: {', '.join(SCALE_MODES)}")


# ----------------------------------------------------------------------------
# Ridge-regression denoising dequantization (Ye et al., arXiv 2409.09245).
# ----------------------------------------------------------------------------


def _quantize_with_detached_noise(x: Array, bits: int, affine: bool, axis: int) -> Array:
  """q = f(x) + stop_gradient(round(f(x)) - f(x)) with f's scale and offset detached.

  The paper leaves f's scale s_f and offset b_f open; we choose, per block
  (statistics along ``axis``), detached min/max ranges:

  * affine: b_f = min x, s_f = (max x - min x) / (2^b - 1); q is an integer in
    [0, 2^b - 1].
  * linear: s_f = max|x| / 2^(b-1); q rounds to the nearest half-integer in
    [-(2^(b-1) - 1/2), 2^(b-1) - 1/2] (2^b symmetric levels, no zero: for one
    bit q = sign(x) / 2).

  Either way dq/dx = 1 / s_f, and the integer grid makes lambda comparable
  across layers (Var(q) is O(1) or more). A block whose min/max (or max|x|) is
  NaN or inf has no scale: its q is NaN, never a code.
  """
  sg = jax.lax.stop_gradient
  levels = 2.0**bits
  tiny = jnp.finfo(jnp.float32).tiny
  if affine:
    lo = sg(jnp.min(x, axis=axis, keepdims=True))
    hi = sg(jnp.max(x, axis=axis, keepdims=True))
    s = jnp.maximum((hi - lo) / (levels - 1.0), tiny)
    s = jnp.where(jnp.isfinite(lo) & jnp.isfinite(hi), s, jnp.nan)
    fx = (x - lo) / s
    target = jnp.clip(jnp.round(fx), 0.0, levels - 1.0)
  else:
    half = levels / 2.0
    mx = sg(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
    s = jnp.where(jnp.isfinite(mx), jnp.maximum(mx / half, tiny), jnp.nan)
    fx = x / s
    target = jnp.clip(jnp.floor(fx) + 0.5, -(half - 0.5), half - 0.5)
  return fx + sg(target - fx)


def ridge_quantize(
    x: Array,
    bits: int,
    *,
    affine: bool = True,
    sparsity: str | tuple[int, int] | None = None,
    axis: int = 0,
) -> Array:
  r"""The integer-grid values q of the ridge method, one block per slice along ``axis``.

  Steps 1 and 2 of :func:`ridge_dequantize`: optional N:M sparsity along
  ``axis`` (:math:`x_S = x + \mathrm{sg}(\mathrm{mask}\,x - x)`), then
  :math:`q = f(x_S) + \mathrm{sg}(\mathrm{round}(f(x_S)) - f(x_S))` with f's
  scale and offset detached per block (``_quantize_with_detached_noise``),
  pruned entries set to 0. Affine: integers in [0, 2^b - 1]; linear:
  half-integers in [-(2^(b-1) - 1/2), 2^(b-1) - 1/2].

  Args:
    x: the blocks, statistics along ``axis`` (float32).
    bits: an integer in [1, 16].
    affine: the affine grid (default) or the symmetric, zero-free one.
    sparsity: ``"2:4"`` or ``(2, 4)``: keep N of every M along ``axis``.
    axis: the axis each block's entries run along.
  """
  nm = parse_sparsity(sparsity)
  xs = x
  mask = None
  if nm is not None:
    mask = nm_sparsity_mask(x, *nm, axis=axis)
    xs = x + jax.lax.stop_gradient(mask * x - x)
  q = _quantize_with_detached_noise(xs, bits, affine, axis=axis)
  if mask is not None:
    q = q * mask
  return q


def ridge_fit(x: Array, q: Array, lam, *, affine: bool = True, axis: int = 0) -> dict[str, Array]:
  r"""The ridge-regression coefficients of x on q, one fit per block (statistics along ``axis``).

  With means :math:`\bar x`, :math:`\bar q` over the block's N entries (all
  statistics divided by N) and the ridge penalty :math:`\lambda`:

  * affine: :math:`\mathrm{slope} = \frac{\mathrm{Cov}(x,q)}{\mathrm{Var}(q)+\lambda}
    = \frac{\overline{(x-\bar x)(q-\bar q)}}{\overline{(q-\bar q)^2}+\lambda}`,
    and the dequantized block is :math:`g(q) = \mathrm{slope}\,(q - \bar q) + \bar x`;
  * linear: :math:`\mathrm{slope} = \frac{\overline{q x}}{\overline{q q}+\lambda}`,
    and :math:`g(q) = \mathrm{slope}\; q`.

  Differentiable in both x and q: the gradient flows through the statistics.

  Args:
    x: the blocks the fit approximates (the dense values, before sparsity).
    q: their quantized values (:func:`ridge_quantize`), same shape.
    lam: the ridge penalty lambda >= 0.
    affine: the affine fit (default) or the linear, zero-mean one.
    axis: the axis each block's entries run along.

  Returns:
    ``{"slope", "mean_q", "mean_x"}`` (affine) or ``{"slope"}`` (linear), each
    with ``axis`` kept as size 1.
  """
  if affine:
    mx = jnp.mean(x, axis=axis, keepdims=True)
    mq = jnp.mean(q, axis=axis, keepdims=True)
    cov = jnp.mean((x - mx) * (q - mq), axis=axis, keepdims=True)
    var = jnp.mean(jnp.square(q - mq), axis=axis, keepdims=True)
    return {"slope": cov / (var + lam), "mean_q": mq, "mean_x": mx}
  return {"slope": jnp.mean(q * x, axis=axis, keepdims=True) / (jnp.mean(q * q, axis=axis, keepdims=True) + lam)}


def ridge_dequantize(
    x: Array,
    bits: int,
    *,
    axis: int | Sequence[int] = 0,
    block_size: int | None = 128,
    lam: float = 0.01,
    affine: bool = True,
    sparsity: str | tuple[int, int] | None = None,
) -> Array:
  r"""Ridge-regression denoising dequantization (Ye et al., arXiv 2409.09245).

  Forward, per block of ``block_size`` consecutive entries along the
  contraction ``axis`` (``block_size=None``: the whole axis, i.e. one fit per
  output channel):

  1. optional N:M sparsity before f: :math:`x_S = x + \mathrm{sg}(\mathrm{mask}\,x - x)`;
  2. :math:`q = f(x_S) + \mathrm{sg}(\mathrm{round}(f(x_S)) - f(x_S))` (see
     ``_quantize_with_detached_noise`` for the choice of f), pruned entries
     set to 0 in q (:func:`ridge_quantize`);
  3. affine: :math:`y = \frac{\mathrm{Cov}(x,q)}{\mathrm{Var}(q)+\lambda}(q - \bar q) + \bar x`;
     linear: :math:`y = \frac{\langle q,x\rangle}{\langle q,q\rangle+\lambda}\,q`,
     fitted to the dense ``x`` (:func:`ridge_fit`).

  Backward: plain autodiff through the statistics (never stopped), so the
  gradient depends on the quantization noise; ``lam > 0`` keeps it finite.

  Args:
    x: the tensor (weights or activations).
    bits: an integer in [1, 16].
    axis: the contraction axis or axes (several are flattened together, in
      order, as for a conv kernel's H, W, I).
    block_size: entries per fit along the (flattened) axis; must divide it.
    lam: the ridge penalty lambda (0.01 in all of the paper's experiments).
    affine: the affine fit (default) or the linear, zero-mean one.
    sparsity: ``"2:4"`` or ``(2, 4)``: keep N of every M along the axis.
  """
  bits = check_bits(bits)
  if not float(lam) >= 0:
    raise ValueError(f"ridge_dequantize: lam must be >= 0, got {lam}")
  axes = _normalize_axes(axis, x.ndim)
  dtype = x.dtype
  # Move the contraction axes to the front and flatten them: (K, rest...).
  rest = [a for a in range(x.ndim) if a not in axes]
  xt = jnp.transpose(x, axes + tuple(rest)).astype(jnp.float32)
  k = int(np.prod([x.shape[a] for a in axes]))
  xt = xt.reshape((k,) + xt.shape[len(axes):])
  bs = k if block_size is None else int(block_size)
  if bs <= 0 or k % bs:
    raise ValueError(
        f"ridge_dequantize: block_size {block_size} must divide the contraction size {k}; "
        f"use block_size=None for one fit per output channel")
  blocks = xt.reshape((k // bs, bs) + xt.shape[1:])  # statistics along axis 1
  q = ridge_quantize(blocks, bits, affine=affine, sparsity=sparsity, axis=1)
  fit = ridge_fit(blocks, q, lam, affine=affine, axis=1)
  y = fit["slope"] * (q - fit["mean_q"]) + fit["mean_x"] if affine else fit["slope"] * q
  y = y.reshape((k,) + xt.shape[1:]).reshape(tuple(x.shape[a] for a in axes) + xt.shape[1:])
  return jnp.transpose(y, np.argsort(axes + tuple(rest))).astype(dtype)


def _normalize_axes(axis, ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
  out = []
  for a in axes:
    if not -ndim <= int(a) < ndim:
      raise ValueError(f"axis {a} is out of range for an array of {ndim} dimensions")
    out.append(int(a) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"repeated axis in {axis}")
  return tuple(out)

