"""Quantized Flax Linen layers, built the AQT way: by injection.

Flax's own ``nn.Dense`` and ``nn.Conv`` take a ``dot_general_cls`` /
``conv_general_dilated_cls``. :class:`QuantDotGeneral` and
:class:`QuantConvGeneralDilated` are those injection points: they quantize the
kernel (and optionally the input activation) and then call the plain ``lax``
op. :func:`QuantDense` and :func:`QuantConv` return a real ``nn.Dense`` /
``nn.Conv`` with the injection made, so

* a layer whose config is off *is* the plain Flax layer (bit-identical), and
* the parameter tree of a quantized model is the same as its float twin's
  (``kernel``, ``bias``), so float checkpoints load into quantized models.

Estimator hyperparameters live in the ``"quant"`` variable collection, one
dict per quantized operand (``{..., "QuantDotGeneral_0": {"weight": {"o":
...}}}``). Pass the collection to ``apply`` with values from a schedule
(:func:`set_quant_hparams`) and the train step never recompiles; leave it out
and the config's initial values are used.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ricci_jax.quant_config import QuantConfig, TensorQuant
from ricci_jax.estimators import get_estimator
from ricci_jax.quantizers import (
    binary_scale,
    dorefa_weights,
    ridge_dequantize,
    staircase_relu,
    uniform,
)

Array = jax.Array
QUANT_COLLECTION = "quant"


OPERANDS = ("weight", "act")
"""The operands of a quantized contraction: the kernel and the layer's input activation."""


def pruned_mask(kernel: Array) -> Array:
  """True where ``kernel`` is exactly 0 (``-0.0`` included): the pruned weights.

  The pruning convention of ricci-jax: a pruned weight is a latent weight held
  at exactly 0.0 (masks keep it there through training, :mod:`ricci_jax.pruning`);
  no weight is exactly 0 after a normal (continuous) initialisation.
  """
  return kernel == 0


def quantize_tensor(
    x: Array,
    spec: TensorQuant,
    contraction_axes: Sequence[int],
    hparams: Mapping[str, Any] | None = None,
    *,
    operand: str = "weight",
) -> Array:
  """Applies ``spec`` to one operand of a contraction.

  **Pruned weights stay zero.** For the kernel (``operand="weight"``), a
  latent weight that is exactly 0 is *pruned* and its quantized value is
  exactly 0: a pruned binary kernel is ternary {-1, 0, +1} (``sign(w)`` where
  ``w != 0``), a pruned k-bit kernel has 0 where pruned, with the scale (if
  any; still mean|W| over the whole kernel, zeros included) applied to the
  rest. The gradient with respect to a pruned weight is 0 (the weight enters
  only through a ``where`` that selects 0, and through a ``stop_gradient``
  into the scale and the quantizer's statistics). The
  rule is applied here, once, for both the Linen ops (:class:`QuantDotGeneral`,
  :class:`QuantConvGeneralDilated`) and the NNX ops
  (:class:`ricci_jax.nnx.ops.QuantOp`), and the packed export rebuilds it
  (:mod:`ricci_jax.export`). Without it the quantizers would map a pruned 0 to
  a level: sign(0) = +1 (RF-DNN Eq. 37, :func:`ricci_jax.quantizers.sign`), an
  Eq. 38 level ±1/(2^k-1), so the "pruned" weight would still compute. This is
  the convention of ternary and sparse binary networks (zero weights skip
  their multiply-accumulate: Li & Liu, "Ternary Weight Networks", 2016;
  Han et al., "Deep Compression", ICLR 2016). Unpruned kernels are
  unchanged, value for value.

  The activation (``operand="act"``) is quantized as it is: a binarized input
  that is exactly 0 (common after a ReLU) keeps sign(0) = +1.

  **A NaN is not pruned.** It is not 0, so it is quantized like any weight,
  and the quantizers never map a NaN to a code (:mod:`ricci_jax.quantizers`):
  sign (Eq. 37) keeps it at its position, Eq. 38 levels and DoReFa (one max
  over the kernel) make the whole kernel NaN, ridge its block. A ``tensor`` /
  ``channel`` scale is a mean|W| over the NaN (or an inf), so the whole kernel
  / that output channel is NaN (or inf); pruned weights stay exactly 0. A loss
  through the layer is then NaN: a corrupted checkpoint cannot train on unnoticed.

  Args:
    x: the operand (a kernel or an activation), in the dtype the op computes
      in (a weight is pruned when it is 0 in that dtype).
    spec: how to quantize it.
    contraction_axes: the operand's contraction axes: the ridge method's blocks
      run along them, and the ``channel`` scale averages over them.
    hparams: estimator hyperparameters (arrays, possibly traced); defaults to
      ``spec.hparams``.
    operand: ``"weight"`` (a kernel: the pruning rule applies) or ``"act"``.

  Returns:
    The quantized operand, in ``x``'s dtype, as the forward pass sees it.
  """
  if operand not in OPERANDS:
    raise ValueError(f"operand must be one of {OPERANDS}, got {operand!r}")
  pruned = None
  if operand == "weight":
    pruned = pruned_mask(x)
    # same values; no gradient reaches a pruned weight through the scale or statistics
    x = jnp.where(pruned, lax.stop_gradient(x), x)
  hp = dict(spec.hparams) if hparams is None else dict(hparams)
  if spec.method == "uniform":
    q = uniform(x, spec.bits, spec.estimator, **hp)
  elif spec.method == "dorefa":
    q = dorefa_weights(x, spec.bits, spec.estimator, **hp)
  elif spec.method == "staircase":
    q = staircase_relu(x, spec.bits, spec.alpha, spec.estimator, **hp)
  elif spec.method == "ridge":
    q = ridge_dequantize(
        x, spec.bits, axis=tuple(contraction_axes), block_size=spec.ridge_block_size,
        lam=spec.ridge_lambda, affine=spec.ridge_affine, sparsity=spec.sparsity)
  else:  # pragma: no cover - TensorQuant validates the method
    raise ValueError(spec.method)
  if spec.scale != "none":
    q = q * binary_scale(x, spec.scale, reduce_axes=contraction_axes).astype(q.dtype)
  if pruned is not None:
    q = jnp.where(pruned, jnp.zeros((), q.dtype), q)
  return q


def _operand_hparams(module: nn.Module, operand: str, spec: TensorQuant) -> dict[str, Array]:
  """The operand's estimator hyperparameters, from the "quant" collection if present."""
  if spec.method == "ridge":
    return {}
  init = get_estimator(spec.estimator).resolve(spec.hparams_dict)
  if not init:
    return {}
  if module.is_mutable_collection(QUANT_COLLECTION) or module.has_variable(QUANT_COLLECTION, operand):
    return module.variable(QUANT_COLLECTION, operand, lambda: init).value
  return init


class QuantDotGeneral(nn.Module):
  """A ``lax.dot_general`` that quantizes its operands first (inject into ``nn.Dense``).

  ``lhs`` is the activation and ``rhs`` the kernel, as in ``nn.Dense``.
  """

  config: QuantConfig

  @nn.compact
  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kwargs):
    (lhs_contract, rhs_contract), _ = dimension_numbers
    if self.config.act is not None:
      lhs = quantize_tensor(lhs, self.config.act, lhs_contract,
                            _operand_hparams(self, "act", self.config.act), operand="act")
    if self.config.weight is not None:
      rhs = quantize_tensor(rhs, self.config.weight, rhs_contract,
                            _operand_hparams(self, "weight", self.config.weight), operand="weight")
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type, **kwargs)


class QuantConvGeneralDilated(nn.Module):
  """A ``lax.conv_general_dilated`` that quantizes its operands first (inject into ``nn.Conv``)."""

  config: QuantConfig

  @nn.compact
  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1,
               precision=None, preferred_element_type=None):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if self.config.act is not None:
      # an activation's contraction axis is its feature axis
      lhs = quantize_tensor(lhs, self.config.act, (dn.lhs_spec[1],),
                            _operand_hparams(self, "act", self.config.act), operand="act")
    if self.config.weight is not None:
      # rhs_spec = (out features, in features, spatial...): contract all but the
      # first, in memory order (H, W, I for HWIO), so ridge blocks follow the layout
      rhs = quantize_tensor(rhs, self.config.weight, tuple(sorted(dn.rhs_spec[1:])),
                            _operand_hparams(self, "weight", self.config.weight), operand="weight")
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dn, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)


def QuantDense(features: int, quant: QuantConfig | None = None, **kwargs) -> nn.Dense:  # noqa: N802
  """An ``nn.Dense`` whose kernel (and input) are quantized by ``quant``.

  With ``quant`` ``None`` or disabled this returns the plain ``nn.Dense``.
  """
  if quant is None or not quant.enabled:
    return nn.Dense(features, **kwargs)
  return nn.Dense(features, dot_general_cls=functools.partial(QuantDotGeneral, quant), **kwargs)


def QuantConv(features: int, kernel_size, quant: QuantConfig | None = None, **kwargs) -> nn.Conv:  # noqa: N802
  """An ``nn.Conv`` whose kernel (and input) are quantized by ``quant``.

  With ``quant`` ``None`` or disabled this returns the plain ``nn.Conv``.
  """
  if quant is None or not quant.enabled:
    return nn.Conv(features, kernel_size, **kwargs)
  return nn.Conv(features, kernel_size,
                 conv_general_dilated_cls=functools.partial(QuantConvGeneralDilated, quant), **kwargs)


# ----------------------------------------------------------------------------
# The quantized kernels' mask and setting hyperparameters.
# ----------------------------------------------------------------------------


def path_names(path) -> tuple[str, ...]:
  """A ``jax.tree_util`` key path as a tuple of strings."""
  names = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
    else:
      names.append(str(key))
  return tuple(names)


def quantized_kernel_mask(params: Any, kernels: Mapping[tuple[str, ...], Any] | Sequence) -> Any:
  """A tree of bools over ``params``: True at the quantized kernels' leaves.

  ``kernels`` is the result of :func:`ricci_jax.quantized_kernels` (or any
  collection of paths). Raises if a path is not in ``params``.
  """
  wanted = {tuple(p) for p in kernels}
  seen = set()

  def leaf(path, _):
    names = path_names(path)
    if names in wanted:
      seen.add(names)
      return True
    return False

  mask = jax.tree_util.tree_map_with_path(leaf, params)
  missing = wanted - seen
  if missing:
    raise ValueError(f"quantized kernel path(s) not found in params: {sorted(missing)}")
  return mask


def set_quant_hparams(quant_vars: Any, operand: str | None = None, **values) -> Any:
  """Returns the ``"quant"`` collection with the named hyperparameters replaced.

  Every leaf called ``name`` (for ``operand`` ``"weight"`` or ``"act"`` only,
  if given) becomes ``values[name]``, which may be a traced array, e.g. a
  schedule's output inside the jitted train step. A name that no operand has
  raises, listing the names present.
  """
  if operand not in (None, "weight", "act"):
    raise ValueError(f"operand must be 'weight', 'act' or None, got {operand!r}")
  present: set[str] = set()
  used: set[str] = set()

  def leaf(path, value):
    names = path_names(path)
    if operand is not None and operand not in names[:-1]:
      return value
    present.add(names[-1])
    if names[-1] in values:
      used.add(names[-1])
      return jnp.broadcast_to(jnp.asarray(values[names[-1]], value.dtype), value.shape)
    return value

  out = jax.tree_util.tree_map_with_path(leaf, quant_vars)
  unknown = set(values) - used
  if unknown:
    where = f" of the {operand} operands" if operand else ""
    raise ValueError(
        f"no quantized operand{where} has hyperparameter(s) {sorted(unknown)}; "
        f"present: {sorted(present) or 'none'}")
  return out
