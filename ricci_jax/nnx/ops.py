"""The quantizing ops that :func:`ricci_jax.nnx.quantize` injects into NNX layers.

``nnx.Linear`` calls ``self.dot_general(inputs, kernel, dimension_numbers,
...)``, ``nnx.Conv`` calls ``self.conv_general_dilated(inputs, kernel,
...)`` and ``nnx.Einsum`` calls ``self.einsum_op(einsum_str, inputs, kernel,
...)``: all are attributes of the layer instance, the NNX twins of Linen's
``dot_general_cls`` / ``conv_general_dilated_cls``. :class:`QuantDot`,
:class:`QuantConv` and :class:`QuantEinsum` take those places. Each quantizes the kernel (``rhs``)
and, when its config says so, the input (``lhs``) with
:func:`ricci_jax.layers.quantize_tensor` (the same ``custom_vjp`` quantizers
and estimators as the Linen layers), then calls the plain ``lax`` op. So for
a 1-bit weight with the clipped STE the layer computes ``y = x sign(W) + b``
and its kernel gradient is ``dL/dW = (dL/dW_q) * 1[|W| <= clip]``; a pruned
weight (exactly 0) quantizes to 0 and gets no gradient, in the one place
both APIs share (``quantize_tensor``).

The ops hold no parameter, so a quantized model's ``nnx.Param`` state has
the same paths and shapes as its float twin's. Estimator hyperparameters
are :class:`QuantHparam` variables (one per name, under ``weight`` / ``act``),
arrays that a jitted step reads as traced inputs: a schedule that changes
them never recompiles, and ``nnx.split(model, nnx.Param, QuantHparam, ...)``
separates them from the trained parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from ricci_jax.estimators import get_estimator
from ricci_jax.layers import quantize_tensor
from ricci_jax.quant_config import QuantConfig, TensorQuant

OPERANDS = ("weight", "act")
"""The operands of a quantized contraction: the kernel and the layer's input."""


class QuantHparam(nnx.Variable):
  """An estimator hyperparameter of one quantized operand (a float32 array, possibly traced)."""


def operand_hparams(spec: TensorQuant | None) -> nnx.Dict | None:
  """The operand's initial hyperparameters as :class:`QuantHparam` variables (``None``: none).

  The values are those the Linen layers start from: the estimator's
  defaults completed by ``spec.hparams`` (ridge has no estimator).
  """
  if spec is None or spec.method == "ridge":
    return None
  init = get_estimator(spec.estimator).resolve(spec.hparams_dict)
  if not init:
    return None
  return nnx.Dict({name: QuantHparam(value) for name, value in sorted(init.items())})


class QuantOp(nnx.Module):
  """What both ops share: the config and the hyperparameter variables.

  Attributes:
    config: the :class:`ricci_jax.QuantConfig` (static: it is part of the
      graph definition, like a Linen module's attribute).
    weight, act: ``nnx.Dict`` of :class:`QuantHparam` per operand, or ``None``.
  """

  def __init__(self, config: QuantConfig):
    if not isinstance(config, QuantConfig) or not config.enabled:
      raise ValueError(f"a quantizing op needs an enabled QuantConfig, got {config!r}")
    self.config = config
    self.weight = nnx.data(operand_hparams(config.weight))
    self.act = nnx.data(operand_hparams(config.act))

  def hparams(self, operand: str) -> dict[str, jax.Array]:
    """The current values of one operand's hyperparameters."""
    values = getattr(self, operand)
    # only the QuantHparam entries: nnx.capture adds a bookkeeping attribute to every module, nnx.Dict included
    return {} if values is None else {k: v[...] for k, v in values.items() if isinstance(v, QuantHparam)}

  def quantize(self, operand: str, x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """``x`` quantized as ``config.<operand>`` says (unchanged when that is ``None``).

    The kernel (``"weight"``) follows the pruning rule of
    :func:`ricci_jax.layers.quantize_tensor` (a weight that is exactly 0 is
    pruned and quantizes to exactly 0), the input does not, as in the Linen ops.
    """
    spec = getattr(self.config, operand)
    if spec is None:
      return x
    return quantize_tensor(x, spec, axes, self.hparams(operand), operand=operand)


class QuantDot(QuantOp):
  """A ``lax.dot_general`` that quantizes its operands first (``nnx.Linear.dot_general``).

  ``lhs`` is the activation and ``rhs`` the kernel (in_features, out_features),
  as ``nnx.Linear`` calls it; both are quantized along their contraction axes.
  """

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, **kwargs: Any):
    (lhs_contract, rhs_contract), _ = dimension_numbers
    lhs = self.quantize("act", lhs, tuple(lhs_contract))
    rhs = self.quantize("weight", rhs, tuple(rhs_contract))
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


class QuantConv(QuantOp):
  """A ``lax.conv_general_dilated`` that quantizes its operands first (``nnx.Conv.conv_general_dilated``).

  The activation's contraction axis is its feature axis; the kernel's are all
  but its output-feature axis, in memory order (H, W, I for HWIO), so the
  channel scale and ridge blocks follow the layout (as in the Linen op).
  """

  def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
               dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
               **kwargs: Any):
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    lhs = self.quantize("act", lhs, (dn.lhs_spec[1],))
    rhs = self.quantize("weight", rhs, tuple(sorted(dn.rhs_spec[1:])))
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dn, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision, **kwargs)


def einsum_contraction_axes(subscripts: str, lhs_ndim: int | None = None, rhs_ndim: int | None = None
                            ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """The contraction axes of each operand of a simple two-operand einsum, ``(lhs axes, rhs axes)``.

  Simple means what a quantizer needs to know which axes a weight is summed
  over: two operands, an explicit output (``->``), letters only (no
  ``...``), no letter twice in one operand, every output letter from an
  operand. An operand's contraction axes are its letters absent from the
  output (for ``"bd,df->bf"``: ``d``, axis 1 of the input and axis 0 of
  the kernel, as for a dense layer).

  Raises:
    ValueError: an einsum that is not simple, or operands of other ranks
      (checked when the ranks are given).
  """
  spec = subscripts.replace(" ", "")
  inputs, arrow, output = spec.partition("->")
  operands = inputs.split(",")
  problem = None
  if not arrow:
    problem = "no explicit output ('->')"
  elif len(operands) != 2:
    problem = f"{len(operands)} operands"
  elif not all(part.isalpha() for part in (*operands, output) if part):
    problem = "an ellipsis or a character that is not a letter"
  elif any(len(set(part)) != len(part) for part in (*operands, output)):
    problem = "a letter repeated within one operand (a trace or diagonal)"
  elif set(output) - set(operands[0]) - set(operands[1]):
    problem = "an output letter that no operand has"
  if problem:
    raise ValueError(f"einsum {subscripts!r} is not simple enough to quantize ({problem}): a quantized nnx.Einsum "
                     "needs 'lhs,rhs->out' in letters, each at most once per operand")
  lhs, rhs = operands
  if (lhs_ndim is not None and len(lhs) != lhs_ndim) or (rhs_ndim is not None and len(rhs) != rhs_ndim):
    raise ValueError(f"einsum {subscripts!r} names {len(lhs)} and {len(rhs)} axes; the operands have "
                     f"{lhs_ndim} and {rhs_ndim}")
  return (tuple(i for i, c in enumerate(lhs) if c not in output),
          tuple(i for i, c in enumerate(rhs) if c not in output))


class QuantEinsum(QuantOp):
  """A ``jnp.einsum`` that quantizes its operands first (``nnx.Einsum.einsum_op``).

  ``nnx.Einsum`` calls ``self.einsum_op(einsum_str, inputs, kernel, ...)``:
  the input is the first operand and the kernel the second. Each is quantized
  along its contraction axes (:func:`einsum_contraction_axes`), which is
  where the channel scale averages and the ridge blocks run, as for
  :class:`QuantDot`. Only simple einsums (two operands, explicit output,
  letters) are accepted.
  """

  def __call__(self, subscripts, lhs, rhs, precision=None, **kwargs: Any):
    lhs_axes, rhs_axes = einsum_contraction_axes(subscripts, lhs.ndim, rhs.ndim)
    lhs = self.quantize("act", lhs, lhs_axes)
    rhs = self.quantize("weight", rhs, rhs_axes)
    return jnp.einsum(subscripts, lhs, rhs, precision=precision, **kwargs)
