"""Train several methods with the same budget and compare them: the main job.

    python -m experiments.compare                      # RF-DNN vs clipped STE, binarized LeNet-5, Fashion-MNIST
    python -m experiments.compare --config experiments/configs/fashion_mnist.py \\
        --methods float,clipped_ste,dorefa,rfdnn --seeds 0,1,2 epochs=5

The config file's ``get_config(method)`` gives each method's configuration;
``key=value`` overrides apply to all of them. For every method and seed the
training program runs into ``WORKDIR/<method>/seed_<s>`` (resuming if a run
was interrupted); then a table of the paper's statistic (mean and standard
deviation of the test accuracy over the last epochs, pooled over seeds) is
printed and written to ``WORKDIR/results.md`` with ``results.json``, and
``WORKDIR/comparison.png`` shows every method's test accuracy per epoch.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Mapping, Sequence

import ml_collections

from experiments import cli


DEFAULT_CONFIG = "experiments/configs/fashion_mnist.py"
DEFAULT_METHODS = "clipped_ste,rfdnn"
DEFAULT_SEEDS = "0,1"


def prepare(configs: Mapping[str, ml_collections.ConfigDict], seeds: Sequence[int], workdir: pathlib.Path,
            overrides: Sequence[str] = ()) -> dict[str, ml_collections.ConfigDict]:
  """Applies the overrides and seeds to every configuration and validates them all (before any training)."""
  from ricci_jax import train  # noqa: PLC0415

  out = {}
  for label, config in configs.items():
    config = ml_collections.ConfigDict(config.to_dict())
    train.schema.apply_overrides(config, overrides)
    config.seeds = tuple(seeds)
    train.schema.validate(config, workdir / label)
    out[label] = config
  return out


def run(configs: Mapping[str, ml_collections.ConfigDict], seeds: Sequence[int], workdir: pathlib.Path,
        command: str = "") -> dict:
  """Trains every (label, seed), then writes ``results.md``, ``results.json`` and ``comparison.png``.

  Returns:
    ``{"results": {label: train_seeds summary + seconds}, "table": markdown text}``.
  """
  from ricci_jax import reporting, train  # noqa: PLC0415

  results, curves = {}, {}
  for label, config in configs.items():
    summary = train.train_seeds(config, workdir / label)
    seconds = [r.get("seconds") for r in summary["runs"]]  # absent in runs recorded before it was
    results[label] = {**summary, "seconds": None if None in seconds else sum(seconds)}
    dirs = [workdir / label / f"seed_{s}" for s in seeds] if len(seeds) > 1 else [workdir / label]
    curves[label] = [[100 * r["accuracy"] for r in reporting.read_jsonl(d / "eval.jsonl")] for d in dirs]

  first = next(iter(configs.values()))
  devices = {run["device"] for r in results.values() for run in r["runs"] if run.get("device")}
  sources = [run.get("source") or {} for r in results.values() for run in r["runs"]]
  commits = sorted({s.get("commit") or "unrecorded" for s in sources})
  dirty = any(s.get("dirty") for s in sources)
  schedules = {label: f"{c.optimizer.schedule} learning rate from {c.optimizer.learning_rate}"
               for label, c in configs.items()}
  schedule_text = (next(iter(schedules.values())) if len(set(schedules.values())) == 1
                   else "learning rate per run: " + "; ".join(f"{k}: {v}" for k, v in schedules.items()))
  rows = []
  for label, r in results.items():
    s = r["across_seeds"]
    rows.append([label, f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}", f"{100 * s['std_of_seed_means']:.2f}",
                 ", ".join(f"{100 * v:.2f}" for v in s["per_seed"]), "n/a" if r["seconds"] is None else f"{r['seconds'] / 60:.1f}"])
  table = reporting.markdown_table(
      ["method", f"test acc. % (last {first.last_epochs} epochs, {len(seeds)} seeds pooled)",
       "std of seed means", "per-seed means", "minutes (all seeds)"], rows)
  text = (f"# {first.dataset.name}, {first.model.name}: {', '.join(configs)}\n\n"
          f"Budget per run: {first.epochs} epochs, batch {first.batch_size}, {schedule_text}.\n\n{table}\n"
          f"Ran on: {'; '.join(sorted(devices)) or 'unrecorded'}; code: commit(s) "
          f"{', '.join(c[:10] for c in commits)}{' (some from a dirty tree)' if dirty else ''}.\n"
          + (f"Command: `{command}`\n" if command else ""))
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "results.md").write_text(text)
  (workdir / "results.json").write_text(json.dumps(reporting.to_jsonable(results), indent=2))
  reporting.plot_comparison(curves, workdir / "comparison.png",
                            title=f"{first.dataset.name}, {first.model.name}: test accuracy per epoch")
  return {"results": results, "table": text}


def configs_from_file(spec: str, methods: Sequence[str]) -> dict[str, ml_collections.ConfigDict]:
  return {m: cli.load_config_file(f"{spec}:{m}") for m in methods}


def parse(argv=None):
  parser = cli.parser(__doc__)
  parser.add_argument("--config", default=DEFAULT_CONFIG, help="config file whose get_config takes the method")
  parser.add_argument("--methods", default=DEFAULT_METHODS, help="comma-separated methods")
  parser.add_argument("--seeds", default=DEFAULT_SEEDS, help="comma-separated seeds")
  parser.add_argument("--workdir", default="runs/compare", help="output directory")
  args, rest = parser.parse_known_args(argv)
  return args, cli.command_line_overrides(parser, rest)


def main(argv=None) -> int:
  args, overrides = parse(argv)
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  workdir = pathlib.Path(args.workdir)
  try:  # every configuration is checked before the first one trains
    configs = prepare(configs_from_file(args.config, methods), seeds, workdir, overrides)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  command = "python -m experiments.compare " + " ".join(
      [f"--config {args.config}", f"--methods {','.join(methods)}", f"--seeds {','.join(map(str, seeds))}",
       f"--workdir {args.workdir}", *overrides])
  out = run(configs, seeds, workdir, command)
  print("\n" + out["table"])
  print(f"plots: {workdir / 'comparison.png'}, per run: {workdir}/<method>/.../training.png, diagnostics.png")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from ricci_jax import runtime
  runtime.configure_cpu()  # process-wide CPU settings, before JAX starts: a program's choice, never the library's
  sys.exit(cli.run(main))
