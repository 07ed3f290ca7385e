"""The LNE metric: rank-1 inverses against dense linear algebra, diagonal dominance, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ricci_jax import lne


def _layer(key, shape=(6, 7), scale=0.5):
  kw, kd = jax.random.split(jax.random.key(key))
  return jax.random.normal(kw, shape) * scale, jax.random.normal(kd, shape)


def _dense(w, tau):
  t = np.tanh(tau * np.asarray(w, np.float64).ravel())
  return np.eye(t.size) - np.outer(t, t), t


@pytest.mark.parametrize("tau", [0.05, 0.2, "auto"])
def test_weak_is_d_plus_t_t_dot_d(tau):
  w, d = _layer(0)
  tau_v = float(lne.resolve_tau(w, tau))
  _, t = _dense(w, tau_v)
  dd = np.asarray(d, np.float64).ravel()
  np.testing.assert_allclose(lne.natural_gradient(w, d, tau, "weak").ravel(), dd + t * (t @ dd), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tau", [0.05, 0.2, "auto"])
def test_exact_inverse_times_metric_is_identity(tau):
  w, d = _layer(1)
  tau_v = float(lne.resolve_tau(w, tau))
  g, _ = _dense(w, tau_v)
  nat = np.asarray(lne.natural_gradient(w, d, tau, "exact"), np.float64).ravel()
  np.testing.assert_allclose(g @ nat, np.asarray(d).ravel(), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(nat, np.linalg.solve(g, np.asarray(d, np.float64).ravel()), rtol=1e-4, atol=1e-5)


def test_weak_error_is_exactly_the_s_t_tT_d_term():
  """(I - tt^T)(I + tt^T) = I - s tt^T, so g(weak) - d = -s t (t . d)."""
  w, d = _layer(2)
  tau = 0.2
  g, t = _dense(w, tau)
  s = t @ t
  dd = np.asarray(d, np.float64).ravel()
  weak = np.asarray(lne.natural_gradient(w, d, tau, "weak"), np.float64).ravel()
  np.testing.assert_allclose(g @ weak - dd, -s * t * (t @ dd), rtol=1e-4, atol=1e-6)


def test_diagonal_inverse_is_cosh_squared():
  w, d = _layer(3)
  tau = 0.7
  t = np.tanh(tau * np.asarray(w, np.float64))
  out = lne.natural_gradient(w, d, tau, "diagonal")
  np.testing.assert_allclose(np.asarray(out) * (1 - t**2), d, rtol=1e-4, atol=1e-6)


def test_none_is_the_identity_metric():
  w, d = _layer(4)
  np.testing.assert_array_equal(lne.natural_gradient(w, d, 0.3, "none"), d)


def test_dense_metric_is_I_minus_ttT_and_only_for_small_layers():
  w, _ = _layer(5)
  g, _ = _dense(w, 0.3)
  np.testing.assert_allclose(lne.dense_metric(w, 0.3), g, atol=1e-6)
  with pytest.raises(ValueError, match="small layers"):
    lne.dense_metric(jnp.ones(5000), 0.1)


def test_diagonal_dominance_against_brute_force():
  rng = np.random.default_rng(0)
  verdicts = []
  for trial in range(300):
    n = int(rng.integers(2, 12))
    t = np.tanh(rng.normal(size=n) * rng.uniform(0.01, 1.5))
    g = np.eye(n) - np.outer(t, t)
    off = np.sum(np.abs(g), axis=1) - np.abs(np.diag(g))
    brute = bool(np.all(np.abs(np.diag(g)) > off))
    assert bool(lne.is_diagonally_dominant(jnp.asarray(t, jnp.float32))) == brute, (trial, t)
    verdicts.append(brute)
  assert 0.1 < np.mean(verdicts) < 0.9  # both outcomes were exercised


@pytest.mark.parametrize("shape,scale", [((3, 3, 16, 16), 0.05), ((784, 256), 0.02), ((10,), 3.0), ((64, 10), 1.0)])
@pytest.mark.parametrize("c", [0.5, 0.99])
def test_auto_tau_keeps_the_metric_dominant_and_definite(shape, scale, c):
  w = jax.random.normal(jax.random.key(6), shape) * scale
  tau = lne.auto_tau(w, c)
  t = lne.metric_vector(w, tau)
  assert bool(lne.is_diagonally_dominant(t))
  assert float(jnp.vdot(t, t)) < 1.0
  diag = lne.lne_diagnostics(w, jnp.ones(shape), "auto", tau_scale=c)
  assert float(diag.dominant) == 1.0 and float(diag.s) < 1.0


def test_exact_with_an_indefinite_metric_falls_back_to_weak_never_nan():
  w = jnp.ones((50,))  # s = 50 tanh(tau)^2 >= 1 for tau = 1
  d = jnp.linspace(-1.0, 1.0, 50)
  out = lne.natural_gradient(w, d, 1.0, "exact")
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, lne.natural_gradient(w, d, 1.0, "weak"), rtol=1e-6)
  diag = lne.lne_diagnostics(w, d, 1.0, "exact")
  assert float(diag.s) >= 1.0 and float(diag.dominant) == 0.0


def test_diagonal_never_overflows():
  out = lne.natural_gradient(jnp.array([1e4, -1e4, 0.0]), jnp.ones(3), 10.0, "diagonal")
  assert np.all(np.isfinite(out))


def test_check_positive_definite_raises_with_a_useful_message():
  with pytest.raises(ValueError, match="not positive definite.*tau='auto'"):
    lne.check_positive_definite(jnp.ones((50,)), 1.0, name="conv1")
  lne.check_positive_definite(jnp.ones((50,)), "auto")


@pytest.mark.parametrize("bad", ["weakest", "Exact"])
def test_unknown_approximation(bad):
  with pytest.raises(ValueError, match="valid: weak, exact, diagonal, strong, none"):
    lne.natural_gradient(jnp.ones(3), jnp.ones(3), 0.1, bad)


def test_bad_tau_string():
  with pytest.raises(ValueError, match="positive number or one of 'auto', 'std'"):
    lne.natural_gradient(jnp.ones(3), jnp.ones(3), "automatic")


def test_strong_approximation_beats_weak_on_a_tiny_layer_and_refuses_big_ones():
  w, d = _layer(7, shape=(4, 8), scale=0.5)
  tau = 0.3
  g, _ = _dense(w, tau)
  G = np.asarray(lne.strong_inverse(w, tau), np.float64)
  weak = 2 * np.eye(g.shape[0]) - g  # I + tt^T
  err_strong = np.linalg.norm(np.eye(g.shape[0]) - g @ G)
  err_weak = np.linalg.norm(np.eye(g.shape[0]) - g @ weak)
  assert err_strong < 0.1 * err_weak
  np.testing.assert_allclose(G, G.T, atol=1e-6)
  nat = lne.natural_gradient(w, d, tau, "strong")
  np.testing.assert_allclose(nat.ravel(), G @ np.asarray(d).ravel(), rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="at most 64 weights"):
    lne.natural_gradient(jnp.ones((9, 9)), jnp.ones((9, 9)), 0.1, "strong")


@pytest.mark.parametrize("approx", ["weak", "exact", "diagonal", "none"])
def test_shape_dtype_jit_vmap(approx):
  w, d = _layer(8, shape=(3, 5, 4))
  for dtype in (jnp.float32, jnp.bfloat16):
    out = jax.jit(lne.natural_gradient, static_argnames="approx")(w.astype(dtype), d.astype(dtype), 0.2, approx=approx)
    assert out.shape == d.shape and out.dtype == dtype
  batched = jax.vmap(lambda w, d: lne.natural_gradient(w, d, 0.2, approx))(w, d)
  np.testing.assert_allclose(batched[1], lne.natural_gradient(w[1], d[1], 0.2, approx), rtol=1e-5)


def test_correction_diagnostic_is_the_relative_size_of_t_t_dot_d():
  w, d = _layer(9)
  tau = 0.25
  _, t = _dense(w, tau)
  dd = np.asarray(d, np.float64).ravel()
  want = np.linalg.norm(t * (t @ dd)) / np.linalg.norm(dd)
  np.testing.assert_allclose(lne.lne_diagnostics(w, d, tau, "weak").correction, want, rtol=1e-4)


# ---------------------------------------------------------------------------
# Readings: the Hessian-diagonal metric, blocks, tau modes (issue: RF-DNN's readings).
# ---------------------------------------------------------------------------


def _np_blocks(w, block):
  """Index lists of each block, written out by loops over the kernel's axes (independent of lne.to_blocks)."""
  shape = w.shape
  idx = np.arange(w.size).reshape(shape)
  if block == "layer":
    return [idx.ravel()]
  if block == "out_channel":
    return [idx[..., o].ravel() for o in range(shape[-1])]
  if block == "kernel":
    return [idx[..., i, o].ravel() for i in range(shape[-2]) for o in range(shape[-1])]
  return [idx.ravel()[k:k + block] for k in range(0, w.size, block)]


def _np_natural(w, d, tau_of_block, metric, approx, block):
  """g^-1 d by dense float64 linear algebra, one block at a time."""
  w64, d64 = np.asarray(w, np.float64).ravel(), np.asarray(d, np.float64).ravel()
  out = np.zeros_like(d64)
  for b, ix in enumerate(_np_blocks(np.asarray(w), block)):
    t = np.tanh(tau_of_block(b, w64[ix]) * w64[ix])
    g = np.diag(1 - t**2) if metric == "hessian_diagonal" else np.eye(ix.size) - np.outer(t, t)
    if approx == "exact":
      out[ix] = np.linalg.solve(g, d64[ix])
    else:  # weak: (2I - g) d, i.e. I + t t^T or diag(1 + t^2)
      out[ix] = (2 * np.eye(ix.size) - g) @ d64[ix]
  return out.reshape(np.shape(d))


@pytest.mark.parametrize("metric", ["rank1", "hessian_diagonal"])
@pytest.mark.parametrize("approx", ["weak", "exact"])
@pytest.mark.parametrize("block", ["layer", "out_channel", "kernel", 6])
def test_every_inverse_and_block_against_dense_float64(metric, approx, block):
  w, d = _layer(10, shape=(3, 2, 4, 3), scale=0.2)  # s < 1 for every block: the exact inverse applies
  tau = 0.3
  got = lne.natural_gradient(w, d, tau, approx, metric=metric, block=block)
  want = _np_natural(w, d, lambda b, wb: tau, metric, approx, block)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("block", ["out_channel", "kernel", 4])
def test_auto_tau_is_per_block_and_keeps_every_block_dominant(block):
  w, d = _layer(11, shape=(3, 3, 4, 8), scale=0.3)
  c = 0.9

  def tau_of_block(b, wb):  # Eq. in lne.auto_tau, per block, by hand
    return c / np.sqrt(wb.size * np.max(np.abs(wb)) * np.mean(np.abs(wb)))

  got = lne.natural_gradient(w, d, "auto", "exact", tau_scale=c, block=block)
  np.testing.assert_allclose(got, _np_natural(w, d, tau_of_block, "rank1", "exact", block), rtol=2e-5, atol=1e-6)
  diag = lne.lne_diagnostics(w, d, "auto", "exact", tau_scale=c, block=block)
  assert float(diag.dominant) == 1.0 and float(diag.s_max) < 1.0
  blocks = _np_blocks(np.asarray(w), block)
  s = [np.sum(np.tanh(tau_of_block(0, np.asarray(w).ravel()[ix]) * np.asarray(w).ravel()[ix]) ** 2) for ix in blocks]
  np.testing.assert_allclose(diag.s, np.mean(s), rtol=1e-4)
  np.testing.assert_allclose(diag.s_max, np.max(s), rtol=1e-4)


def test_std_tau_is_kappa_over_the_layers_std():
  w, d = _layer(12, shape=(20, 6), scale=0.07)
  kappa = 1.3
  tau = kappa / np.std(np.asarray(w, np.float64))
  np.testing.assert_allclose(lne.resolve_tau(w, "std", kappa), tau, rtol=1e-5)
  got = lne.natural_gradient(w, d, "std", "weak", tau_scale=kappa, metric="hessian_diagonal")
  np.testing.assert_allclose(got, (1 + np.tanh(tau * np.asarray(w, np.float64)) ** 2) * np.asarray(d), rtol=1e-5)
  # scale invariant: the same correction for w and 10 w
  c1 = lne.lne_diagnostics(w, d, "std", "weak", tau_scale=kappa, metric="hessian_diagonal").correction
  c10 = lne.lne_diagnostics(10 * w, d, "std", "weak", tau_scale=kappa, metric="hessian_diagonal").correction
  np.testing.assert_allclose(c1, c10, rtol=1e-5)


def test_diagonal_alias_is_the_hessian_metric_with_the_exact_inverse():
  w, d = _layer(13)
  np.testing.assert_array_equal(lne.natural_gradient(w, d, 0.7, "diagonal"),
                                lne.natural_gradient(w, d, 0.7, "exact", metric="hessian_diagonal"))
  assert lne.resolve_metric("rank1", "diagonal") == ("hessian_diagonal", "exact")


def test_dense_metric_of_blocks_and_of_the_diagonal_metric():
  w, _ = _layer(14, shape=(2, 2, 2, 3), scale=0.5)
  g = np.asarray(lne.dense_metric(w, 0.4, block="out_channel"), np.float64)
  # in block order: rows of block o are the weights of output channel o
  for o, ix in enumerate(_np_blocks(np.asarray(w), "out_channel")):
    t = np.tanh(0.4 * np.asarray(w, np.float64).ravel()[ix])
    sl = slice(o * ix.size, (o + 1) * ix.size)
    np.testing.assert_allclose(g[sl, sl], np.eye(ix.size) - np.outer(t, t), atol=1e-6)
  np.testing.assert_allclose(np.count_nonzero(g), 3 * 8 * 8)
  gd = np.asarray(lne.dense_metric(w, 0.4, metric="hessian_diagonal"))
  np.testing.assert_allclose(gd, np.diag(1 - np.tanh(0.4 * np.asarray(w, np.float64).ravel()) ** 2), atol=1e-6)


def test_positive_definiteness_is_needed_only_by_the_rank1_exact_and_strong_inverses():
  assert lne.needs_positive_definite("rank1", "exact") and lne.needs_positive_definite("rank1", "strong")
  for metric, approx in [("rank1", "weak"), ("rank1", "none"), ("hessian_diagonal", "weak"),
                         ("hessian_diagonal", "exact"), ("rank1", "diagonal")]:
    assert not lne.needs_positive_definite(metric, approx)
  # the weak inverse I + t t^T is positive definite whatever s is
  w, d = _layer(15, shape=(30,), scale=2.0)
  weak = np.asarray(lne.natural_gradient(w, d, 5.0, "weak"), np.float64)
  assert float(np.dot(weak, np.asarray(d, np.float64))) > 0
  with pytest.raises(ValueError, match=r"of dense \(block \d of 5, 6 weights each\) is not positive definite"):
    lne.check_positive_definite(w, 5.0, block=6, name="dense")


@pytest.mark.parametrize("metric", ["rank1", "hessian_diagonal"])
@pytest.mark.parametrize("block", ["layer", "kernel", 5])
def test_readings_under_jit_vmap_and_bfloat16(metric, block):
  w, d = _layer(16, shape=(2, 5, 3, 2))
  f = jax.jit(lambda w, d: lne.natural_gradient(w, d, "std", "weak", tau_scale=1.0, metric=metric, block=block))
  for dtype in (jnp.float32, jnp.bfloat16):
    out = f(w.astype(dtype), d.astype(dtype))
    assert out.shape == d.shape and out.dtype == dtype
  batched = jax.vmap(f)(w, d)
  np.testing.assert_allclose(batched[1], f(w[1], d[1]), rtol=1e-5)


def test_bad_readings_are_refused_with_what_is_allowed():
  w, d = _layer(17, shape=(3, 3, 2, 4))
  with pytest.raises(ValueError, match="unknown metric 'hessian'; valid: rank1, hessian_diagonal"):
    lne.natural_gradient(w, d, 0.1, metric="hessian")
  with pytest.raises(ValueError, match="unknown block 'row'; valid: layer, out_channel, kernel or a positive int"):
    lne.natural_gradient(w, d, 0.1, block="row")
  with pytest.raises(ValueError, match="block=7 does not divide a kernel of shape"):
    lne.natural_gradient(w, d, 0.1, block=7)
  with pytest.raises(ValueError, match="tau='auto' keeps the rank-1 metric"):
    lne.natural_gradient(w, d, "auto", "weak", metric="hessian_diagonal")
  with pytest.raises(ValueError, match="approx='strong' fits an MLP"):
    lne.natural_gradient(w, d, 0.1, "strong", metric="hessian_diagonal")
  with pytest.raises(ValueError, match="tau must be a positive number"):
    lne.check_tau(-0.5)
  big = jnp.ones((5, 5, 4, 2))  # out-channel blocks of 100 weights
  with pytest.raises(ValueError, match="at most 64 weights.*this block has 100"):
    lne.natural_gradient(big, big, 0.1, "strong", block="out_channel")
