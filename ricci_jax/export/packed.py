"""A whole model: :func:`pack` its variables, :func:`unpack` them back."""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np

from ricci_jax import models
from ricci_jax.export.errors import ExportError
from ricci_jax.export.file_format import load
from ricci_jax.export.tensors import Packed, PackedTensor, dequantize, float_tensor, pack_kernel
from ricci_jax.models import inspect, serialization


def pack(params: Any, model: nn.Module, *, batch_stats: Any = None, input_shape: tuple[int, ...] | None = None,
         exact: bool = True) -> Packed:
  """Packs a quantized model's variables: quantized kernels at their real bit width.

  Args:
    params: the params tree, or a variables dict / training checkpoint with
      ``"params"`` and ``"batch_stats"``
      (:func:`ricci_jax.models.inspect.split_variables`).
    model: the model whose forward pass the variables serve (a
      ``flax.linen.Module`` of :mod:`ricci_jax.models`), with its
      :class:`~ricci_jax.models.QuantRule`: its kernels are packed as that
      rule quantizes them. A float model packs as its quantized twin with
      ``model.clone(quant=rule)`` (both have the same parameters); the
      training program's model is ``ricci_jax.train.build_model(config,
      num_classes)``.
    batch_stats: BatchNorm running statistics, if not in ``params``; required
      when the model has BatchNorm (inference needs them).
    input_shape: one example's shape, for models outside the zoo.
    exact: refuse kernels that cannot be rebuilt bit for bit (ridge); False
      packs them too, marked inexact (see :mod:`ricci_jax.export`).

  Returns:
    A :class:`Packed`; :func:`ricci_jax.export.save` writes it.

  Raises:
    ExportError: not a model, parameters that do not match the model
      (missing, extra or wrongly shaped leaves), a model outside the zoo
      without ``input_shape``, or a kernel that cannot be stored exactly.
  """
  if not isinstance(model, nn.Module):
    raise ExportError(
        f"pack(params, model) takes the model (a flax.linen.Module), got {type(model).__name__}; for the "
        "training program's config, build its model first: ricci_jax.train.build_model(config, num_classes)")
  try:
    shape = models.input_shape_for(model, input_shape)
  except ValueError as e:  # a model outside the zoo
    raise ExportError(str(e)) from None
  try:
    params, batch_stats = inspect.split_variables(params, batch_stats)
    flat = inspect.check_variables(model, shape, params, batch_stats)
    description = serialization.describe_model(model)
  except (inspect.VariablesError, serialization.DescriptionError) as e:
    raise ExportError(str(e)) from None
  trace = inspect.trace(model, inspect.example_input(shape), train=False)
  kernels = {"/".join(p): c for p, c in trace.kernels().items()}
  dtype = inspect.compute_dtype(model)
  tensors: dict[str, PackedTensor] = {}
  for coll in inspect.COLLECTIONS:
    for path, value in flat[coll].items():
      cfg = kernels.get(path) if coll == "params" else None
      if cfg is not None and cfg.weight is not None:
        tensors[f"{coll}/{path}"] = pack_kernel(value, cfg.weight, dtype, name=path, exact=exact)
      else:
        tensors[f"{coll}/{path}"] = float_tensor(value)
  return Packed(model=description, input_shape=shape, tensors=tensors)


def unpack(packed: Packed | str | Any) -> dict[str, Any]:
  """The variables of a packed model (or file), as nested dicts of NumPy arrays.

  The quantized kernels are the values the training forward multiplies with
  (e.g. ±1 times the scale), not the latent float weights, which a packed
  model does not keep. Serve them with :mod:`ricci_jax.inference` (which does
  not quantize them again); the training model would quantize them a second
  time, which is the identity only for sign and Eq. 38 levels without a scale.

  Returns:
    ``{"params": ..., "batch_stats": ...}``.
  """
  if not isinstance(packed, Packed):
    packed = load(packed)
  out: dict[str, dict[str, np.ndarray]] = {c: {} for c in inspect.COLLECTIONS}
  for key, tensor in packed.tensors.items():
    coll, path = key.split("/", 1)
    value = tensor.arrays["value"] if tensor.kind == "float" else np.asarray(
        jax.jit(functools.partial(dequantize, tensor))(tensor.arrays))
    out[coll][path] = value
  return {c: flax.traverse_util.unflatten_dict(v, sep="/") for c, v in out.items()}
