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
  with pytest.raises(ValueError, match="positive number or 'auto'"):
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
