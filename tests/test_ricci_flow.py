"""The discrete Ricci flow: rank-1 algebra against dense matrices, translations, translated gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ricci_jax as rj
from ricci_jax import lne, ricci_flow
from ricci_jax.ricci_flow import Shifts


def _vectors(key, m, n, scale=0.3):
  return jnp.tanh(jax.random.normal(jax.random.key(key), (m, n)) * scale)


@pytest.mark.parametrize("shifts", [Shifts(), Shifts(2, -1, 1, -2), Shifts(0, 3, -1, 1)])
@pytest.mark.parametrize("n", [5, 40, 300])
def test_rank1_residual_norm_equals_the_dense_norm(shifts, n):
  vecs = _vectors(n, 5, n)
  rank1 = ricci_flow.flow_residual(vecs[0], vecs[1:], shifts).frobenius_sq()
  dense = jnp.sum(ricci_flow.flow_residual_dense(vecs[0], vecs[1:], shifts) ** 2)
  np.testing.assert_allclose(rank1, dense, rtol=1e-5)
  np.testing.assert_allclose(ricci_flow.flow_residual(vecs[0], vecs[1:], shifts).dense(),
                             ricci_flow.flow_residual_dense(vecs[0], vecs[1:], shifts), atol=1e-6)


def test_curvature_matches_eq32_with_dense_metrics():
  shifts = Shifts(1, -2, 2, -1)
  tk1, tk2, tj1, tj2 = _vectors(1, 4, 30)
  g = lambda t: jnp.eye(30) - jnp.outer(t, t)  # noqa: E731
  dense = (g(tk1) - g(tk2)) / shifts.dk - (g(tj1) - g(tj2)) / shifts.dj
  rank1 = ricci_flow.curvature(tk1, tk2, tj1, tj2, shifts)
  np.testing.assert_allclose(rank1.dense(), dense, atol=1e-6)
  np.testing.assert_allclose(rank1.frobenius_sq(), jnp.sum(dense**2), rtol=1e-5)


def test_residual_with_identical_metrics_and_no_change_is_zero():
  t = _vectors(2, 1, 20)[0]
  prev = jnp.broadcast_to(t, (4, 20))
  assert float(ricci_flow.flow_residual(t, prev).frobenius_sq()) == pytest.approx(0.0, abs=1e-10)


def test_translate_roll_and_pad():
  img = jnp.arange(16.0).reshape(1, 4, 4, 1)
  down = ricci_flow.translate(img, 1, 0, "roll")
  np.testing.assert_array_equal(down[0, 1:, :, 0], img[0, :-1, :, 0])
  np.testing.assert_array_equal(down[0, 0, :, 0], img[0, -1, :, 0])
  left = ricci_flow.translate(img, 0, -1, "pad")
  np.testing.assert_array_equal(left[0, :, :-1, 0], img[0, :, 1:, 0])
  np.testing.assert_array_equal(left[0, :, -1, 0], 0)
  np.testing.assert_array_equal(ricci_flow.translate(img, 2, -1, "pad")[0, :2], 0)
  with pytest.raises(ValueError, match="valid: roll, pad"):
    ricci_flow.translate(img, 1, 0, "wrap")
  with pytest.raises(ValueError, match="NHWC"):
    ricci_flow.translate(img[0], 1, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(k1=1, k2=1), "k1 != k2"),
    (dict(j1=2, j2=-2), "under 4 pixels"),
    (dict(k1=1.5), "whole number"),
])
def test_bad_shifts(kwargs, match):
  with pytest.raises(ValueError, match=match):
    Shifts(**kwargs)


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = rj.QuantConv(3, (3, 3), quant=rj.QuantConfig(weight=rj.TensorQuant()), name="conv")(x)
    return nn.Dense(4, name="head")(x.reshape(x.shape[0], -1))


def _tiny_setup():
  model = _Tiny()
  x = jax.random.normal(jax.random.key(0), (16, 6, 6, 2))
  y = jax.random.randint(jax.random.key(1), (16,), 0, 4)
  params = model.init(jax.random.key(2), x)["params"]

  def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch["image"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  return params, {"image": x, "label": y}, loss_fn


@pytest.mark.parametrize("strategy", ["loop", "vmap"])
@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_translated_grads_equal_four_separate_gradients(fraction, strategy):
  params, batch, loss_fn = _tiny_setup()
  shifts = Shifts(1, -1, 2, -1)
  got = ricci_flow.translated_grads(loss_fn, params, batch, shifts, fraction, strategy=strategy)
  stride = round(1 / fraction)
  small = {k: v[::stride] for k, v in batch.items()}
  for i, (dy, dx) in enumerate(shifts.as_pixels()):
    moved = {**small, "image": jnp.roll(small["image"], (dy, dx), axis=(1, 2))}
    want = jax.grad(loss_fn)(params, moved)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6)
  assert all(leaf.shape[0] == 4 for leaf in jax.tree.leaves(got))


def test_no_gradient_flows_back_through_the_translated_passes():
  params, batch, loss_fn = _tiny_setup()
  g = jax.grad(lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(ricci_flow.translated_grads(loss_fn, p, batch))))(params)
  assert all(float(jnp.max(jnp.abs(leaf))) == 0.0 for leaf in jax.tree.leaves(g))


def test_subsample_is_strided_and_validated():
  np.testing.assert_array_equal(ricci_flow.subsample({"a": jnp.arange(16)}, 0.25)["a"], [0, 4, 8, 12])
  for bad in (0.0, 1.5):
    with pytest.raises(ValueError, match="fraction"):
      ricci_flow.subsample({"a": jnp.arange(4)}, bad)
  with pytest.raises(ValueError, match="valid: auto, loop, vmap"):
    ricci_flow.translated_grads(lambda p, b: 0.0, {}, {"image": jnp.ones((2, 3, 3, 1))}, strategy="scan")
  with pytest.raises(ValueError, match="no 'image' entry"):
    ricci_flow.translated_grads(lambda p, b: 0.0, {}, {"x": jnp.ones((2, 3, 3, 1))})


def test_tentative_vectors_follow_eqs_31_32():
  w = jax.random.normal(jax.random.key(3), (5, 4)) * 0.4
  g4 = jax.random.normal(jax.random.key(4), (4, 5, 4))
  tau, eta = jnp.float32(0.3), jnp.float32(0.1)
  got = ricci_flow.tentative_vectors(w, g4, tau, eta, "weak")
  for s in range(4):
    want = np.tanh(0.3 * (np.asarray(w) - 0.1 * np.asarray(lne.natural_gradient(w, g4[s], 0.3, "weak")))).ravel()
    np.testing.assert_allclose(got[s], want, rtol=1e-5, atol=1e-6)


def _dense_n(w, g4, prev, tau, eta, shifts):
  """N from dense matrices, the tentative step held fixed: a reference for value and gradient."""
  steps = jax.lax.stop_gradient(jnp.stack([eta * lne.natural_gradient(w, g4[s], tau).ravel() for s in range(4)]))
  a = jnp.tanh(tau * (w.ravel() - steps[0]))
  return jnp.sum(ricci_flow.flow_residual_dense(a, prev, shifts) ** 2)


def test_residual_norm_value_and_gradient_against_dense():
  w = jax.random.normal(jax.random.key(5), (6, 5)) * 0.5
  g4 = jax.random.normal(jax.random.key(6), (4, 6, 5))
  prev = _vectors(7, 4, 30)
  tau, eta, shifts = jnp.float32(0.25), jnp.float32(0.5), Shifts()
  (n, store), grad = jax.value_and_grad(ricci_flow.residual_norm, has_aux=True)(w, g4, prev, tau, eta, shifts=shifts)
  n_dense, grad_dense = jax.value_and_grad(_dense_n)(w, g4, prev, tau, eta, shifts)
  np.testing.assert_allclose(n, n_dense, rtol=1e-5)
  np.testing.assert_allclose(grad, grad_dense, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(store, ricci_flow.tentative_vectors(w, g4, tau, eta), rtol=1e-6)
  assert float(n) > 0


def test_readings():
  w = jax.random.normal(jax.random.key(8), (20,)) * 0.5
  g4 = jax.random.normal(jax.random.key(9), (4, 20))
  prev = _vectors(10, 4, 20)
  tau, eta = jnp.float32(0.3), jnp.float32(0.2)
  tent = ricci_flow.tentative_vectors(w, g4, tau, eta)
  # current: all g(t)|s are the current metric, the curvature vanishes
  n_cur, _ = ricci_flow.residual_norm(w, g4, prev, tau, eta, reading="current")
  t = lne.metric_vector(w, tau)
  np.testing.assert_allclose(n_cur, jnp.sum((jnp.outer(t, t) - jnp.outer(tent[0], tent[0])) ** 2), rtol=1e-5)
  # lag uses the stored previous vectors; two_step ignores them
  n_lag, _ = ricci_flow.residual_norm(w, g4, prev, tau, eta, reading="lag")
  n_two, _ = ricci_flow.residual_norm(w, g4, prev, tau, eta, reading="two_step")
  n_two_b, _ = ricci_flow.residual_norm(w, g4, prev * 0.5, tau, eta, reading="two_step")
  assert float(n_lag) != float(n_two) and float(n_two) == float(n_two_b)
  with pytest.raises(ValueError, match="valid: lag, current, two_step"):
    ricci_flow.residual_norm(w, g4, prev, tau, eta, reading="future")


def test_initial_condition_is_the_current_metric_for_every_shift():
  w = jax.random.normal(jax.random.key(11), (3, 4))
  prev = ricci_flow.initial_previous(w, jnp.float32(0.2))
  assert prev.shape == (4, 12)
  np.testing.assert_allclose(prev, np.broadcast_to(np.tanh(0.2 * np.asarray(w).ravel()), (4, 12)), rtol=1e-6)


def test_residual_norm_costs_linear_memory():
  """N for a 1e6-weight layer runs without ever building a 1e6 x 1e6 matrix."""
  n = 1_000_000
  w = jax.random.normal(jax.random.key(12), (n,)) * 0.01
  g4 = jax.random.normal(jax.random.key(13), (4, n))
  prev = ricci_flow.initial_previous(w, lne.auto_tau(w))
  compiled = jax.jit(ricci_flow.residual_norm).lower(w, g4, prev, lne.auto_tau(w), jnp.float32(0.1)).compile()
  mem = compiled.memory_analysis()
  if mem is not None:
    assert mem.temp_size_in_bytes < 200 * n  # a few (4, n) float32 buffers, not n^2
  value, _ = compiled(w, g4, prev, lne.auto_tau(w), jnp.float32(0.1))
  assert np.isfinite(float(value))


def test_residual_norm_is_accurate_when_the_metrics_barely_move():
  """The realistic regime: N ~ 1e-10 of |t|^4. Naive c^T (G o G) c in float32 loses it entirely."""
  rng = np.random.default_rng(0)
  n = 20_000
  base = np.tanh(rng.normal(size=n) * 0.004)  # s ~ 0.3, as with tau="auto"
  vecs = np.stack([base + 1e-6 * rng.normal(size=n) for _ in range(5)])
  shifts = Shifts()
  dk, dj = shifts.dk, shifts.dj
  coeffs = np.array([-1.0, 1 + 1 / dk, -1 / dk, -1 / dj, 1 / dj])
  # float64 reference through the (exact) centred expansion of the same matrix
  gram = vecs @ vecs.T
  exact = coeffs @ (gram * gram) @ coeffs  # float64 has the digits to spare here
  got = ricci_flow.flow_residual(jnp.asarray(vecs[0], jnp.float32), jnp.asarray(vecs[1:], jnp.float32),
                                 shifts).frobenius_sq()
  assert exact > 0
  np.testing.assert_allclose(float(got), exact, rtol=2e-2)
  naive_gram = np.asarray(jnp.asarray(vecs, jnp.float32) @ jnp.asarray(vecs, jnp.float32).T)
  naive = float(coeffs.astype(np.float32) @ (naive_gram * naive_gram) @ coeffs.astype(np.float32))
  assert abs(naive - exact) > 10 * abs(float(got) - exact)  # the centring is what makes it work


@pytest.mark.parametrize("coeffs", [[-1.0, 1.5, -0.5, -0.5, 0.5], [0.3, -2.0, 1.0], [2.0, 1.0, 0.5, -0.25]])
def test_rank1_norm_gradient_matches_autodiff_of_the_dense_matrix(coeffs):
  c = jnp.asarray(coeffs, jnp.float32)
  v = _vectors(20 + len(coeffs), len(coeffs), 30, scale=0.8)
  got = jax.grad(lambda v: ricci_flow.Rank1Sum(c, v).frobenius_sq())(v)
  want = jax.grad(lambda v: jnp.sum(ricci_flow.Rank1Sum(c, v).dense() ** 2))(v)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(want))))
  np.testing.assert_allclose(ricci_flow.Rank1Sum(c, v).frobenius_sq(),
                             jnp.sum(ricci_flow.Rank1Sum(c, v).dense() ** 2), rtol=1e-5)


@pytest.mark.parametrize("reading", ["lag", "current", "two_step"])
def test_every_reading_has_the_gradient_of_its_dense_residual(reading):
  w = jax.random.normal(jax.random.key(30), (6, 5)) * 0.5
  g4 = jax.random.normal(jax.random.key(31), (4, 6, 5))
  prev = _vectors(32, 4, 30)
  tau, eta = jnp.float32(0.25), jnp.float32(0.5)

  def dense(w):
    t_next, t_prev, _ = ricci_flow.flow_vectors(w, g4, prev, tau, eta, reading=reading)
    return jnp.sum(ricci_flow.flow_residual_dense(t_next, t_prev) ** 2)

  got = jax.grad(lambda w: ricci_flow.residual_norm(w, g4, prev, tau, eta, reading=reading)[0])(w)
  np.testing.assert_allclose(got, jax.grad(dense)(w), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------
# The residual in the update's own metric: blocks and the Hessian-diagonal metric.
# ---------------------------------------------------------------------------


def _np_blocks(shape, block):
  """Flat indices of each block, by loops over the kernel's axes (independent of lne.to_blocks)."""
  idx = np.arange(int(np.prod(shape))).reshape(shape)
  if block == "layer":
    return [idx.ravel()]
  if block == "out_channel":
    return [idx[..., o].ravel() for o in range(shape[-1])]
  return [idx[..., i, o].ravel() for i in range(shape[-2]) for o in range(shape[-1])]  # kernel


def _np_n(w, g4, prev, tau, eta, shifts, metric, block):
  """N of Eq. 35 from dense float64 block metrics; the tentative steps (weak inverse) computed at ``w``."""
  return _np_n_shifted(w, w, g4, prev, tau, eta, shifts, metric, block)


@pytest.mark.parametrize("metric", ["rank1", "hessian_diagonal"])
@pytest.mark.parametrize("block", ["layer", "out_channel", "kernel"])
def test_residual_in_the_updates_metric_against_dense_float64(metric, block):
  shape = (2, 3, 2, 3)
  w = jax.random.normal(jax.random.key(11), shape) * 0.5
  g4 = jax.random.normal(jax.random.key(12), (4,) + shape)
  prev = _vectors(13, 4, w.size)
  tau, eta, shifts = 0.7, 0.2, Shifts(1, -2, 1, -1)
  n, grad = jax.value_and_grad(lambda w: ricci_flow.residual_norm(
      w, g4, prev, jnp.float32(tau), jnp.float32(eta), shifts=shifts, metric=metric, block=block)[0])(w)
  np.testing.assert_allclose(n, _np_n(w, g4, prev, tau, eta, shifts, metric, block), rtol=1e-4)
  # the gradient through tanh(tau w), the tentative steps held at their value: central differences in float64
  steps_fixed = np.asarray(w, np.float64)
  rng = np.random.default_rng(0)
  for i in rng.choice(w.size, 6, replace=False):
    e = np.zeros(w.size)
    e[i] = 1e-6

    def n_at(delta):
      # shift w but keep the tentative step eta * g^-1 g_k1 computed at the original w
      wp = (steps_fixed.ravel() + delta).reshape(shape)
      return _np_n_shifted(wp, steps_fixed, g4, prev, tau, eta, shifts, metric, block)

    fd = (n_at(e) - n_at(-e)) / 2e-6
    np.testing.assert_allclose(np.asarray(grad).ravel()[i], fd, rtol=2e-3, atol=1e-6)


def _np_n_shifted(w, w0, g4, prev, tau, eta, shifts, metric, block):
  """_np_n at weights ``w`` with the tentative steps of ``w0`` (what stop_gradient means)."""
  w, w0, g4, prev = (np.asarray(x, np.float64) for x in (w, w0, g4, prev))
  total, offset = 0.0, 0
  for ix in _np_blocks(w.shape, block):
    m = ix.size
    gm = lambda u: np.eye(m) - (np.diag(u**2) if metric == "hessian_diagonal" else np.outer(u, u))  # noqa: E731
    t0 = np.tanh(tau * w0.ravel()[ix])
    step = eta * (2 * np.eye(m) - gm(t0)) @ g4[0].ravel()[ix]
    a = np.tanh(tau * (w.ravel()[ix] - step))
    u = prev[:, offset:offset + m]
    offset += m
    ricci = (gm(u[0]) - gm(u[1])) / shifts.dk - (gm(u[2]) - gm(u[3])) / shifts.dj
    total += np.sum((gm(a) - gm(u[0]) - ricci) ** 2)
  return total


def test_initial_previous_and_the_stored_vectors_follow_the_block_order():
  w = jax.random.normal(jax.random.key(14), (3, 3, 2, 4)) * 0.3
  prev = ricci_flow.initial_previous(w, jnp.float32(0.5), "out_channel")
  want = np.concatenate([np.tanh(0.5 * np.asarray(w)[..., o].ravel()) for o in range(4)])
  np.testing.assert_allclose(prev[2], want, rtol=1e-6)
  g4 = jnp.zeros((4,) + w.shape)  # no tentative step: every stored vector is the current metric's
  _, store = ricci_flow.residual_norm(w, g4, prev, jnp.float32(0.5), jnp.float32(0.1), block="out_channel")
  np.testing.assert_allclose(store, prev, rtol=1e-6)


def test_diagonal_residual_keeps_its_digits_when_the_metrics_barely_move():
  w = jax.random.normal(jax.random.key(15), (4000,)) * 0.5
  t = np.tanh(np.asarray(w, np.float64))
  prev = np.stack([t + 1e-5 * k for k in range(1, 5)])
  a = t + 3e-5
  got = ricci_flow.residual_squared_norm(jnp.asarray(a, jnp.float32), jnp.asarray(prev, jnp.float32),
                                         metric="hessian_diagonal")
  c = np.array([-1.0, 1.5, -0.5, -0.5, 0.5])
  vec = np.stack([a, *prev])
  want = np.sum((c @ (vec**2)) ** 2)
  np.testing.assert_allclose(got, want, rtol=2e-2)
