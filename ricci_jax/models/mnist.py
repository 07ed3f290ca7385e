"""Small models for the MNIST family (MNIST, Fashion-MNIST), input 28x28x1.

**LeNet-5 style CNN** (after LeCun et al. 1998, with BN, ReLU and max pools)::

  conv_init 5x5, 6 ch, padding 2 -> 28x28x6 -> max pool 2 -> 14x14x6
  conv1     5x5, 16 ch, no padding -> 10x10x16 -> max pool 2 -> 5x5x16 -> flatten 400
  dense1 120 -> dense2 84 -> head num_classes

Every conv / hidden dense is bias-free and followed by its BN (``bn_init``,
``bn1``, ``bn_dense1``, ``bn_dense2``) and a ReLU (``order`` as elsewhere).
The 4 ReLU sites (:mod:`ricci_jax.dead_neurons`): ``relu_init``, ``relu1``,
``relu_dense1``, ``relu_dense2``.
Parameters (``num_classes=10``): 61,932.

**MLP**: flatten, then hidden dense layers ``dense_init``, ``dense1``, ... (bias-
free, each with BN ``bn_init``, ``bn1``, ... and ReLU ``relu_init``, ``relu1``,
...), then ``head``. Default
784-256-256-10: 269,834 parameters.

**Quantization**: ``conv_init`` / ``dense_init`` is ``first`` (it reads the
image), ``head`` is ``last``, the rest ``inner``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ricci_jax import dead_neurons
from ricci_jax.models import common
from ricci_jax.models.rules import QuantRule


class LeNet5(nn.Module):
  """A LeNet-5 style CNN (see the module docstring).

  Attributes:
    num_classes: classifier outputs.
    quant: the quantization rule (``None``: float).
    dtype: compute dtype; logits in ``dtype``.
    order: ``"conv_bn_relu"`` or ``"conv_relu_bn"``.
    norm_momentum, norm_epsilon: BatchNorm's.
  """

  num_classes: int = 10
  quant: QuantRule | None = None
  dtype: Any = jnp.float32
  order: str = "conv_bn_relu"
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits (batch, num_classes) in ``dtype`` for NHWC images (batch, 28, 28, 1)."""
    common.check_order(self.order)
    common.check_rule(self.quant)
    x = common.conv_unit(self, x, "conv_init", "bn_init", "first", 6, 5, train)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    y = common.conv(self, "conv1", "inner", 16, 5, padding=0)(x)
    if self.order == "conv_relu_bn":
      x = common.norm(self, "bn1", train)(dead_neurons.relu(self, y, "relu1"))
    else:
      x = dead_neurons.relu(self, common.norm(self, "bn1", train)(y), "relu1")
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = common.dense_unit(self, x, "dense1", "bn_dense1", "inner", 120, train)
    x = common.dense_unit(self, x, "dense2", "bn_dense2", "inner", 84, train)
    return common.dense(self, "head", "last", self.num_classes, use_bias=True)(x)


class MLP(nn.Module):
  """A multilayer perceptron with BN (see the module docstring).

  Attributes:
    num_classes: classifier outputs.
    quant: the quantization rule (``None``: float).
    dtype: compute dtype; logits in ``dtype``.
    hidden: widths of the hidden layers (``(256, 256)``); empty gives a linear
      classifier whose one layer (``head``) is both first and last (it then
      takes the ``last`` role).
    order: ``"conv_bn_relu"`` (dense, BN, ReLU) or ``"conv_relu_bn"``.
    norm_momentum, norm_epsilon: BatchNorm's.
  """

  num_classes: int = 10
  quant: QuantRule | None = None
  dtype: Any = jnp.float32
  hidden: Sequence[int] = (256, 256)
  order: str = "conv_bn_relu"
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits (batch, num_classes) in ``dtype``; ``x`` is flattened after the batch axis."""
    common.check_order(self.order)
    common.check_rule(self.quant)
    hidden = common.as_tuple(self.hidden)
    if any(h <= 0 for h in hidden):
      raise ValueError(f"MLP hidden widths must be positive, got {self.hidden!r}")
    x = x.reshape(x.shape[0], -1)
    for i, h in enumerate(hidden):
      names = ("dense_init", "bn_init") if i == 0 else (f"dense{i}", f"bn{i}")
      x = common.dense_unit(self, x, *names, "first" if i == 0 else "inner", h, train)
    return common.dense(self, "head", "last", self.num_classes, use_bias=True)(x)
