"""MobileNet v1 (Howard et al. 2017, arXiv 1704.04861), input 224x224x3, NHWC.

* ``conv_init``: 3x3 conv, 32 channels, stride 2; ``bn_init``, ReLU;
* 13 depthwise-separable blocks ``block{i}`` (i = 1..13): a 3x3 depthwise conv
  ``block{i}_dw`` (stride s) + ``block{i}_dw_bn`` + ReLU, then a 1x1 pointwise
  conv ``block{i}_pw`` to c channels + ``block{i}_pw_bn`` + ReLU, with
  (c, s) = (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
  5 x (512, 1), (1024, 2), (1024, 1);
* global average pool, ``head`` dense with bias (the paper's FC; Keras uses an
  equivalent 1x1 conv).

Convs are bias-free with padding 1 (3x3) or 0 (1x1). A width multiplier
``alpha`` scales every channel count to ``int(c * alpha)`` (Keras's rule).
With ``order="conv_relu_bn"`` each unit is ``bn(relu(conv(x)))`` instead.
ReLU sites (:mod:`ricci_jax.dead_neurons`): ``relu_init``, ``block{i}_dw_relu``
and ``block{i}_pw_relu``.

**Quantization**: ``conv_init`` is ``first``, ``head`` is ``last``; every
depthwise and pointwise conv is ``inner`` (use an override such as
``{r"block\\d+_dw": None}`` to keep the depthwise convs float).

Parameters (``alpha=1``, ``num_classes=1000``): 4,231,976 (Keras's trainable
count).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ricci_jax.models import common
from ricci_jax.models.rules import QuantRule

BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))
"""(pointwise channels, depthwise stride) of the 13 separable blocks."""


class MobileNetV1(nn.Module):
  """MobileNet v1 (see the module docstring).

  Attributes:
    num_classes: classifier outputs.
    quant: the quantization rule (``None``: float).
    dtype: compute dtype; logits in ``dtype``.
    alpha: width multiplier (1.0, 0.75, 0.5, 0.25 in the paper).
    order: ``"conv_bn_relu"`` or ``"conv_relu_bn"``.
    norm_momentum, norm_epsilon: BatchNorm's.
  """

  num_classes: int = 1000
  quant: QuantRule | None = None
  dtype: Any = jnp.float32
  alpha: float = 1.0
  order: str = "conv_bn_relu"
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits (batch, num_classes) in ``dtype`` for NHWC images (batch, 224, 224, 3)."""
    if not self.alpha > 0:
      raise ValueError(f"the width multiplier alpha must be > 0, got {self.alpha}")
    common.check_order(self.order)
    common.check_rule(self.quant)

    def ch(c: int) -> int:
      return max(1, int(c * self.alpha))

    x = common.conv_unit(self, x, "conv_init", "bn_init", "first", ch(32), 3, train, strides=2)
    for i, (c, s) in enumerate(BLOCKS, start=1):
      cin = x.shape[-1]
      x = common.conv_unit(self, x, f"block{i}_dw", f"block{i}_dw_bn", "inner", cin, 3, train,
                           strides=s, groups=cin)
      x = common.conv_unit(self, x, f"block{i}_pw", f"block{i}_pw_bn", "inner", ch(c), 1, train)
    return common.classifier(self, x, train)
