"""PNG figures of the coarse-gradient claims (matplotlib, Agg backend; imported lazily)."""

from __future__ import annotations

import math
import os

import numpy as np

COLORS = {"identity": "tab:red", "relu": "tab:blue", "clipped_relu": "tab:green"}
LABELS = {"identity": "identity STE", "relu": "ReLU STE", "clipped_relu": "clipped-ReLU STE"}
OUTCOME_COLORS = {"global": "tab:blue", "spurious": "tab:orange", "other": "tab:red"}
STES = ("identity", "relu", "clipped_relu")


def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.dpi": 110})
  return plt


def _no_minor_ticks(fig):
  """Drop minor ticks: on log axes they dominate matplotlib's layout time."""
  from matplotlib.ticker import NullLocator
  for ax in fig.axes:
    ax.xaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_locator(NullLocator())


def _linear_if_narrow(ax, decades: float = 1.5):
  """Switch a log y-axis to linear when its data span less than ``decades`` decades
  (without minor ticks, a narrow log axis would show a single tick label)."""
  lo, hi = ax.get_ylim()
  if lo > 0 and np.log10(hi / lo) < decades:
    ax.set_yscale("linear")


def _save(fig, out_dir: str, name: str) -> str:
  path = os.path.join(out_dir, name)
  fig.savefig(path, bbox_inches="tight")
  _plt().close(fig)
  return name


def _log_subsample(length: int, num: int = 1500) -> np.ndarray:
  """At most ``num`` unique indices of ``range(length)``, log-spaced (for log time axes)."""
  idx = np.unique(np.geomspace(1, length, num).astype(int) - 1)
  return idx


def _floor(x, eps=1e-8):
  return np.maximum(x, eps)


def plot_a(curves: dict, metrics: dict, out_dir: str) -> list[str]:
  """Loss, theta and ||w|| trajectories of Algorithm 1, one figure per (||w0||, lr)."""
  plt = _plt()
  configs = sorted({(v["w0_norm"], v["lr"]) for v in metrics["runs"].values()},
                   key=lambda c: (c[0], -c[1]))
  names = []
  for r, lr in configs:
    fig, axes = plt.subplots(3, 3, figsize=(12, 8.5), sharex=True)
    for j, est in enumerate(STES):
      key = f"{est}|w0={r:g}|lr={lr:g}"
      c = curves[key]
      k = _log_subsample(c["loss"].shape[1])
      t = k + 1
      for i, outcome in enumerate(c["outcomes"]):
        col = OUTCOME_COLORS[outcome]
        axes[0, j].loglog(t, _floor(c["loss"][i, k], 1e-7), color=col, lw=0.8, alpha=0.6)
        axes[1, j].semilogx(t, c["theta"][i, k], color=col, lw=0.8, alpha=0.6)
        axes[2, j].loglog(t, _floor(c["w_norm"][i, k], 1e-6), color=col, lw=0.8, alpha=0.6)
      m = metrics["runs"][key]
      axes[0, j].set_title(f"{LABELS[est]}: {m['global']} global, {m['spurious']} spurious, "
                           f"{m['other']} other\n{m['runs_monotone']}/{m['seeds']} runs monotone, "
                           f"min ‖w_t‖ = {m['min_w_norm']:.1e}", fontsize=9.5)
      axes[1, j].set_yticks([0, math.pi / 2, math.pi], ["0", "π/2", "π"])
      _linear_if_narrow(axes[2, j])
      axes[2, j].set_xlabel("iteration t + 1 (log; ≤1500 log-spaced points drawn)")
    axes[0, 0].set_ylabel("population loss f (log; float32 floor ~1e-6)")
    axes[1, 0].set_ylabel("θ = ∠(w, w*)")
    axes[2, 0].set_ylabel("‖w‖")
    handles = [plt.Line2D([], [], color=c, label=f"ends at {k}") for k, c in OUTCOME_COLORS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=3, bbox_to_anchor=(0.5, 1.02))
    fig.suptitle(f"(a) Algorithm 1 (closed-form expectations) from {c['loss'].shape[0]} random "
                 f"starts, ‖w0‖ = {r:g}, η = {lr:g}", y=1.05)
    _no_minor_ticks(fig)
    fig.tight_layout()
    names.append(_save(fig, out_dir, f"a_theorem1_w0_{r:g}_lr_{lr:g}.png"))
  return names


def plot_b(curves: dict, metrics: dict, out_dir: str) -> list[str]:
  """Loss, theta and ||w|| from the spurious point, every STE (log time axis)."""
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
  for name, c in curves.items():
    est, start = name.split("|")[:2]
    mc = name.endswith("|mc")
    ls = ":" if mc else ("-" if start == "exact" else "--")
    label = f"{LABELS[est]}, {start} start" + (" (Monte Carlo)" if mc else "")
    t = np.arange(c["loss"].size) + 1
    kw = dict(color=COLORS[est], ls=ls, lw=1.8 if mc else 1.0, label=label,
              alpha=0.9 if start == "exact" else 0.6)
    axes[0].semilogx(t, c["loss"], **kw)
    axes[1].semilogx(t, c["theta"], **kw)
    axes[2].loglog(t, _floor(c["w_norm"], 1e-6), **kw)
  axes[0].axhline(metrics["loss_at_spurious"], color="k", lw=0.6, ls="-.")
  axes[0].set_ylabel("population loss f")
  axes[1].set_ylabel("θ")
  axes[1].set_yticks([0, math.pi / 2, math.pi], ["0", "π/2", "π"])
  axes[2].set_ylabel("‖w‖")
  _linear_if_narrow(axes[2])
  for ax in axes:
    ax.set_xlabel("iteration t + 1 (log)")
  axes[0].legend(fontsize=7.5, loc="upper left")
  fig.suptitle("(b) Algorithm 1 from the spurious minimum (θ = π, v = (I+11ᵀ)⁻¹(11ᵀ−I)v*), "
               f"m = {metrics['m']}, 1ᵀv* = {metrics['1Tv*']:.3f}; dash-dot: f at the spurious "
               "point.\nReLU / clipped-ReLU curves coincide and stay there; the identity STE "
               "shrinks ‖w‖ to 0, then w flips sign (θ: π ↔ 0) every few steps.", fontsize=10.5)
  _no_minor_ticks(fig)
  fig.tight_layout()
  return [_save(fig, out_dir, "b_spurious_minimum.png")]


def plot_c(curves: dict, metrics: dict, out_dir: str) -> list[str]:
  """Inner products <E[g], df/dw> against the formulas, closed form and Monte Carlo."""
  plt = _plt()
  fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
  lo, hi = np.inf, 0.0
  for est in STES:
    c = curves[est]
    ok = c["formula"] > 1e-9
    axes[0].loglog(c["formula"][ok], _floor(c["inner"][ok], 1e-12), ".", ms=2.5, color=COLORS[est],
                   label=LABELS[est], alpha=0.6)
    lo, hi = min(lo, c["formula"][ok].min()), max(hi, c["formula"][ok].max())
    axes[1].errorbar(c["mc_formula"], c["mc_inner"], yerr=2 * c["mc_se"], fmt="o", ms=3,
                     color=COLORS[est], label=LABELS[est], alpha=0.8, lw=0.8)
    axes[2].hist(c["cos"], bins=40, range=(-0.05, 1.0), histtype="step", color=COLORS[est],
                 label=LABELS[est], lw=1.3)
  axes[0].loglog([lo, hi], [lo, hi], "k-", lw=0.6)
  axes[0].set_xlabel("formula (printed for identity / ReLU; ours for clipped ReLU)")
  axes[0].set_ylabel("⟨E[g], ∂f/∂w⟩ from the closed-form vectors")
  axes[0].set_title(f"closed forms, {metrics['points']} random points")
  mx = max(np.max(curves[e]["mc_formula"]) for e in STES)
  axes[1].plot([0, mx], [0, mx], "k-", lw=0.6)
  axes[1].axhline(0, color="gray", lw=0.5)
  axes[1].set_xlabel("formula")
  axes[1].set_ylabel("Monte-Carlo ⟨E[g], ∂f/∂w⟩ (±2 SE)")
  axes[1].set_title(f"Monte Carlo, {metrics['mc_points']} points × {metrics['mc_samples']} samples")
  axes[2].set_xlabel("cos ∠(E[g], ∂f/∂w)")
  axes[2].set_ylabel("points")
  axes[2].set_title("cosine between expected coarse and true gradient")
  for ax in axes:
    ax.legend(fontsize=8)
  fig.suptitle("(c) the expected coarse gradients correlate positively with ∂f/∂w")
  fig.tight_layout()
  return [_save(fig, out_dir, "c_correlation.png")]


def plot_d(curves: dict, metrics: dict, out_dir: str) -> list[str]:
  """Held-out loss of the multi-level student: rows = bit widths, columns = STEs."""
  plt = _plt()
  bits = sorted({v["bits"] for v in metrics["runs"].values()})
  every = curves["eval_every"]
  fig, axes = plt.subplots(len(bits), 3, figsize=(13, 3.6 * len(bits)), squeeze=False,
                           sharex=True, sharey=True)
  for row, b in zip(axes, bits):
    for ax, est in zip(row, STES):
      loss = curves[f"{b}bit|{est}"]["loss"]
      m = metrics["runs"][f"{b}bit|{est}"]
      t = np.arange(loss.shape[1]) * every
      for i in range(loss.shape[0]):
        ax.semilogy(t, loss[i], color=COLORS[est], lw=0.8, alpha=0.5)
      ax.semilogy(t, np.median(loss, 0), color="k", lw=1.8, label="median over seeds")
      ax.set_title(f"{b}-bit, {LABELS[est]}\nmedian final loss {m['median_final_loss']:.3g}, "
                   f"median final ‖w‖ {m['median_final_w_norm']:.3g}", fontsize=9.5)
    row[0].set_ylabel("held-out squared loss (log)")
    row[0].legend(fontsize=8, loc="upper right")
  for ax in axes[-1]:
    ax.set_xlabel("SGD step")
  fig.suptitle("(d) multi-level student / teacher y = vᵀq_b(Zw), one line per seed (our extension)")
  fig.tight_layout()
  return [_save(fig, out_dir, "d_multilevel_loss.png")]


def plot_e(curves: dict, metrics: dict, out_dir: str) -> list[str]:
  """Training accuracy of the multi-class student: rows = bit widths, columns = STEs."""
  plt = _plt()
  bits = sorted({v["bits"] for v in metrics["runs"].values()})
  fig, axes = plt.subplots(len(bits), 3, figsize=(13, 3.6 * len(bits)), squeeze=False,
                           sharex=True, sharey=True)
  for row, b in zip(axes, bits):
    for ax, est in zip(row, STES):
      acc = curves[f"{b}bit|{est}"]["train_acc"]
      m = metrics["runs"][f"{b}bit|{est}"]
      t = np.arange(acc.shape[1]) + 1
      for i in range(acc.shape[0]):
        ax.semilogx(t, 100 * acc[i], color=COLORS[est], lw=0.8, alpha=0.7)
      ax.axhline(100, color="k", lw=0.5)
      ax.set_ylim(70, 100.8)
      ax.set_title(f"{b}-bit, {LABELS[est]}: {m['seeds_reaching_100pct']}/{m['seeds']} seeds "
                   f"reach 100%", fontsize=9.5)
    row[0].set_ylabel("training accuracy (%)")
  for ax in axes[-1]:
    ax.set_xlabel("full-batch step + 1 (log)")
  fig.suptitle("(e) multi-class two-linear-layer network, cross-entropy, one line per seed "
               "(our extension)")
  _no_minor_ticks(fig)
  fig.tight_layout()
  return [_save(fig, out_dir, "e_multiclass_accuracy.png")]


PLOTS = {"a": plot_a, "b": plot_b, "c": plot_c, "d": plot_d, "e": plot_e}
