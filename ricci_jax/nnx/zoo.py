"""NNX versions of zoo models, with the Linen zoo's layer names, and loading Linen weights into them.

:class:`CifarResNet` (``resnet20`` ... with the Linen defaults: option-A
shortcuts, no Bi-Real shortcuts) is built the same way as :class:`LeNet5`.

:class:`LeNet5` is :class:`ricci_jax.models.mnist.LeNet5` written in NNX:
the same layers under the same names (``conv_init``, ``bn_init``, ``conv1``,
``bn1``, ``dense1``, ``bn_dense1``, ``dense2``, ``bn_dense2``, ``head``), the
same initialisers, BatchNorm momentum and epsilon, and the same ``order``s.
So a Linen variables dict loads into it leaf for leaf
(:func:`load_linen_variables`), and with equal weights both give the same
logits and gradients. It is built float; quantize it like any NNX model,
with :func:`ricci_jax.nnx.quantize` and a ``QuantRule``: in definition (and
call) order ``conv_init`` is first and ``head`` last, as in the Linen model.

Train / eval mode is NNX's: ``model.train()`` uses batch statistics (and
updates the running ones), ``model.eval()`` the running ones; the Linen
model's ``train=`` flag.

Every ReLU goes through :func:`ricci_jax.dead_neurons.relu` under the Linen
model's site name (``relu_init``, ``relu1``, ``relu_dense1``, ...,
``stage1_block0_relu1``, ``stage1_block0_relu_add``), so
:func:`ricci_jax.dead_neurons.nnx_relu_activity` gives the same counts as the
Linen model's :func:`ricci_jax.dead_neurons.relu_activity`; outside it they
record nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from ricci_jax import dead_neurons
from ricci_jax.models.common import CONV_INIT, check_order, relu_site, shortcut_a


def _conv(in_features: int, features: int, kernel: int, padding: int, dtype: Any, rngs: nnx.Rngs,
          strides: int = 1) -> nnx.Conv:
  return nnx.Conv(in_features, features, (kernel, kernel), strides=(strides, strides),
                  padding=((padding, padding), (padding, padding)), use_bias=False, dtype=dtype,
                  kernel_init=CONV_INIT, rngs=rngs)


def _norm(features: int, momentum: float, epsilon: float, dtype: Any, rngs: nnx.Rngs) -> nnx.BatchNorm:
  return nnx.BatchNorm(features, momentum=momentum, epsilon=epsilon, dtype=dtype, rngs=rngs)


class LeNet5(nnx.Module):
  """A LeNet-5 style CNN for 28x28x1 images (the Linen zoo's ``lenet5``, in NNX).

  Args:
    num_classes: classifier outputs.
    dtype: compute dtype; logits in ``dtype``.
    order: ``"conv_bn_relu"`` or ``"conv_relu_bn"`` (see :mod:`ricci_jax.models.common`).
    norm_momentum, norm_epsilon: BatchNorm's.
    rngs: the parameters' initialisation.
  """

  def __init__(self, num_classes: int = 10, *, dtype: Any = jnp.float32, order: str = "conv_bn_relu",
               norm_momentum: float = 0.9, norm_epsilon: float = 1e-5, rngs: nnx.Rngs):
    check_order(order)
    self.order = order
    norm = lambda n: _norm(n, norm_momentum, norm_epsilon, dtype, rngs)  # noqa: E731
    self.conv_init = _conv(1, 6, 5, 2, dtype, rngs)
    self.bn_init = norm(6)
    self.conv1 = _conv(6, 16, 5, 0, dtype, rngs)
    self.bn1 = norm(16)
    self.dense1 = nnx.Linear(400, 120, use_bias=False, dtype=dtype, rngs=rngs)
    self.bn_dense1 = norm(120)
    self.dense2 = nnx.Linear(120, 84, use_bias=False, dtype=dtype, rngs=rngs)
    self.bn_dense2 = norm(84)
    self.head = nnx.Linear(84, num_classes, use_bias=True, dtype=dtype, rngs=rngs)

  def _unit(self, layer, bn, x):
    y, site = getattr(self, layer)(x), relu_site(bn)
    if self.order == "conv_relu_bn":
      return getattr(self, bn)(dead_neurons.relu(self, y, site))
    return dead_neurons.relu(self, getattr(self, bn)(y), site)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits (batch, num_classes) for NHWC images (batch, 28, 28, 1)."""
    x = nnx.max_pool(self._unit("conv_init", "bn_init", x), (2, 2), strides=(2, 2))
    x = nnx.max_pool(self._unit("conv1", "bn1", x), (2, 2), strides=(2, 2))
    x = x.reshape(x.shape[0], -1)
    x = self._unit("dense1", "bn_dense1", x)
    x = self._unit("dense2", "bn_dense2", x)
    return self.head(x)


class CifarResNet(nnx.Module):
  """The CIFAR ResNet of depth ``6n + 2`` with option-A shortcuts (the Linen zoo's ``resnet20`` ..., in NNX).

  Layer names as in :class:`ricci_jax.models.resnet_cifar.CifarResNet`
  (``conv_init``, ``stage{s}_block{b}_conv1`` / ``_bn1`` / ``_conv2`` /
  ``_bn2``, ``head_bn`` when ``head_norm``, ``head``), a flat parameter tree,
  the parameter-free "option A" shortcut (subsample, zero-pad channels) and
  no Bi-Real shortcuts: the Linen defaults.

  Args:
    depth: 20, 32, 44, 56, 110 or any ``6n + 2``.
    num_classes, dtype, order, norm_momentum, norm_epsilon: as for :class:`LeNet5`.
    head_norm: a BatchNorm on the pooled features before the classifier.
    width: channels of the first stage (stages double it).
    in_features: input channels.
    rngs: the parameters' initialisation.
  """

  def __init__(self, depth: int = 20, num_classes: int = 10, *, dtype: Any = jnp.float32,
               order: str = "conv_bn_relu", head_norm: bool = False, width: int = 16, in_features: int = 3,
               norm_momentum: float = 0.9, norm_epsilon: float = 1e-5, rngs: nnx.Rngs):
    check_order(order)
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
      raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110, ...), got {depth!r}")
    self.order, self.head_norm = order, head_norm
    norm = lambda n: _norm(n, norm_momentum, norm_epsilon, dtype, rngs)  # noqa: E731
    self.conv_init = _conv(in_features, width, 3, 1, dtype, rngs)
    self.bn_init = norm(width)
    blocks = []  # (name, features, strides)
    features_in = width
    for s, features in enumerate((width, 2 * width, 4 * width), start=1):
      for b in range((depth - 2) // 6):
        name, strides = f"stage{s}_block{b}", 2 if (b == 0 and s > 1) else 1
        setattr(self, f"{name}_conv1", _conv(features_in, features, 3, 1, dtype, rngs, strides))
        setattr(self, f"{name}_bn1", norm(features))
        setattr(self, f"{name}_conv2", _conv(features, features, 3, 1, dtype, rngs))
        setattr(self, f"{name}_bn2", norm(features))
        blocks.append((name, features, strides))
        features_in = features
    self.blocks = tuple(blocks)  # static: part of the graph definition
    if head_norm:
      self.head_bn = norm(features_in)
    self.head = nnx.Linear(features_in, num_classes, dtype=dtype, rngs=rngs)

  def _unit(self, name, x, before_add=False):
    y, site = getattr(self, name.replace("bn", "conv"))(x), relu_site(name)
    if self.order == "conv_relu_bn":
      return getattr(self, name)(dead_neurons.relu(self, y, site))
    y = getattr(self, name)(y)
    return y if before_add else dead_neurons.relu(self, y, site)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits (batch, num_classes) for NHWC images (batch, 32, 32, 3)."""
    x = self._unit("bn_init", x)
    for name, features, strides in self.blocks:
      sc = shortcut_a(x, features, strides) if strides != 1 or x.shape[-1] != features else x
      y = self._unit(f"{name}_bn1", x)
      y = self._unit(f"{name}_bn2", y, before_add=True) + sc
      x = dead_neurons.relu(self, y, f"{name}_relu_add") if self.order == "conv_bn_relu" else y
    x = jnp.mean(x, axis=(1, 2))
    if self.head_norm:
      x = self.head_bn(x)
    return self.head(x)


def load_linen_variables(model: nnx.Module, variables: Mapping[str, Any]) -> nnx.Module:
  """Loads a Linen variables dict (``{"params": ..., "batch_stats": ...}``) into ``model``, in place.

  ``params`` go to the ``nnx.Param`` state and ``batch_stats`` to the
  ``nnx.BatchStat`` state, by path: the model must name its layers as the
  Linen model does (the zoo versions here do). A missing or extra leaf, or
  a wrong shape, raises ``ValueError`` naming it.
  """
  for collection, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
    state = nnx.state(model, kind)
    given = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables.get(collection, {})), sep="/")
    want = {"/".join(str(k) for k in path): v for path, v in nnx.to_flat_state(state)}
    if set(given) != set(want):
      raise ValueError(f"{collection} do not match the NNX model: missing {sorted(set(want) - set(given))}, "
                       f"not in the model {sorted(set(given) - set(want))}")
    for key, value in given.items():
      if tuple(jnp.shape(value)) != tuple(want[key].shape):
        raise ValueError(f"{collection} {key} has shape {tuple(jnp.shape(value))}, the model's is "
                         f"{tuple(want[key].shape)}")
    nnx.replace_by_pure_dict(state, flax.traverse_util.unflatten_dict(
        {tuple(k.split("/")): jnp.asarray(v, want[k].dtype) for k, v in given.items()}))
    nnx.update(model, state)
  return model


ZOO = {"LeNet5": LeNet5, "CifarResNet": CifarResNet}
"""The NNX zoo classes by name: what a packed file can rebuild without the model object."""


def init_args(model: nnx.Module) -> dict[str, Any] | None:
  """The constructor arguments (but ``rngs``) that build ``model``'s architecture again; ``None`` outside the zoo.

  Read from the built layers (NNX modules keep no record of their
  arguments), so a packed file can name the architecture in JSON.
  """
  if type(model) not in ZOO.values():
    return None
  bn = model.bn_init
  out = {"num_classes": int(model.head.out_features), "dtype": None if model.head.dtype is None else
         jnp.dtype(model.head.dtype).name, "order": model.order, "norm_momentum": float(bn.momentum),
         "norm_epsilon": float(bn.epsilon)}
  if isinstance(model, CifarResNet):
    out.update(depth=2 * len(model.blocks) + 2, head_norm=bool(model.head_norm),
               width=int(model.conv_init.out_features), in_features=int(model.conv_init.in_features))
  return out


def input_shape(model: nnx.Module) -> tuple[int, ...] | None:
  """One example's shape (H, W, C) for a zoo model; ``None`` outside the zoo."""
  if type(model) is LeNet5:
    return (28, 28, 1)
  if type(model) is CifarResNet:
    return (32, 32, int(model.conv_init.in_features))
  return None


def name_of(model: nnx.Module) -> str | None:
  """The Linen zoo's name of ``model``'s architecture (``"lenet5"``, ``"resnet20"``); ``None`` outside the zoo."""
  if type(model) is LeNet5:
    return "lenet5"
  if type(model) is CifarResNet:
    return f"resnet{2 * len(model.blocks) + 2}"
  return None
