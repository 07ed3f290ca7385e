"""VGG-small for CIFAR (LQ-Nets, Zhang et al. ECCV 2018; ReSTE, Wu et al. ICCV 2023).

Input 32x32x3, NHWC. Six bias-free 3x3 convs (padding 1), each followed by BN
and ReLU, with 2x2 max pools: 128-128-M-256-256-M-512-512-M, then the
flattened 4x4x512 features go to ``head``, a dense with bias::

  conv_init(128) conv1(128) M  conv2(256) conv3(256) M  conv4(512) conv5(512) M  head

BN layers are ``bn_init``, ``bn1`` ... ``bn5``. With ``order="conv_relu_bn"``
each unit is ``bn(relu(conv(x)))`` before the pool, exactly the ReSTE code's
``vgg_small_1w1a``; the default is ``relu(bn(conv(x)))``.
ReLU sites (:mod:`ricci_jax.dead_neurons`): ``relu_init``, ``relu1`` ...
``relu5``.

**Quantization**: ``conv_init`` is ``first``, ``head`` is ``last``, conv1-5 are
``inner``.

Parameters (``num_classes=10``): 4,660,106.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ricci_jax.models import common
from ricci_jax.models.rules import QuantRule

VGG_SMALL = (128, 128, "M", 256, 256, "M", 512, 512, "M")


class VGGSmall(nn.Module):
  """VGG-small (see the module docstring).

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
    """Logits (batch, num_classes) in ``dtype`` for NHWC images (batch, 32, 32, 3)."""
    common.check_order(self.order)
    common.check_rule(self.quant)
    i = 0
    for item in VGG_SMALL:
      if item == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      conv_name, bn_name = ("conv_init", "bn_init") if i == 0 else (f"conv{i}", f"bn{i}")
      x = common.conv_unit(self, x, conv_name, bn_name, "first" if i == 0 else "inner", item, 3,
                           train)
      i += 1
    x = x.reshape(x.shape[0], -1)
    return common.dense(self, "head", "last", self.num_classes, use_bias=True)(x)
