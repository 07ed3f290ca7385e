"""A whole model: :func:`pack` its variables, :func:`unpack` them back."""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from ricci_jax import models
from ricci_jax.export.errors import ExportError
from ricci_jax.export.file_format import load
from ricci_jax.export.tensors import Packed, PackedTensor, dequantize, float_tensor, pack_kernel
from ricci_jax.models import inspect, serialization
from ricci_jax.nnx import describe, zoo
from ricci_jax.nnx.quantize import is_quantized


def pack(params: Any, model: nn.Module, *, batch_stats: Any = None, input_shape: tuple[int, ...] | None = None,
         exact: bool = True) -> Packed:
  """Packs a quantized model's variables: quantized kernels at their real bit width.

  Args:
    params: the params tree, or a variables dict / training checkpoint with
      ``"params"`` and ``"batch_stats"``
      (:func:`ricci_jax.models.inspect.split_variables`). For an NNX model:
      its state (``nnx.state(model)``, or the same as a nested dict), or
      ``None`` for the model's own.
    model: the model whose forward pass the variables serve (a
      ``flax.linen.Module`` of :mod:`ricci_jax.models`), with its
      :class:`~ricci_jax.models.QuantRule`: its kernels are packed as that
      rule quantizes them. A float model packs as its quantized twin with
      ``model.clone(quant=rule)`` (both have the same parameters); the
      training program's model is ``ricci_jax.train.build_model(config,
      num_classes)``. Or a Flax NNX model quantized by
      :func:`ricci_jax.nnx.quantize` (see :func:`pack_nnx`).
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
      without ``input_shape``, a quantized kernel with a NaN or inf latent
      weight, or a kernel that cannot be stored exactly.
  """
  if isinstance(model, nnx.Module):
    return pack_nnx(params, model, input_shape=input_shape, exact=exact)
  if not isinstance(model, nn.Module):
    raise ExportError(
        f"pack(params, model) takes the model (a flax.linen.Module or flax.nnx.Module), got {type(model).__name__}; for the "
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


def pack_nnx(state: Any, model: nnx.Module, *, input_shape: tuple[int, ...] | None = None,
             exact: bool = True) -> Packed:
  """:func:`pack` for a Flax NNX model quantized by :func:`ricci_jax.nnx.quantize`.

  The kernels its quantizing ops quantize in an eval-mode forward pass are
  packed by their configs, in the dtype the op computes them in; every other
  ``nnx.Param`` and ``nnx.BatchStat`` is stored as it is, under ``params/``
  and ``batch_stats/`` as for Linen. The file's description
  (:func:`ricci_jax.nnx.describe.describe_model`) names the class and the
  layers' configs, and for the NNX zoo its constructor's arguments, so
  :class:`ricci_jax.inference.Predictor` rebuilds a zoo model alone and a
  user's model from the model object passed again.

  Raises:
    ExportError: a model that is not quantized (a float model has nothing to
      store at a bit width: quantize it first), a state that does not fit the
      model, a variable type a file does not store, no ``input_shape`` for a
      model outside the NNX zoo, or a kernel that cannot be stored exactly.
  """
  if not is_quantized(model):
    raise ExportError(f"{type(model).__name__} is a float NNX model: quantize it with "
                      "ricci_jax.nnx.quantize(model, rule) first (its packed kernels are the quantized forward's)")
  shape = tuple(int(d) for d in input_shape) if input_shape is not None else zoo.input_shape(model)
  if shape is None:
    raise ExportError(f"{type(model).__name__} is not a model of ricci_jax.nnx.zoo: pass input_shape=(H, W, C)")
  try:
    flat = describe.variables(model, state)
  except describe.StateError as e:
    raise ExportError(str(e)) from None
  kernels = describe.quantized_kernels(model, shape)
  tensors: dict[str, PackedTensor] = {}
  for coll, leaves in flat.items():
    for path, value in leaves.items():
      spec, dtype = kernels.get(path, (None, None)) if coll == "params" else (None, None)
      tensors[f"{coll}/{path}"] = (float_tensor(value) if spec is None else
                                   pack_kernel(value, spec, dtype, name=path, exact=exact))
  return Packed(model=describe.describe_model(model), input_shape=shape, tensors=tensors)


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
