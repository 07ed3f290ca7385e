"""Forwards against their formulas; dtype, jit, vmap and grad; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ricci_jax as rj
from ricci_jax import quantizers

GRID = np.linspace(-2.0, 2.0, 401).astype(np.float32)


def q_k_reference(x, k):
  """RF-DNN Eq. 38 in float64."""
  x = np.asarray(x, np.float64)
  n = 2**k - 1
  return 2 / n * np.round(n * (x / (2 * np.max(np.abs(x))) + 0.5)) - 1


def test_sign_of_zero_is_plus_one_and_values_are_pm1():
  out = rj.binarize(jnp.array([0.0, -0.0, 1e-30, -1e-30, 3.0, -3.0]))
  np.testing.assert_array_equal(out, [1, 1, 1, -1, 1, -1])
  assert set(np.unique(rj.binarize(jnp.asarray(GRID)))) == {-1.0, 1.0}


@pytest.mark.parametrize("k", [2, 3, 4, 8])
def test_uniform_matches_eq38(k):
  # random points: a regular grid puts values exactly on rounding ties, where
  # float32 and float64 legitimately disagree
  x = np.random.default_rng(k).uniform(-2, 2, 2000).astype(np.float32)
  np.testing.assert_allclose(rj.uniform(jnp.asarray(x), k), q_k_reference(x, k), atol=1e-6)


def test_q2_has_exactly_four_levels():
  x = jax.random.normal(jax.random.key(0), (10_000,))
  levels = np.unique(np.asarray(rj.uniform(x, 2)))
  np.testing.assert_allclose(levels, [-1, -1 / 3, 1 / 3, 1], atol=1e-6)


def test_uniform_with_one_bit_is_binarize():
  x = jnp.asarray(GRID)
  np.testing.assert_array_equal(rj.uniform(x, 1), rj.binarize(x))


def test_uniform_per_axis_max():
  x = jax.random.normal(jax.random.key(1), (5, 7))
  out = rj.uniform(x, 3, axis=1)
  for i in range(5):
    np.testing.assert_allclose(out[i], q_k_reference(np.asarray(x[i]), 3), atol=1e-6)


def test_uniform_of_zeros_is_finite():
  assert np.all(np.isfinite(rj.uniform(jnp.zeros(4), 4)))


@pytest.mark.parametrize("k", [1, 2, 4])
def test_dorefa_weights_forward_and_backward(k):
  w = jnp.asarray(GRID)
  t = np.tanh(GRID.astype(np.float64))
  wt = t / np.max(np.abs(t))
  want = np.where(wt >= 0, 1.0, -1.0) if k == 1 else q_k_reference(wt, k)
  np.testing.assert_allclose(rj.dorefa_weights(w, k), want, atol=1e-6)
  g = jax.grad(lambda w: jnp.sum(rj.dorefa_weights(w, k)))(w)
  np.testing.assert_allclose(g, (1 - t**2) / np.max(np.abs(t)), rtol=1e-5, atol=1e-7)


def test_dorefa_weights_gradient_equals_the_dorefa_estimator():
  w = jax.random.normal(jax.random.key(2), (64,))
  g1 = jax.grad(lambda w: jnp.sum(jnp.sin(rj.dorefa_weights(w, 1))))(w)
  g2 = jax.grad(lambda w: jnp.sum(jnp.sin(rj.binarize(w, "dorefa"))))(w)
  np.testing.assert_allclose(g1, g2, rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_staircase_relu_forward_and_coarse_backwards(bits):
  alpha = quantizers.STAIRCASE_ALPHA[bits]
  x = jnp.asarray(GRID * 2)
  xd = np.asarray(x, np.float64)
  top = 2**bits - 1
  np.testing.assert_allclose(rj.staircase_relu(x, bits), alpha * np.clip(np.ceil(xd / alpha), 0, top), rtol=1e-6)
  want = {"identity": np.ones_like(xd), "relu": (xd > 0) * 1.0,
          "clipped_relu": ((xd > 0) & (xd <= top * alpha)) * 1.0}
  for name, expected in want.items():
    g = jax.grad(lambda x: jnp.sum(rj.staircase_relu(x, bits, estimator=name)))(x)
    np.testing.assert_array_equal(g, expected)


def test_staircase_relu_rejects_non_coarse_estimators_and_unknown_alpha():
  with pytest.raises(ValueError, match="coarse STE"):
    rj.staircase_relu(jnp.ones(3), 2, estimator="reste")
  with pytest.raises(ValueError, match="pass alpha"):
    rj.staircase_relu(jnp.ones(3), 3)
  np.testing.assert_allclose(rj.staircase_relu(jnp.array([0.3, 5.0]), 3, alpha=0.5), [0.5, 3.5])


QUANTIZERS = {
    "binarize": lambda x: rj.binarize(x, "reste"),
    "uniform4": lambda x: rj.uniform(x, 4, "ede", t=2.0),
    "dorefa2": lambda x: rj.dorefa_weights(x, 2),
    "staircase2": lambda x: rj.staircase_relu(x, 2, estimator="clipped_relu"),
    "ridge2": lambda x: rj.ridge_dequantize(x, 2, axis=0, block_size=4),
    "ridge1_linear_sparse": lambda x: rj.ridge_dequantize(x, 1, axis=0, block_size=8, affine=False,
                                                          sparsity="2:4"),
}


@pytest.mark.parametrize("name", QUANTIZERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_jit_vmap_grad(name, dtype):
  fn = QUANTIZERS[name]
  x = jax.random.normal(jax.random.key(3), (3, 16, 4)).astype(dtype)
  y = fn(x[0])
  assert y.dtype == dtype and y.shape == x[0].shape
  # XLA may fuse the arithmetic differently under jit: equal to an ulp
  np.testing.assert_allclose(np.asarray(jax.jit(fn)(x[0]), np.float32), np.asarray(y, np.float32),
                             rtol=1e-6, atol=1e-6)
  yv = jax.vmap(fn)(x)
  assert yv.dtype == dtype
  np.testing.assert_allclose(np.asarray(yv[1], np.float32), np.asarray(fn(x[1]), np.float32), rtol=1e-6, atol=1e-6)
  g = jax.grad(lambda x: jnp.sum(fn(x).astype(jnp.float32) ** 2))(x[0])
  assert g.dtype == dtype and g.shape == x[0].shape
  assert np.all(np.isfinite(np.asarray(g, np.float32)))
  assert np.any(np.asarray(g, np.float32) != 0)


@pytest.mark.parametrize("bad", [0, 17, 2.0, 1.5, True, "4", None])
def test_bits_must_be_an_integer_in_range(bad):
  with pytest.raises(ValueError, match=r"integer in \[1, 16\]"):
    rj.uniform(jnp.ones(3), bad)
  with pytest.raises(ValueError, match=r"integer in \[1, 16\]"):
    rj.ridge_dequantize(jnp.ones((4, 2)), bad, block_size=None)


def test_numpy_integer_bits_are_accepted():
  rj.uniform(jnp.ones(3), np.int64(3))


# ---------------------------------------------------------------------------
# Weight scale modes.
# ---------------------------------------------------------------------------


def test_binary_scale_modes_and_their_gradients():
  w = jax.random.normal(jax.random.key(4), (6, 5))
  assert float(rj.binary_scale(w, "none")) == 1.0
  np.testing.assert_allclose(rj.binary_scale(w, "tensor"), np.mean(np.abs(w)), rtol=1e-6)
  np.testing.assert_allclose(rj.binary_scale(w, "channel", reduce_axes=0),
                             np.mean(np.abs(w), axis=0, keepdims=True), rtol=1e-6)
  # ReSTE keeps the gradient through the per-tensor mean: d/dw sum(sign(w) * mean|w|)
  g = jax.grad(lambda w: jnp.sum(rj.binarize(w, "ste") * rj.binary_scale(w, "tensor")))(w)
  s = np.sign(np.asarray(w))
  want = np.mean(np.abs(w)) + np.sum(s) * s / w.size
  np.testing.assert_allclose(g, want, rtol=1e-5)
  with pytest.raises(ValueError, match="valid modes"):
    rj.binary_scale(w, "row")
  with pytest.raises(ValueError, match="reduce_axes"):
    rj.binary_scale(w, "channel")


# ---------------------------------------------------------------------------
# Ridge-regression denoising dequantization.
# ---------------------------------------------------------------------------


def _ridge_reference(x, q, lam, affine):
  """Closed form per column (statistics along axis 0), float64."""
  x, q = np.asarray(x, np.float64), np.asarray(q, np.float64)
  if affine:
    mx, mq = x.mean(0), q.mean(0)
    cov = ((x - mx) * (q - mq)).mean(0)
    var = ((q - mq) ** 2).mean(0)
    return cov / (var + lam) * (q - mq) + mx
  return (q * x).mean(0) / ((q * q).mean(0) + lam) * q


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_ridge_forward_is_the_closed_form(bits, affine):
  x = jax.random.normal(jax.random.key(5), (64, 3)) + 0.3
  y = rj.ridge_dequantize(x, bits, axis=0, block_size=None, affine=affine)
  xd = np.asarray(x, np.float64)
  if affine:
    lo, hi = xd.min(0), xd.max(0)
    s = (hi - lo) / (2**bits - 1)
    q = np.clip(np.round((xd - lo) / s), 0, 2**bits - 1)
    assert len(np.unique(q)) <= 2**bits
  else:
    half = 2.0 ** (bits - 1)
    s = np.abs(xd).max(0) / half
    q = np.clip(np.floor(xd / s) + 0.5, -(half - 0.5), half - 0.5)
  np.testing.assert_allclose(y, _ridge_reference(xd, q, 0.01, affine), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("affine", [True, False])
def test_ridge_fit_gives_the_closed_form_coefficients_and_the_forward_uses_them(affine):
  """ridge_quantize + ridge_fit: the integer grid and the per-block coefficients of ridge_dequantize."""
  x = jax.random.normal(jax.random.key(6), (2, 32, 3)) + 0.3  # two blocks of 32 along axis 1
  q = np.asarray(rj.quantizers.ridge_quantize(x, 3, affine=affine, axis=1))
  grid = q if affine else q + 3.5
  assert np.array_equal(grid, np.round(grid)) and grid.min() >= 0 and grid.max() <= 7
  fit = {k: np.asarray(v) for k, v in rj.quantizers.ridge_fit(x, jnp.asarray(q), 0.01, affine=affine, axis=1).items()}
  xd, qd = np.asarray(x, np.float64), np.asarray(q, np.float64)
  if affine:
    assert set(fit) == {"slope", "mean_q", "mean_x"}
    mx, mq = xd.mean(1, keepdims=True), qd.mean(1, keepdims=True)
    slope = ((xd - mx) * (qd - mq)).mean(1, keepdims=True) / (((qd - mq) ** 2).mean(1, keepdims=True) + 0.01)
    np.testing.assert_allclose(fit["mean_x"], mx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fit["mean_q"], mq, rtol=1e-5, atol=1e-6)
    y = fit["slope"] * (q - fit["mean_q"]) + fit["mean_x"]
  else:
    assert set(fit) == {"slope"}
    slope = (qd * xd).mean(1, keepdims=True) / ((qd * qd).mean(1, keepdims=True) + 0.01)
    y = fit["slope"] * q
  np.testing.assert_allclose(fit["slope"], slope, rtol=1e-5, atol=1e-6)
  want = rj.ridge_dequantize(jnp.moveaxis(x, 1, 0).reshape(32, 2 * 3), 3, axis=0, block_size=None, affine=affine)
  np.testing.assert_allclose(np.moveaxis(y, 1, 0).reshape(32, 6), want, rtol=1e-5, atol=1e-6)


def test_ridge_reduces_quantization_error_against_plain_rounding():
  w = jax.random.normal(jax.random.key(6), (256, 16))
  y = rj.ridge_dequantize(w, 2, axis=0, block_size=128)
  lo, hi = jnp.min(w, 0), jnp.max(w, 0)
  s = (hi - lo) / 3
  naive = jnp.round((w - lo) / s) * s + lo
  assert float(jnp.mean((y - w) ** 2)) < float(jnp.mean((naive - w) ** 2))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("lam", [0.01, 1e-6])
def test_ridge_gradient_matches_finite_differences(affine, lam):
  """d/dx of the surrogate with the rounding noise held fixed (it is detached)."""
  x = np.asarray(jax.random.normal(jax.random.key(7), (8, 2)), np.float64) + 0.1
  c = np.asarray(jax.random.normal(jax.random.key(8), (8, 2)), np.float64)
  bits = 2
  # the detached pieces at x: f's range and the rounding noise
  lo, hi = x.min(0), x.max(0)
  s = (hi - lo) / (2**bits - 1)
  if not affine:
    s = np.abs(x).max(0) / 2.0
  def f(z):
    fz = (z - lo) / s if affine else z / s
    fx = (x - lo) / s if affine else x / s
    target = np.clip(np.round(fx), 0, 3) if affine else np.clip(np.floor(fx) + 0.5, -1.5, 1.5)
    q = fz + (target - fx)
    return np.sum(c * _ridge_reference(z, q, lam, affine))
  eps = 1e-6
  fd = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    e = np.zeros_like(x); e[idx] = eps
    fd[idx] = (f(x + e) - f(x - e)) / (2 * eps)
  g = jax.grad(lambda z: jnp.sum(jnp.asarray(c, jnp.float32) * rj.ridge_dequantize(
      z, bits, axis=0, block_size=None, lam=lam, affine=affine)))(jnp.asarray(x, jnp.float32))
  assert np.all(np.isfinite(g))
  np.testing.assert_allclose(g, fd, rtol=2e-2, atol=2e-3)
  # the gradient is not the STE's: it flows through the statistics
  assert not np.allclose(g, c / s, rtol=1e-2)


def test_ridge_gradient_is_finite_for_tiny_lambda_and_constant_blocks():
  x = jnp.concatenate([jnp.ones((4, 1)), jax.random.normal(jax.random.key(9), (4, 1))], axis=1)
  for lam in (1e-8, 0.0):
    g = jax.grad(lambda x: jnp.sum(rj.ridge_dequantize(x, 1, axis=0, block_size=None, lam=lam) ** 2))(x)
    if lam > 0:
      assert np.all(np.isfinite(g))


def test_ridge_blocks_along_the_flattened_contraction_axes():
  k = jax.random.normal(jax.random.key(10), (2, 2, 64, 5))  # HWIO, contraction over H, W, I
  y = rj.ridge_dequantize(k, 2, axis=(0, 1, 2), block_size=128)
  flat = np.asarray(k).reshape(256, 5)
  y_flat = np.asarray(rj.ridge_dequantize(jnp.asarray(flat), 2, axis=0, block_size=128))
  np.testing.assert_allclose(np.asarray(y).reshape(256, 5), y_flat, rtol=1e-6)


def test_nm_sparsity_mask_keeps_the_largest_n_of_every_m():
  x = jnp.array([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, -1.0, 0.2]]).T
  mask = quantizers.nm_sparsity_mask(x, 2, 4, axis=0)
  np.testing.assert_array_equal(mask[:, 0], [0, 1, 1, 0, 1, 1, 0, 0])
  x = jax.random.normal(jax.random.key(11), (128, 4))
  y = np.asarray(rj.ridge_dequantize(x, 2, axis=0, affine=False, sparsity="2:4"))
  # linear fit: pruned entries are exactly 0, two of every four survive
  np.testing.assert_array_equal(np.count_nonzero(y.reshape(32, 4, 4), axis=1), 2)
  np.testing.assert_array_equal(y != 0, np.asarray(quantizers.nm_sparsity_mask(x, 2, 4, axis=0)) == 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(sparsity="2:4"), "divisible by 4"),
    (dict(sparsity="4:4"), "0 < N < M"),
    (dict(sparsity="two:four"), "look like '2:4'"),
    (dict(block_size=128), "must divide the contraction size 144"),
    (dict(lam=-1.0), "lam must be >= 0"),
])
def test_ridge_bad_input(kwargs, match):
  x = jnp.ones((144, 2)) if "block_size" in kwargs else jnp.ones((6, 2))
  kwargs.setdefault("block_size", None)
  with pytest.raises(ValueError, match=match):
    rj.ridge_dequantize(x, 2, axis=0, **kwargs)


# ---------------------------------------------------------------------------
# Non-finite inputs: a NaN is never mapped to a code.
# ---------------------------------------------------------------------------


def _special_rows(dtype):
  """(4, 16) values of ``dtype`` as float64: row 0 finite (with +0 and -0), row 1 a NaN,
  row 2 +inf, row 3 -inf and a NaN.

  Every row's max|x| is 2, a power of two: Eq. 38's x / (2 max|x|) is then exact in float32
  as in float64, so the float64 reference meets the same rounding ties as the forward.
  """
  x = np.random.default_rng(12).uniform(-2, 2, (4, 16))
  x[0, :2] = 0.0, -0.0
  x[:, 15] = 2.0, -2.0, 2.0, -2.0
  x[1, 3] = np.nan
  x[2, 5] = np.inf
  x[3, 7], x[3, 9] = -np.inf, np.nan
  return np.asarray(jnp.asarray(x, dtype)).astype(np.float64)


def _sign_ref(x):
  """RF-DNN Eq. 37 with sign(0) = +1, sign(+-inf) = +-1, NaN kept."""
  return np.where(np.isnan(x), np.nan, np.where(x >= 0, 1.0, -1.0))


def _eq38_ref(x, k):
  """RF-DNN Eq. 38 over the whole of ``x``; NaN everywhere when max|x| is not finite.

  The level index is found in float64; the level 2/n i - 1 is evaluated in float32, as the forward does."""
  n = 2**k - 1
  m = np.max(np.abs(x))
  if not np.isfinite(m):
    return np.full(x.shape, np.nan)
  i = np.round(n * (x / (2 * m) + 0.5))
  return (np.float32(2 / n) * i.astype(np.float32) - np.float32(1)).astype(np.float64)


def _dorefa_ref(x, k, dtype):
  """tanh(w) / max|tanh(w)| (rounded to ``dtype`` as the forward computes it there), then Eq. 37 / 38."""
  with np.errstate(invalid="ignore"):
    t = np.tanh(x).astype(dtype).astype(np.float32)
    m = np.max(np.abs(t))
    if not np.isfinite(m):
      return np.full(x.shape, np.nan)
    wt = (t / m).astype(dtype).astype(np.float64)
  return _sign_ref(wt) if k == 1 else _eq38_ref(wt, k)


def _staircase_ref(x, bits, alpha):
  """alpha * clip(ceil(x / alpha), 0, 2^b - 1): +inf saturates at the top level, -inf at 0, NaN kept."""
  i = np.clip(np.ceil(x / alpha), 0, 2**bits - 1)
  return np.where(np.isnan(x), np.nan, np.float32(alpha) * i.astype(np.float32))


def _nonfinite_cases():
  cases = []
  for i, est in enumerate(rj.ESTIMATORS):
    cases.append(("binarize", est, 1))
    cases.append(("uniform", est, (2, 3, 4, 8)[i % 4]))
    cases.append(("dorefa", est, (1, 2, 3)[i % 3]))
  cases += [("staircase", est, bits) for est, bits in zip(quantizers.COARSE_ESTIMATORS, (1, 2, 4))]
  return cases


def _quantizer_and_reference(kind, est, bits, dtype):
  """The quantizer, its elementwise-or-global NumPy reference and the estimator's hparams."""
  if kind == "binarize":
    return (lambda x: rj.binarize(x, est)), _sign_ref, {}
  if kind == "uniform":
    return (lambda x: rj.uniform(x, bits, est)), (lambda x: _eq38_ref(x, bits)), {}
  if kind == "dorefa":
    return (lambda x: rj.dorefa_weights(x, bits, est)), (lambda x: _dorefa_ref(x, bits, dtype)), None
  alpha = quantizers.STAIRCASE_ALPHA[bits]
  hp = {"upper": (2**bits - 1) * alpha} if est == "clipped_relu" else {}
  return (lambda x: rj.staircase_relu(x, bits, estimator=est)), (lambda x: _staircase_ref(x, bits, alpha)), hp


def _assert_codes(got, want, dtype, exact=True):
  """NaN exactly where ``want`` is NaN; the other values equal (or within an ulp of ``dtype``, under jit)."""
  assert got.dtype == dtype
  got = np.asarray(got).astype(np.float64)
  want = np.asarray(want, np.float32).astype(dtype).astype(np.float64)
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  if exact:
    np.testing.assert_array_equal(got, want)
  else:  # XLA may fuse the level's 2/n i - 1 into one multiply-add under jit: an ulp of 1
    eps = float(jnp.finfo(dtype).eps)
    np.testing.assert_allclose(got, want, rtol=eps, atol=eps)


@pytest.mark.parametrize("kind,est,bits", _nonfinite_cases(), ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_nan_in_gives_nan_out_and_finite_values_are_unchanged(kind, est, bits, dtype):
  """README, non-finite inputs: NaN stays NaN (sign, staircase: at its position; Eq. 38 and DoReFa: the
  whole max slice); +-inf are the formulas' limits except inside Eq. 38's max|x|, which makes the slice NaN."""
  fn, ref, hp = _quantizer_and_reference(kind, est, bits, dtype)
  x = _special_rows(dtype)
  xj = jnp.asarray(x, dtype)
  rows = np.stack([ref(r) for r in x])  # each row its own tensor
  _assert_codes(fn(xj), ref(x), dtype)  # the whole tensor: global max for Eq. 38 / DoReFa
  _assert_codes(fn(xj[0]), rows[0], dtype)
  _assert_codes(jax.vmap(fn)(xj), rows, dtype)
  _assert_codes(jax.jit(fn)(xj), ref(x), dtype, exact=False)
  if kind in ("binarize", "staircase"):
    assert np.all(np.isnan(rows[1:]) == np.isnan(x[1:]))  # at the NaNs' positions only
  elif kind == "uniform":  # an inf max|x| as well as a NaN one: the whole slice
    assert np.all(np.isnan(rows[1:])) and not np.any(np.isnan(rows[0]))
  else:  # DoReFa: tanh(+inf) = 1 saturates to the top level; a NaN takes the whole tensor
    assert np.all(np.isnan(rows[[1, 3]])) and not np.any(np.isnan(rows[[0, 2]])) and rows[2, 5] == 1.0
  if kind == "uniform":  # one max per row
    _assert_codes(rj.uniform(xj, bits, est, axis=1), rows, dtype)
  c = np.random.default_rng(13).choice([-2.0, -0.5, 1.0, 3.0], x.shape).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(fn(x).astype(jnp.float32) * c))(xj)
  assert g.dtype == dtype and g.shape == x.shape
  if hp is not None:  # the estimator's surrogate, whatever it gives at NaN and inf
    want = (c * np.asarray(rj.ESTIMATORS[est](jnp.asarray(x, jnp.float32), **hp))).astype(dtype)
    np.testing.assert_allclose(np.asarray(g, np.float32), want.astype(np.float32), rtol=1e-6)


def test_sign_keeps_zero_infinities_integers_and_float16():
  x = jnp.array([0.0, -0.0, np.inf, -np.inf, np.nan, -2.5], jnp.float16)
  out = quantizers.sign(x)
  assert out.dtype == jnp.float16
  np.testing.assert_array_equal(np.asarray(out, np.float64), [1, 1, 1, -1, np.nan, -1])
  np.testing.assert_array_equal(quantizers.sign(jnp.array([0, -3, 2])), [1, -1, 1])
  u = rj.uniform(jnp.array([0.5, np.inf, -0.25], jnp.float16), 2)
  assert u.dtype == jnp.float16 and np.all(np.isnan(np.asarray(u, np.float32)))
  s = rj.staircase_relu(jnp.array([np.nan, np.inf, -np.inf], jnp.float16), 2)
  np.testing.assert_array_equal(np.asarray(s, np.float32), [np.nan, np.float16(3 * 0.6511), 0])


@pytest.mark.parametrize("affine,sparsity", [(True, None), (False, None), (True, "2:4")])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ridge_blocks_with_a_nan_or_inf_are_nan(affine, sparsity, dtype):
  """A block whose min/max (max|x|) is not finite has no scale: q and y are NaN there, never codes."""
  x = np.asarray(jnp.asarray(np.random.default_rng(14).normal(size=(16, 3)) + 0.3, dtype)).astype(np.float64)
  x[1, 0], x[6, 1], x[13, 2] = np.nan, np.inf, -np.inf  # blocks of 4 along axis 0: (0, 0), (1, 1), (3, 2)
  bad = np.zeros((4, 4, 3), bool)
  bad[0, :, 0] = bad[1, :, 1] = bad[3, :, 2] = True
  fn = lambda x: rj.ridge_dequantize(x, 2, axis=0, block_size=4, affine=affine, sparsity=sparsity)  # noqa: E731
  xj = jnp.asarray(x, dtype)
  for y in (fn(xj), jax.jit(fn)(xj), jax.vmap(fn)(jnp.stack([xj, xj]))[1]):
    assert y.dtype == dtype
    y = np.asarray(y, np.float32).reshape(4, 4, 3)
    np.testing.assert_array_equal(np.isnan(y), bad)
  q = np.asarray(quantizers.ridge_quantize(jnp.asarray(x, jnp.float32).reshape(4, 4, 3), 2, affine=affine,
                                           sparsity=sparsity, axis=1))
  np.testing.assert_array_equal(np.isnan(q), bad)
  grid = q[~bad] if affine else q[~bad] + 1.5
  assert np.array_equal(grid, np.round(grid)) and grid.min() >= 0 and grid.max() <= 3
  if sparsity is None:  # the healthy blocks: the closed form, in float64
    y = np.asarray(fn(xj), np.float32).reshape(4, 4, 3)
    xb = x.reshape(4, 4, 3)
    for b in range(4):
      for col in range(3):
        if not bad[b, 0, col]:
          want = _ridge_reference(xb[b, :, col:col + 1], q[b, :, col:col + 1], 0.01, affine)[:, 0]
          np.testing.assert_allclose(y[b, :, col], want, rtol=2e-4 if dtype == jnp.float32 else 1e-2, atol=2e-5)
  g = jax.grad(lambda x: jnp.sum(fn(x).astype(jnp.float32) ** 2))(xj)
  assert g.dtype == dtype and g.shape == x.shape
  assert np.all(np.isfinite(np.asarray(g, np.float32).reshape(4, 4, 3)[~bad]))
