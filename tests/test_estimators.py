"""Every estimator's backward against its formula, written here independently in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ricci_jax as rj
from ricci_jax import estimators

GRID = np.linspace(-2.5, 2.5, 1001).astype(np.float32)


def _reference(name, x, **h):
  """The published backward factor mu'(x), evaluated in float64."""
  x = x.astype(np.float64)
  if name in ("ste", "identity"):
    return np.ones_like(x)
  if name == "clipped_ste":
    return (np.abs(x) <= h.get("clip", 1.0)).astype(float)
  if name == "dorefa":
    return (1 - np.tanh(x) ** 2) / np.max(np.abs(np.tanh(x)))
  if name == "md_tanh":
    b = h.get("beta", 1.0)
    return b * (1 - np.tanh(b * x) ** 2)
  if name == "approx_sign":
    return np.where(np.abs(x) <= 1, 2 - 2 * np.abs(x), 0.0)
  if name == "swish_sign":
    b = h.get("beta", 5.0)
    return b * (2 - b * x * np.tanh(b * x / 2)) / (1 + np.cosh(b * x))
  if name == "ede":
    t = h.get("t", 0.1)
    k = h.get("k", max(1 / t, 1.0))
    return k * t * (1 - np.tanh(t * x) ** 2)
  if name == "reste":
    o, t, m = h.get("o", 3.0), h.get("t", 1.5), h.get("m", 0.1)
    # the thresholds compare against float32 inputs, so compare in float32 too
    t, m = float(np.float32(t)), float(np.float32(m))
    a = np.abs(x)
    with np.errstate(divide="ignore"):
      power = (1 / o) * np.power(a, (1 - o) / o)
    return np.where(a <= m, m ** (1 / o) / m, np.where(a <= t, power, 0.0))
  if name == "relu":
    return (x > 0).astype(float)
  if name == "clipped_relu":
    return ((x > 0) & (x <= h.get("upper", 1.0))).astype(float)
  raise AssertionError(name)


CASES = [
    ("ste", {}), ("clipped_ste", {}), ("clipped_ste", {"clip": 0.5}), ("dorefa", {}),
    ("md_tanh", {}), ("md_tanh", {"beta": 4.0}), ("approx_sign", {}), ("swish_sign", {}),
    ("swish_sign", {"beta": 2.0}), ("ede", {}), ("ede", {"t": 3.0}), ("ede", {"t": 0.5, "k": 2.0}),
    ("reste", {}), ("reste", {"o": 1.5}), ("reste", {"o": 1.0}), ("identity", {}), ("relu", {}),
    ("clipped_relu", {}), ("clipped_relu", {"upper": 1.9533}),
]


def test_registry_lists_every_estimator():
  assert set(rj.ESTIMATORS) == {
      "ste", "clipped_ste", "dorefa", "md_tanh", "approx_sign", "swish_sign", "ede", "reste",
      "identity", "relu", "clipped_relu"}
  assert rj.quantizers.ESTIMATORS is rj.ESTIMATORS
  for est in rj.ESTIMATORS.values():
    assert est.surrogate.__doc__ and "Backward" in est.surrogate.__doc__ and "Forward" in est.surrogate.__doc__
    assert est.reference


@pytest.mark.parametrize("name,h", CASES, ids=[f"{n}-{h}" for n, h in CASES])
def test_binarize_backward_matches_formula(name, h):
  g = jax.grad(lambda x: jnp.sum(rj.binarize(x, name, **h)))(jnp.asarray(GRID))
  np.testing.assert_allclose(np.asarray(g), _reference(name, GRID, **h), rtol=2e-5, atol=2e-6)


def test_backward_scales_the_incoming_cotangent():
  x = jnp.asarray(GRID)
  cot = jax.random.normal(jax.random.key(1), x.shape)
  _, vjp = jax.vjp(lambda x: rj.binarize(x, "approx_sign"), x)
  np.testing.assert_allclose(vjp(cot)[0], np.asarray(cot) * _reference("approx_sign", GRID), rtol=1e-6, atol=1e-7)


def test_reste_exact_values():
  x = jnp.array([0.0, 0.05, -0.1, 1.0, -1.0, 1.5, 1.5001, -1.6, 3.0])
  g = jax.grad(lambda x: jnp.sum(rj.binarize(x, "reste", o=3.0)))(x)
  np.testing.assert_allclose(g[:3], 4.6416, atol=1e-4)
  np.testing.assert_allclose(g[3:5], 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(g[5], (1 / 3) * 1.5 ** (-2 / 3), rtol=1e-6)
  np.testing.assert_array_equal(g[6:], 0.0)
  assert np.all(np.isfinite(g))


def test_reste_second_derivative_is_finite_at_zero():
  # jnp.where evaluates both branches; the power must not produce NaN at 0.
  d = jax.grad(lambda x: estimators.reste(x, jnp.float32(3.0), jnp.float32(1.5), jnp.float32(0.1)).sum())
  assert np.all(np.isfinite(d(jnp.array([0.0, 0.2]))))


def test_clipped_ste_is_zero_just_past_the_clip():
  c = 0.75
  x = jnp.array([c, np.nextafter(np.float32(c), np.float32(2)), -c, -np.nextafter(np.float32(c), np.float32(2))])
  g = jax.grad(lambda x: jnp.sum(rj.binarize(x, "clipped_ste", clip=c)))(x)
  np.testing.assert_array_equal(g, [1.0, 0.0, 1.0, 0.0])


def test_ede_k_defaults_to_max_inverse_t_one():
  x = jnp.linspace(-1, 1, 11)
  for t in (0.1, 1.0, 5.0):
    g = jax.grad(lambda x: jnp.sum(rj.binarize(x, "ede", t=t)))(x)
    np.testing.assert_allclose(g, _reference("ede", np.asarray(x), t=t, k=max(1 / t, 1)), rtol=1e-5)


@pytest.mark.parametrize("name,bad,match", [
    ("clipped_ste", {"clip": -0.1}, "clip must be >= 0"),
    ("reste", {"o": 0.9}, "o must be >= 1"),
    ("reste", {"m": 0.0}, "m must be > 0"),
    ("reste", {"t": 0.05}, "cut t must exceed the plateau m"),
    ("md_tanh", {"beta": 0.0}, "beta must be > 0"),
    ("swish_sign", {"beta": -1.0}, "beta must be > 0"),
    ("ede", {"t": 0.0}, "t must be > 0"),
    ("clipped_relu", {"upper": 0.0}, "upper must be > 0"),
    ("reste", {"oo": 1.0}, "unknown hyperparameter"),
])
def test_bad_hyperparameters_raise(name, bad, match):
  with pytest.raises(ValueError, match=match):
    rj.binarize(jnp.ones(4), name, **bad)


def test_unknown_estimator_names_the_valid_ones():
  with pytest.raises(ValueError) as err:
    rj.binarize(jnp.ones(4), "straight_through")
  for name in rj.ESTIMATORS:
    assert name in str(err.value)
  with pytest.raises(ValueError, match="valid estimators"):
    rj.uniform(jnp.ones(4), 2, estimator="nope")


def test_traced_hyperparameters_do_not_recompile():
  traces = []

  @jax.jit
  def grad_at(o, x):
    traces.append(None)
    return jax.grad(lambda x: jnp.sum(rj.binarize(x, "reste", o=o)))(x)

  x = jnp.array([0.5, 1.0])
  outs = [grad_at(jnp.float32(o), x) for o in (1.0, 2.0, 3.0)]
  assert len(traces) == 1
  np.testing.assert_allclose(outs[0], [1.0, 1.0], rtol=1e-6)  # o = 1 is the identity
  np.testing.assert_allclose(outs[2][1], 1 / 3, rtol=1e-6)
