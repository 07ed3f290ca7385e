"""CIFAR ResNets: ResNet-20/32/44/56/110 (He et al., CVPR 2016, §4.2), plain or Bi-Real.

Architecture (depth = 6n + 2, input 32x32x3, NHWC):

* ``conv_init``: 3x3 conv, 16 channels, stride 1, then ``bn_init`` and ReLU;
* three stages of n BasicBlocks with 16, 32, 64 channels; the first block of
  stages 2 and 3 has stride 2 (in its first conv);
* global average pool, optional ``head_bn`` (the ReSTE code's BatchNorm1d),
  ``head``: dense to ``num_classes`` with bias.

Convs are 3x3, bias-free, padding 1. Block ``b`` of stage ``s`` (from 1) has
``stage{s}_block{b}_conv1`` / ``_bn1`` and ``_conv2`` / ``_bn2``.

**Shortcuts.** ``shortcut="A"`` (default, the paper's CIFAR choice): no
parameters; where the shape changes, ``x[:, ::2, ::2, :]`` zero-padded to the
new width (8 channels before, 8 after for 16 -> 32). ``shortcut="B"``: a 1x1
stride-2 conv ``stage{s}_block0_downsample`` + ``_downsample_bn`` (role
``downsample``).

**Plain block** (``bireal=False``), ``sc`` the shortcut::

  conv_bn_relu:  y = relu(bn1(conv1(x)));  out = relu(bn2(conv2(y)) + sc(x))
  conv_relu_bn:  y = bn1(relu(conv1(x)));  out = bn2(relu(conv2(y))) + sc(x)

(the second is the ReSTE code's ``BasicBlock_1w1a``).

**Bi-Real block** (``bireal=True``; Liu et al., ECCV 2018): a shortcut around
*every* conv, the first one ``sc(x)`` and the second the identity::

  conv_bn_relu:  y = relu(bn1(conv1(x)) + sc(x));  out = relu(bn2(conv2(y)) + y)
  conv_relu_bn:  y = bn1(relu(conv1(x))) + sc(x);  out = bn2(relu(conv2(y))) + y

The ``conv_relu_bn`` form is exactly the ReSTE code's Bi-Real ResNet-20
(``resnet20_bireal_1w1a``). Bi-Real adds no parameters: its parameter tree is
the plain ResNet's.

**ReLU sites** (recorded for :mod:`ricci_jax.dead_neurons`): ``relu_init``
(the stem), then per block ``{block}_relu1`` (after ``bn1``) and
``{block}_relu_add`` (after the residual addition) in ``conv_bn_relu``;
``{block}_relu1`` and ``{block}_relu2`` (before ``bn1`` / ``bn2``) in
``conv_relu_bn``; Bi-Real ``conv_bn_relu`` has ``{block}_relu1_add`` (after
the first addition) and ``{block}_relu_add``. ResNet-20: 19 sites in every
case (1 + 2 x 9).

**Quantization** (:class:`~ricci_jax.models.QuantRule`): ``conv_init`` is the
``first`` layer, ``head`` the ``last``, every block conv ``inner``. A quantized
conv quantizes its own input, so with ``layers="inner"`` the image is never
quantized and a W1A1 block is ``conv(sign(x), sign(W)) -> BN -> ...``.

Parameters with ``num_classes=10`` (conv kernels, BN scale and bias, head
kernel and bias): ResNet-20 269,722; ResNet-32 464,154; ResNet-44 658,586;
ResNet-56 853,018; ResNet-110 1,727,962.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ricci_jax.models import common
from ricci_jax.models.rules import QuantRule

CIFAR_WIDTHS = (16, 32, 64)
SHORTCUTS = ("A", "B")


class CifarResNet(nn.Module):
  """The CIFAR ResNet of depth ``6n + 2`` (see the module docstring).

  Attributes:
    depth: 20, 32, 44, 56, 110 or any ``6n + 2``.
    num_classes: classifier outputs.
    quant: the quantization rule (``None``: float).
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32, BN
      statistics are reduced in float32, the logits come out in ``dtype``.
    bireal: a shortcut around every conv (Bi-Real Net).
    shortcut: ``"A"`` (zero-pad, no parameters) or ``"B"`` (1x1 conv + BN).
    order: ``"conv_bn_relu"`` or ``"conv_relu_bn"`` (see
      :mod:`ricci_jax.models.common`); also used by the stem.
    head_norm: a BatchNorm on the pooled features before the classifier.
    width: channels of the first stage (16 in the paper; stages double it).
    norm_momentum, norm_epsilon: BatchNorm's (PyTorch's 0.1 momentum is 0.9).
  """

  depth: int = 20
  num_classes: int = 10
  quant: QuantRule | None = None
  dtype: Any = jnp.float32
  bireal: bool = False
  shortcut: str = "A"
  order: str = "conv_bn_relu"
  head_norm: bool = False
  width: int = 16
  norm_momentum: float = 0.9
  norm_epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Logits (batch, num_classes) in ``dtype`` for NHWC images ``x``.

    Args:
      x: images, (batch, 32, 32, 3) for CIFAR (any size works).
      train: batch statistics for BN (and update ``batch_stats``, which must
        then be mutable) when True, running averages otherwise.
    """
    n = _blocks_per_stage(self.depth)
    if self.shortcut not in SHORTCUTS:
      raise ValueError(f"unknown shortcut {self.shortcut!r}; allowed: {', '.join(SHORTCUTS)}")
    common.check_order(self.order)
    common.check_rule(self.quant)
    x = common.conv_unit(self, x, "conv_init", "bn_init", "first", self.width, 3, train)
    for s, features in enumerate((self.width, 2 * self.width, 4 * self.width), start=1):
      for b in range(n):
        strides = 2 if (b == 0 and s > 1) else 1
        x = self._block(x, f"stage{s}_block{b}", features, strides, train)
    return common.classifier(self, x, train, self.head_norm)

  def _block(self, x, name: str, features: int, strides: int, train: bool):
    if strides != 1 or x.shape[-1] != features:
      if self.shortcut == "A":
        sc = common.shortcut_a(x, features, strides)
      else:
        sc = common.conv(self, f"{name}_downsample", "downsample", features, 1, strides=strides)(x)
        sc = common.norm(self, f"{name}_downsample_bn", train)(sc)
    else:
      sc = x
    y = common.conv_unit(self, x, f"{name}_conv1", f"{name}_bn1", "inner", features, 3, train,
                         strides=strides, before_add=self.bireal)
    if self.bireal:
      y = common.after_add(self, y + sc, f"{name}_relu1_add")
      sc = y
    y = common.conv_unit(self, y, f"{name}_conv2", f"{name}_bn2", "inner", features, 3, train,
                         before_add=True)
    return common.after_add(self, y + sc, f"{name}_relu_add")


def _blocks_per_stage(depth: int) -> int:
  if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
    raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110, ...), got {depth!r}")
  return (depth - 2) // 6
