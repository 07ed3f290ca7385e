"""The real-data study: every estimator under one budget, the bit sweep, CIFAR, RF-DNN's knobs, the metric.

    python -m experiments.study [--parts fashion,bits,cifar,alpha,metric] [--workdir runs/study] [--out results]
    python -m experiments.study --quick          # the same pipeline in about a minute (tiny budgets)

Parts (each writes ``OUT/<part>/results.md``, ``results.json`` and plots; runs go to ``WORKDIR/<part>``
and resume if interrupted):

* ``fashion``: binarized LeNet-5 (weights in {-1, +1}, float activations, first and last layers
  float) on real Fashion-MNIST, one budget for every method: full precision, clipped STE, DoReFa,
  MD-tanh, ReSTE, EDE, RF-DNN weak, RF-DNN exact; 5 seeds; the paper's statistic.
* ``bits``: RF-DNN and clipped STE at 1, 2, 4 and 8 weight bits (Eq. 38), 3 seeds: the analogue of
  the paper's Fig. 6(b).
* ``cifar``: binarized CIFAR ResNet-20 (all layers, as in Table 1) on the real CIFAR-10 subset,
  clipped STE, DoReFa and RF-DNN, 3 seeds, the paper's protocol shortened (see presets.cifar10_subset).
* ``alpha``: RF-DNN's open knobs on Fashion-MNIST, 2 seeds: alpha (the regulariser's weight) at 1 (the
  default: this part's own control), 1e2, 1e4, 1e6, and tau_scale 0.95 (a metric close to the edge of
  diagonal dominance).
* ``metric``: the metric perturbation over training (experiments.metric_perturbation) for RF-DNN
  and clipped STE, with the cosine schedule and with a constant learning rate (the schedule alone
  shrinks every step, so the comparison with STE is what says whether the flow adds anything).

Every RF-DNN run also reports how far its update is from STE's (the per-layer correction), N and
the regulariser's relative size, summarised per part in ``diagnostics.md``.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import ml_collections
import numpy as np

from experiments import cli, compare, metric_perturbation
from experiments.configs import presets

PARTS = ("fashion", "bits", "cifar", "alpha", "metric")
FASHION_METHODS = ("float", "clipped_ste", "dorefa", "md_tanh", "reste", "ede", "rfdnn", "rfdnn_exact")


def _fashion(method: str, quick: bool, **kw) -> ml_collections.ConfigDict:
  c = presets.fashion_mnist(method, epochs=1 if quick else 6, **kw)
  if quick:
    c.dataset.train_limit, c.dataset.test_limit, c.batch_size = 512, 256, 64
  c.progress = False
  return c


def _cifar(method: str, quick: bool) -> ml_collections.ConfigDict:
  c = presets.cifar10_subset(method, epochs=1 if quick else 30)
  if quick:
    c.dataset.train_limit, c.dataset.test_limit, c.batch_size, c.log_every_steps = 64, 64, 32, 1
  c.progress = False
  return c


def _seeds(quick: bool, n: int) -> list[int]:
  return [0] if quick else list(range(n))


def part_fashion(quick: bool, workdir: pathlib.Path) -> dict:
  methods = FASHION_METHODS[:3] + ("rfdnn",) if quick else FASHION_METHODS
  seeds = _seeds(quick, 5)
  return compare.run(compare.prepare({m: _fashion(m, quick) for m in methods}, seeds, workdir), seeds, workdir)


def part_bits(quick: bool, workdir: pathlib.Path) -> dict:
  seeds = _seeds(quick, 3)
  configs = {f"{m}_w{b}": _fashion(m, quick, weight_bits=b) for b in ((1, 4) if quick else (1, 2, 4, 8))
             for m in ("clipped_ste", "rfdnn")}
  out = compare.run(compare.prepare(configs, seeds, workdir), seeds, workdir)
  _plot_bits(out["results"], workdir / "bits.png")
  return out


def part_cifar(quick: bool, workdir: pathlib.Path) -> dict:
  seeds = _seeds(quick, 3)
  methods = ("clipped_ste", "rfdnn") if quick else ("clipped_ste", "dorefa", "rfdnn")
  return compare.run(compare.prepare({m: _cifar(m, quick) for m in methods}, seeds, workdir), seeds, workdir)


def part_alpha(quick: bool, workdir: pathlib.Path) -> dict:
  seeds = _seeds(quick, 2)
  variants = {"alpha_1": ["rfdnn.alpha=1.0"],  # the control: the defaults, on the same machine and commit
              "alpha_1e2": ["rfdnn.alpha=100.0"], "alpha_1e4": ["rfdnn.alpha=10000.0"],
              "alpha_1e6": ["rfdnn.alpha=1000000.0"], "tau_scale_0.95": ["rfdnn.tau_scale=0.95"]}
  if quick:
    variants = {"alpha_1e6": variants["alpha_1e6"]}
  configs = {}
  for label, overrides in variants.items():
    from ricci_jax import train  # noqa: PLC0415
    configs[label] = train.schema.apply_overrides(_fashion("rfdnn", quick), overrides)
  return compare.run(compare.prepare(configs, seeds, workdir), seeds, workdir)


def part_metric(quick: bool, workdir: pathlib.Path) -> dict:
  """One seed each, a checkpoint every 50 steps (every 4 in quick mode), then the rank-1 metric distances."""
  every = 4 if quick else 50
  configs = {}
  for method in ("rfdnn", "clipped_ste"):
    for schedule in ("cosine", "constant"):
      c = _fashion(method, quick)
      c.checkpoint_every_steps, c.keep_checkpoints = every, 100_000
      c.optimizer.schedule = schedule
      configs[f"{method}_{schedule}"] = c
  out = compare.run(compare.prepare(configs, [0], workdir), [0], workdir)
  rows, fits = [], {}
  for label in configs:
    analysis = metric_perturbation.analyse(workdir / label)
    metric_perturbation.plot(analysis, workdir / f"{label}_metric.png", title=label)
    (workdir / f"{label}_metric.json").write_text(json.dumps(_jsonable(analysis), indent=2))
    for layer, v in analysis["layers"].items():
      f = v["fit_to_final"]
      fits[(label, layer)] = f
      rows.append([label, layer, f"{v['to_final'][0]:.3e}", f"{f['rate']:.3e}", f"{f['half_life_steps']:.0f}",
                   f"{f['r2']:.3f}"])
  from ricci_jax import reporting  # noqa: PLC0415
  table = reporting.markdown_table(
      ["run", "layer", "|g(0) - g(T)|_F", "fitted decay rate / step", "half-life (steps)", "R^2 of the fit"], rows)
  (workdir / "metric.md").write_text(table)
  out["metric_table"] = table
  return out


def _machine() -> str:
  """The device and versions the part ran on, for the results file."""
  import platform  # noqa: PLC0415

  from ricci_jax import train  # noqa: PLC0415
  return f"{train.describe_devices()}, {os.cpu_count()} host cores, Python {platform.python_version()}"


def _jsonable(x):
  from ricci_jax import reporting  # noqa: PLC0415
  return reporting.to_jsonable(x)


def _plot_bits(results: dict, path: pathlib.Path):
  from ricci_jax import reporting  # noqa: PLC0415
  plt = reporting.pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for method in ("clipped_ste", "rfdnn"):
    pts = sorted((int(k.rsplit("_w", 1)[1]), r["across_seeds"]) for k, r in results.items() if k.startswith(method))
    bits = [b for b, _ in pts]
    ax.errorbar(bits, [100 * s["mean"] for _, s in pts], yerr=[100 * s["std"] for _, s in pts], marker="o",
                capsize=3, label=method)
  ax.set_xscale("log", base=2); ax.set_xlabel("weight bits"); ax.set_ylabel("test accuracy (%)")
  ax.grid(alpha=0.3); ax.legend(); ax.set_title("Weight bit-width sweep (Fashion-MNIST, LeNet-5)")
  fig.tight_layout(); fig.savefig(path, dpi=110); plt.close(fig)


def diagnostics_data(workdir: pathlib.Path) -> dict:
  """Per RF-DNN run (label/seed) and layer: mean and max over training of s, correction, N, the regulariser, gate."""
  from ricci_jax import reporting  # noqa: PLC0415
  out = {}
  for diag_file in sorted(workdir.glob("**/diagnostics.jsonl")):
    records = reporting.read_jsonl(diag_file)
    if not records:
      continue
    label = str(diag_file.parent.relative_to(workdir))
    out[label] = {}
    for layer in records[0]["layers"]:
      vals = {k: np.array([float(r["layers"][layer][k]) for r in records]) for k in
              ("s", "correction", "residual", "regularizer", "gate")}
      out[label][layer] = {**{f"{k}_mean": float(v.mean()) for k, v in vals.items()},
                           **{f"{k}_max": float(v.max()) for k, v in vals.items()},
                           **{f"{k}_min": float(v.min()) for k, v in vals.items()},
                           "epsilon": str(records[-1]["layers"][layer].get("epsilon", "inf")),
                           "logged_steps": len(records)}
  return out


def diagnostics_summary(data: dict) -> str:
  """:func:`diagnostics_data` as a markdown table."""
  from ricci_jax import reporting  # noqa: PLC0415
  rows = [[label, layer, f"{v['s_mean']:.3f}", f"{v['correction_mean']:.2e}", f"{v['correction_max']:.2e}",
           f"{v['residual_mean']:.2e}", f"{v['regularizer_mean']:.2e}", f"{v['gate_mean']:.2f}", v["epsilon"]]
          for label, layers in data.items() for layer, v in layers.items()]
  return reporting.markdown_table(
      ["run", "layer", "mean s", "mean |g^-1 d - d|/|d|", "max", "mean N", "mean |alpha dN|/|d|", "gate open",
       "epsilon"], rows)


def main(argv=None) -> int:
  parser = cli.parser(__doc__)
  parser.add_argument("--parts", default=",".join(PARTS))
  parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline, proves nothing")
  parser.add_argument("--workdir", default="runs/study")
  parser.add_argument("--out", default="results")
  args = parser.parse_args(argv)
  parts = [p.strip() for p in args.parts.split(",") if p.strip()]
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    print(f"error: unknown part(s) {unknown}; valid parts: {', '.join(PARTS)}", file=sys.stderr)
    return 2
  runners = {"fashion": part_fashion, "bits": part_bits, "cifar": part_cifar, "alpha": part_alpha,
             "metric": part_metric}
  # Every part trains before any output is written: a file written into the tree would make the later
  # parts' runs record a dirty tree.
  finished, status = [], 0
  for part in parts:
    workdir = pathlib.Path(args.workdir) / part
    try:
      finished.append((part, workdir, runners[part](args.quick, workdir)))
    except ValueError as e:
      print(f"error in part {part!r}: {e}", file=sys.stderr)
      status = 2
      break
  for part, workdir, out in finished:
    write_part(part, workdir, out, pathlib.Path(args.out) / f"study_{part}", args.quick)
  return status


def write_part(part: str, workdir: pathlib.Path, out: dict, out_dir: pathlib.Path, quick: bool):
  """A finished part's summary, data, diagnostics and plots into ``out_dir``."""
  out_dir.mkdir(parents=True, exist_ok=True)
  diag_data = diagnostics_data(workdir)
  diag = diagnostics_summary(diag_data)
  command = f"python -m experiments.study --parts {part}" + (" --quick" if quick else "")
  text = out["table"] + f"\nCommand: `{command}`" + (" (quick mode: tiny budgets, not evidence)\n" if quick else "\n")
  text += f"\nThis summary written on: {_machine()}\n"
  if "metric_table" in out:
    text += "\n## Metric perturbation\n\n" + out["metric_table"]
  if diag_data:
    text += ("\n## RF-DNN diagnostics (means over training; the gate cannot close where epsilon is inf)\n\n"
             + diag)
  (out_dir / "results.md").write_text(text)
  (out_dir / "results.json").write_text(json.dumps(_jsonable(out["results"]), indent=2))
  if diag_data:
    (out_dir / "diagnostics.json").write_text(json.dumps(_jsonable(diag_data), indent=1))
  for produced in [*workdir.glob("*.png"), *workdir.glob("*_metric.json")]:  # plots and the series behind them
    (out_dir / produced.name).write_bytes(produced.read_bytes())
  print(text)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from ricci_jax import runtime
  runtime.configure_cpu()  # process-wide CPU settings, before JAX starts: a program's choice, never the library's
  sys.exit(cli.run(main))
