"""One function per reproduced claim (a-e); each returns JSON-able metrics and plot data.

(a) Theorem 1, ReLU STE: Algorithm 1 decreases f and converges.
(b) Theorem 1, identity STE: E[g_id] does not vanish at the spurious minimum.
(c) The expected coarse gradients correlate positively with df/dw.
(d) Multi-level staircase student/teacher (our extension).
(e) Multi-class two-linear-layer classifier (our extension).

Every function takes a :class:`Config` and returns ``(metrics, curves)``:
``metrics`` is a dict of plain floats / ints / strings (goes to
``metrics.json`` and the README tables) and ``curves`` a dict of NumPy arrays
for the plots.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.coarse_gradient import model as M
from experiments.coarse_gradient import multiclass as MC
from experiments.coarse_gradient import multilevel as ML

STES = M.STES


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes and hyperparameters of every claim (``FULL`` and ``QUICK`` below)."""

  seed: int = 0
  # the binary model (a, b, c)
  m: int = 10
  n: int = 20
  # (a) Theorem 1 from random starts
  a_seeds: int = 20
  a_runs: tuple[tuple[float, float], ...] = ((1.0, 0.05), (1.0, 0.01), (10.0, 0.05))  # (||w0||, lr)
  a_horizon: float = 200.0  # lr * steps
  a_tol: float = 1e-3  # theta and ||v - v*|| below this count as converged
  # (b) the spurious minimum
  b_steps: int = 2000
  b_lr: float = 0.05
  b_perturb: float = 0.05
  b_mc_samples: int = 200_000  # MC check of E[g] at the spurious point
  b_mc_run_samples: int = 2048  # per step, for the Monte-Carlo run of Algorithm 1
  b_mc_run_steps: int = 1000
  b_local_probes: int = 2000
  # (c) correlations
  c_points: int = 2000
  c_mc_points: int = 48
  c_mc_samples: int = 20_000
  # (d) multi-level staircase
  d_bits: tuple[int, ...] = (2, 4)
  d_seeds: int = 8
  d_steps: int = 4000
  d_lr: float = 0.05
  d_batch: int = 256
  d_train: int = 32768
  d_eval: int = 8192
  d_eval_every: int = 100
  # (e) multi-class
  e_bits: tuple[int, ...] = (1, 2)
  e_seeds: int = 5
  e_steps: int = 3000
  e_lr: float = 0.2
  e_lr_sweep: tuple[float, ...] = (0.05, 0.5)
  e_momentum: float = 0.9
  e_dim: int = 10
  e_teacher_hidden: int = 8
  e_student_hidden: int = 32
  e_classes: int = 4
  e_train: int = 1000
  e_test: int = 5000
  e_margin: float = 1.0


FULL = Config()
QUICK = Config(  # (a) and (b) share one compiled Algorithm-1 program: 2 starts, 300 steps
    a_seeds=2, a_runs=((1.0, 0.05), (10.0, 0.05)), a_horizon=15.0,
    b_steps=300, b_mc_samples=20_000, b_mc_run_steps=0, b_local_probes=200,
    c_points=200, c_mc_points=4, c_mc_samples=2000,
    d_bits=(2,), d_seeds=2, d_steps=200, d_train=2048, d_eval=1024, d_eval_every=50,
    e_bits=(1,), e_seeds=2, e_steps=200, e_lr_sweep=(), e_train=200, e_test=500)


def _progress(items: Iterable, desc: str, progress: Callable | None):
  return progress(items, desc=desc) if progress is not None else items


def _f(x) -> float:
  return float(np.asarray(x))


def _rng(cfg: Config, claim: int) -> np.random.Generator:
  """The NumPy generator of a claim's set-up draws (teachers, starts, data)."""
  return np.random.default_rng([cfg.seed, claim])


def _binary_teacher(cfg: Config, min_abs_sum: float = 1.5) -> M.Teacher:
  """The one teacher of claims (a) and (b): a :func:`M.random_teacher` draw, redrawn until
  ``|1^T v*| >= min_abs_sum`` and its spurious point is a local minimum, so that Theorem 1's
  identity-STE statement (which needs 1^T v* != 0) has a visible effect."""
  rng = _rng(cfg, 0)
  while True:
    teacher = M.random_teacher(rng, cfg.m, cfg.n)
    v_star = np.asarray(teacher.v_star)
    if abs(v_star.sum()) >= min_abs_sum and M.spurious_is_local_min(v_star):
      return teacher


# ----------------------------------------------------------------------------
# (a) Theorem 1 with the ReLU STE (and the others, for contrast).
# ----------------------------------------------------------------------------


def _outcome(theta, v, teacher: M.Teacher, tol: float) -> str:
  """``global`` (theta ~ 0, v ~ v*), ``spurious`` (theta ~ pi, v ~ spurious v) or ``other``."""
  if theta < tol and np.linalg.norm(v - np.asarray(teacher.v_star)) < tol:
    return "global"
  if math.pi - theta < tol and np.linalg.norm(v - np.asarray(M.spurious_v(teacher.v_star))) < tol:
    return "spurious"
  return "other"


def _random_starts(rng: np.random.Generator, num: int, m: int, n: int):
  """``num`` starts: v0 ~ N(0, I_m) and unit directions d0 uniform on the sphere of R^n."""
  v0 = rng.standard_normal((num, m))
  d0 = rng.standard_normal((num, n))
  d0 /= np.linalg.norm(d0, axis=1, keepdims=True)
  return jnp.asarray(v0, jnp.float32), jnp.asarray(d0, jnp.float32)


@functools.partial(jax.jit, static_argnames="steps")
def _algorithm1_all(v0, w0, teacher: M.Teacher, lr, steps: int) -> dict:
  """Algorithm 1 from every start (batched), for every STE, as one compiled program."""
  return {est: jax.vmap(lambda v, w, est=est: M.coarse_gradient_descent(
      v, w, teacher, estimator=est, lr=lr, steps=steps))(v0, w0) for est in STES}


@jax.jit
def _teacher_facts(teacher: M.Teacher) -> dict:
  vs, ws = M.spurious_point(teacher)
  g = {est: jnp.linalg.norm(M.expected_coarse_grad(vs, ws, teacher, est)) for est in STES}
  return {"1Tv*": jnp.sum(teacher.v_star), "vTv*_at_spurious": jnp.dot(vs, teacher.v_star),
          "loss_at_spurious": M.population_loss(vs, ws, teacher),
          "grad_v_norm_at_spurious": jnp.linalg.norm(M.grad_v(vs, ws, teacher)),
          "printed_identity_norm": M.spurious_identity_norm(teacher.v_star),
          "relu_h_at_spurious": M.relu_h(vs, teacher.v_star), "coarse_norm_closed": g}


def claim_a(cfg: Config, progress=None):
  """Algorithm 1 from ``a_seeds`` random starts, every STE, every (``||w0||``, lr) in ``a_runs``.

  Starts: v0 ~ N(0, I_m), w0 uniform on the sphere of radius ``||w0||`` (the
  same directions for every row). The expected coarse gradients are the closed
  forms (clipped ReLU: ours). T = ``a_horizon / lr``.
  """
  teacher = _binary_teacher(cfg)
  v0, d0 = _random_starts(_rng(cfg, 1), cfg.a_seeds, cfg.m, cfg.n)
  facts = jax.device_get(_teacher_facts(teacher))
  metrics = {"teacher_1Tv*": float(facts["1Tv*"]),
             "spurious_is_local_min": M.spurious_is_local_min(teacher.v_star),
             "spurious_loss": float(facts["loss_at_spurious"]), "runs": {}}
  curves = {}
  for r, lr in _progress(cfg.a_runs, "(a) Theorem 1", progress):
    steps = int(round(cfg.a_horizon / lr))
    runs = jax.device_get(_algorithm1_all(v0, r * d0, teacher, lr, steps))
    for est in STES:  # device_get returns dicts with sorted keys; keep the STE order
      run = runs[est]
      loss = np.asarray(run.loss)
      inc = np.diff(loss, axis=1)
      outcomes = [_outcome(float(run.theta[i, -1]), run.v[i], teacher, cfg.a_tol)
                  for i in range(cfg.a_seeds)]
      tail = loss[:, -max(steps // 10, 1):]
      key = f"{est}|w0={r:g}|lr={lr:g}"
      metrics["runs"][key] = {
          "estimator": est, "w0_norm": r, "lr": lr, "steps": steps,
          "global": outcomes.count("global"), "spurious": outcomes.count("spurious"),
          "other": outcomes.count("other"), "seeds": cfg.a_seeds,
          "max_loss_increase": float(inc.max()),
          "runs_monotone": int(np.sum(inc.max(axis=1) <= 1e-5)),
          "min_w_norm": float(run.w_norm.min()),
          "median_final_loss": float(np.median(loss[:, -1])),
          "median_final_theta": float(np.median(run.theta[:, -1])),
          "median_final_v_err": float(np.median(run.v_err[:, -1])),
          "max_tail_loss_range": float((tail.max(1) - tail.min(1)).max()),
          "outcomes": outcomes,
      }
      curves[key] = {"loss": loss, "theta": run.theta, "w_norm": run.w_norm, "outcomes": outcomes}
  return metrics, curves


# ----------------------------------------------------------------------------
# (b) The spurious minimum of Theorem 1.
# ----------------------------------------------------------------------------


@jax.jit
def _local_min_probe(teacher: M.Teacher, dv, dw, radius: float = 1e-2):
  """min over probes of f(spurious + radius (dv, dw) / ||(dv, dw)||) - f(spurious).

  Non-negative at a local minimum (for a small enough radius).
  """
  vs, ws = M.spurious_point(teacher)
  scale = radius / jnp.sqrt(jnp.sum(dv**2, 1) + jnp.sum(dw**2, 1))
  f0 = M.population_loss(vs, ws, teacher)
  f = jax.vmap(lambda a, b: M.population_loss(vs + a, ws + b, teacher))(dv * scale[:, None],
                                                                         dw * scale[:, None])
  return jnp.min(f - f0)


@functools.partial(jax.jit, static_argnames="num")
def _mc_all(v, w, teacher: M.Teacher, key, num: int) -> dict:
  """Monte-Carlo estimates of f, df/dv and E[g] at one point, for every STE."""
  return {est: M.mc_estimates(v, w, teacher, est, jax.random.fold_in(key, i), num)
          for i, est in enumerate(STES)}


def claim_b(cfg: Config, progress=None):
  """Algorithm 1 started at the spurious point (theta = pi) and next to it, every STE."""
  teacher = _binary_teacher(cfg)
  vs, ws = M.spurious_point(teacher)
  key = M.prng_key(cfg.seed + 2)
  rng = _rng(cfg, 2)
  facts = jax.device_get(_teacher_facts(teacher))
  mc = jax.device_get(_mc_all(vs, ws, teacher, jax.random.fold_in(key, 10), cfg.b_mc_samples))
  metrics = {
      "m": cfg.m, "perturb": cfg.b_perturb,
      "spurious_is_local_min": M.spurious_is_local_min(teacher.v_star),
      "local_min_probe_min_df": _f(_local_min_probe(
          teacher, rng.standard_normal((cfg.b_local_probes, cfg.m)).astype(np.float32),
          rng.standard_normal((cfg.b_local_probes, cfg.n)).astype(np.float32))),
      **{k: float(v) for k, v in facts.items() if k != "coarse_norm_closed"},
      "coarse_norm_closed": {k: float(v) for k, v in facts["coarse_norm_closed"].items()},
      "coarse_norm_mc": {k: float(np.linalg.norm(e["coarse_grad_w"].mean)) for k, e in mc.items()},
      "coarse_norm_mc_stderr": {k: float(np.linalg.norm(e["coarse_grad_w"].stderr))
                                for k, e in mc.items()},
      "runs": {},
  }
  # the perturbed start: theta = pi - perturb in a random plane, v + perturb * N(0, I)
  vs_np, ws_np = np.asarray(vs, np.float64), np.asarray(ws, np.float64)
  d = rng.standard_normal(cfg.n)
  d -= np.dot(d, ws_np) * ws_np
  d /= np.linalg.norm(d)
  names = ("exact", "perturbed")
  v0 = np.stack([vs_np, vs_np + cfg.b_perturb * rng.standard_normal(cfg.m)])
  w0 = np.stack([ws_np, np.cos(cfg.b_perturb) * ws_np + np.sin(cfg.b_perturb) * d])
  v0, w0 = jnp.asarray(v0, jnp.float32), jnp.asarray(w0, jnp.float32)
  jobs = ["closed form"] + (["monte-carlo"] if cfg.b_mc_run_steps else [])
  results = {}
  for job in _progress(jobs, "(b) spurious minimum", progress):
    if job == "closed form":
      runs = jax.device_get(_algorithm1_all(v0, w0, teacher, cfg.b_lr, cfg.b_steps))
      for i, start in enumerate(names):
        for est in STES:
          run = runs[est]
          results[f"{est}|{start}"] = (est, start, job, jax.tree.map(lambda x, i=i: x[i], run))
    else:
      run = M.coarse_gradient_descent(vs, ws, teacher, estimator="clipped_relu", lr=cfg.b_lr,
                                      steps=cfg.b_mc_run_steps, mc_samples=cfg.b_mc_run_samples,
                                      key=jax.random.fold_in(key, 2))
      results["clipped_relu|exact|mc"] = ("clipped_relu", "exact", job, jax.device_get(run))
  curves = {}
  vs_np = np.asarray(vs)
  for name, (est, start, job, run) in results.items():
    loss = np.asarray(run.loss)
    metrics["runs"][name] = {
        "estimator": est, "start": start, "expectation": job, "steps": int(loss.size - 1),
        "initial_coarse_norm": float(run.coarse_norm[0]),
        "final_loss": float(loss[-1]), "min_loss": float(loss.min()), "max_loss": float(loss.max()),
        "max_loss_increase": float(np.diff(loss).max()),
        "final_theta": float(run.theta[-1]),
        "min_w_norm": float(run.w_norm.min()), "final_w_norm": float(run.w_norm[-1]),
        "final_v_dist_to_spurious": float(np.linalg.norm(run.v - vs_np)),
        "final_v_err": float(run.v_err[-1]),
        "steps_with_theta_below_pi/2": int(np.sum(run.theta < math.pi / 2)),
    }
    curves[name] = {"loss": loss, "theta": run.theta, "w_norm": run.w_norm}
  return metrics, curves


# ----------------------------------------------------------------------------
# (c) Positive correlation of E[g] with df/dw.
# ----------------------------------------------------------------------------


def _random_points(rng: np.random.Generator, num: int, m: int, n: int):
  """Random teachers and (v, w): v ~ N(0, I), w ~ N(0, I) * exp(U(-1.5, 1.5))."""
  teachers = M.random_teachers(rng, num, m, n)
  v = rng.standard_normal((num, m))
  w = rng.standard_normal((num, n)) * np.exp(rng.uniform(-1.5, 1.5, (num, 1)))
  return teachers, jnp.asarray(v, jnp.float32), jnp.asarray(w, jnp.float32)


@jax.jit
def _closed_correlations(v, w, teachers) -> dict:
  """Per point and STE: <E[g], df/dw> from the closed-form vectors, the formula, the cosine."""
  def one(v, w, t, est):
    g, gw = M.expected_coarse_grad(v, w, t, est), M.grad_w(v, w, t)
    inner = jnp.dot(g, gw)
    cos = inner / (jnp.linalg.norm(g) * jnp.linalg.norm(gw) + 1e-30)
    return inner, M.correlation_formula(v, w, t, est), cos
  return {est: jax.vmap(lambda v, w, t, est=est: one(v, w, t, est))(v, w, teachers) for est in STES}


@functools.partial(jax.jit, static_argnames="num")
def _mc_correlations(v, w, teachers, key, num: int) -> dict:
  """Per point and STE: Monte-Carlo <E[g], df/dw>, its standard error and the formula."""
  def one(args, est):
    v, w, t, k = args
    e = M.mc_inner(v, w, t, est, k, num, M.grad_w(v, w, t))
    return e.mean, e.stderr, M.correlation_formula(v, w, t, est)
  keys = jax.random.split(key, v.shape[0])
  return {est: jax.lax.map(lambda a, est=est: one(a, est), (v, w, teachers, keys)) for est in STES}


def claim_c(cfg: Config, progress=None):
  """Closed-form inner products on ``c_points`` random points; MC on ``c_mc_points`` of them.

  Points: a random teacher each, v ~ N(0, I), w ~ N(0, I) exp(U(-1.5, 1.5)).
  The Monte-Carlo standard error is that of the per-sample inner products
  ``<g_mu(Z), df/dw>``.
  """
  key = M.prng_key(cfg.seed + 3)
  teachers, v, w = _random_points(_rng(cfg, 3), cfg.c_points, cfg.m, cfg.n)
  metrics = {"points": cfg.c_points, "mc_points": cfg.c_mc_points,
             "mc_samples": cfg.c_mc_samples, "closed": {}, "mc": {}}
  curves = {}
  k = cfg.c_mc_points
  sub = jax.tree.map(lambda x: x[:k], (v, w, teachers))
  closed = jax.device_get(_closed_correlations(v, w, teachers))
  mc_all = jax.device_get(_mc_correlations(*sub, jax.random.fold_in(key, 99), cfg.c_mc_samples))
  for est in STES:
    inner, formula, cos = closed[est]
    rel = np.abs(inner - formula) / np.maximum(np.abs(formula), 1e-12)
    metrics["closed"][est] = {
        "min_inner": float(inner.min()), "fraction_nonnegative": float(np.mean(inner >= 0)),
        "max_rel_dev_from_formula": float(np.max(np.where(np.abs(formula) > 1e-6, rel, 0.0))),
        "median_cosine": float(np.median(cos)), "min_cosine": float(cos.min()),
        "formula": "printed" if est != "clipped_relu" else "ours",
    }
    mc, se, mc_formula = mc_all[est]
    z = np.abs(mc - mc_formula) / np.maximum(se, 1e-12)
    metrics["mc"][est] = {"fraction_positive": float(np.mean(mc > 0)),
                          "fraction_above_minus_3se": float(np.mean(mc > -3 * se)),
                          "max_abs_z_vs_formula": float(z.max()),
                          "median_abs_z": float(np.median(z))}
    curves[est] = {"inner": inner, "formula": formula, "cos": cos, "mc_inner": mc, "mc_se": se,
                   "mc_formula": mc_formula}
  return metrics, curves


# ----------------------------------------------------------------------------
# (d) Multi-level staircase.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("bits", "steps", "batch", "eval_every"))
def _multilevel_all(v0, w0, teachers, z_train, z_eval, seeds, lr, *, bits: int, steps: int,
                    batch: int, eval_every: int) -> dict:
  """Every seed (batched) and STE: the training run, then the gradients at its final iterate
  averaged over the whole training sample (dl/dv and the STE's coarse dl/dw)."""
  grad = jax.grad(ML.batch_loss, argnums=(0, 1))
  out = {}
  for est in STES:
    run = jax.vmap(lambda v, w, t, k, est=est: ML.train(
        v, w, t, z_train, z_eval, k, bits=bits, estimator=est, lr=lr, steps=steps, batch=batch,
        eval_every=eval_every))(v0, w0, teachers, seeds)
    gv, gw = jax.vmap(lambda v, w, t, est=est: grad(v, w, z_train, t, bits, est))(run.v, run.w,
                                                                                   teachers)
    out[est] = (run, gv, gw)
  return out


def claim_d(cfg: Config, progress=None):
  """Student/teacher with a b-bit staircase, mini-batch coarse SGD, every STE, ``d_seeds`` seeds."""
  rng = _rng(cfg, 4)
  z_train = jnp.asarray(rng.standard_normal((cfg.d_train, cfg.m, cfg.n)), jnp.float32)
  z_eval = jnp.asarray(rng.standard_normal((cfg.d_eval, cfg.m, cfg.n)), jnp.float32)
  teachers = M.random_teachers(rng, cfg.d_seeds, cfg.m, cfg.n)
  v0, w0 = _random_starts(rng, cfg.d_seeds, cfg.m, cfg.n)
  seeds = jax.random.split(M.prng_key(cfg.seed + 4), cfg.d_seeds)  # mini-batch indices
  metrics = {"runs": {}, "setup": {"m": cfg.m, "n": cfg.n, "train": cfg.d_train, "eval": cfg.d_eval,
                                   "batch": cfg.d_batch, "steps": cfg.d_steps, "lr": cfg.d_lr,
                                   "seeds": cfg.d_seeds}}
  curves = {"eval_every": cfg.d_eval_every}
  results = []
  for bits in _progress(cfg.d_bits, "(d) multi-level", progress):
    out = _multilevel_all(v0, w0, teachers, z_train, z_eval, seeds, cfg.d_lr, bits=bits,
                          steps=cfg.d_steps, batch=cfg.d_batch, eval_every=cfg.d_eval_every)
    results += [(bits, est, *jax.device_get(out[est])) for est in STES]
  for bits, est, run, gv, gw in results:
    loss = np.asarray(run.loss)
    rel = loss[:, -1] / loss[:, 0]
    name = f"{bits}bit|{est}"
    metrics["runs"][name] = {
        "bits": bits, "estimator": est,
        "median_final_loss": float(np.median(loss[:, -1])),
        "mean_final_loss": float(np.mean(loss[:, -1])),
        "final_losses": [float(x) for x in loss[:, -1]],
        "median_initial_loss": float(np.median(loss[:, 0])),
        "seeds_below_1pct_of_initial": int(np.sum(rel < 0.01)),
        "median_final_theta": float(np.median(np.asarray(run.theta[:, -1]))),
        "median_final_w_err": float(np.median(np.asarray(run.w_err[:, -1]))),
        "median_final_w_norm": float(np.median(np.linalg.norm(np.asarray(run.w), axis=1))),
        "median_final_v_err": float(np.median(np.asarray(run.v_err[:, -1]))),
        "seeds_theta_above_pi/2": int(np.sum(np.asarray(run.theta[:, -1]) > math.pi / 2)),
        "seeds_w_norm_above_3": int(np.sum(np.linalg.norm(run.w, axis=1) > 3.0)),
        "median_final_loss_theta_below_pi/2": (
            float(np.median(loss[good, -1])) if np.any(good := run.theta[:, -1] < math.pi / 2)
            else None),
        "median_final_coarse_grad_w_norm": float(np.median(np.linalg.norm(gw, axis=1))),
        "median_final_grad_v_norm": float(np.median(np.linalg.norm(gv, axis=1))),
        "seeds": cfg.d_seeds,
    }
    curves[name] = {"loss": loss, "theta": np.asarray(run.theta), "w_err": np.asarray(run.w_err)}
  return metrics, curves


# ----------------------------------------------------------------------------
# (e) Multi-class classification.
# ----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("bits", "steps"))
def _multiclass_all(p0, x, y, xt, yt, lr, momentum, *, bits: int, steps: int) -> dict:
  """Every seed (batched) and STE: full-batch training of the classifier."""
  return {est: jax.vmap(lambda p, x, y, xt, yt, est=est: MC.train(
      p, x, y, xt, yt, bits=bits, estimator=est, lr=lr, momentum=momentum, steps=steps))(
          p0, x, y, xt, yt) for est in STES}


def claim_e(cfg: Config, progress=None):
  """Teacher-labelled classes, two-linear-layer quantized-ReLU student, every STE and bit width."""
  rng = _rng(cfg, 5)
  metrics = {"runs": {}, "sweep": {},
             "setup": {"d": cfg.e_dim, "teacher_hidden": cfg.e_teacher_hidden,
                       "student_hidden": cfg.e_student_hidden, "classes": cfg.e_classes,
                       "train": cfg.e_train, "test": cfg.e_test, "margin": cfg.e_margin,
                       "steps": cfg.e_steps, "lr": cfg.e_lr, "momentum": cfg.e_momentum,
                       "seeds": cfg.e_seeds}}
  curves = {}
  tail = max(cfg.e_steps // 10, 1)
  for bits in cfg.e_bits:
    data = []
    for _ in range(cfg.e_seeds):
      teacher = MC.make_teacher(rng, cfg.e_dim, cfg.e_teacher_hidden, cfg.e_classes)
      x, y, kept = MC.make_data(rng, teacher, cfg.e_train, bits, cfg.e_margin)
      xt, yt, kept_t = MC.make_data(rng, teacher, cfg.e_test, bits, cfg.e_margin)
      data.append((x, y, xt, yt, min(kept, kept_t),
                   MC.init_student(rng, cfg.e_dim, cfg.e_student_hidden, cfg.e_classes)))
    x, y, xt, yt, kept = (np.stack(col) for col in list(zip(*data))[:5])
    p0 = jax.tree.map(lambda *a: jnp.stack(a), *(row[5] for row in data))
    metrics["setup"][f"{bits}bit_kept_fraction_min"] = float(np.min(kept))
    counts = np.stack([np.bincount(yi, minlength=cfg.e_classes) for yi in y])
    metrics["setup"][f"{bits}bit_smallest_class_share_min"] = float(counts.min() / cfg.e_train)
    lrs = (cfg.e_lr,) + tuple(lr for lr in cfg.e_lr_sweep if lr != cfg.e_lr)
    results = []
    for lr in _progress(lrs, f"(e) multi-class, {bits} bit", progress):
      out = jax.device_get(_multiclass_all(p0, x, y, xt, yt, lr, cfg.e_momentum, bits=bits,
                                           steps=cfg.e_steps))
      results += [(lr, est, out[est]) for est in STES]
    for lr, est, run in results:
      acc = np.asarray(run.train_acc)
      first = [MC.steps_to_perfect(a) for a in acc]
      hit = [s for s in first if s is not None]
      entry = {
          "bits": bits, "estimator": est, "lr": lr,
          "seeds_reaching_100pct": len(hit), "seeds": cfg.e_seeds,
          "steps_to_100pct": first,
          "median_steps_to_100pct": float(np.median(hit)) if hit else None,
          "seeds_at_100pct_at_end": int(np.sum(acc[:, -1] >= 1.0)),
          "seeds_100pct_whole_last_10pct": int(np.sum(acc[:, -tail:].min(1) >= 1.0)),
          "mean_final_train_acc": float(acc[:, -1].mean()),
          "mean_best_train_acc": float(acc.max(1).mean()),
          "mean_test_acc": float(np.asarray(run.test_acc).mean()),
          "mean_final_loss": float(np.asarray(run.loss)[:, -1].mean()),
      }
      if lr == cfg.e_lr:
        metrics["runs"][f"{bits}bit|{est}"] = entry
        curves[f"{bits}bit|{est}"] = {"train_acc": acc, "loss": np.asarray(run.loss)}
      else:
        metrics["sweep"][f"{bits}bit|{est}|lr={lr:g}"] = entry
  return metrics, curves


CLAIMS = {"a": claim_a, "b": claim_b, "c": claim_c, "d": claim_d, "e": claim_e}
