"""The training program: data-parallel training of discretized networks from a config.

:func:`train` runs one seed of a configuration (``ricci_jax.train_config``)
into a working directory; :func:`train_seeds` runs every seed and reports the
paper's statistic across them. A run:

* builds the model with its quantization rule, the optimizer (SGD, Adam, or
  RF-DNN's ``rf_sgd``) and the estimator's hyperparameter schedule, all as
  traced values so nothing recompiles during training;
* trains data-parallel over all local devices, by default with ``jax.jit`` and
  shardings (a ``("data",)`` mesh: the batch split, the state replicated), or
  with ``jax.pmap`` (``config.pmap``); the global batch is the same whatever
  the device count, and several hosts each read their own shard;
* augments on the device inside the jitted step, from a key derived from the
  seed and the step, so a resumed run sees exactly the same batches;
* skips a step whose loss or gradients are not finite (counted), and stops
  with a checkpoint and a clear message after too many in a row;
* writes Orbax checkpoints at every epoch end and every N steps, and resumes
  from the latest one;
* shows a tqdm bar (loss, accuracy, images/s), writes ``metrics.jsonl``,
  ``eval.jsonl`` and ``diagnostics.jsonl`` (per-layer RF-DNN diagnostics), and
  draws PNG plots;
* ends with the paper's statistic: mean and standard deviation of the test
  accuracy over the last epochs.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from ricci_jax import data as data_lib
from ricci_jax import layers, models, reporting, runtime, schedules, train_config, transform
from ricci_jax.config import TensorQuant
from ricci_jax.ricci_flow import Shifts, translated_grads
from ricci_jax.summary import summary as summarize_model

Array = jax.Array
FLOAT_BITS = train_config.FLOAT_BITS


class NonFiniteLossError(RuntimeError):
  """Raised when too many consecutive steps had a non-finite loss or gradient."""


# ----------------------------------------------------------------------------
# Building blocks from the config.
# ----------------------------------------------------------------------------


def build_quant_rule(config: ml_collections.ConfigDict) -> models.QuantRule | None:
  """The model's quantization rule from ``config.quant`` (``None``: a float model)."""
  q = config.quant
  if q.layers == "none" or (q.weight_bits == FLOAT_BITS and q.act_bits == FLOAT_BITS):
    return None
  hparams = dict(q.hparams)
  weight = None
  if q.weight_bits != FLOAT_BITS:
    weight = TensorQuant(bits=q.weight_bits, method=q.weight_method, estimator=q.estimator,
                         hparams=hparams, scale=q.scale)
  act = None
  if q.act_bits != FLOAT_BITS:
    act_estimator = q.act_estimator or ("clipped_relu" if q.act_method == "staircase" else q.estimator)
    act = TensorQuant(bits=q.act_bits, method=q.act_method, estimator=act_estimator,
                      hparams=hparams if act_estimator == q.estimator else {})
  return models.QuantRule(layers=q.layers, weight=weight, act=act)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  kwargs = {"order": config.model.order}
  if config.model.bireal:
    kwargs["bireal"] = True
  if config.pmap:
    kwargs["norm_axis_name"] = "data"  # global-batch BN statistics, as on one device
  return models.create(config.model.name, num_classes=num_classes, quant=build_quant_rule(config),
                       dtype=jnp.dtype(config.model.dtype), **kwargs)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """The learning rate per step: multistep (the paper's CIFAR), cosine (ImageNet) or constant."""
  o = config.optimizer
  total = config.epochs * steps_per_epoch
  if o.schedule == "multistep":
    sched = optax.piecewise_constant_schedule(
        o.learning_rate, {max(1, int(round(b * total))): o.decay_factor for b in o.boundaries})
  elif o.schedule == "cosine":
    sched = optax.cosine_decay_schedule(o.learning_rate, max(1, total))
  else:
    sched = optax.constant_schedule(o.learning_rate)
  warmup = o.warmup_epochs * steps_per_epoch
  if warmup:
    sched = optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, warmup), sched], [warmup])
  return sched


def estimator_schedules(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[str, optax.Schedule]:
  """The published schedule of the estimator's hyperparameter, if it has one (``quant.schedule='auto'``)."""
  if config.quant.schedule == "none":
    return {}
  name = config.quant.estimator
  if name == "reste":
    return {"o": schedules.reste_o(config.epochs, steps_per_epoch, o_end=config.quant.hparams.get("o", 3.0))}
  if name == "ede":
    return {"t": schedules.ede_t(config.epochs, steps_per_epoch, t_min=config.quant.ede_t_min)}
  if name == "md_tanh":
    return {"beta": schedules.md_tanh_beta()}
  return {}


def build_optimizer(config: ml_collections.ConfigDict, lr: optax.Schedule, quantized_mask: Any,
                    axis_name: str | None = None) -> optax.GradientTransformationExtraArgs:
  o = config.optimizer
  if o.name == "rf_sgd":
    return transform.rf_sgd(
        lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
        quantized=quantized_mask, axis_name=axis_name, control_seed=config.seed,
        **train_config.rfdnn_options(config))
  if o.name == "adam":
    return optax.with_extra_args_support(optax.adamw(lr, weight_decay=o.weight_decay))
  return optax.with_extra_args_support(optax.chain(
      optax.add_decayed_weights(o.weight_decay),
      optax.trace(decay=o.momentum, nesterov=o.nesterov),
      optax.scale_by_learning_rate(lr)))


# ----------------------------------------------------------------------------
# State and steps.
# ----------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; saved whole in every checkpoint."""

  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  quant: Any  # the "quant" collection: estimator hyperparameters at their initial values
  nonfinite_total: Array
  nonfinite_streak: Array


@dataclasses.dataclass(frozen=True)
class Program:
  """The pure functions of one configuration (closures over static structure)."""

  model: nn.Module
  tx: optax.GradientTransformationExtraArgs
  lr: optax.Schedule
  hparam_schedules: dict
  dataset: str
  augment: str
  seed: int
  rfdnn: bool
  fraction: float
  shifts: Shifts
  translation: str
  quantized: Any = None  # bools like the params: the quantized kernels (for their flip rate)


def _augment(program: Program, key: Array, images: Array) -> Array:
  if program.augment == "none":
    return data_lib.preprocess(program.dataset, images)
  if program.augment == "crop_flip":
    return data_lib.augment(program.dataset, key, images, pad=4, flip=True)
  return data_lib.augment(program.dataset, key, images)


def _scheduled_quant(program: Program, quant: Any, step: Array) -> Any:
  if not program.hparam_schedules or not jax.tree.leaves(quant):
    return quant
  return layers.set_quant_hparams(quant, **{k: s(step) for k, s in program.hparam_schedules.items()})


def _loss(program: Program, params, batch_stats, quant, images, labels, mask):
  variables = {"params": params, "batch_stats": batch_stats, "quant": quant}
  logits, new_vars = program.model.apply(variables, images, train=True, mutable=["batch_stats"])
  logits = logits.astype(jnp.float32)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weights = mask.astype(jnp.float32)
  loss = jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)
  return loss, (logits, new_vars["batch_stats"])


def _all_finite(tree) -> Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)] or [jnp.array(True)]))


def build_program(config: ml_collections.ConfigDict, model: nn.Module, variables: dict, quantized_mask: Any,
                  steps_per_epoch: int, axis_name: str | None = None) -> tuple[Program, TrainState]:
  """The configuration's :class:`Program` (optimizer, schedules, augmentation) and its initial :class:`TrainState`.

  ``variables`` are the model's (``model.init``); ``quantized_mask`` marks the
  quantized kernels among the params (:func:`ricci_jax.layers.quantized_kernel_mask`).
  ``jax.jit(functools.partial(train_step, program))`` is then the program's step.
  """
  lr = learning_rate_schedule(config, steps_per_epoch)
  tx = build_optimizer(config, lr, quantized_mask, axis_name=axis_name)
  program = Program(
      model=model, tx=tx, lr=lr, hparam_schedules=estimator_schedules(config, steps_per_epoch),
      dataset=config.dataset.name, augment=config.dataset.augment, seed=config.seed,
      rfdnn=config.optimizer.name == "rf_sgd", fraction=config.rfdnn.fraction,
      shifts=Shifts(*map(int, config.rfdnn.shifts)), translation=config.rfdnn.translation,
      quantized=quantized_mask)
  state = TrainState(
      step=jnp.zeros((), jnp.int32), params=variables["params"],
      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(variables["params"]),
      quant=variables.get("quant", {}), nonfinite_total=jnp.zeros((), jnp.int32),
      nonfinite_streak=jnp.zeros((), jnp.int32))
  return program, state


def _flip_rate(old, new, quantized) -> Array:
  """The share of quantized latent weights whose sign (hence whose binary value) changed in this step."""
  flips, total = jnp.zeros((), jnp.int32), 0
  for o, n, q in zip(jax.tree.leaves(old), jax.tree.leaves(new), jax.tree.leaves(quantized)):
    if q:
      flips = flips + jnp.sum((o >= 0) != (n >= 0)).astype(jnp.int32)
      total += o.size
  return flips.astype(jnp.float32) / max(total, 1)


def train_step(program: Program, state: TrainState, batch: dict, axis_name: str | None = None):
  """One optimisation step; returns the new state and this step's metrics (device arrays)."""
  key = jax.random.fold_in(jax.random.key(program.seed), state.step)
  images = _augment(program, key, batch["image"])
  labels, mask = batch["label"], batch["mask"]
  quant = _scheduled_quant(program, state.quant, state.step)
  loss_fn = functools.partial(_loss, program)
  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, quant, images, labels, mask)
  extra = {}
  if axis_name is not None:  # the model's BN already reduces over axis_name
    grads = jax.lax.pmean(grads, axis_name)
    loss = jax.lax.pmean(loss, axis_name)
  if program.rfdnn:
    def plain_loss(p, b):
      return loss_fn(p, state.batch_stats, quant, b["image"], b["label"], b["mask"])[0]
    extra["translated_grads"] = translated_grads(
        plain_loss, state.params, {"image": images, "label": labels, "mask": mask}, program.shifts,
        program.fraction, mode=program.translation, axis_name=axis_name)
  updates, new_opt = program.tx.update(grads, state.opt_state, state.params, **extra)
  new_params = optax.apply_updates(state.params, updates)

  finite = jnp.isfinite(loss) & _all_finite(grads)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  new_state = TrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      batch_stats=keep(new_stats, state.batch_stats),
      opt_state=keep(new_opt, state.opt_state),
      quant=state.quant,
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
  )
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
  count = jnp.sum(mask)
  if axis_name is not None:
    correct, count = jax.lax.psum(correct, axis_name), jax.lax.psum(count, axis_name)
  metrics = {"loss": loss, "accuracy": correct / jnp.maximum(count, 1), "finite": finite,
             "learning_rate": program.lr(state.step)}
  metrics.update({f"hparam/{k}": s(state.step) for k, s in program.hparam_schedules.items()})
  if program.quantized is not None:
    metrics["quant/flip_rate"] = _flip_rate(state.params, new_state.params, program.quantized)
  if program.rfdnn:
    metrics.update(transform.summarize_diagnostics(new_state.opt_state))
  return new_state, metrics


def eval_step(program: Program, state: TrainState, batch: dict, axis_name: str | None = None):
  """Sums of loss and correct predictions over the real (unmasked) examples of a batch."""
  images = data_lib.preprocess(program.dataset, batch["image"])
  quant = _scheduled_quant(program, state.quant, state.step)
  variables = {"params": state.params, "batch_stats": state.batch_stats, "quant": quant}
  logits = program.model.apply(variables, images, train=False).astype(jnp.float32)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  mask = batch["mask"].astype(jnp.float32)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  out = {"loss_sum": jnp.sum(per_example * mask),
         "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
         "correct_top5": jnp.sum(jnp.any(top5 == batch["label"][:, None], axis=-1) * mask),
         "count": jnp.sum(mask)}
  if axis_name is not None:
    out = jax.lax.psum(out, axis_name)
  return out


# ----------------------------------------------------------------------------
# Device placement: jit with shardings (default) or pmap.
# ----------------------------------------------------------------------------


class _Placement:
  """Puts state and batches on devices and wraps the steps, for jit+shardings or pmap."""

  def __init__(self, use_pmap: bool):
    self.use_pmap = use_pmap
    self.devices = jax.local_devices()
    self.n = len(self.devices)
    if not use_pmap:
      self.mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
      self.replicated = NamedSharding(self.mesh, P())
      self.sharded = NamedSharding(self.mesh, P("data"))

  def state(self, state: TrainState) -> TrainState:
    # Fresh buffers per leaf: optax and flax may share one array between leaves,
    # and a donated argument must not hold the same buffer twice.
    state = jax.tree.map(lambda x: np.array(x, copy=True), state)
    if self.use_pmap:
      return jax.tree.map(lambda x: np.broadcast_to(x, (self.n,) + x.shape).copy(), state)
    # Each process holds the same state; built from the local copy without device_put's cross-process
    # equality check, which reads NaN (an empty slot of the gate's history) as a mismatch.
    return jax.tree.map(lambda x: jax.make_array_from_callback(x.shape, self.replicated, lambda i: x[i]), state)

  def unstate(self, state: TrainState) -> TrainState:
    """A host copy of the (first replica of the) state."""
    if self.use_pmap:
      state = jax.tree.map(lambda x: x[0], state)
    return jax.device_get(state)

  def batch(self, batch: dict) -> dict:
    if self.use_pmap:
      return jax.tree.map(lambda x: x.reshape((self.n, x.shape[0] // self.n) + x.shape[1:]), batch)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(self.sharded, x), batch)

  def train_fn(self, program: Program) -> Callable:
    if self.use_pmap:
      return jax.pmap(functools.partial(train_step, program, axis_name="data"), axis_name="data",
                      donate_argnums=(0,))
    return jax.jit(functools.partial(train_step, program), donate_argnums=(0,),
                   compiler_options=runtime.compiler_options())

  def eval_fn(self, program: Program) -> Callable:
    if self.use_pmap:
      return jax.pmap(functools.partial(eval_step, program, axis_name="data"), axis_name="data")
    return jax.jit(functools.partial(eval_step, program), compiler_options=runtime.compiler_options())

  def first(self, tree):
    return jax.tree.map(lambda x: x[0], tree) if self.use_pmap else tree


# ----------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------


def _datasets(config: ml_collections.ConfigDict):
  d = config.dataset
  common = dict(source=d.source, data_dir=d.data_dir or None)
  holdout = d.holdout_validation or d.eval_split == "validation"
  train = data_lib.load(d.name, "train", batch_size=config.batch_size, seed=config.seed,
                        validation=holdout, limit=d.train_limit or None, **common)
  test = data_lib.load(d.name, d.eval_split, batch_size=config.batch_size, seed=config.seed,
                       drop_remainder=False, limit=d.test_limit or None, **common)
  return train, test


def _init_variables(config, model, train_ds) -> tuple[dict, dict, Any]:
  """The model's variables, its quantized kernels and their mask over the params."""
  x = jnp.zeros((1,) + tuple(train_ds.image_shape), jnp.float32)
  # one compiled program: eager init dispatches every initializer op by op (ResNet-18: 40 s on a CPU)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(config.seed), x)
  kernels = models.inspect.quantized_kernels(model, x, train=False)
  mask = layers.quantized_kernel_mask(variables["params"], kernels)
  return variables, kernels, mask


def _load_init(config: ml_collections.ConfigDict, variables: dict) -> dict:
  """``variables`` with params and batch statistics from the run ``config.init_from`` (e.g. a float run).

  Float and quantized models have the same parameter tree, so a float run
  initialises a quantized one (RF-DNN Table 4 starts from pretrained float
  models). The estimator hyperparameters (``quant``) stay this run's.
  """
  run = train_config.resolve_init_dir(config.init_from, config.seed)
  saved = load_checkpoint(run)
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


def _checkpoint_manager(workdir: pathlib.Path, config) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True)
  return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=options)


def _save(mgr: ocp.CheckpointManager, state: TrainState, meta: dict):
  step = int(state.step)
  if mgr.latest_step() == step:
    return
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mgr.wait_until_finished()


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains one seed of ``config`` in ``workdir`` (resuming if a checkpoint is there).

  Returns:
    A dict with the final and the last-epochs test accuracy, and run facts.
  """
  started = time.perf_counter()
  workdir = pathlib.Path(workdir)
  train_config.validate(config, workdir)
  train_ds, test_ds = _datasets(config)
  steps_per_epoch = train_ds.steps_per_epoch
  total_steps = config.epochs * steps_per_epoch
  model = build_model(config, train_ds.num_classes)
  variables, kernels, mask = _init_variables(config, model, train_ds)
  if config.init_from:
    variables = _load_init(config, variables)
  model_summary = summarize_model(model, variables, input_shape=tuple(train_ds.image_shape))
  placement = _Placement(config.pmap)
  use_rf = config.optimizer.name == "rf_sgd"
  program, state = build_program(config, model, variables, mask, steps_per_epoch,
                                 axis_name="data" if (config.pmap and use_rf) else None)

  primary = jax.process_index() == 0  # of several processes, the first writes every file but the checkpoints
  if primary:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    (workdir / "model_summary.txt").write_text(model_summary.text() + "\n")
    (workdir / "model_summary.json").write_text(
        json.dumps(reporting.to_jsonable(model_summary.to_dict()), indent=2))
    if config.progress:
      print(model_summary, flush=True)
  metrics_log = reporting.JsonlWriter(workdir / "metrics.jsonl", enabled=primary)
  eval_log = reporting.JsonlWriter(workdir / "eval.jsonl", enabled=primary)
  diag_log = reporting.JsonlWriter(workdir / "diagnostics.jsonl", enabled=primary)
  evals: list[dict] = []  # every process keeps them: the checkpoints carry them, no process reads another's file
  mgr = _checkpoint_manager(workdir, config)
  start_step = 0
  if config.resume and mgr.latest_step() is not None:
    restored = mgr.restore(mgr.latest_step(), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.device_get(state)), meta=ocp.args.JsonRestore()))
    state = restored["state"]
    start_step = int(state.step)
    saved_evals = restored["meta"].get("evals")
    if saved_evals is None:  # a checkpoint written before the evaluations travelled with it
      saved_evals = reporting.read_jsonl(workdir / "eval.jsonl")
    evals = [r for r in saved_evals if r["step"] <= start_step]
    for log in (metrics_log, eval_log, diag_log):
      log.truncate_after(start_step)
  else:  # a fresh run: no stale metrics, and the initial state is checkpoint 0
    for log in (metrics_log, eval_log, diag_log):
      log.remove()

  train_fn, eval_fn = placement.train_fn(program), placement.eval_fn(program)
  dstate = placement.state(state)
  meta = {"steps_per_epoch": steps_per_epoch, "name": config.name, "evals": evals}  # evals grows in place
  if start_step == 0:
    _save(mgr, jax.device_get(state), meta)
  n_quant = sum(int(np.size(p)) for p, m in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(mask)) if m)
  n_params = sum(int(np.size(p)) for p in jax.tree.leaves(variables["params"]))

  progress = _progress_bar(config, total_steps, start_step, config.name or config.model.name)
  pending: list[dict] = []
  interval_start, interval_images = time.perf_counter(), 0
  step = start_step
  stopped_reason = None
  try:
    for epoch in range(start_step // steps_per_epoch, config.epochs):
      first = step - epoch * steps_per_epoch
      for batch in train_ds.epoch(epoch, start_step=first):
        dstate, metrics = train_fn(dstate, placement.batch(batch))
        step += 1
        pending.append(metrics)
        interval_images += config.batch_size
        progress.update(1)
        at_log = step % config.log_every_steps == 0 or step % steps_per_epoch == 0
        if at_log:
          record = _flush_metrics(placement, pending, step, epoch, interval_images,
                                  time.perf_counter() - interval_start)
          pending, interval_start, interval_images = [], time.perf_counter(), 0
          metrics_log.write(record)
          progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{100 * record['accuracy']:.1f}%",
                               img_s=f"{record['images_per_second']:.0f}")
          if use_rf:
            diag_log.write({"step": step, "layers": _layer_diagnostics(placement, dstate)})
          streak = int(placement.first(dstate.nonfinite_streak))
          if streak >= config.max_consecutive_nonfinite:
            stopped_reason = "nonfinite"
            break
        if step % config.checkpoint_every_steps == 0:
          _save(mgr, placement.unstate(dstate), meta)
        if config.stop_after_steps and step >= config.stop_after_steps:
          stopped_reason = "stop_after_steps"
          break
      if stopped_reason:
        break
      if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == config.epochs:
        result = _evaluate(placement, eval_fn, dstate, test_ds)
        evals.append({"step": step, "epoch": epoch + 1, **result})
        eval_log.write(evals[-1])
        progress.write(f"epoch {epoch + 1}/{config.epochs}: test accuracy {100 * result['accuracy']:.2f}% "
                       f"(loss {result['loss']:.4f})")
      _save(mgr, placement.unstate(dstate), meta)
  finally:
    progress.close()

  host_state = placement.unstate(dstate)
  _save(mgr, host_state, meta)
  if stopped_reason == "nonfinite":
    raise NonFiniteLossError(
        f"stopped at step {step}: {config.max_consecutive_nonfinite} consecutive steps had a non-finite "
        f"loss or gradient ({int(host_state.nonfinite_total)} in total). The last good state is saved in "
        f"{workdir / 'checkpoints'}; lower the learning rate or check the data.")
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
  }
  if primary:
    (workdir / "results.json").write_text(json.dumps(reporting.to_jsonable(summary), indent=2))
  if config.plots and primary:
    title = f"{config.name or config.model.name} (seed {config.seed})"
    reporting.plot_training(reporting.read_jsonl(workdir / "metrics.jsonl"), evals, workdir / "training.png", title)
    if use_rf:
      reporting.plot_diagnostics(reporting.read_jsonl(workdir / "diagnostics.jsonl"),
                                 workdir / "diagnostics.png", title)
  return summary


def _progress_bar(config, total: int, initial: int, desc: str):
  from tqdm.auto import tqdm  # noqa: PLC0415

  return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
              disable=not config.progress or jax.process_index() != 0, mininterval=1.0)


def _flush_metrics(placement, pending, step, epoch, images, seconds) -> dict:
  host = jax.device_get([placement.first(m) for m in pending])
  keys = host[0].keys()
  record = {k: float(np.mean([float(h[k]) for h in host])) for k in keys if k != "finite"}
  record["nonfinite_in_interval"] = int(sum(not bool(h["finite"]) for h in host))
  record.update(step=step, epoch=epoch, images_per_second=images / max(seconds, 1e-9))
  return record


def _layer_diagnostics(placement, dstate) -> dict:
  diags = transform.layer_diagnostics(placement.first(dstate.opt_state))
  return {name: {k: float(v) for k, v in d._asdict().items()} for name, d in jax.device_get(diags).items()}


def _evaluate(placement, eval_fn, dstate, test_ds) -> dict:
  totals = {"loss_sum": 0.0, "correct": 0.0, "correct_top5": 0.0, "count": 0.0}
  for batch in test_ds.epoch(0):
    out = placement.first(eval_fn(dstate, placement.batch(batch)))
    for k in totals:
      totals[k] += float(out[k])
  count = max(totals["count"], 1.0)
  return {"accuracy": totals["correct"] / count, "top5_accuracy": totals["correct_top5"] / count,
          "loss": totals["loss_sum"] / count, "examples": int(count)}


def load_checkpoint(workdir: str | pathlib.Path, step: int | None = None) -> dict:
  """The saved :class:`TrainState` of a run as nested dicts of NumPy arrays (latest step by default).

  Keys: ``step``, ``params``, ``batch_stats``, ``opt_state``, ``quant``,
  ``nonfinite_total``, ``nonfinite_streak``; plus ``meta`` (steps per epoch,
  run name).
  """
  path = (pathlib.Path(workdir) / "checkpoints").absolute()  # newer orbax refuses relative paths
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoints in {str(path)!r}")
  with ocp.CheckpointManager(path) as mgr:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoints in {str(path)!r}")
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                         meta=ocp.args.JsonRestore()))
  return {**jax.device_get(restored["state"]), "meta": restored["meta"]}


def describe_devices() -> str:
  """The accelerator the run used, e.g. ``1 x NVIDIA H100 80GB HBM3 (gpu), jax 0.11.2``."""
  dev = jax.devices()[0]
  return f"{jax.device_count()} x {dev.device_kind} ({dev.platform}), jax {jax.__version__}"


def _finished(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict | None:
  """The results of a run already finished in ``workdir`` with this very config, else None.

  With ``config.resume`` a finished seed is not trained again, even when its
  checkpoints were deleted (its ``config.json`` and ``results.json`` suffice).
  """
  results, saved = workdir / "results.json", workdir / "config.json"
  if not (config.resume and results.is_file() and saved.is_file()):
    return None
  if saved.read_text() != config.to_json_best_effort(indent=2):
    return None
  summary = json.loads(results.read_text())
  return None if summary.get("interrupted") else summary


def train_seeds(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Runs every seed (``config.seeds``, or ``config.seed``) and summarises across them."""
  workdir = pathlib.Path(workdir)
  seeds = list(config.seeds) or [config.seed]
  per_seed = []
  for seed in seeds:
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.seed = int(seed)
    run_dir = workdir / f"seed_{seed}" if len(seeds) > 1 else workdir
    per_seed.append(_finished(cfg, run_dir) or train(cfg, run_dir))
  stats = reporting.across_seeds([r["last_epochs"] for r in per_seed])
  summary = {"name": config.name, "seeds": seeds, "runs": per_seed, "across_seeds": stats}
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(reporting.to_jsonable(summary), indent=2))
  return summary

