"""ImageNet ResNets: ResNet-18/34 (BasicBlock) and ResNet-50/101/152 (Bottleneck).

He et al., CVPR 2016, in the torchvision layout (stride in the bottleneck's
3x3 conv, "ResNet v1.5"), input 224x224x3, NHWC:

* ``conv_init``: 7x7 conv, 64 channels, stride 2, padding 3; ``bn_init``, ReLU;
  3x3 max pool, stride 2, padding 1;
* four stages with 64, 128, 256, 512 base channels (x4 at a bottleneck's
  output), blocks per stage 18: (2, 2, 2, 2), 34 and 50: (3, 4, 6, 3),
  101: (3, 4, 23, 3), 152: (3, 8, 36, 3); stages 2-4 start with stride 2;
* global average pool, optional ``head_bn``, ``head`` dense with bias.

Where a block changes shape its shortcut is a projection, ``downsample``: a
1x1 conv with the block's stride, ``stage{s}_block0_downsample``, then
``stage{s}_block0_downsample_bn`` ("option B"); elsewhere the identity.

**BasicBlock** (18, 34): as in :mod:`ricci_jax.models.resnet_cifar` with the
projection shortcut, including the Bi-Real variant (``bireal=True``, a
shortcut around every conv; with ``order="conv_relu_bn"`` this is the ReSTE
code's ImageNet ``BasicBlock_1w1a``: ``y = bn1(relu(conv1(x))) + ds(x);
out = bn2(relu(conv2(y))) + y``).

**Bottleneck** (50+), ``w`` the base width::

  conv_bn_relu:  relu(bn3(conv3_1x1(relu(bn2(conv2_3x3(relu(bn1(conv1_1x1(x)))))))) + sc(x))
  conv_relu_bn:  bn3(relu(conv3(bn2(relu(conv2(bn1(relu(conv1(x))))))))) + sc(x)

with conv1: w channels, conv2: w, stride s, conv3: 4w. Bi-Real is not
defined for bottlenecks (their convs change the width) and raises.

**ReLU sites** (:mod:`ricci_jax.dead_neurons`): ``relu_init``, then per block
``{block}_relu1`` (, ``_relu2`` in a bottleneck) and ``{block}_relu_add``
(after the addition) in ``conv_bn_relu``; every ``{block}_relu{i}`` before
its BN in ``conv_relu_bn``; Bi-Real as in :mod:`ricci_jax.models.resnet_cifar`.

**Quantization**: ``conv_init`` is ``first``, ``head`` is ``last``, the
projection convs are ``downsample`` (float under ``layers="inner"``, as in the
ReSTE and Bi-Real code; quantized under ``"all"``; or set
``QuantRule.downsample``), every other conv ``inner``.

Parameters (``num_classes=1000``): ResNet-18 11,689,512; ResNet-34
21,797,672; ResNet-50 25,557,032 (torchvision's counts).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ricci_jax.models import common
from ricci_jax.models.rules import QuantRule

STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
"""Block type and blocks per stage, by depth."""


class ResNet(nn.Module):
  """An ImageNet ResNet (see the module docstring).

  Attributes:
    depth: 18, 34, 50, 101 or 152.
    num_classes: classifier outputs.
    quant: the quantization rule (``None``: float).
    dtype: compute dtype; parameters float32, BN statistics float32, logits
      in ``dtype``.
    bireal: a shortcut around every conv (BasicBlock depths only).
    order: ``"conv_bn_relu"`` or ``"conv_relu_bn"`` (also for the stem).
    head_norm: a BatchNorm on the pooled features before the classifier (the
      ReSTE code has one).
    width: channels of the stem and the first stage (64).
    norm_momentum, norm_epsilon: BatchNorm's.
  """

  depth: int = 18
  num_classes: int = 1000
  quant: QuantRule | None = None
  dtype: Any = jnp.float32
  bireal: bool = False
  order: str = "conv_bn_relu"
  head_norm: bool = False
  width: int = 64
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits (batch, num_classes) in ``dtype`` for NHWC images (batch, 224, 224, 3)."""
    if self.depth not in STAGES:
      raise ValueError(f"unknown ImageNet ResNet depth {self.depth!r}; allowed: {sorted(STAGES)}")
    kind, stages = STAGES[self.depth]
    if self.bireal and kind != "basic":
      raise ValueError(
          f"bireal=True needs a BasicBlock ResNet (depth 18 or 34); ResNet-{self.depth} has bottlenecks")
    common.check_order(self.order)
    common.check_rule(self.quant)
    x = common.conv_unit(self, x, "conv_init", "bn_init", "first", self.width, 7, train, strides=2)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for s, blocks in enumerate(stages, start=1):
      width = self.width * 2 ** (s - 1)
      for b in range(blocks):
        strides = 2 if (b == 0 and s > 1) else 1
        name = f"stage{s}_block{b}"
        if kind == "basic":
          x = self._basic(x, name, width, strides, train)
        else:
          x = self._bottleneck(x, name, width, strides, train)
    return common.classifier(self, x, train, self.head_norm)

  def _shortcut(self, x, name: str, features: int, strides: int, train: bool):
    if strides == 1 and x.shape[-1] == features:
      return x
    sc = common.conv(self, f"{name}_downsample", "downsample", features, 1, strides=strides)(x)
    return common.norm(self, f"{name}_downsample_bn", train)(sc)

  def _basic(self, x, name: str, features: int, strides: int, train: bool):
    sc = self._shortcut(x, name, features, strides, train)
    y = common.conv_unit(self, x, f"{name}_conv1", f"{name}_bn1", "inner", features, 3, train,
                         strides=strides, before_add=self.bireal)
    if self.bireal:
      y = common.after_add(self, y + sc, f"{name}_relu1_add")
      sc = y
    y = common.conv_unit(self, y, f"{name}_conv2", f"{name}_bn2", "inner", features, 3, train,
                         before_add=True)
    return common.after_add(self, y + sc, f"{name}_relu_add")

  def _bottleneck(self, x, name: str, width: int, strides: int, train: bool):
    sc = self._shortcut(x, name, 4 * width, strides, train)
    y = common.conv_unit(self, x, f"{name}_conv1", f"{name}_bn1", "inner", width, 1, train)
    y = common.conv_unit(self, y, f"{name}_conv2", f"{name}_bn2", "inner", width, 3, train,
                         strides=strides)
    y = common.conv_unit(self, y, f"{name}_conv3", f"{name}_bn3", "inner", 4 * width, 1, train,
                         before_add=True)
    return common.after_add(self, y + sc, f"{name}_relu_add")
