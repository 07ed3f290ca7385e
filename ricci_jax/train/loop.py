"""The training loop: one seed of a configuration into a working directory, and every seed of it.

:func:`train` runs one seed (the config schema is :mod:`ricci_jax.train.schema`); :func:`train_seeds`
runs every seed and reports the paper's statistic across them. A run:

* builds the model with its quantization rule, the optimizer (SGD, Adam, or RF-DNN's ``rf_sgd``) and the
  estimator's hyperparameter schedule, all as traced values so nothing recompiles during training;
* trains data-parallel with ``jax.jit`` over a ``("data",)`` mesh of every device of every process
  (:mod:`ricci_jax.train.placement`); the global batch is the same whatever the device count, and each
  process reads only its own rows of it;
* reads its batches from one Grain iterator over every epoch (:meth:`ricci_jax.data.Dataset.iterator`)
  and augments them on the device inside the jitted step, from a key derived from the seed and the step;
  the iterator's state is saved with the model of the same step, so a resumed run sees exactly the
  same batches;
* skips a step whose loss or gradients are not finite, or that would make a finite value of the state
  non-finite (counted), and stops with a checkpoint and a one-line message naming the offending value
  after too many in a row;
* is identified by its folder's ``config.json``, written once: a later invocation with another config is
  refused before any work, unless the change is one a resume may make and is asked for
  (:mod:`ricci_jax.train.run_folder`);
* writes verified Orbax checkpoints (model, input pipeline, checksum) at every epoch end and every N steps,
  and resumes from the newest intact one (:mod:`ricci_jax.train.checkpoints`);
* inside :func:`ricci_jax.train.interrupts.stop_on_signals`, stops on SIGINT / SIGTERM after the current
  step with a checkpoint, raising :class:`~ricci_jax.train.interrupts.Interrupted`;
* shows a tqdm bar (loss, accuracy, images/s), writes ``metrics.jsonl``, ``eval.jsonl`` and
  ``diagnostics.jsonl`` (per-layer RF-DNN diagnostics), and draws PNG plots; of several processes, the
  first writes every file but the checkpoints;
* ends with the paper's statistic: mean and standard deviation of the test accuracy over the last epochs.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ricci_jax import data as data_lib
from flax import nnx

from ricci_jax import dead_neurons, layers, models, reporting, transform
from ricci_jax.nnx.functional import Functional
from ricci_jax.summary import summary as summarize_model
from ricci_jax.train import builders, checkpoints, interrupts, run_folder, schema, steps
from ricci_jax.train.placement import DataParallel


class NonFiniteLossError(RuntimeError):
  """Raised when too many consecutive steps had a non-finite loss, gradient or state (the last good state
  is saved)."""


REWIND_POINT = "rewind_point.npz"
"""The file a dense run of a late-rewinding pruning schedule keeps its rewind point in."""


@dataclasses.dataclass(frozen=True)
class Start:
  """Where a run starts instead of the model's initialisation: a pruning cycle's rewound weights.

  Attributes:
    params, batch_stats: the starting variables (host arrays).
    masks: pruning masks like the params (True = alive), kept in every step.
    step: the first step (a late-rewound cycle starts at the rewind point's step).
  """

  params: Any
  batch_stats: Any
  masks: Any = None
  step: int = 0
  sparsity: float | None = None  # the share of prunable weights pruned (for the dead-neuron records)


def datasets(config: ml_collections.ConfigDict):
  d = config.dataset
  common = dict(source=d.source, data_dir=d.data_dir or None)
  holdout = d.holdout_validation or d.eval_split == "validation"
  train = data_lib.load(d.name, "train", batch_size=config.batch_size, seed=config.seed,
                        validation=holdout, limit=d.train_limit or None, **common)
  test = data_lib.load(d.name, d.eval_split, batch_size=config.batch_size, seed=config.seed,
                       drop_remainder=False, limit=d.test_limit or None, **common)
  return train, test


def init_variables(config, model, train_ds) -> tuple[dict, dict, Any]:
  """The model's variables, its quantized kernels and their mask over the params."""
  x = jnp.zeros((1,) + tuple(train_ds.image_shape), jnp.float32)
  # one compiled program: eager init dispatches every initializer op by op (ResNet-18: 40 s on a CPU)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(config.seed), x)
  if isinstance(model, Functional):  # an NNX model: its quantizing ops are in its graph
    kernels = model.quantized_kernels()
  else:
    kernels = models.inspect.quantized_kernels(model, x, train=False)
  mask = layers.quantized_kernel_mask(variables["params"], kernels)
  return variables, kernels, mask


def load_init(config: ml_collections.ConfigDict, variables: dict) -> dict:
  """``variables`` with params and batch statistics from the run ``config.init_from`` (e.g. a float run).

  Float and quantized models have the same parameter tree, so a float run
  initialises a quantized one (RF-DNN Table 4 starts from pretrained float
  models). The estimator hyperparameters (``quant``) stay this run's.
  """
  run = schema.resolve_init_dir(config.init_from, config.seed)
  saved = checkpoints.load_checkpoint(run)
  out = dict(variables)
  for collection in ("params", "batch_stats"):
    if collection not in variables:
      continue
    want = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(variables[collection])}
    have = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved.get(collection, {}))}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    wrong = sorted(k for k in set(want) & set(have) if tuple(np.shape(have[k])) != tuple(want[k].shape))
    if missing or extra or wrong:
      raise ValueError(
          f"init_from {str(run)!r} does not fit model {config.model.name!r} ({collection}): "
          f"missing {missing[:5]}, unexpected {extra[:5]}, wrong shapes "
          f"{[(k, tuple(np.shape(have[k])), tuple(want[k].shape)) for k in wrong[:5]]}. "
          "Pass a run of the same model and number of classes.")
    out[collection] = jax.tree_util.tree_map_with_path(
        lambda k, v: jnp.asarray(have[jax.tree_util.keystr(k)], v.dtype), variables[collection])
  return out


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, start: Start | None = None) -> dict:
  """Trains one seed of ``config`` in ``workdir`` (resuming if a checkpoint is there).

  ``start``: the variables, pruning masks and first step to start from (a
  pruning cycle, :func:`ricci_jax.train.cycles.train_pruned`); default: the
  model's initialisation (or ``config.init_from``).

  Returns:
    A dict with the final and the last-epochs test accuracy, and run facts.
  """
  started = time.perf_counter()
  workdir = pathlib.Path(workdir)
  schema.validate(config, workdir)
  changes = run_folder.check_resume(config, workdir)  # before any work; None: a new run
  train_ds, test_ds = datasets(config)
  steps_per_epoch = train_ds.steps_per_epoch
  total_steps = config.epochs * steps_per_epoch
  model = builders.build_model(config, train_ds.num_classes)
  variables, kernels, mask = init_variables(config, model, train_ds)
  if config.init_from:
    variables = load_init(config, variables)
  if start is not None:
    variables = {**variables, "params": start.params, "batch_stats": start.batch_stats}
  if isinstance(model, Functional):
    module = model.module(variables)
    model_summary = summarize_model(module, nnx.state(module), input_shape=tuple(train_ds.image_shape))
  else:
    model_summary = summarize_model(model, variables, input_shape=tuple(train_ds.image_shape))
  placement = DataParallel()
  use_rf = config.optimizer.name == "rf_sgd"
  program, state = steps.build_program(config, model, variables, mask, steps_per_epoch,
                                       masks=None if start is None else start.masks,
                                       step=0 if start is None else start.step)
  guarded = steps.guarded_names(state)

  primary = jax.process_index() == 0  # of several processes, the first writes every file but the checkpoints
  evals: list[dict] = []  # every process keeps them: the checkpoints carry them, no process reads another's file
  mgr = checkpoints.manager(workdir, config.keep_checkpoints)
  start_step, data_state, restored = int(state.step), None, None
  if changes is not None:  # the newest intact checkpoint (a CheckpointError, before anything is written, if none)
    restored = checkpoints.restore_newest_intact(mgr, jax.device_get(state), move_damaged=primary)
  if restored is not None:
    state, saved_meta, data_state = restored
    start_step = int(state.step)
    saved_evals = saved_meta.get("evals")
    if saved_evals is None:  # a checkpoint written before the evaluations travelled with it
      saved_evals = reporting.read_jsonl(workdir / "eval.jsonl")
    evals = [r for r in saved_evals if r["step"] <= start_step]
    if start_step > total_steps:
      raise ValueError(f"epochs = {config.epochs} ({total_steps} steps) ends before step {start_step}, where the "
                       f"run in {str(workdir)!r} stands")
  # from here on the run writes its folder
  if primary:
    run_folder.create(config, workdir)
    (workdir / "model_summary.txt").write_text(model_summary.text() + "\n")
    (workdir / "model_summary.json").write_text(
        json.dumps(reporting.to_jsonable(model_summary.to_dict()), indent=2))
    if changes is not None:
      run_folder.record_resume(workdir, start_step, total_steps, changes)
      changed = "".join(f"; {k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
      print(f"resuming {workdir} from step {start_step} of {total_steps}{changed}", flush=True)
    if config.progress:
      print(model_summary, flush=True)
  metrics_log = reporting.JsonlWriter(workdir / "metrics.jsonl", enabled=primary)
  eval_log = reporting.JsonlWriter(workdir / "eval.jsonl", enabled=primary)
  diag_log = reporting.JsonlWriter(workdir / "diagnostics.jsonl", enabled=primary)
  dnr_log = reporting.JsonlWriter(workdir / "dnr.jsonl", enabled=primary)
  for log in (metrics_log, eval_log, diag_log, dnr_log):
    if restored is not None:
      log.truncate_after(start_step)
    else:  # a fresh start: no stale lines
      log.remove()

  train_fn, eval_fn = placement.train_fn(program), placement.eval_fn(program)
  dnr_every = config.dnr.every_steps
  sparsity = None if start is None else start.sparsity
  relu_fn = {mode: jax.jit(functools.partial(steps.relu_counts, program, train=mode == "train"))
             for mode in ("train", "eval")}
  dstate = placement.state(state)
  meta = {"steps_per_epoch": steps_per_epoch, "name": config.name, "evals": evals}  # evals grows in place
  # the batches of every epoch, positioned where the checkpoint's model stands (a checkpoint without a
  # pipeline state, from before it was saved, resumes at the model's step of the current order)
  batches = train_ds.iterator(start_step, data_state)

  def save(host_state):  # the model and the input pipeline's position, of the same step
    checkpoints.save(mgr, host_state, meta, batches.get_state())

  if mgr.latest_step() is None:
    save(jax.device_get(state))
  rewind_at = _rewind_point_step(config, start, workdir if primary else None)
  if rewind_at == start_step:
    _save_rewind_point(placement.unstate(dstate), workdir)
  n_quant = sum(int(np.size(p)) for p, m in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(mask)) if m)
  n_params = sum(int(np.size(p)) for p in jax.tree.leaves(variables["params"]))

  progress = _progress_bar(config, total_steps, start_step, config.name or config.model.name)
  pending: list[dict] = []
  interval_start, interval_images = time.perf_counter(), 0
  step = start_step
  stopped_reason, signum, last_nonfinite = None, None, None

  def evaluate_epoch(epoch_done: int, at_step: int):  # the test evaluation due after epoch ``epoch_done``
    if (epoch_done % config.eval_every_epochs and epoch_done != config.epochs) or any(
        r["step"] == at_step for r in evals):
      return
    result = _evaluate(placement, eval_fn, dstate, test_ds)
    evals.append({"step": at_step, "epoch": epoch_done, **result})
    eval_log.write(evals[-1])
    progress.write(f"epoch {epoch_done}/{config.epochs}: test accuracy {100 * result['accuracy']:.2f}% "
                   f"(loss {result['loss']:.4f})")

  try:
    if start_step and start_step % steps_per_epoch == 0:  # stopped at an epoch's end, before its evaluation?
      evaluate_epoch(start_step // steps_per_epoch, start_step)
    for epoch in range(start_step // steps_per_epoch, config.epochs):
      first = step - epoch * steps_per_epoch
      for batch in itertools.islice(batches, steps_per_epoch - first):
        batch = placement.batch(batch)
        if dnr_every and (step + 1) % dnr_every == 0:  # on the batch and weights of the coming step
          counts = jax.device_get(relu_fn["train"](dstate, batch))
          dnr_log.write({**dead_neurons.dnr_record(dead_neurons.summarize(counts), step + 1, sparsity=sparsity),
                         "epoch": epoch})
        dstate, metrics = train_fn(dstate, batch)
        step += 1
        if rewind_at == step:
          _save_rewind_point(placement.unstate(dstate), workdir)
        pending.append(metrics)
        interval_images += config.batch_size
        progress.update(1)
        at_log = step % config.log_every_steps == 0 or step % steps_per_epoch == 0
        if at_log:
          record = _flush_metrics(pending, step, epoch, interval_images,
                                  time.perf_counter() - interval_start, guarded)
          last_nonfinite = record.get("nonfinite_at", last_nonfinite)
          pending, interval_start, interval_images = [], time.perf_counter(), 0
          metrics_log.write(record)
          progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{100 * record['accuracy']:.1f}%",
                               img_s=f"{record['images_per_second']:.0f}")
          if use_rf:
            diag_log.write({"step": step, "layers": _layer_diagnostics(dstate)})
          streak = int(dstate.nonfinite_streak)
          if streak >= config.max_consecutive_nonfinite:
            stopped_reason = "nonfinite"
            break
        if step % config.checkpoint_every_steps == 0 and step % steps_per_epoch:  # an epoch's end saves after
          save(placement.unstate(dstate))                                           # its evaluation
        if config.stop_after_steps and step >= config.stop_after_steps:
          stopped_reason = "stop_after_steps"
          break
        # a signal's request to stop, shared by every process at the steps where they all log
        signum = interrupts.requested() if jax.process_count() == 1 else (
            interrupts.agreed(interrupts.requested()) if at_log else None)
        if signum:
          stopped_reason = "interrupted"
          break
      if stopped_reason:
        break
      evaluate_epoch(epoch + 1, step)
      save(placement.unstate(dstate))
  finally:
    progress.close()

  host_state = placement.unstate(dstate)
  save(host_state)
  if stopped_reason == "interrupted":
    raise interrupts.Interrupted(step, signum)
  if stopped_reason == "nonfinite":
    raise NonFiniteLossError(
        f"stopped at step {step}: {config.max_consecutive_nonfinite} consecutive steps were not finite (the last "
        f"in {last_nonfinite or 'an unlogged step'}; {int(host_state.nonfinite_total)} in total); the last good "
        f"state is saved in {str(workdir / 'checkpoints')!r}: lower the learning rate or check the data")
  dnr_results = {}
  if stopped_reason is None and primary and dnr_every:
    dnr_results["dnr_train"] = last_epoch_dnr(reporting.read_jsonl(workdir / "dnr.jsonl"))
  if stopped_reason is None and config.dnr.test:
    counts = None
    for batch in test_ds.epoch(0):
      c = jax.device_get(relu_fn["eval"](dstate, placement.batch(batch)))
      counts = c if counts is None else dead_neurons.add_counts(counts, c)
    dnr_results["dnr_test"] = dead_neurons.summarize(counts)
    dnr_log.write(dead_neurons.dnr_record(dnr_results["dnr_test"], step, sparsity=sparsity, mode="eval"))
  accs = [r["accuracy"] for r in evals]
  summary = {
      "name": config.name, "seed": config.seed, "steps": step, "epochs_done": len(evals),
      "interrupted": stopped_reason == "stop_after_steps",
      "final_test_accuracy": accs[-1] if accs else float("nan"),
      "last_epochs": reporting.last_epochs_statistic(accs, config.last_epochs),
      "nonfinite_steps": int(host_state.nonfinite_total),
      "parameters": n_params, "quantized_weights": n_quant,
      "quantized_layers": ["/".join(k) for k in kernels],
      "model_summary": model_summary.totals(),
      "seconds": time.perf_counter() - started,  # this invocation (compilation and evaluation included)
      "device": describe_devices(),
      "source": reporting.source_version(),
      **dnr_results,
  }
  if primary:
    (workdir / "results.json").write_text(json.dumps(reporting.to_jsonable(summary), indent=2))
  if config.plots and primary:
    title = f"{config.name or config.model.name} (seed {config.seed})"
    reporting.plot_training(reporting.read_jsonl(workdir / "metrics.jsonl"), evals, workdir / "training.png", title)
    if use_rf:
      reporting.plot_diagnostics(reporting.read_jsonl(workdir / "diagnostics.jsonl"),
                                 workdir / "diagnostics.png", title)
    if dnr_results:
      reporting.plot_dead_neurons(reporting.read_jsonl(workdir / "dnr.jsonl"), workdir / "dnr.png", title)
  return summary


def _progress_bar(config, total: int, initial: int, desc: str):
  from tqdm.auto import tqdm  # noqa: PLC0415

  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
              disable=not config.progress or jax.process_index() != 0, mininterval=1.0)


def _flush_metrics(pending, step, epoch, images, seconds, guarded: list[str]) -> dict:
  host = jax.device_get(pending)
  keys = host[0].keys()
  record = {k: float(np.mean([float(h[k]) for h in host])) for k in keys if k not in ("finite", "nonfinite_at")}
  record["nonfinite_in_interval"] = int(sum(not bool(h["finite"]) for h in host))
  where = [int(h["nonfinite_at"]) for h in host if int(h["nonfinite_at"]) >= 0]
  if where:  # what the interval's last refused step first found non-finite
    record["nonfinite_at"] = guarded[where[-1]]
  record.update(step=step, epoch=epoch, images_per_second=images / max(seconds, 1e-9))
  return record


def _layer_diagnostics(dstate) -> dict:
  diags = transform.layer_diagnostics(dstate.opt_state)
  return {name: {k: float(v) for k, v in d._asdict().items()} for name, d in jax.device_get(diags).items()}


def _evaluate(placement, eval_fn, dstate, test_ds) -> dict:
  totals = {"loss_sum": 0.0, "correct": 0.0, "correct_top5": 0.0, "count": 0.0}
  for batch in test_ds.epoch(0):
    out = eval_fn(dstate, placement.batch(batch))
    for k in totals:
      totals[k] += float(out[k])
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count, "top5_accuracy": totals["correct_top5"] / count,
          "loss": totals["loss_sum"] / count, "examples": int(count)}


def describe_devices() -> str:
  """The accelerator the run used, e.g. ``1 x NVIDIA H100 80GB HBM3 (gpu), jax 0.11.2``."""
  dev = jax.devices()[0]
  return f"{jax.device_count()} x {dev.device_kind} ({dev.platform}), jax {jax.__version__}"


def last_epoch_dnr(records: list[dict]) -> dict:
  """The dynamic dead-neuron rate of a run: the mean over its last epoch's measured training batches.

  Per batch, ``dnr`` is the share of (unit, example) pairs at 0 and
  ``dead_units`` the share of units at 0 on every example of the batch
  (:func:`ricci_jax.dead_neurons.summarize`); both are averaged over the
  batches, globally and per site. Read from ``dnr.jsonl``, so a resumed run
  reports what an uninterrupted one would.
  """
  train = [r for r in records if r.get("mode", "train") == "train"]
  if not train:
    return {}
  last = [r for r in train if r["epoch"] == train[-1]["epoch"]]
  mean = lambda key, site="global": float(np.mean([r[key][site] for r in last]))  # noqa: E731
  sites = [k for k in last[0]["dnr"] if k != "global"]
  return {"batches": len(last), "epoch": last[0]["epoch"] + 1,
          "global": {"dnr": mean("dnr"), "dead_units": mean("dead_units")},
          "sites": {site: {"dnr": mean("dnr", site), "dead_units": mean("dead_units", site)} for site in sites}}


def _rewind_point_step(config, start: Start | None, workdir: pathlib.Path | None) -> int | None:
  """The step whose weights a late-rewinding pruning schedule rewinds to, if this (dense) run must keep them."""
  p = config.pruning
  if start is not None or workdir is None or p.rewind != "early" or (p.cycles == 0 and p.target_sparsity is None):
    return None
  return None if (workdir / REWIND_POINT).is_file() else int(p.rewind_step)


def _save_rewind_point(host_state, workdir: pathlib.Path) -> None:
  arrays = {f"params{jax.tree_util.keystr(k)}": np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(host_state.params)}
  arrays.update({f"batch_stats{jax.tree_util.keystr(k)}": np.asarray(v)
                 for k, v in jax.tree_util.tree_leaves_with_path(host_state.batch_stats)})
  tmp = workdir / (REWIND_POINT + ".tmp.npz")
  np.savez(tmp, step=np.asarray(int(host_state.step)), **arrays)
  tmp.replace(workdir / REWIND_POINT)  # whole or absent, whenever the run is killed


def load_rewind_point(workdir: str | pathlib.Path, like: dict) -> tuple[dict, int]:
  """The rewind point a dense run saved (``like``: ``{"params", "batch_stats"}`` for the structure) and its step."""
  with np.load(pathlib.Path(workdir) / REWIND_POINT) as saved:
    out = {name: jax.tree_util.tree_map_with_path(
        lambda k, v, name=name: np.asarray(saved[f"{name}{jax.tree_util.keystr(k)}"], np.asarray(v).dtype), tree)
        for name, tree in like.items()}
    return out, int(saved["step"])


def finished(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict | None:
  """The results of a run already finished in ``workdir`` with this config, else None.

  A finished seed is not trained again, even when its checkpoints were deleted (its ``config.json`` and
  ``results.json`` suffice). None when the folder holds no finished run, or when ``allow_changes`` changes
  it (a longer run continues it).

  Raises:
    RunMismatchError: the folder holds a run with another config (:func:`ricci_jax.train.run_folder.check_resume`).
  """
  results = pathlib.Path(workdir) / "results.json"
  changes = run_folder.check_resume(config, workdir)
  if changes is None or changes or not results.is_file():
    return None
  summary = json.loads(results.read_text())
  return None if summary.get("interrupted") else summary
