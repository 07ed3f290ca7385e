"""The jitted steps: the state a step changes, the program's pure functions, one training and one
evaluation step.

The steps are written for the global batch: under ``jax.jit`` with the batch sharded over a mesh
(:mod:`ricci_jax.train.placement`), the compiler inserts the reductions across devices and hosts, so
batch-norm statistics, the loss and the gradients are those of the whole batch, as on one device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ricci_jax import data as data_lib
from ricci_jax import dead_neurons, layers, pruning, transform
from ricci_jax.nnx.functional import Functional
from ricci_jax.ricci_flow import Shifts, translated_grads
from ricci_jax.train import builders

Array = jax.Array


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
  masks: Any = None  # pruning: bools like the params, True = alive (None: a dense run)


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


def _named_leaves(prefix: str, tree) -> list[tuple[str, Array]]:
  return [(prefix + "/".join(layers.path_names(path)), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def _guarded(loss, grads, old: TrainState, new: TrainState) -> list[tuple[str, Array, Array | None]]:
  """What the non-finite guard checks, in a fixed order: (name, value, its value before the step or None).

  The loss, every gradient, and every leaf of the new params, batch statistics and optimizer state.
  """
  out = [("loss", loss, None)] + [(n, g, None) for n, g in _named_leaves("gradient of params/", grads)]
  for part in ("params", "batch_stats", "opt_state"):
    out += [(n, v, o) for (n, v), o in zip(_named_leaves(f"{part}/", getattr(new, part)),
                                           jax.tree.leaves(getattr(old, part)))]
  return out


def guarded_names(state: TrainState) -> list[str]:
  """The names of what the non-finite guard checks (``metrics["nonfinite_at"]`` indexes them; -1: none)."""
  return [name for name, _, _ in _guarded(0.0, state.params, state, state)]


def _first_nonfinite(guarded) -> tuple[Array, Array]:
  """(all finite, index of the first non-finite entry or -1).

  A value that was already non-finite before the step may stay so: some optimizer state is non-finite
  by design (RF-DNN's gate bound epsilon = inf, the NaN slots of its median window); what is refused is
  a finite value turning into a NaN or an inf.
  """
  flags = []
  for _, value, before in guarded:
    ok = jnp.isfinite(value) if before is None else jnp.isfinite(value) | ~jnp.isfinite(before)
    flags.append(jnp.all(ok))
  flags = jnp.stack(flags)
  finite = jnp.all(flags)
  return finite, jnp.where(finite, -1, jnp.argmin(flags)).astype(jnp.int32)


def build_program(config: ml_collections.ConfigDict, model: nn.Module, variables: dict, quantized_mask: Any,
                  steps_per_epoch: int, *, masks: Any = None, step: int = 0) -> tuple[Program, TrainState]:
  """The configuration's :class:`Program` (optimizer, schedules, augmentation) and its initial :class:`TrainState`.

  ``variables`` are the model's (``model.init``); ``quantized_mask`` marks the
  quantized kernels among the params (:func:`ricci_jax.layers.quantized_kernel_mask`).
  ``masks`` (pruning: bools like the params, True = alive) keep the pruned
  weights at exactly 0 through every step; ``step`` is the state's first step
  (a late-rewound pruning cycle starts where the dense run's rewind point was).
  ``jax.jit(functools.partial(train_step, program))`` is then the program's step.
  """
  lr = builders.learning_rate_schedule(config, steps_per_epoch)
  tx = builders.build_optimizer(config, lr, quantized_mask)
  program = Program(
      model=model, tx=tx, lr=lr, hparam_schedules=builders.estimator_schedules(config, steps_per_epoch),
      dataset=config.dataset.name, augment=config.dataset.augment, seed=config.seed,
      rfdnn=config.optimizer.name == "rf_sgd", fraction=config.rfdnn.fraction,
      shifts=Shifts(*map(int, config.rfdnn.shifts)), translation=config.rfdnn.translation,
      quantized=quantized_mask)
  params = variables["params"] if masks is None else pruning.apply_masks(variables["params"], masks)
  state = TrainState(
      step=jnp.asarray(step, jnp.int32), params=params,
      batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
      quant=variables.get("quant", {}), nonfinite_total=jnp.zeros((), jnp.int32),
      nonfinite_streak=jnp.zeros((), jnp.int32), masks=masks)
  return program, state


def _flip_rate(old, new, quantized) -> Array:
  """The share of quantized latent weights whose sign (hence whose binary value) changed in this step."""
  flips, total = jnp.zeros((), jnp.int32), 0
  for o, n, q in zip(jax.tree.leaves(old), jax.tree.leaves(new), jax.tree.leaves(quantized)):
    if q:
      flips = flips + jnp.sum((o >= 0) != (n >= 0)).astype(jnp.int32)
      total += o.size
  return flips.astype(jnp.float32) / max(total, 1)


def train_images(program: Program, step: Array, images: Array) -> Array:
  """The images step ``step`` trains on: the batch augmented from a key of the seed and the step."""
  return _augment(program, jax.random.fold_in(jax.random.key(program.seed), step), images)


def train_step(program: Program, state: TrainState, batch: dict):
  """One optimisation step; returns the new state and this step's metrics (device arrays).

  A step whose loss or gradients are not finite, or that would turn a finite value of the params, batch
  statistics or optimizer state into a NaN or an inf, is not taken: the state stays as it was but for
  the counters (``nonfinite_total``, ``nonfinite_streak``), and ``metrics["nonfinite_at"]`` indexes
  :func:`guarded_names` (the first offending value; -1 when the step was taken).

  With pruning masks the gradients of pruned weights are zeroed before the
  optimizer (so neither momentum nor the RF-DNN metric sees them) and the
  new params are masked after it: pruned weights stay exactly 0.
  """
  images = train_images(program, state.step, batch["image"])
  labels, mask = batch["label"], batch["mask"]
  quant = _scheduled_quant(program, state.quant, state.step)
  loss_fn = functools.partial(_loss, program)
  (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, quant, images, labels, mask)
  masked = state.masks is not None
  if masked:
    grads = pruning.mask_gradients(grads, state.masks)
  extra = {}
  if program.rfdnn:
    def plain_loss(p, b):
      return loss_fn(p, state.batch_stats, quant, b["image"], b["label"], b["mask"])[0]
    extra["translated_grads"] = translated_grads(
        plain_loss, state.params, {"image": images, "label": labels, "mask": mask}, program.shifts,
        program.fraction, mode=program.translation)
    if masked:
      extra["translated_grads"] = pruning.mask_gradients(extra["translated_grads"], state.masks)
  updates, new_opt = program.tx.update(grads, state.opt_state, state.params, **extra)
  new_params = optax.apply_updates(state.params, updates)
  if masked:
    new_params = pruning.apply_masks(new_params, state.masks)

  proposed = state.replace(params=new_params, batch_stats=new_stats, opt_state=new_opt)
  finite, nonfinite_at = _first_nonfinite(_guarded(loss, grads, state, proposed))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
  new_state = TrainState(
      step=state.step + 1,
      params=keep(new_params, state.params),
      batch_stats=keep(new_stats, state.batch_stats),
      opt_state=keep(new_opt, state.opt_state),
      quant=state.quant,
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
      masks=state.masks,
  )
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * mask)
  count = jnp.sum(mask)
  metrics = {"loss": loss, "accuracy": correct / jnp.maximum(count, 1), "finite": finite, "nonfinite_at": nonfinite_at,
             "learning_rate": program.lr(state.step)}
  metrics.update({f"hparam/{k}": s(state.step) for k, s in program.hparam_schedules.items()})
  if program.quantized is not None:
    metrics["quant/flip_rate"] = _flip_rate(state.params, new_state.params, program.quantized)
  if program.rfdnn:
    metrics.update(transform.summarize_diagnostics(new_state.opt_state))
  return new_state, metrics


def eval_step(program: Program, state: TrainState, batch: dict):
  """Sums of loss and correct predictions over the real (unmasked) examples of a batch.

  The estimator hyperparameters (the ``quant`` collection) shape only the backward pass, so evaluation
  applies the model without recomputing their schedules.
  """
  images = data_lib.preprocess(program.dataset, batch["image"])
  variables = {"params": state.params, "batch_stats": state.batch_stats, "quant": state.quant}
  logits = program.model.apply(variables, images, train=False).astype(jnp.float32)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
  mask = batch["mask"].astype(jnp.float32)
  top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
  out = {"loss_sum": jnp.sum(per_example * mask),
         "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
         "correct_top5": jnp.sum(jnp.any(top5 == batch["label"][:, None], axis=-1) * mask),
         "count": jnp.sum(mask)}
  return out


def relu_counts(program: Program, state: TrainState, batch: dict, *, train: bool) -> dead_neurons.DeadNeuronCounts:
  """How often each ReLU unit is positive on a batch (:mod:`ricci_jax.dead_neurons`), the padding not counted.

  ``train=True``: in train mode (batch statistics) on exactly the images step
  ``state.step`` trains on (augmented), the dynamic dead-neuron rate's
  batches; ``train=False``: in eval mode on the preprocessed batch (the
  post-training rate on the evaluation set). The state is not changed.
  """
  if train:
    images = train_images(program, state.step, batch["image"])
  else:
    images = data_lib.preprocess(program.dataset, batch["image"])
  variables = {"params": state.params, "batch_stats": state.batch_stats, "quant": state.quant}
  if isinstance(program.model, Functional):
    return dead_neurons.nnx_relu_activity(program.model.module(variables), images, batch["mask"], train=train)
  return dead_neurons.relu_activity(program.model, variables, images, train=train, mask=batch["mask"])
