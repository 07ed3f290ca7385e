"""Every seed of a configuration, and the paper's statistic across them."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections

from ricci_jax import reporting
from ricci_jax.train import cycles, loop, run_folder, schema


def seed_runs(config: ml_collections.ConfigDict,
              workdir: str | pathlib.Path) -> list[tuple[ml_collections.ConfigDict, pathlib.Path]]:
  """Each seed's config and folder: ``config.seeds`` (or ``config.seed``), ``workdir/seed_<s>`` when several."""
  workdir = pathlib.Path(workdir)
  seeds = list(config.seeds) or [config.seed]
  runs = []
  for seed in seeds:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.seed = int(seed)
    runs.append((cfg, workdir / f"seed_{seed}" if len(seeds) > 1 else workdir))
  return runs


def check_runs(config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
  """Refuses, before any seed trains, a folder of any seed that holds a run with another config
  (:func:`ricci_jax.train.run_folder.check_resume`)."""
  for cfg, run_dir in seed_runs(config, workdir):
    run_folder.check_resume(cfg, run_dir)


def train_seeds(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs every seed (``config.seeds``, or ``config.seed``) and summarises across them."""
  workdir = pathlib.Path(workdir)
  check_runs(config, workdir)
  runs, per_seed = seed_runs(config, workdir), []
  for cfg, run_dir in runs:
    if schema.pruning_schedule(cfg) is not None:
      per_seed.append(cycles.train_pruned(cfg, run_dir))
    else:
      per_seed.append(loop.finished(cfg, run_dir) or loop.train(cfg, run_dir))
  stats = reporting.across_seeds([r["last_epochs"] for r in per_seed])
  summary = {"name": config.name, "seeds": [cfg.seed for cfg, _ in runs], "runs": per_seed, "across_seeds": stats}
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(reporting.to_jsonable(summary), indent=2))
  return summary
