"""The coarse-gradient experiment: closed forms against Monte Carlo, Theorem 1's facts, the CLI.

Monte-Carlo tolerances are 5 standard errors of the mean (plus a float32
rounding floor), so a correct formula fails with probability well below 1e-5
per coordinate.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.coarse_gradient import claims
from experiments.coarse_gradient import model as M
from experiments.coarse_gradient import multiclass as MC
from experiments.coarse_gradient import multilevel as ML
from experiments.coarse_gradient import run

MC_SAMPLES = 200_000
M_DIM, N_DIM = 4, 3


def _point(seed, w_scale, theta=None):
  """A teacher and a point (v, w); ``theta`` sets the angle of w to w* when given."""
  rng = np.random.default_rng(seed)
  teacher = M.random_teacher(rng, M_DIM, N_DIM)
  v = jnp.asarray(rng.standard_normal(M_DIM), jnp.float32)
  w = jnp.asarray(rng.standard_normal(N_DIM), jnp.float32)
  if theta is not None:
    d = w - jnp.dot(w, teacher.w_star) * teacher.w_star
    d = d / jnp.linalg.norm(d)
    w = math.cos(theta) * teacher.w_star + math.sin(theta) * d
  return teacher, v, w_scale * w / jnp.linalg.norm(w)


POINTS = {  # (seed, ||w||, theta)
    "theta=0.4,|w|=0.5": (0, 0.5, 0.4),
    "theta=1.6,|w|=1": (1, 1.0, 1.6),
    "theta=2.8,|w|=3": (2, 3.0, 2.8),
}


def _assert_mc(estimate: M.MCEstimate, closed, what: str):
  mean, se = np.asarray(estimate.mean), np.asarray(estimate.stderr)
  closed = np.asarray(closed)
  np.testing.assert_array_less(np.abs(mean - closed), 5 * se + 1e-4, err_msg=what)


@pytest.mark.parametrize("point", POINTS)
def test_closed_forms_match_monte_carlo(point):
  seed, scale, theta = POINTS[point]
  teacher, v, w = _point(seed, scale, theta)
  np.testing.assert_allclose(M.angle(w, teacher.w_star), theta, atol=1e-5)
  estimates = claims._mc_all(v, w, teacher, M.prng_key(7 + seed), MC_SAMPLES)
  for estimator, est in estimates.items():
    _assert_mc(est["loss"], M.population_loss(v, w, teacher), "f")
    _assert_mc(est["grad_v"], M.grad_v(v, w, teacher), "df/dv")
    _assert_mc(est["coarse_grad_w"], M.expected_coarse_grad(v, w, teacher, estimator),
               f"E[g_{estimator}]")


def test_grad_w_is_the_derivative_of_the_closed_form_loss():
  for seed, scale, theta in POINTS.values():
    teacher, v, w = _point(seed, scale, theta)
    auto = jax.grad(M.population_loss, argnums=1)(v, w, teacher)
    np.testing.assert_allclose(M.grad_w(v, w, teacher), auto, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(M.grad_v(v, w, teacher),
                               jax.grad(M.population_loss)(v, w, teacher), rtol=1e-5, atol=1e-6)


def test_grad_w_matches_a_finite_difference_of_the_sampled_loss():
  # df/dw is not the mean of sampled gradients (those are 0 a.e.); check it as a central
  # difference of Monte-Carlo losses with common random numbers, in float32
  teacher, v, w = _point(3, 1.0, 1.2)
  d = M.grad_w(v, w, teacher)
  d = d / jnp.linalg.norm(d)
  h = 0.1
  z = M.sample_inputs(M.prng_key(11), 400_000, M_DIM, N_DIM)
  loss = jax.jit(lambda w: jnp.mean(jax.vmap(M.sample_loss, (None, None, 0, None))(v, w, z,
                                                                                    teacher)))
  fd = (loss(w + h * d) - loss(w - h * d)) / (2 * h)
  # exact central difference of the closed form over the same step, against the MC one
  f = M.population_loss
  exact = (f(v, w + h * d, teacher) - f(v, w - h * d, teacher)) / (2 * h)
  np.testing.assert_allclose(fd, exact, rtol=0.1)
  np.testing.assert_allclose(exact, jnp.dot(M.grad_w(v, w, teacher), d), rtol=0.02)


def test_clipped_relu_closed_form_tends_to_the_relu_one():
  teacher, v, w = _point(4, 1.3, 1.0)
  np.testing.assert_allclose(M.expected_coarse_grad_clipped_relu(v, w, teacher, upper=1e4),
                             M.expected_coarse_grad_relu(v, w, teacher), atol=1e-6)


def test_estimator_names_are_checked():
  teacher, v, w = _point(0, 1.0)
  with pytest.raises(ValueError, match="no closed-form"):
    M.expected_coarse_grad(v, w, teacher, "ste")
  with pytest.raises(ValueError, match="unknown coarse STE"):
    M.coarse_gradient_descent(v, w, teacher, estimator="ste", lr=0.1, steps=2)
  with pytest.raises(ValueError, match="PRNG key"):
    M.coarse_gradient_descent(v, w, teacher, estimator="relu", lr=0.1, steps=2, mc_samples=8)
  with pytest.raises(ValueError, match="nonzero"):
    M.make_teacher(jnp.ones(3), jnp.zeros(2))


# ----------------------------------------------------------------------------
# The spurious minimum (Theorem 1).
# ----------------------------------------------------------------------------


def test_spurious_point_is_critical_in_v_and_the_identity_ste_does_not_vanish():
  m, n = 10, 20
  teacher = M.make_teacher(jnp.linspace(-1.5, 1.0, m), jnp.arange(n) - 3.0)
  assert abs(float(jnp.sum(teacher.v_star))) > 1  # 1^T v* != 0
  vs, ws = M.spurious_point(teacher, w_norm=2.0)
  np.testing.assert_allclose(M.angle(ws, teacher.w_star), math.pi, atol=1e-6)
  # v = (I + 11^T)^{-1} (11^T - I) v*, against a dense solve
  a = np.eye(m) + 1.0
  want = np.linalg.solve(a, (np.ones((m, m)) - np.eye(m)) @ np.asarray(teacher.v_star, np.float64))
  np.testing.assert_allclose(vs, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(M.grad_v(vs, ws, teacher), 0.0, atol=1e-6)
  printed = float(M.spurious_identity_norm(teacher.v_star))
  s = float(np.sum(np.asarray(teacher.v_star, np.float64)))
  np.testing.assert_allclose(printed, 2 * (m - 1) * s**2 / (math.sqrt(2 * math.pi) * (m + 1) ** 2),
                             rtol=1e-6)
  g_id = M.expected_coarse_grad_identity(vs, ws, teacher)
  np.testing.assert_allclose(jnp.linalg.norm(g_id), printed, rtol=1e-5)
  # ... and Monte Carlo agrees with the printed norm
  est = claims._mc_all(vs, ws, teacher, M.prng_key(3), claims.QUICK.b_mc_samples)
  _assert_mc(est["identity"]["coarse_grad_w"], g_id, "E[g_id] at the spurious point")
  # the ReLU and clipped-ReLU expected coarse gradients vanish there (our observation)
  for name in ("relu", "clipped_relu"):
    np.testing.assert_allclose(M.expected_coarse_grad(vs, ws, teacher, name), 0.0, atol=1e-6)


def test_spurious_point_is_a_local_minimum_exactly_when_vTv_star_is_negative():
  m = 6
  local = M.make_teacher(jnp.array([1.0, -1.0, 0.5, -0.3, 0.2, 0.4]), jnp.ones(5))
  saddle = M.make_teacher(jnp.ones(m), jnp.ones(5))
  for teacher, is_min in ((local, True), (saddle, False)):
    assert M.spurious_is_local_min(teacher.v_star) is is_min
    vs, ws = M.spurious_point(teacher)
    assert (float(jnp.dot(vs, teacher.v_star)) < 0) is is_min
    # probe f at random nearby points
    rng = np.random.default_rng(5)
    dv = 1e-2 * rng.standard_normal((500, m)).astype(np.float32)
    dw = 1e-2 * rng.standard_normal((500, 5)).astype(np.float32)
    df = jax.jit(jax.vmap(lambda a, b: M.population_loss(vs + a, ws + b, teacher)))(dv, dw)
    df = df - M.population_loss(vs, ws, teacher)
    assert (float(jnp.min(df)) > -1e-6) is is_min


def test_identity_ste_leaves_the_spurious_point_and_relu_ste_stays():
  cfg = claims.QUICK  # the CLI test below reuses these compiled programs
  metrics, curves = claims.claim_b(cfg)
  assert metrics["spurious_is_local_min"] and metrics["local_min_probe_min_df"] > 0
  np.testing.assert_allclose(metrics["coarse_norm_closed"]["identity"],
                             metrics["printed_identity_norm"], rtol=1e-5)
  # E[g_id] is parallel to w there, so ||w|| first shrinks by lr * printed norm per step
  rate = cfg.b_lr * metrics["printed_identity_norm"]
  np.testing.assert_allclose(curves["identity|exact"]["w_norm"][:10], 1.0 - rate * np.arange(10),
                             rtol=1e-4)
  for start in ("exact", "perturbed"):
    ident = metrics["runs"][f"identity|{start}"]
    assert ident["min_w_norm"] < 0.05 and ident["max_loss_increase"] > 0.1  # w flips through 0
    for name in ("relu", "clipped_relu"):  # stay at, or move back towards, the spurious point
      stay = metrics["runs"][f"{name}|{start}"]
      assert stay["final_v_dist_to_spurious"] < (1e-4 if start == "exact" else 0.03), name
      assert stay["max_loss_increase"] < 1e-5 and stay["final_theta"] > math.pi - 1e-3, name


# ----------------------------------------------------------------------------
# Correlation and descent.
# ----------------------------------------------------------------------------


def test_expected_coarse_gradients_correlate_positively_with_the_true_gradient():
  metrics, curves = claims.claim_c(claims.QUICK)  # random points, closed forms and Monte Carlo
  for estimator in M.STES:
    c = curves[estimator]
    assert float(np.min(c["inner"])) >= 0.0 and float(np.min(c["cos"])) >= 0.0, estimator
    np.testing.assert_allclose(c["inner"], c["formula"], rtol=1e-3, atol=1e-7, err_msg=estimator)
    assert metrics["mc"][estimator]["max_abs_z_vs_formula"] < 5, estimator
  # the printed identity value is twice the ReLU one; ours for the clipped ReLU lies below it
  np.testing.assert_allclose(curves["identity"]["formula"], 2 * curves["relu"]["formula"],
                             rtol=1e-4)
  assert np.all(curves["clipped_relu"]["formula"] <= curves["relu"]["formula"] * (1 + 1e-5))


def test_short_relu_ste_runs_decrease_the_loss_monotonically():
  metrics, curves = claims.claim_a(claims.QUICK)  # 2 random starts
  key = "relu|w0=10|lr=0.05"
  assert metrics["runs"][key]["runs_monotone"] == metrics["runs"][key]["seeds"]
  loss = curves[key]["loss"]
  assert np.max(np.diff(loss, axis=1)) <= 1e-5
  assert np.all(loss[:, -1] < 0.75 * loss[:, 0])
  # and two runs from ||w0|| = 3
  teacher = M.random_teacher(np.random.default_rng(0), 10, 20)
  v0, d0 = claims._random_starts(np.random.default_rng(1), 2, 10, 20)
  run_ = claims._algorithm1_all(v0, 3 * d0, teacher, 0.05, 300)["relu"]  # compiled for QUICK
  loss = np.asarray(run_.loss)
  assert np.max(np.diff(loss)) <= 1e-5
  assert np.all(loss[:, -1] < 0.5 * loss[:, 0])


def test_monte_carlo_algorithm_1_follows_the_closed_form_one():
  teacher = M.random_teacher(np.random.default_rng(2), 6, 5)
  v0, w0 = jnp.ones(6), jnp.ones(5)
  closed = M.coarse_gradient_descent(v0, w0, teacher, estimator="clipped_relu", lr=0.05, steps=40)
  mc = M.coarse_gradient_descent(v0, w0, teacher, estimator="clipped_relu", lr=0.05, steps=40,
                                 mc_samples=20_000, key=M.prng_key(3))
  np.testing.assert_allclose(mc.loss, closed.loss, rtol=0.05, atol=0.01)


# ----------------------------------------------------------------------------
# Multi-level and multi-class extensions.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4])
def test_multilevel_teacher_is_a_fixed_point_of_every_ste(bits):
  teacher = M.random_teacher(np.random.default_rng(4), 5, 6)
  z = M.sample_inputs(M.prng_key(5), 256, 5, 6)
  for name in M.STES:
    gv, gw = jax.grad(ML.batch_loss, argnums=(0, 1))(teacher.v_star, teacher.w_star, z, teacher,
                                                     bits, name)
    assert float(ML.batch_loss(teacher.v_star, teacher.w_star, z, teacher, bits)) == 0.0
    np.testing.assert_array_equal(gv, 0.0)
    np.testing.assert_array_equal(gw, 0.0)


def test_multiclass_data_respects_the_margin_and_the_teacher_labels():
  rng = np.random.default_rng(6)
  teacher = MC.make_teacher(rng, 6, 5, 3)
  x, y, kept = MC.make_data(rng, teacher, 300, 2, margin=0.5)
  assert 0.25 <= kept <= 1
  z = MC.logits(teacher, jnp.asarray(x), 2)
  np.testing.assert_array_equal(y, jnp.argmax(z, axis=1))
  top2 = jnp.sort(z, axis=1)[:, -2:]
  assert float(jnp.min(top2[:, 1] - top2[:, 0])) >= 0.5
  with pytest.raises(ValueError, match="margin"):
    MC.make_data(rng, teacher, 300, 2, margin=100.0)


# ----------------------------------------------------------------------------
# The CLI.
# ----------------------------------------------------------------------------


def test_quick_cli_runs_end_to_end(tmp_path):
  out = tmp_path / "cg"
  metrics = run.main(["--quick", "--out", str(out)])
  assert set("abcde") <= set(metrics)
  saved = json.loads((out / "metrics.json").read_text())
  assert saved["meta"]["quick"] is True
  readme = (out / "README.md").read_text()
  assert "python -m experiments.coarse_gradient.run --quick" in readme
  assert readme.count("| identity |") >= 3
  try:
    import matplotlib  # noqa: F401
  except ImportError:
    return
  pngs = sorted(p.name for p in out.glob("*.png"))
  assert len(pngs) >= 6 and all((out / p).stat().st_size > 10_000 for p in pngs)
  assert all(f"]({p})" in readme for p in pngs)


def test_cli_rejects_unknown_claims():
  with pytest.raises(SystemExit):
    run.parse_args(["--claims", "az"])
