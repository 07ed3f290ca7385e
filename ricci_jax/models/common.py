"""Building blocks shared by the model families.

The helpers here are plain functions that create Flax layers inside the
calling module's ``@nn.compact`` method, with explicit names, so every model
keeps a flat, readable parameter tree (``params["stage1_block0_conv1"]
["kernel"]``) and every conv / dense goes through the model's
:class:`~ricci_jax.models.rules.QuantRule`.

Two orders of the conv / norm / nonlinearity triple are offered:

* ``"conv_bn_relu"`` (default): ``relu(bn(conv(x)))``, residual blocks add the
  shortcut before the last ReLU (He et al. 2016).
* ``"conv_relu_bn"``: ``bn(relu(conv(x)))``, residual blocks add the shortcut
  after the BN and apply no further ReLU, as in the ReSTE code's binary
  nets (Wu et al., ICCV 2023). With 1-bit activations this is the one
  to use: a binarized conv quantizes its *input*, and in ``"conv_bn_relu"``
  that input has passed a ReLU, so ``sign`` (with sign(0) = +1) maps all of it
  to +1 (a warning says so). A k-bit uniform activation quantizer (RF-DNN
  Eq. 38, symmetric on [-max, max]) on those inputs wastes half its levels
  (RF-DNN notes, A7); the staircase quantizer is made for them.

Activations are NHWC throughout; BatchNorm keeps float32 statistics whatever
the compute ``dtype`` (Flax's ``force_float32_reductions``).

**ReLU sites.** Every ReLU goes through :func:`ricci_jax.dead_neurons.relu`,
which records its output for the dead-neuron-rate diagnostics (a no-op in an
ordinary forward pass). A site is named after the BN of its unit,
:func:`relu_site` (``bn_init`` -> ``relu_init``, ``stage1_block0_bn1`` ->
``stage1_block0_relu1``, ``block1_dw_bn`` -> ``block1_dw_relu``); the ReLU
after a residual addition is ``{block}_relu_add`` (:func:`after_add`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ricci_jax import dead_neurons
from ricci_jax.quant_config import QuantConfig
from ricci_jax.layers import QuantConv, QuantDense
from ricci_jax.models.rules import QuantRule, resolve

Array = jax.Array

ORDERS = ("conv_bn_relu", "conv_relu_bn")
"""The allowed ``order`` values of every model (see the module docstring)."""

CONV_INIT = nn.initializers.he_normal()
"""Kernel initializer of every conv: He et al. 2015 (fan-in, truncated normal)."""

SIGN_OF_RELU_WARNING = (
    "a 1-bit activation quantizer (sign) reads the output of a ReLU in order='conv_bn_relu', "
    "where every value is >= 0 and sign maps it to +1: the quantized layers see a constant "
    "input. Use order='conv_relu_bn' (BN after the ReLU, as in the ReSTE code) for W1A1, or a "
    "staircase activation quantizer.")


def check_order(order: str) -> None:
  if order not in ORDERS:
    raise ValueError(f"unknown order {order!r}; allowed: {', '.join(ORDERS)}")


def check_rule(rule: Any) -> None:
  if rule is not None and not isinstance(rule, QuantRule):
    raise ValueError(f"quant must be a ricci_jax.models.QuantRule or None, got {rule!r}")


def _is_sign(config: QuantConfig | None) -> bool:
  act = None if config is None else config.act
  return act is not None and act.bits == 1 and act.method in ("uniform", "dorefa")


def _layer_config(m: nn.Module, name: str, role: str) -> QuantConfig | None:
  config = resolve(m.quant, name, role)
  if role != "first" and m.order == "conv_bn_relu" and _is_sign(config):
    warnings.warn(SIGN_OF_RELU_WARNING, stacklevel=3)
  return config


def conv(
    m: nn.Module,
    name: str,
    role: str,
    features: int,
    kernel: int,
    strides: int = 1,
    padding: int | None = None,
    groups: int = 1,
) -> nn.Conv:
  """A bias-free ``kernel x kernel`` conv of ``m`` named ``name``, quantized by ``m.quant``.

  Padding defaults to ``kernel // 2`` on every side (PyTorch's convention, so
  shapes and weights port one to one).
  """
  pad = kernel // 2 if padding is None else padding
  return QuantConv(
      features, (kernel, kernel), quant=_layer_config(m, name, role), strides=(strides, strides),
      padding=((pad, pad), (pad, pad)), feature_group_count=groups, use_bias=False,
      dtype=m.dtype, kernel_init=CONV_INIT, name=name)


def dense(m: nn.Module, name: str, role: str, features: int, use_bias: bool) -> nn.Dense:
  """A dense layer of ``m`` named ``name``, quantized by ``m.quant``."""
  return QuantDense(features, quant=_layer_config(m, name, role), use_bias=use_bias,
                    dtype=m.dtype, name=name)


def norm(m: nn.Module, name: str, train: bool) -> nn.BatchNorm:
  """BatchNorm (collection ``batch_stats``), batch statistics only when ``train``.

  No axis name: under ``jax.jit`` with the batch sharded over devices and
  hosts, the mean over the batch axis is the global batch's, as on one device.
  """
  return nn.BatchNorm(use_running_average=not train, momentum=m.norm_momentum,
                      epsilon=m.norm_epsilon, dtype=m.dtype, name=name)


def relu_site(bn_name: str) -> str:
  """The name of the ReLU site of the unit whose BN is ``bn_name``: its last ``bn`` becomes ``relu``.

  ``bn_init`` -> ``relu_init``, ``bn1`` -> ``relu1``, ``bn_dense1`` ->
  ``relu_dense1``, ``stage2_block0_bn1`` -> ``stage2_block0_relu1``,
  ``block3_pw_bn`` -> ``block3_pw_relu``. The name holds whatever the order
  (in ``conv_relu_bn`` the ReLU precedes that BN).
  """
  head, found, tail = bn_name.rpartition("bn")
  if not found:
    raise ValueError(f"a BN layer's name must contain 'bn', got {bn_name!r}")
  return f"{head}relu{tail}"


def conv_unit(
    m: nn.Module,
    x: Array,
    conv_name: str,
    bn_name: str,
    role: str,
    features: int,
    kernel: int,
    train: bool,
    *,
    strides: int = 1,
    groups: int = 1,
    before_add: bool = False,
) -> Array:
  """conv, BN and ReLU in ``m.order``.

  ``conv_bn_relu``: ``relu(bn(conv(x)))``, or ``bn(conv(x))`` when
  ``before_add`` (the ReLU then follows the residual add, :func:`after_add`).
  ``conv_relu_bn``: ``bn(relu(conv(x)))`` either way.
  """
  site = relu_site(bn_name)
  y = conv(m, conv_name, role, features, kernel, strides=strides, groups=groups)(x)
  if m.order == "conv_relu_bn":
    return norm(m, bn_name, train)(dead_neurons.relu(m, y, site))
  y = norm(m, bn_name, train)(y)
  return y if before_add else dead_neurons.relu(m, y, site)


def dense_unit(m: nn.Module, x: Array, dense_name: str, bn_name: str, role: str, features: int,
               train: bool) -> Array:
  """A bias-free dense, BN and ReLU in ``m.order`` (the MLP / LeNet hidden layers)."""
  site = relu_site(bn_name)
  y = dense(m, dense_name, role, features, use_bias=False)(x)
  if m.order == "conv_relu_bn":
    return norm(m, bn_name, train)(dead_neurons.relu(m, y, site))
  return dead_neurons.relu(m, norm(m, bn_name, train)(y), site)


def after_add(m: nn.Module, y: Array, site: str) -> Array:
  """What follows a residual add: ReLU (recorded as ``site``) in ``conv_bn_relu``, nothing in ``conv_relu_bn``."""
  return dead_neurons.relu(m, y, site) if m.order == "conv_bn_relu" else y


def shortcut_a(x: Array, features: int, strides: int) -> Array:
  """The parameter-free "option A" shortcut of the CIFAR ResNets (He et al. 2016, §4.2).

  Subsamples by ``strides`` (``x[:, ::s, ::s, :]``) and zero-pads the channel
  axis to ``features``, half the new channels before and half after (the
  ``F.pad(x[:, :, ::2, ::2], (..., planes//4, planes//4))`` of the common
  PyTorch code).
  """
  if strides != 1:
    x = x[:, ::strides, ::strides, :]
  extra = features - x.shape[-1]
  if extra < 0:
    raise ValueError(f"an option-A shortcut cannot reduce channels ({x.shape[-1]} -> {features})")
  if extra:
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
  return x


def classifier(m: nn.Module, x: Array, train: bool, head_norm: bool = False) -> Array:
  """Global average pool (NHWC), optional BN (``head_bn``), then the ``head`` dense.

  ``head_norm`` is the ReSTE code's ``BatchNorm1d`` before the classifier.
  """
  x = jnp.mean(x, axis=(1, 2))
  if head_norm:
    x = norm(m, "head_bn", train)(x)
  return dense(m, "head", "last", m.num_classes, use_bias=True)(x)


def as_tuple(values: Sequence[int] | int) -> tuple[int, ...]:
  return (int(values),) if isinstance(values, int) else tuple(int(v) for v in values)
