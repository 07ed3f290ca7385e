"""From a training config to the objects a run is made of: the quantization rule, the model, the learning
rate and estimator schedules, the optimizer."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import optax

from ricci_jax import models, schedules, transform
from ricci_jax.quant_config import TensorQuant
from ricci_jax.train import schema

FLOAT_BITS = schema.FLOAT_BITS


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


def build_nnx_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
  """The NNX zoo's version of ``config.model``, quantized by :func:`build_quant_rule`, seen through
  :class:`ricci_jax.nnx.functional.Functional` (Linen's ``init`` / ``apply``)."""
  from flax import nnx  # noqa: PLC0415  (NNX is imported only by runs that ask for it)

  from ricci_jax.nnx import functional, quantize, zoo  # noqa: PLC0415

  name, rule = config.model.name, build_quant_rule(config)
  kwargs = {"num_classes": num_classes, "dtype": jnp.dtype(config.model.dtype), "order": config.model.order}

  def build(rngs: nnx.Rngs) -> nnx.Module:
    if name == "lenet5":
      model = zoo.LeNet5(rngs=rngs, **kwargs)
    else:
      model = zoo.CifarResNet(int(name[len("resnet"):]), rngs=rngs, **kwargs)
    # definition order is the zoo's call order, so the roles (first, inner, last) are the Linen model's
    return model if rule is None else quantize(model, rule)

  return functional.Functional(build)


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> Any:
  """The zoo model ``config.model`` with the rule of ``config.quant`` (:func:`build_quant_rule`).

  A Linen module, or with ``model.api="nnx"`` the NNX zoo's version seen as
  one (:func:`build_nnx_model`): both have ``init`` and ``apply``.
  """
  if config.model.api == "nnx":
    return build_nnx_model(config, num_classes)
  kwargs = {"order": config.model.order}
  if config.model.bireal:
    kwargs["bireal"] = True
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


def build_optimizer(config: ml_collections.ConfigDict, lr: optax.Schedule,
                    quantized_mask: Any) -> optax.GradientTransformationExtraArgs:
  o = config.optimizer
  if o.name == "rf_sgd":
    return transform.rf_sgd(
        lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay,
        quantized=quantized_mask, control_seed=config.seed,
        **schema.rfdnn_options(config))
  if o.name == "adam":
    return optax.with_extra_args_support(optax.adamw(lr, weight_decay=o.weight_decay))
  return optax.with_extra_args_support(optax.chain(
      optax.add_decayed_weights(o.weight_decay),
      optax.trace(decay=o.momentum, nesterov=o.nesterov),
      optax.scale_by_learning_rate(lr)))
