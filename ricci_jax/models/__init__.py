"""The model zoo: Flax Linen networks whose quantized layers follow a :class:`QuantRule`.

Every model is called as ``model.apply(variables, x, train=...)`` on NHWC
inputs, has BatchNorm (collection ``batch_stats``, batch statistics when
``train``), a ``num_classes``, a compute ``dtype`` and stable layer names.
Its quantized and float versions have the same parameter tree, so a float
checkpoint loads into a binarized model.

Example::

    import jax, jax.numpy as jnp, ricci_jax as rj
    from ricci_jax import models

    rule = models.QuantRule(weight=rj.TensorQuant(bits=1, estimator="reste", scale="tensor"),
                            act=rj.TensorQuant(bits=1, estimator="reste"))
    net = models.create("resnet20", num_classes=10, quant=rule, order="conv_relu_bn")
    x = jnp.zeros((8, *models.input_shape("resnet20")))
    variables = net.init(jax.random.key(0), x, train=False)
    logits, updates = net.apply(variables, x, train=True, mutable=["batch_stats"])

=================  ============================================  ==========
name               model                                         input
=================  ============================================  ==========
``resnet20`` ...   CIFAR ResNet-20/32/44/56/110 (``bireal=``)    32x32x3
``resnet18/34``    ImageNet ResNet, BasicBlock (``bireal=``)     224x224x3
``resnet50``       ImageNet ResNet, Bottleneck                   224x224x3
``mobilenet_v1``   MobileNet v1 (``alpha=`` width multiplier)    224x224x3
``vgg_small``      VGG-small for CIFAR                           32x32x3
``lenet5``         LeNet-5 style CNN                             28x28x1
``mlp``            MLP, 784-256-256-10 by default (``hidden=``)  28x28x1
=================  ============================================  ==========

The ReSTE code's binary networks (Wu et al., ICCV 2023) are
``order="conv_relu_bn"`` with ``head_norm=True`` (ResNets), a W1A1
``QuantRule`` with ``layers="inner"`` and ``scale="tensor"`` weights:
``resnet20`` is its ``resnet20_1w1a``, ``resnet20`` with ``bireal=True`` its
``resnet20_bireal_1w1a``, ``resnet18`` / ``resnet34`` with ``bireal=True`` its
ImageNet nets, and ``vgg_small`` (no ``head_norm``) its ``vgg_small_1w1a``.
The RF-DNN / MetaQuant CIFAR setting is the default order with
``QuantRule(layers="all", weight=...)`` and float activations.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ricci_jax.models.common import ORDERS, shortcut_a
from ricci_jax.models.inspect import layer_plan, unused_overrides
from ricci_jax.models.mnist import MLP, LeNet5
from ricci_jax.models.mobilenet import MobileNetV1
from ricci_jax.models.resnet_cifar import CifarResNet
from ricci_jax.models.resnet_imagenet import ResNet
from ricci_jax.models.rules import LAYER_SETS, ROLES, QuantRule
from ricci_jax.models.vgg import VGGSmall


@dataclasses.dataclass(frozen=True)
class ModelInfo:
  """A registry entry: the module class, fixed attributes and input shape.

  Attributes:
    cls: the Flax module class.
    fixed: attributes the name fixes (e.g. ``{"depth": 20}``).
    input_shape: one example's shape, (H, W, C).
    reference: the paper the architecture follows.
  """

  cls: type[nn.Module]
  fixed: Mapping[str, Any]
  input_shape: tuple[int, int, int]
  reference: str


_CIFAR = (32, 32, 3)
_IMAGENET = (224, 224, 3)
_MNIST = (28, 28, 1)

MODELS: Mapping[str, ModelInfo] = {
    **{f"resnet{d}": ModelInfo(CifarResNet, {"depth": d}, _CIFAR, "He et al. 2016 (CIFAR variant)")
       for d in (20, 32, 44, 56, 110)},
    **{f"resnet{d}": ModelInfo(ResNet, {"depth": d}, _IMAGENET, "He et al. 2016 (torchvision layout)")
       for d in (18, 34, 50)},
    "mobilenet_v1": ModelInfo(MobileNetV1, {}, _IMAGENET, "Howard et al. 2017"),
    "vgg_small": ModelInfo(VGGSmall, {}, _CIFAR, "Zhang et al. 2018 (LQ-Nets); Wu et al. 2023 (ReSTE)"),
    "lenet5": ModelInfo(LeNet5, {}, _MNIST, "LeCun et al. 1998 (with BN and ReLU)"),
    "mlp": ModelInfo(MLP, {}, _MNIST, "multilayer perceptron with BN"),
}
"""Every model by name. ``create(name, ...)`` builds one."""


def _info(name: str) -> ModelInfo:
  try:
    return MODELS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown model {name!r}; valid models: {', '.join(MODELS)}") from None


def input_shape(name: str) -> tuple[int, int, int]:
  """One example's input shape (H, W, C) for model ``name`` (e.g. (32, 32, 3))."""
  return _info(name).input_shape


def name_of(model: nn.Module) -> str | None:
  """The zoo name of ``model`` (``"resnet20"``): its class and the attributes the name fixes; ``None`` outside the zoo."""
  for name, info in MODELS.items():
    if type(model) is info.cls and all(getattr(model, k, None) == v for k, v in info.fixed.items()):
      return name
  return None


def input_shape_for(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
  """One example's input shape for ``model``: ``input_shape`` if given, else the zoo's for its class.

  Raises:
    ValueError: no ``input_shape`` and a model outside the zoo (or a class
      registered with several input shapes).
  """
  if input_shape is not None:
    return tuple(int(d) for d in input_shape)
  shapes = {info.input_shape for info in MODELS.values() if type(model) is info.cls}
  if len(shapes) == 1:
    return shapes.pop()
  raise ValueError(f"{type(model).__name__} is not a model of ricci_jax.models: pass input_shape=(H, W, C)")


def create(
    name: str,
    *,
    num_classes: int,
    quant: QuantRule | None = None,
    dtype: Any = jnp.float32,
    **kwargs,
) -> nn.Module:
  """Builds model ``name`` (a key of :data:`MODELS`).

  Args:
    name: e.g. ``"resnet20"``, ``"resnet18"``, ``"mobilenet_v1"``, ``"mlp"``.
    num_classes: classifier outputs.
    quant: which layers are quantized and how (``None``: the float model).
    dtype: compute dtype (parameters stay float32).
    **kwargs: further attributes of the model class, e.g. ``bireal=True``,
      ``order="conv_relu_bn"``, ``head_norm=True`` (ResNets), ``alpha=0.5``
      (MobileNet), ``hidden=(512,)`` (MLP).

  Returns:
    The unbound Flax module; call ``init`` / ``apply`` with ``train=``.

  Raises:
    ValueError: for an unknown name, an attribute the model does not have or
      that the name fixes, or a bad value. A warning lists the ``quant``
      overrides that match none of the model's layers.
  """
  info = _info(name)
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  if quant is not None and not isinstance(quant, QuantRule):
    raise ValueError(f"quant must be a ricci_jax.models.QuantRule or None, got {quant!r}")
  allowed = sorted(f.name for f in dataclasses.fields(info.cls)
                   if f.init and f.name not in ("parent", "name", "num_classes", "quant", "dtype")
                   and f.name not in info.fixed)
  fixed = sorted(set(kwargs) & set(info.fixed))
  if fixed:
    raise ValueError(
        f"model {name!r} fixes {', '.join(f'{k}={info.fixed[k]!r}' for k in fixed)}; build "
        f"{info.cls.__name__}(...) directly for other values")
  bad = sorted(set(kwargs) - set(allowed))
  if bad:
    raise ValueError(f"model {name!r} has no attribute(s) {bad}; it accepts {allowed}")
  if "order" in kwargs and kwargs["order"] not in ORDERS:
    raise ValueError(f"unknown order {kwargs['order']!r}; allowed: {', '.join(ORDERS)}")
  model = info.cls(**info.fixed, num_classes=num_classes, quant=quant, dtype=dtype, **kwargs)
  if quant is not None and quant.overrides:
    unused = unused_overrides(model, jnp.zeros((1, *info.input_shape), dtype), train=False)
    if unused:
      warnings.warn(f"QuantRule overrides that decide no layer of {name!r}: {unused}", stacklevel=2)
  return model


__all__ = [
    "LAYER_SETS",
    "MLP",
    "MODELS",
    "ORDERS",
    "ROLES",
    "CifarResNet",
    "LeNet5",
    "MobileNetV1",
    "ModelInfo",
    "QuantRule",
    "ResNet",
    "VGGSmall",
    "create",
    "input_shape",
    "input_shape_for",
    "layer_plan",
    "name_of",
    "shortcut_a",
    "unused_overrides",
]
