"""Iterative pruning in the training program: a dense run, then cycles of prune, rewind and retrain.

``config.pruning`` (:func:`ricci_jax.train.schema.pruning_schedule`) turns a
run into ``1 + cycles`` trainings of ``config.epochs`` each. Cycle 0 is the
dense run, exactly the run without pruning. Before each later cycle
:func:`ricci_jax.pruning.prune_cycle` removes ``rate`` of the alive prunable
weights (the host method by its score, AP its share among the negative
weights that moved least during the previous cycle), the weights are rewound
(``pruning.rewind``: to the initialisation, to the dense run's step
``rewind_step``, kept as trained, or re-drawn) under the new masks, and the
cycle trains with a fresh optimizer state and its learning-rate schedule
restarted (from ``rewind_step`` for a late rewind, which then trains the
remaining steps). The masks ride in the train state: pruned gradients are
zeroed and pruned weights stay exactly 0 in every step, with every optimizer
(:func:`ricci_jax.train.steps.train_step`). Batch statistics are rewound with
the weights (the official AP code keeps the trained ones, its bug B10 in
the AP notes). Every cycle reads the batches in the same order (the seed's),
so cycles differ by their masks and starting weights only.

Each cycle is an ordinary run of :func:`ricci_jax.train.loop.train` in its
own folder (``cycle_00`` is the dense run), with its checkpoints, logs,
plots and exact resume. A run killed in cycle 5 resumes in cycle 5: cycles
0-4 are finished and not retrained; their pruning decisions are recomputed
from their final checkpoints (host side and deterministic, the PRNG keys
derive from the seed and the cycle), and cycle 5 continues from its own
checkpoint. ``cycles.jsonl`` holds one row per cycle (sparsity, test
accuracy, dead-neuron rates), ``pruning.png`` plots them against sparsity.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from ricci_jax import pruning, reporting
from ricci_jax.nnx.functional import Functional
from ricci_jax.train import builders, checkpoints, loop, run_folder, schema

CYCLE_DIR = "cycle_{:02d}"
"""A cycle's folder in the run's working directory (``cycle_00``: the dense run)."""


def prunable_leaves(config: ml_collections.ConfigDict, model: Any, variables: dict, image_shape) -> Any:
  """The prunable leaves of the params (a tree of Python bools) by ``config.pruning``'s rule."""
  x = jnp.zeros((1,) + tuple(image_shape), jnp.float32)
  if isinstance(model, Functional):
    module = model.module(variables)
    module.eval()  # the trace reads the layers' order; in train mode it would write batch statistics
    layers = pruning.nnx_layer_paths(module, x)
  else:
    layers = pruning.layer_paths(model, x, train=False)
  return schema.prune_rule(config).prunable(variables["params"], layers)


def _rewound(schedule, cycle: int, config, model, theta0: dict, end: dict, workdir: pathlib.Path,
             image_shape) -> tuple[dict, int]:
  """The variables (params, batch_stats) and first step of cycle ``cycle``, before masking."""
  if schedule.rewind == "init":
    return theta0, 0
  if schedule.rewind == "early":
    return loop.load_rewind_point(workdir / CYCLE_DIR.format(0), theta0)
  if schedule.rewind == "none":  # learning-rate rewinding: the trained weights, the schedule restarted
    return {"params": end["params"], "batch_stats": end["batch_stats"]}, 0
  key = jax.random.fold_in(jax.random.key(config.seed), 10_000 + cycle)  # "reinit": a fresh draw per cycle
  fresh = jax.device_get(model.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False))
  return {"params": fresh["params"], "batch_stats": fresh.get("batch_stats", {})}, 0


def train_pruned(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains the dense run and every pruning cycle of ``config`` in ``workdir`` (resuming where it stopped).

  Returns:
    The last cycle's summary (as :func:`ricci_jax.train.loop.train`'s) with
    ``cycles``: one row per cycle.

  Raises:
    RunMismatchError: ``workdir`` holds a pruning run with another config.
    ValueError: before any training, for a bad ``config.pruning`` (see
      :func:`ricci_jax.train.schema.pruning_schedule`), a rewind step at or
      after the end of the dense run, a rule that selects no layer, or an
      N:M pattern that does not divide a prunable kernel's input axis.
  """
  workdir = pathlib.Path(workdir)
  schema.validate(config, workdir)
  run_folder.check_resume(config, workdir)
  schedule = schema.pruning_schedule(config)
  if schedule is None:
    raise ValueError("train_pruned needs a pruning schedule: set pruning.cycles or pruning.target_sparsity")
  train_ds, _ = loop.datasets(config)
  try:
    schedule.check_rewind_step(config.epochs * train_ds.steps_per_epoch)
  except ValueError as e:
    raise ValueError(f"pruning: {e} ({config.epochs} epochs of {train_ds.steps_per_epoch} steps)") from None
  model = builders.build_model(config, train_ds.num_classes)
  variables, _, _ = loop.init_variables(config, model, train_ds)
  if config.init_from:
    variables = loop.load_init(config, variables)
  variables = jax.device_get(variables)
  prunable = prunable_leaves(config, model, variables, train_ds.image_shape)
  theta0 = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
  masks = pruning.init_masks(theta0["params"])
  if schedule.nm is not None:  # the pattern must divide every prunable kernel: check now, not after the last cycle
    try:
      pruning.nm_masks(theta0["params"], masks, prunable, *schedule.nm)
    except ValueError as e:
      raise ValueError(f"pruning.nm: {e}") from None
  cycle_start, start, stats = theta0["params"], None, {}
  rows: list[dict] = []
  primary = jax.process_index() == 0
  if primary:
    run_folder.create(config, workdir)  # the pruning run's identity; each cycle's folder has its own too
  result: dict = {}
  for cycle in range(schedule.cycles + 1):
    run_dir = workdir / CYCLE_DIR.format(cycle)
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.name = f"{config.name or config.model.name} cycle {cycle}"
    if cycle > 0:
      end = checkpoints.load_checkpoint(workdir / CYCLE_DIR.format(cycle - 1))
      key = jax.random.fold_in(jax.random.key(config.seed), cycle)
      masks, stats = pruning.prune_cycle(schedule, cycle, masks, end["params"], cycle_start, prunable, key=key)
      values, step = _rewound(schedule, cycle, config, model, theta0, end, workdir, train_ds.image_shape)
      params = jax.device_get(pruning.rewind(theta0["params"], values["params"], masks))
      start = loop.Start(params=params, batch_stats=values["batch_stats"], masks=jax.device_get(masks), step=step,
                         sparsity=pruning.sparsity(masks, prunable)["global"]["sparsity"])
      cycle_start = params
    result = loop.finished(cfg, run_dir) or loop.train(cfg, run_dir, start=start)
    rows.append(_row(cycle, schedule, masks, prunable, stats, result))
    if primary:
      _write(workdir, rows, config)
  summary = {**result, "name": config.name, "cycles": rows,
             "pruning": {"schedule": schedule.to_json(), "rule": schema.prune_rule(config).to_json()}}
  if primary:
    (workdir / "results.json").write_text(json.dumps(reporting.to_jsonable(summary), indent=2))
  return summary


def _row(cycle: int, schedule, masks, prunable, stats: dict, result: dict) -> dict:
  overall = pruning.sparsity(masks, prunable)["global"]
  row = {"cycle": cycle, "sparsity": overall["sparsity"], "remaining": 1.0 - overall["sparsity"],
         "alive": overall["alive"], "prunable": overall["total"],
         "host_removed": stats.get("host_removed", 0), "ap_removed": stats.get("ap_removed", 0),
         "ap_budget": stats.get("ap_budget", 0), "ap_active": cycle > 0 and schedule.ap_active(cycle),
         "final_test_accuracy": result.get("final_test_accuracy"),
         "last_epochs_mean": result.get("last_epochs", {}).get("mean"), "seconds": result.get("seconds")}
  for name in ("dnr_train", "dnr_test"):
    if result.get(name):
      row[name] = result[name]["global"]["dnr"]
      row[f"{name}_dead_units"] = result[name]["global"]["dead_units"]
  return row


def _write(workdir: pathlib.Path, rows: list[dict], config: ml_collections.ConfigDict) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "cycles.jsonl").write_text("".join(json.dumps(reporting.to_jsonable(r)) + "\n" for r in rows))
  if config.plots:
    reporting.plot_pruning(rows, workdir / "pruning.png", f"{config.name or config.model.name} (seed {config.seed})")


def cycle_table(rows: list[dict]) -> str:
  """A markdown table of the cycles: sparsity, AP's part, test accuracy, dead-neuron rates."""
  head = "| cycle | remaining % | host removed | AP removed | test accuracy % | DNR train | DNR test |"
  lines = [head, "|" + "---|" * 7]
  for r in rows:
    fmt = lambda v, scale=1.0, digits=3: "" if v is None else f"{scale * v:.{digits}f}"  # noqa: E731
    lines.append(f"| {r['cycle']} | {100 * r['remaining']:.1f} | {r['host_removed']} | {r['ap_removed']} | "
                 f"{fmt(r['final_test_accuracy'], 100, 2)} | {fmt(r.get('dnr_train'))} | {fmt(r.get('dnr_test'))} |")
  return "\n".join(lines)

