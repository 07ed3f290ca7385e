"""Reproduce the coarse-gradient claims (Yin et al. ICLR 2019), plus our extensions.

    python -m experiments.coarse_gradient.run            # full run, ~2 min on 2 CPU cores
    python -m experiments.coarse_gradient.run --quick    # seconds-long smoke version

Writes ``README.md`` (tables and the command), ``metrics.json`` and PNG plots
to ``--out`` (default ``results/coarse_gradient``). Claims:

  a  Theorem 1, ReLU STE: Algorithm 1 decreases f and converges
  b  Theorem 1, identity STE: E[g_id] does not vanish at the spurious minimum
  c  the expected coarse gradients correlate positively with df/dw
  d  multi-level staircase student / teacher (our extension)
  e  multi-class two-linear-layer classifier (our extension)

Plots need matplotlib and progress bars tqdm; without them the run still
writes the tables and metrics and says what it skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

import jax
import numpy as np

from experiments import cli
from experiments.coarse_gradient import claims
from experiments.coarse_gradient.claims import FULL, QUICK, STES

DEFAULT_OUT = os.path.join("results", "coarse_gradient")


def _progress_fn():
  try:
    from tqdm.auto import tqdm
  except ImportError:  # pragma: no cover - tqdm is in the dev venv
    print("note: tqdm is not installed; no progress bars", file=sys.stderr)
    return None
  return lambda items, desc: tqdm(list(items), desc=desc, leave=False)


def _fmt(x, digits=3) -> str:
  if x is None:
    return "—"
  if isinstance(x, bool):
    return "yes" if x else "no"
  if isinstance(x, (int, np.integer)):
    return str(x)
  x = float(x)
  if x == 0:
    return "0"
  if abs(x) >= 1e4 or abs(x) < 1e-3:
    return f"{x:.{digits - 1}e}"
  return f"{x:.{digits}g}"


def _table(header: list[str], rows: list[list]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |"
            for row in rows]
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# README sections.
# ----------------------------------------------------------------------------


def _section_a(m: dict, cfg: claims.Config) -> str:
  rows = []
  for r in m["runs"].values():
    rows.append([r["estimator"], _fmt(r["w0_norm"]), _fmt(r["lr"]), r["steps"],
                 f"{r['global']}/{r['seeds']}", f"{r['spurious']}/{r['seeds']}",
                 f"{r['other']}/{r['seeds']}", f"{r['runs_monotone']}/{r['seeds']}",
                 r["max_loss_increase"], r["min_w_norm"], r["median_final_loss"],
                 r["median_final_theta"], r["median_final_v_err"], r["max_tail_loss_range"]])
  return "\n".join([
      "## (a) Theorem 1, ReLU STE: descent and convergence",
      "",
      f"Algorithm 1 with the closed-form expectations, m = {cfg.m}, n = {cfg.n}, horizon "
      f"ηT = {cfg.a_horizon:g}, {cfg.a_seeds} random starts (v0 ~ N(0, I), w0 uniform on the "
      "sphere of radius ‖w0‖; the same starts for every row), one random teacher "
      f"(1ᵀv* = {m['teacher_1Tv*']:.3f}; its spurious point is a local minimum: "
      f"{_fmt(m['spurious_is_local_min'])}, f there = {m['spurious_loss']:.4f}). *global*: "
      f"θ < {cfg.a_tol:g} and ‖v − v*‖ < {cfg.a_tol:g} at the end; *spurious*: π − θ < "
      f"{cfg.a_tol:g} and v within {cfg.a_tol:g} of the spurious v; *other*: neither. "
      "*monotone*: no step raised f by more than 1e-5 (float32 noise in f is ~1e-6). "
      "*tail range*: max − min of f over the last 10% of iterations (largest over seeds).",
      "",
      _table(["STE", "‖w0‖", "η", "T", "global", "spurious", "other", "monotone",
              "max f increase", "min ‖w_t‖", "median final f", "median final θ",
              "median ‖v − v*‖", "tail range"], rows),
  ])


def _section_b(m: dict, cfg: claims.Config) -> str:
  rows_g = []
  for est in STES:
    rows_g.append([est, m["coarse_norm_closed"][est], m["coarse_norm_mc"][est],
                   m["coarse_norm_mc_stderr"][est]])
  rows = []
  for name, r in m["runs"].items():
    rows.append([r["estimator"], r["start"], r["expectation"], r["steps"], r["initial_coarse_norm"],
                 r["final_loss"], r["max_loss_increase"], r["final_theta"], r["min_w_norm"],
                 r["final_w_norm"], r["final_v_dist_to_spurious"], r["final_v_err"]])
  return "\n".join([
      "## (b) Theorem 1, identity STE at the spurious minimum",
      "",
      f"Same teacher, m = {m['m']}, 1ᵀv* = {m['1Tv*']:.4f}. At the spurious point (θ = π, "
      f"v = (I+11ᵀ)⁻¹(11ᵀ−I)v*): f = {m['loss_at_spurious']:.5f}, ‖∂f/∂v‖ = "
      f"{_fmt(m['grad_v_norm_at_spurious'])}, vᵀv* = {m['vTv*_at_spurious']:.4f} (< 0, so a local "
      f"minimum: {_fmt(m['spurious_is_local_min'])}; smallest f(probe) − f over "
      f"{cfg.b_local_probes} random probes at distance 0.01: "
      f"{_fmt(m['local_min_probe_min_df'])}), h(v, v*) = {_fmt(m['relu_h_at_spurious'])}.",
      "",
      f"Printed ‖E[g_id]‖ = 2(m−1)(1ᵀv*)²/(√(2π)(m+1)²) = **{m['printed_identity_norm']:.5f}**. "
      "Expected coarse gradient norms there (closed form vs Monte Carlo with "
      f"{cfg.b_mc_samples} samples; the last column is the norm of the per-coordinate standard "
      "errors, i.e. the size of pure MC noise):",
      "",
      _table(["STE", "‖E[g]‖ closed form", "‖E[g]‖ Monte Carlo", "MC noise level"], rows_g),
      "",
      f"Algorithm 1 from there (η = {cfg.b_lr}); *perturbed*: θ = π − {cfg.b_perturb}, "
      f"v + {cfg.b_perturb}·N(0, I). The Monte-Carlo run draws {cfg.b_mc_run_samples} fresh "
      "samples per step (its f is still the closed form at the iterate).",
      "",
      _table(["STE", "start", "E[g] by", "T", "‖E[g]‖ at t=0", "final f", "max f increase",
              "final θ", "min ‖w_t‖", "final ‖w‖", "final ‖v − v_spur‖", "final ‖v − v*‖"], rows),
  ])


def _section_c(m: dict, cfg: claims.Config) -> str:
  rows = []
  for est in STES:
    c, mc = m["closed"][est], m["mc"][est]
    rows.append([est, c["formula"], c["fraction_nonnegative"], c["min_inner"],
                 c["max_rel_dev_from_formula"], c["median_cosine"], c["min_cosine"],
                 mc["fraction_positive"], mc["fraction_above_minus_3se"], mc["median_abs_z"],
                 mc["max_abs_z_vs_formula"]])
  return "\n".join([
      "## (c) Positive correlation of E[g] with ∂f/∂w",
      "",
      f"{m['points']} random points (random teacher each; v ~ N(0, I); w ~ N(0, I)·e^U, "
      "U ~ U(−1.5, 1.5)). Inner product ⟨E[g], ∂f/∂w⟩ from the closed-form vectors, against the "
      "printed scalar formulas sin θ (vᵀv*)²/(2(√(2π))³‖w‖) (ReLU) and twice that (identity), "
      "and our clipped-ReLU formula sin θ (vᵀv*)² (Φ(1/(‖w‖ sin θ)) − ½)/((√(2π))³‖w‖). "
      f"Monte Carlo: {m['mc_points']} of the points, {m['mc_samples']} samples each; z = "
      "|MC − formula| / SE.",
      "",
      _table(["STE", "formula", "share ≥ 0", "min ⟨·,·⟩", "max rel. dev. from formula",
              "median cos", "min cos", "MC share > 0", "MC share > −3 SE", "MC median z",
              "MC max z"], rows),
  ])


def _section_d(m: dict, cfg: claims.Config) -> str:
  s = m["setup"]
  rows = []
  for r in m["runs"].values():
    rows.append([r["bits"], r["estimator"], r["median_initial_loss"], r["median_final_loss"],
                 r["median_final_loss_theta_below_pi/2"],
                 f"{r['seeds_below_1pct_of_initial']}/{r['seeds']}",
                 f"{r['seeds_theta_above_pi/2']}/{r['seeds']}",
                 f"{r['seeds_w_norm_above_3']}/{r['seeds']}", r["median_final_theta"],
                 r["median_final_w_norm"], r["median_final_w_err"], r["median_final_v_err"],
                 r["median_final_coarse_grad_w_norm"], r["median_final_grad_v_norm"]])
  return "\n".join([
      "## (d) Multi-level staircase (our extension)",
      "",
      "y = vᵀq_b(Zw), teacher y* = v*ᵀq_b(Zw*), ‖w*‖ = 1, q_b = `staircase_relu` with the fixed "
      f"α (b = 2: 0.6511, b = 4: 0.1946); m = {s['m']}, n = {s['n']}. Mini-batch coarse SGD "
      f"(batch {s['batch']}) on a fixed sample of {s['train']} Gaussian Z, η = {s['lr']} "
      f"(÷10 for the last 30%), {s['steps']} steps, {s['seeds']} seeds (teacher and start drawn "
      f"per seed, shared by the STEs). Loss on {s['eval']} held-out Z. The last two columns are "
      "the gradients at the final iterate averaged over the whole training sample (v: true, "
      "w: the STE's coarse gradient): small values mean the run stopped at a stationary point "
      "of the coarse-gradient dynamics.",
      "",
      _table(["bits", "STE", "median initial loss", "median final loss",
              "median final loss, seeds with θ < π/2", "final < 1% of initial", "final θ > π/2",
              "final ‖w‖ > 3", "median final θ", "median ‖w‖",
              "median ‖w − w*‖", "median ‖v − v*‖", "median final ‖E[g_w]‖",
              "median final ‖∂/∂v‖"], rows),
  ])


def _section_e(m: dict, cfg: claims.Config) -> str:
  s = m["setup"]

  def row(r):
    return [r["bits"], r["estimator"], _fmt(r["lr"]),
            f"{r['seeds_reaching_100pct']}/{r['seeds']}", r["median_steps_to_100pct"],
            f"{r['seeds_at_100pct_at_end']}/{r['seeds']}",
            f"{r['seeds_100pct_whole_last_10pct']}/{r['seeds']}",
            100 * r["mean_best_train_acc"], 100 * r["mean_final_train_acc"],
            100 * r["mean_test_acc"]]

  header = ["bits", "STE", "lr", "reach 100% train", "median steps to 100%", "100% at end",
            "100% through last 10%", "mean best train %", "mean final train %", "mean test %"]
  kept = ", ".join(f"{b}-bit ≥ {s[f'{b}bit_kept_fraction_min']:.0%}" for b in cfg.e_bits)
  out = [
      "## (e) Multi-class classification (our extension)",
      "",
      f"Logits V q_b(W x), x ~ N(0, I_{s['d']}); labels = argmax of a teacher of the same form "
      f"({s['teacher_hidden']} hidden units, unit-norm rows of W*, V* ~ N(0, 1)), {s['classes']} "
      f"classes, samples kept only if the teacher's top-1 − top-2 logit gap is ≥ {s['margin']} "
      f"(kept share of candidates: {kept}). Student: {s['student_hidden']} hidden units, "
      f"W ~ N(0, 1/d), V ~ N(0, 1/h). Full-batch cross-entropy on {s['train']} samples, "
      f"heavy-ball momentum {s['momentum']}, {s['steps']} steps, {s['seeds']} seeds (data, "
      f"teacher and start per seed, shared by the STEs); test on {s['test']} fresh samples.",
      "",
      _table(header, [row(r) for r in m["runs"].values()]),
  ]
  if m["sweep"]:
    out += ["", "Step-size check (same seeds):", "",
            _table(header, [row(r) for r in m["sweep"].values()])]
  return "\n".join(out)


NOTES = """## Notes on the set-up

- **Numerics.** float32 JAX, every loop `jit`-compiled (`lax.scan`); one compiled program per claim
  configuration covers the three STEs. Set-up draws (teachers, starts, data) use NumPy
  (`default_rng([seed, claim])`); Monte-Carlo samples and mini-batch indices use JAX's `rbg` PRNG.
  The quantized ReLU and its STEs are `ricci_jax.staircase_relu` / `ricci_jax.estimators`
  (`identity`, `relu`, `clipped_relu`); sampled coarse gradients are plain `jax.grad` through it.
- **Closed forms.** Every printed formula of the notes (f, ∂f/∂v, ∂f/∂w, E[g_relu], E[g_id], the
  two correlations, the spurious point and its ‖E[g_id]‖) agreed with our Monte-Carlo checks
  (`tests/test_coarse_gradient.py`); none needed a correction. E[g_relu] is evaluated as
  h/(2√(2π)) ŵ − (vᵀv*)(ŵ + w*)/(2√(2π)), equal to the printed form since
  ‖ŵ + w*‖ = 2 cos(θ/2), and free of 0/0 at θ = π. ∂f/∂w is undefined at θ ∈ {0, π}; we use 0.
- **Clipped ReLU (ours).** The notes give no closed form; we derived
  E[g_crelu] = ½ p₁ h ŵ − (vᵀv*)(A ŵ + B e) with r = 1/‖w‖, p₁ = φ(0) − φ(r),
  A = ½φ(0) − φ(r)Φ(r cot θ) + cos θ φ(0)(Φ(r/sin θ) − ½), B = sin θ φ(0)(Φ(r/sin θ) − ½),
  e the unit vector of (I − ŵŵᵀ)w*; it matches Monte Carlo and tends to E[g_relu] as the clip
  level grows. Algorithm 1 uses it; one Monte-Carlo run of Algorithm 1 (fresh samples every step)
  is shown in (b) as a cross-check.
- **Not in the notes, checked here.** The spurious point is a local minimum only when
  vᵀv* < 0 there, i.e. (1ᵀv*)² < (m+1)‖v*‖²/2 (otherwise a saddle); and E[g_relu] =
  E[g_crelu] = 0 there (h = 0 and, at θ = π, 1[Zᵢw* > 0] = 1 − σ(Zᵢw)), so the spurious point
  is a fixed point of Algorithm 1 for those STEs. The teacher of (a)/(b) is redrawn until
  |1ᵀv*| ≥ 1.5 and the spurious point is a local minimum.
- **Scale of w.** σ(Zw) ignores ‖w‖, but the coarse-gradient steps do not: the radial part of
  E[g] moves ‖w‖ at a rate that does not shrink with ‖w‖, so from ‖w0‖ = 1 the iterates pass
  close to w = 0, where the angular step ∝ η/‖w‖ explodes and f jumps (Theorem 1 assumes
  ‖w_t‖ ≥ c_w). The clipped-ReLU STE, conversely, slows down for large ‖w‖.
- **(d), (e) are our designs**, not Long, Yin, Xin (2021), whose setup could not be retrieved.
  (d) trains on a fixed sample of Gaussian inputs with mini-batch SGD; (e) filters samples by
  the teacher's logit margin so that a perfect classifier exists in the student's class.
"""


SECTIONS = {"a": _section_a, "b": _section_b, "c": _section_c, "d": _section_d, "e": _section_e}

PREAMBLE = """# Coarse gradients and straight-through estimators: the two-linear-layer experiment

Reproduction of Yin, Lyu, Zhang, Osher, Qi, Xin, "Understanding Straight-Through Estimator in
Training Activation Quantized Neural Nets" (ICLR 2019; formulas from the submission text), on its
model: Gaussian Z ∈ R^(m×n), output vᵀσ(Zw), σ(x) = 1[x > 0] (= `ricci_jax.staircase_relu`
with 1 bit and α = 1), teacher (v*, w*), squared loss. Parts (d) and (e) are **our own**
multi-level and multi-class extensions built on that model; the setup of Long, Yin, Xin (2021)
could not be retrieved and is not reproduced. Code: `experiments/coarse_gradient/`.
"""


def _verdict(ok: bool) -> str:
  return "**reproduced**" if ok else "**not reproduced**"


def _ends(r: dict) -> str:
  return (f"at the end {r['global']} at the global minimum, {r['spurious']} at the spurious local "
          f"minimum (θ = π), {r['other']} neither")


def _summary_a(m: dict) -> list[str]:
  runs = m["runs"]
  out = []
  for r in runs.values():
    if r["estimator"] != "relu":
      continue
    if r["w0_norm"] >= 10:
      ok = r["runs_monotone"] == r["seeds"] and r["other"] == 0
      out.append(
          f"- (a) ReLU STE, ‖w0‖ = {r['w0_norm']:g}, η = {r['lr']:g}: f decreased monotonically "
          f"in {r['runs_monotone']}/{r['seeds']} runs (largest one-step increase "
          f"{_fmt(r['max_loss_increase'])}), ‖w_t‖ ≥ {_fmt(r['min_w_norm'])} throughout; "
          f"{_ends(r)} — {_verdict(ok)} (Theorem 1 allows convergence to a local minimiser).")
    else:
      out.append(
          f"- (a) ReLU STE, ‖w0‖ = {r['w0_norm']:g}, η = {r['lr']:g}: ‖w_t‖ fell to "
          f"{_fmt(r['min_w_norm'])} (Theorem 1 assumes ‖w_t‖ ≥ c_w > 0) and "
          f"{r['runs_monotone']}/{r['seeds']} runs were monotone (largest one-step increase "
          f"{_fmt(r['max_loss_increase'])}); {_ends(r)}.")
  for key, r in runs.items():
    if r["estimator"] == "identity" and r["other"]:
      relu = runs.get(key.replace("identity", "relu", 1))
      both = ""
      if relu is not None:
        n = sum(a == "other" and b == "spurious" for a, b in zip(r["outcomes"], relu["outcomes"]))
        both = f"; in {n} of them the ReLU STE converged to the spurious minimum"
      out.append(
          f"- (a) identity STE, ‖w0‖ = {r['w0_norm']:g}, η = {r['lr']:g}: "
          f"{r['other']}/{r['seeds']} runs did not converge (f still varies by up to "
          f"{_fmt(r['max_tail_loss_range'])} over the last 10% of iterations){both}.")
  for r in runs.values():
    if r["estimator"] == "clipped_relu" and r["w0_norm"] >= 10 and r["other"]:
      out.append(
          f"- (a) clipped-ReLU STE (μ' = 1[0 < x ≤ 1]), ‖w0‖ = {r['w0_norm']:g}: {r['other']}/"
          f"{r['seeds']} runs had not converged at ηT = {r['lr'] * r['steps']:g} (median final θ "
          f"{_fmt(r['median_final_theta'])}): σ ignores the scale of w but the clipping does not; "
          "with large ‖w‖ few pre-activations fall in (0, 1] and the coarse gradient is small.")
  return out


def _summary_b(m: dict) -> list[str]:
  printed = m["printed_identity_norm"]
  closed = m["coarse_norm_closed"]["identity"]
  mc, noise = m["coarse_norm_mc"]["identity"], m["coarse_norm_mc_stderr"]["identity"]
  ident = m["runs"].get("identity|exact", {})
  relu = m["runs"].get("relu|exact", {})
  back = m["runs"].get("relu|perturbed", {})
  ok = (abs(closed - printed) <= 1e-3 * printed and abs(mc - printed) <= 3 * noise
        and ident.get("max_loss_increase", 0) > 1e-3
        and relu.get("final_v_dist_to_spurious", 1) < 1e-3)
  return [
      f"- (b) At the spurious point ∂f/∂v = 0 (norm {_fmt(m['grad_v_norm_at_spurious'])}) and "
      f"‖E[g_id]‖ = {closed:.5f} (closed form) / {mc:.4f} ± {noise:.4f} (Monte Carlo) vs the "
      f"printed 2(m−1)(1ᵀv*)²/(√(2π)(m+1)²) = {printed:.5f}; E[g_relu] and E[g_crelu] vanish "
      f"there ({_fmt(m['coarse_norm_closed']['relu'])}, "
      f"{_fmt(m['coarse_norm_closed']['clipped_relu'])}). From there the identity STE shrinks ‖w‖ "
      f"to {_fmt(ident.get('min_w_norm'))}, w then flips sign every few steps and f never settles "
      f"(jumps up to {_fmt(ident.get('max_loss_increase'))});"
      f" the ReLU STE stays put (final ‖v − v_spur‖ = {_fmt(relu.get('final_v_dist_to_spurious'))})"
      f" and, started {m['perturb']:g} away (in θ and in each coordinate of v), returns to it "
      f"(final ‖v − v_spur‖ = "
      f"{_fmt(back.get('final_v_dist_to_spurious'))}, θ = {_fmt(back.get('final_theta'))}) — "
      f"{_verdict(ok)}. The point is a local minimum "
      f"only because vᵀv* < 0 there ({m['vTv*_at_spurious']:.3f}); this condition, "
      "(1ᵀv*)² < (m+1)‖v*‖²/2, is not in the notes."]


def _summary_c(m: dict) -> list[str]:
  c = m["closed"]
  ok = all(c[e]["fraction_nonnegative"] == 1.0 and c[e]["max_rel_dev_from_formula"] < 1e-3
           for e in ("identity", "relu"))
  max_z = max(m["mc"][e]["max_abs_z_vs_formula"] for e in STES)
  return [
      f"- (c) On {m['points']} random points ⟨E[g], ∂f/∂w⟩ ≥ 0 for every STE (min "
      + ", ".join(f"{e}: {_fmt(c[e]['min_inner'])}" for e in STES)
      + "), equal to the printed formulas up to float32 rounding (max relative deviation "
      + ", ".join(f"{_fmt(c[e]['max_rel_dev_from_formula'])}" for e in ("identity", "relu"))
      + f"); Monte-Carlo estimates agree within {max_z:.1f} standard errors — {_verdict(ok)}. "
      "Median cosines with ∂f/∂w: "
      + ", ".join(f"{e} {c[e]['median_cosine']:.2f}" for e in STES) + "."]


def _summary_d(m: dict) -> list[str]:
  out = []
  for bits in sorted({r["bits"] for r in m["runs"].values()}):
    rs = [r for r in m["runs"].values() if r["bits"] == bits]
    rs.sort(key=lambda r: r["median_final_loss"])
    parts = [f"{r['estimator']} {_fmt(r['median_final_loss'])} (all) / "
             f"{_fmt(r['median_final_loss_theta_below_pi/2'])} (θ < π/2), ‖w‖ > 3 in "
             f"{r['seeds_w_norm_above_3']}/{r['seeds']}" for r in rs]
    stuck = sorted({r["seeds_theta_above_pi/2"] for r in rs})
    out.append(f"- (d) {bits}-bit staircase, median final held-out loss: " + "; ".join(parts)
               + f". Seeds ending with θ > π/2: {'/'.join(map(str, stuck))} of {rs[0]['seeds']}"
               + (" for every STE." if len(stuck) == 1 else "."))
  return out


def _summary_e(m: dict) -> list[str]:
  out = []
  for bits in sorted({r["bits"] for r in m["runs"].values()}):
    rs = [r for r in m["runs"].values() if r["bits"] == bits]
    out.append(
        f"- (e) {bits}-bit, seeds reaching 100% training accuracy (median first step; seeds at "
        "100% after the last step; mean test accuracy): " + "; ".join(
            f"{r['estimator']} {r['seeds_reaching_100pct']}/{r['seeds']} "
            f"({_fmt(r['median_steps_to_100pct'])}; {r['seeds_at_100pct_at_end']}/{r['seeds']}; "
            f"{100 * r['mean_test_acc']:.1f}%)" for r in rs) + ".")
  return out


def summarize(metrics: dict) -> str:
  """Markdown bullets with the measured verdict of every claim that ran."""
  fns = {"a": _summary_a, "b": _summary_b, "c": _summary_c, "d": _summary_d, "e": _summary_e}
  lines = []
  for key, fn in fns.items():
    if key in metrics:
      lines += fn(metrics[key])
  return "\n".join(lines)


def write_readme(out_dir: str, metrics: dict, cfg: claims.Config, command: str, figures: list[str],
                 summary: str) -> None:
  parts = [PREAMBLE,
           f"Produced by `{command}` in {metrics['meta']['wall_seconds']:.0f} s "
           f"(jax {metrics['meta']['jax']}, {metrics['meta']['platform']}, "
           f"{metrics['meta']['cpu_count']} CPU cores). All numbers are also in `metrics.json`.",
           ""]
  if summary:
    parts += ["## Summary", "", summary, ""]
  for key, fn in SECTIONS.items():
    if key in metrics:
      parts += [fn(metrics[key], cfg), ""]
      parts += [f"![{f}]({f})" for f in figures if f.startswith(key + "_")] + [""]
  parts += [NOTES]
  with open(os.path.join(out_dir, "README.md"), "w") as fh:
    fh.write("\n".join(parts))


# ----------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------


def _jsonable(x):
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, float) and not np.isfinite(x):
    return str(x)
  return x


def parse_args(argv=None) -> argparse.Namespace:
  parser = cli.parser(__doc__)
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes: a seconds-long smoke run (numbers are not meaningful)")
  parser.add_argument("--out", default=DEFAULT_OUT,
                      help=f"output directory (created; default: {DEFAULT_OUT})")
  parser.add_argument("--claims", default="abcde",
                      help="which claims to run, a subset of 'abcde' (default: all)")
  parser.add_argument("--seed", type=int, default=0, help="base PRNG seed (default: 0)")
  parser.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
  args = parser.parse_args(argv)
  bad = sorted(set(args.claims) - set(claims.CLAIMS))
  if bad or not args.claims:
    parser.error(f"--claims must be a non-empty subset of 'abcde', got {args.claims!r}")
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  cfg = QUICK if args.quick else FULL
  if args.seed != cfg.seed:
    import dataclasses
    cfg = dataclasses.replace(cfg, seed=args.seed)
  os.makedirs(args.out, exist_ok=True)
  plot_fns = None
  if not args.no_plots:
    try:
      from experiments.coarse_gradient import plots
      plots._plt()
      plot_fns = plots.PLOTS
    except ImportError:
      print("warning: matplotlib is not installed; skipping the plots (pip install matplotlib)",
            file=sys.stderr)
  progress = _progress_fn()
  start = time.time()
  metrics, figures = {}, []
  for key in sorted(set(args.claims)):
    t0 = time.time()
    m, curves = claims.CLAIMS[key](cfg, progress)
    m["seconds"] = time.time() - t0
    metrics[key] = m
    if plot_fns is not None:
      figures += plot_fns[key](curves, m, args.out)
    print(f"claim ({key}) done in {m['seconds']:.1f} s", file=sys.stderr)
  command = "python -m experiments.coarse_gradient.run" + (
      " " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
      if (argv if argv is not None else sys.argv[1:]) else "")
  metrics["meta"] = {"command": command, "wall_seconds": time.time() - start,
                     "jax": jax.__version__, "platform": platform.platform(),
                     "cpu_count": os.cpu_count(), "quick": args.quick, "figures": figures,
                     "config": {k: v for k, v in vars(cfg).items()}}
  with open(os.path.join(args.out, "metrics.json"), "w") as fh:
    json.dump(_jsonable(metrics), fh, indent=1)
  write_readme(args.out, metrics, cfg, command, figures, summarize(metrics))
  print(f"wrote {args.out}/README.md, metrics.json and {len(figures)} figures in "
        f"{metrics['meta']['wall_seconds']:.1f} s", file=sys.stderr)
  return metrics


if __name__ == "__main__":
  from ricci_jax import runtime
  runtime.configure_cpu()  # process-wide CPU settings, before JAX starts: a program's choice, never the library's
  sys.exit(cli.run(main))
