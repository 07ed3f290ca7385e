"""How the LNE metric evolves over training, from a run's checkpoints.

    python -m experiments.metric_perturbation RUN_DIR [--out DIR]

RF-DNN (§4.4, §6.2) claims that under the discrete Ricci flow the metric
perturbation decays exponentially, g(t) -> g0, but shows no measurement. Here,
for every quantized layer and every checkpoint of a run (train with a small
``checkpoint_every_steps`` and a large ``keep_checkpoints``), the metric is
g(t) = I - t t^T with t = tanh(tau_t w_t) and tau_t the optimizer's own
(``tau="auto"`` is recomputed from w_t), and three distances are measured in
rank-1 form (never an n x n matrix):

* ``to_final``: ||g(t) - g(T)||_F, the perturbation from where the metric ends
  (the paper's g0 is the limit; the last checkpoint stands in for it);
* ``to_initial``: ||g(t) - g(0)||_F;
* ``step``: ||g(t) - g(t_prev)||_F between consecutive checkpoints (per step).

An exponential C exp(-rate * t) is fitted to ``to_final`` by least squares on
its logarithm (the last checkpoint, where it is 0, is left out); the rate, the
half-life in steps and R^2 are reported. Writes ``metric_perturbation.json``
and ``metric_perturbation.png``.
"""

from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from ricci_jax import lne, reporting, train
from ricci_jax.ricci_flow import Rank1Sum

from experiments import cli


def metric_distance(t_a: jax.Array, t_b: jax.Array) -> float:
  """||(I - a a^T) - (I - b b^T)||_F = ||b b^T - a a^T||_F, in O(n) and without cancellation."""
  return float(jnp.sqrt(Rank1Sum(jnp.array([-1.0, 1.0]), jnp.stack([t_a, t_b])).frobenius_sq()))


def _metric_vectors(params: dict, kernels: list[str], tau_scale: float) -> dict[str, jax.Array]:
  out = {}
  for path in kernels:
    node = params
    for key in path.split("/"):
      node = node[key]
    w = jnp.asarray(node)
    out[path] = lne.metric_vector(w, lne.auto_tau(w, tau_scale))
  return out


def fit_exponential(steps: np.ndarray, values: np.ndarray) -> dict[str, float]:
  """Least squares of log(values) = log C - rate * steps, over the positive values."""
  keep = values > 0
  if keep.sum() < 3:
    return {"rate": float("nan"), "half_life_steps": float("nan"), "r2": float("nan"), "points": int(keep.sum())}
  x, y = steps[keep].astype(float), np.log(values[keep])
  slope, intercept = np.polyfit(x, y, 1)
  pred = slope * x + intercept
  ss_res, ss_tot = float(np.sum((y - pred) ** 2)), float(np.sum((y - y.mean()) ** 2))
  rate = -float(slope)
  return {"rate": rate, "log_c": float(intercept), "half_life_steps": float(np.log(2) / rate) if rate > 0 else float("inf"),
          "r2": 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan"), "points": int(keep.sum())}


def analyse(run_dir: str | pathlib.Path) -> dict:
  run_dir = pathlib.Path(run_dir)
  results = json.loads((run_dir / "results.json").read_text())
  config = json.loads((run_dir / "config.json").read_text())
  tau_scale = float(config.get("rfdnn", {}).get("tau_scale", 0.5))
  kernels = results["quantized_layers"]
  with ocp.CheckpointManager((run_dir / "checkpoints").absolute()) as mgr:
    steps = sorted(mgr.all_steps())
  if len(steps) < 3:
    raise ValueError(f"{run_dir} has {len(steps)} checkpoints; train with a small checkpoint_every_steps and "
                     f"a large keep_checkpoints to follow the metric")
  vectors = {s: _metric_vectors(train.load_checkpoint(run_dir, s)["params"], kernels, tau_scale) for s in steps}
  final, first = vectors[steps[-1]], vectors[steps[0]]
  layers = {}
  for path in kernels:
    to_final = np.array([metric_distance(vectors[s][path], final[path]) for s in steps])
    to_initial = np.array([metric_distance(vectors[s][path], first[path]) for s in steps])
    step = np.array([np.nan] + [metric_distance(vectors[b][path], vectors[a][path]) / (b - a)
                                for a, b in zip(steps[:-1], steps[1:])])
    layers[path] = {"to_final": to_final.tolist(), "to_initial": to_initial.tolist(), "step": step.tolist(),
                    "fit_to_final": fit_exponential(np.array(steps[:-1]), to_final[:-1])}
  return {"run": str(run_dir), "steps": steps, "layers": layers}


def plot(result: dict, path: pathlib.Path, title: str = ""):
  plt = reporting.pyplot()
  steps = np.array(result["steps"])
  names = list(result["layers"])
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  cmap = plt.get_cmap("viridis")
  for i, name in enumerate(names):
    layer = result["layers"][name]
    color = cmap(i / max(1, len(names) - 1))
    axes[0].semilogy(steps[:-1], layer["to_final"][:-1], color=color, label=name)
    fit = layer["fit_to_final"]
    if np.isfinite(fit["rate"]):
      axes[0].semilogy(steps[:-1], np.exp(fit["log_c"] - fit["rate"] * steps[:-1]), "--", color=color, lw=0.8)
    axes[1].plot(steps, layer["to_initial"], color=color)
    axes[2].semilogy(steps[1:], layer["step"][1:], color=color)
  axes[0].set_title("||g(t) - g(T)||_F (dashed: exponential fit)", fontsize=9)
  axes[1].set_title("||g(t) - g(0)||_F", fontsize=9)
  axes[2].set_title("||g(t) - g(t')||_F / (t - t') per step", fontsize=9)
  for ax in axes:
    ax.set_xlabel("step"); ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None):
  parser = cli.parser(__doc__)
  parser.add_argument("run_dir")
  parser.add_argument("--out", default=None, help="output directory (default: the run directory)")
  args = parser.parse_args(argv)
  result = analyse(args.run_dir)
  out = pathlib.Path(args.out or args.run_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "metric_perturbation.json").write_text(json.dumps(reporting.to_jsonable(result), indent=2))
  plot(result, out / "metric_perturbation.png", title=f"LNE metric over training: {args.run_dir}")
  for name, layer in result["layers"].items():
    f = layer["fit_to_final"]
    print(f"{name:24s} |g(0)-g(T)| = {layer['to_final'][0]:.3e}  exponential fit: rate {f['rate']:.3e}/step, "
          f"half-life {f['half_life_steps']:.0f} steps, R^2 {f['r2']:.3f}")


if __name__ == "__main__":
  sys.exit(cli.run(main))
