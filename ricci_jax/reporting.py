"""Metrics files, the paper's statistics, tables and plots.

* Metrics are JSON lines (one object per line, each with its ``step``), written
  by :class:`JsonlWriter`; a resumed run first drops the lines written after
  its checkpoint, so the files always match the restored state.
* The paper's statistic (RF-DNN §7.1): mean and standard deviation of the test
  accuracy over the last epochs (10 for CIFAR, 5 for ImageNet), and across
  seeds when several ran.
* Plots are PNG files drawn with matplotlib's non-interactive backend.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


class JsonlWriter:
  """Appends JSON objects, one per line, flushing each line.

  ``enabled=False`` gives a writer that writes nothing: the processes of a
  multi-process run other than the first log through one.
  """

  def __init__(self, path: str | os.PathLike, enabled: bool = True):
    self.path = pathlib.Path(path)
    self.enabled = enabled
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)

  def write(self, record: Mapping[str, Any]):
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps(to_jsonable(record)) + "\n")

  def remove(self):
    """Deletes the file (a fresh run starts without stale lines)."""
    if self.enabled:
      self.path.unlink(missing_ok=True)

  def truncate_after(self, step: int):
    """Drops the lines whose ``step`` is greater than ``step`` (used when resuming)."""
    if not self.enabled or not self.path.exists():
      return
    kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
    self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
  path = pathlib.Path(path)
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def to_jsonable(value):
  if isinstance(value, Mapping):
    return {str(k): to_jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [to_jsonable(v) for v in value]
  if hasattr(value, "item") and np.ndim(value) == 0:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, np.ndarray):
    return value.tolist()
  return value


def source_version(path: str | os.PathLike | None = None, max_changes: int = 20) -> dict[str, Any]:
  """The git commit of the code at ``path`` (default: this package) and whether its tree was dirty.

  ``{"commit": <sha or None>, "dirty": <bool or None>, "changes": [...]}``;
  commit and dirty are None outside a git checkout (an installed wheel). Dirty
  means tracked files differ from the commit or untracked files that git does
  not ignore exist: a result from a dirty tree is not reproducible from its
  commit. ``changes`` lists the first ``max_changes`` lines of ``git status
  --porcelain`` so that a reader can tell modified code from, say, an output
  file left in the tree.
  """
  import subprocess  # noqa: PLC0415

  where = pathlib.Path(path) if path is not None else pathlib.Path(__file__).resolve().parent
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=30,
                            check=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=where, capture_output=True, text=True,
                            timeout=30, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None, "changes": []}
  changes = [line for line in status.splitlines() if line.strip()]
  return {"commit": commit, "dirty": bool(changes), "changes": changes[:max_changes]}


def provenance(records: Iterable[Mapping]) -> dict[str, Any]:
  """Where a set of runs came from, for a report's provenance line.

  ``records``: each with ``source`` (:func:`source_version`'s dict, or
  ``None``) and ``device``. Returns the sorted ``commits`` and ``devices``
  (``"unrecorded"`` where a run has none), ``runs``, ``dirty`` (how many were
  made from a tree with uncommitted changes), ``changes`` (the sorted paths
  those runs recorded) and ``unrecorded_changes`` (dirty runs from before
  the paths were recorded).
  """
  records = list(records)
  dirty = [r for r in records if (r.get("source") or {}).get("dirty")]
  return {"commits": sorted({(r.get("source") or {}).get("commit") or "unrecorded" for r in records}),
          "devices": sorted({r.get("device") or "unrecorded" for r in records}),
          "runs": len(records), "dirty": len(dirty),
          "changes": sorted({c for r in dirty for c in (r["source"].get("changes") or [])}),
          "unrecorded_changes": sum(1 for r in dirty if "changes" not in r["source"])}


def last_epochs_statistic(test_accuracies: Sequence[float], window: int) -> dict[str, Any]:
  """Mean and (population) standard deviation over the last ``window`` values."""
  values = np.asarray(list(test_accuracies)[-window:], float)
  if values.size == 0:
    return {"mean": float("nan"), "std": float("nan"), "epochs": 0, "values": []}
  return {"mean": float(values.mean()), "std": float(values.std()), "epochs": int(values.size),
          "values": [float(v) for v in values]}


def across_seeds(per_seed: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The paper's statistic over several runs, and the spread of the runs themselves.

  ``mean``/``std``: over the last-epochs test accuracies of all runs pooled
  (RF-DNN §7.1: "conducted for 5 times, and the statistics of the last 10/5
  epochs' test accuracies are reported"). ``std_of_seed_means``: the standard
  deviation of the per-run means, the run-to-run spread alone.
  """
  pooled = np.concatenate([np.asarray(r["values"], float) for r in per_seed]) if per_seed else np.array([])
  means = np.asarray([r["mean"] for r in per_seed], float)
  if pooled.size == 0:
    return {"mean": float("nan"), "std": float("nan"), "std_of_seed_means": float("nan"),
            "seeds": len(per_seed), "per_seed": []}
  return {"mean": float(pooled.mean()), "std": float(pooled.std()),
          "std_of_seed_means": float(means.std()), "seeds": int(means.size),
          "per_seed": [float(m) for m in means]}


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def pyplot():
  """matplotlib.pyplot with the non-interactive Agg backend."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  return plt


def plot_training(train: Sequence[Mapping], evals: Sequence[Mapping], path: str | os.PathLike, title: str = ""):
  """Loss and accuracy curves (train at log steps, test at epoch ends) into one PNG."""
  plt = pyplot()
  fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
  if train:
    steps = [r["step"] for r in train]
    ax_loss.plot(steps, [r["loss"] for r in train], label="train loss", lw=1)
    ax_acc.plot(steps, [100 * r["accuracy"] for r in train], label="train accuracy", lw=1, alpha=0.7)
  if evals:
    steps = [r["step"] for r in evals]
    ax_loss.plot(steps, [r["loss"] for r in evals], "o-", label="test loss", ms=3)
    ax_acc.plot(steps, [100 * r["accuracy"] for r in evals], "o-", label="test accuracy", ms=3)
  ax_loss.set_xlabel("step"); ax_loss.set_ylabel("cross-entropy"); ax_loss.set_yscale("log")
  ax_acc.set_xlabel("step"); ax_acc.set_ylabel("accuracy (%)")
  for ax in (ax_loss, ax_acc):
    ax.grid(alpha=0.3); ax.legend()
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


DIAGNOSTIC_PANELS = (
    ("s", "s = |tanh(tau w)|^2", "linear"),
    ("correction", "|g^-1 d - d| / |d| (distance from STE)", "log"),
    ("residual", "Ricci-flow residual N (Eq. 35)", "log"),
    ("gate", "gate open, share of steps so far (Eq. 36)", "linear"),
)


def plot_diagnostics(records: Sequence[Mapping], path: str | os.PathLike, title: str = ""):
  """Per-layer RF-DNN diagnostics over training: s, correction, N, gate open fraction.

  ``records`` are lines of ``diagnostics.jsonl``: ``{"step": ..., "layers":
  {name: {"s": ..., "correction": ..., "residual": ..., "gate": ...}}}``.
  """
  if not records:
    return
  plt = pyplot()
  layers = list(records[0]["layers"])
  steps = [r["step"] for r in records]
  fig, axes = plt.subplots(1, len(DIAGNOSTIC_PANELS), figsize=(4.2 * len(DIAGNOSTIC_PANELS), 3.8))
  cmap = plt.get_cmap("viridis")
  for ax, (key, label, scale) in zip(axes, DIAGNOSTIC_PANELS):
    for i, layer in enumerate(layers):
      if key == "gate":  # the share of all steps so far the gate let through
        values = [float(r["layers"][layer].get("gate_open_fraction", r["layers"][layer][key])) for r in records]
      else:
        values = [float(r["layers"][layer][key]) for r in records]
      ax.plot(steps, values, color=cmap(i / max(1, len(layers) - 1)), lw=1,
              label=layer if i in (0, len(layers) - 1) else None)
    if scale == "log" and all(float(r["layers"][lay][key]) > 0 for r in records for lay in layers):
      ax.set_yscale("log")
    ax.set_title(label, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7, title="layers (first, last)", title_fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_comparison(curves: Mapping[str, Sequence[Sequence[float]]], path: str | os.PathLike,
                    ylabel: str = "test accuracy (%)", title: str = ""):
  """Mean and min-max band across seeds of one curve per method (x = epoch)."""
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.2))
  for name, runs in curves.items():
    length = min(len(r) for r in runs)
    arr = np.asarray([r[:length] for r in runs], float)
    x = np.arange(1, length + 1)
    ax.plot(x, arr.mean(0), label=f"{name} (n={len(runs)})")
    ax.fill_between(x, arr.min(0), arr.max(0), alpha=0.2)
  ax.set_xlabel("epoch"); ax.set_ylabel(ylabel); ax.grid(alpha=0.3); ax.legend()
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_dead_neurons(records: Sequence[Mapping], path: str | os.PathLike, title: str = "", max_sites: int = 40):
  """Dead neuron rate (:mod:`ricci_jax.dead_neurons`) per ReLU site and overall against step, and against sparsity.

  ``records`` are DNR log lines (JSON objects, one per measurement, as
  :func:`ricci_jax.dead_neurons.dnr_record` writes them)::

    {"step": int,                      # the training step of the measurement
     "mode": "train" | "eval",         # optional, default "train": dynamic DNR
                                       #   (train mode, training batches) or
                                       #   post-training DNR (eval mode, test set)
     "sparsity": float,                # optional: share of prunable weights that are 0, in [0, 1]
     "dnr": {"global": float,          # unit-weighted DNR over all sites, in [0, 1]
             "<site>": float, ...}}    # the DNR of each ReLU site

  Other keys are ignored. Left: each site's DNR (train records, or eval ones
  when there are none; colour from first to last site, at most ``max_sites``
  sites drawn) and the global one (black) against step. Middle: the global
  DNR against step, one line per mode. Right, only when some records carry
  ``sparsity``: the global DNR against sparsity, per mode the last record
  (largest step) at each sparsity level. Nothing is drawn for no records.
  """
  if not records:
    return
  plt = pyplot()
  by_mode: dict[str, list[Mapping]] = {}
  for r in sorted(records, key=lambda r: r["step"]):
    by_mode.setdefault(r.get("mode", "train"), []).append(r)
  with_sparsity = [r for r in records if r.get("sparsity") is not None]
  panels = 3 if with_sparsity else 2
  fig, axes = plt.subplots(1, panels, figsize=(4.8 * panels, 4))
  shown_mode = "train" if "train" in by_mode else sorted(by_mode)[0]
  shown = by_mode[shown_mode]
  sites = [s for s in shown[0]["dnr"] if s != "global"][:max_sites]
  cmap = plt.get_cmap("viridis")
  steps = [r["step"] for r in shown]
  for i, site in enumerate(sites):
    axes[0].plot(steps, [float(r["dnr"].get(site, float("nan"))) for r in shown], lw=1,
                 color=cmap(i / max(1, len(sites) - 1)), label=site if i in (0, len(sites) - 1) else None)
  axes[0].plot(steps, [float(r["dnr"]["global"]) for r in shown], "k-", lw=2, label="global")
  axes[0].set_title(f"DNR per ReLU site ({shown_mode})", fontsize=9)
  for mode, rs in sorted(by_mode.items()):
    axes[1].plot([r["step"] for r in rs], [float(r["dnr"]["global"]) for r in rs], "o-", ms=3, label=mode)
  axes[1].set_title("global DNR (unit-weighted)", fontsize=9)
  for ax in axes[:2]:
    ax.set_xlabel("step")
  if with_sparsity:
    for mode, rs in sorted(by_mode.items()):
      last: dict[float, Mapping] = {}
      for r in rs:  # sorted by step: the last one at each sparsity wins
        if r.get("sparsity") is not None:
          last[float(r["sparsity"])] = r
      xs = sorted(last)
      axes[2].plot(xs, [float(last[x]["dnr"]["global"]) for x in xs], "o-", ms=3, label=mode)
    axes[2].set_xlabel("sparsity (share of prunable weights that are 0)")
    axes[2].set_title("global DNR against sparsity (last record per level)", fontsize=9)
  for ax in axes:
    ax.set_ylabel("DNR (share of ReLU outputs = 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_pruning(rows: Sequence[Mapping], path: str | os.PathLike, title: str = ""):
  """A pruned run's cycles (:mod:`ricci_jax.train.cycles`, ``cycles.jsonl``) against the remaining weights.

  ``rows``: one per cycle, with ``remaining`` (share of prunable weights
  alive), ``final_test_accuracy``, and when measured ``dnr_train`` /
  ``dnr_test`` (global dead-neuron rates). Left: test accuracy; right: the
  dead-neuron rates (drawn only when some row has them). The x axis runs from
  dense (100%) to sparse, on a log scale as the cycles remove a constant share.
  """
  if not rows:
    return
  plt = pyplot()
  has_dnr = any(r.get("dnr_train") is not None or r.get("dnr_test") is not None for r in rows)
  fig, axes = plt.subplots(1, 2 if has_dnr else 1, figsize=(10 if has_dnr else 5, 4), squeeze=False)
  x = [100 * r["remaining"] for r in rows]
  ax = axes[0][0]
  ax.plot(x, [100 * (r["final_test_accuracy"] or float("nan")) for r in rows], "o-")
  for xi, r in zip(x, rows):
    if r.get("final_test_accuracy") is not None:
      ax.annotate(str(r["cycle"]), (xi, 100 * r["final_test_accuracy"]), fontsize=7, xytext=(2, 2),
                  textcoords="offset points")
  ax.set_ylabel("test accuracy % (labels: cycle)")
  if has_dnr:
    ax = axes[0][1]
    for key, label in (("dnr_train", "dynamic DNR (training batches)"), ("dnr_test", "DNR on the test set")):
      ax.plot(x, [r.get(key, float("nan")) for r in rows], "o-", label=label)
    ax.set_ylabel("dead-neuron rate (share of ReLU outputs = 0)")
    ax.legend(fontsize=8)
  from matplotlib import ticker  # noqa: PLC0415

  for ax in axes[0]:
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(ticker.FixedLocator(x[::max(1, len(x) // 8)]))
    ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%.3g"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.invert_xaxis()
    ax.set_xlabel("remaining prunable weights %")
    ax.grid(alpha=0.3, which="both")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
