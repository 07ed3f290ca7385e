"""An NNX model in the terms the summary, the packed export and serving use.

The Linen path reads a model through :mod:`ricci_jax.models.inspect` (one
abstract trace: each layer's path, its quantizer, its shapes) and
:mod:`ricci_jax.models.serialization` (a JSON description that rebuilds the
model). This module gives the same for a model quantized by
:func:`ricci_jax.nnx.quantize`, so :func:`ricci_jax.summary`,
:func:`ricci_jax.export.pack` and :class:`ricci_jax.inference.Predictor`
share their code between the two paths:

* :func:`variables`: the model's state (or a state given for it) as the
  ``params`` (``nnx.Param``) and ``batch_stats`` (``nnx.BatchStat``)
  collections of flat ``/``-joined paths, checked against the model;
* :func:`layers`: the trace (:func:`ricci_jax.nnx.trace.trace`) with each
  layer's installed config and the dtype its quantized kernel is computed in;
* :func:`describe_model` / :func:`build_model`: the packed file's description.
  An NNX module keeps no record of its constructor's arguments, so only the
  NNX zoo (:mod:`ricci_jax.nnx.zoo`, whose arguments are read back from its
  layers) is rebuilt from a file; a user's own model is named by its class
  and must be passed again (``Predictor(path, model=MyCNN(...))``, any
  weights: the file supplies them);
* :func:`install`: the layers' ops set by a plan of configs, for the model
  rebuilt from a file and for the serving model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax
import jax
import numpy as np
from flax import nnx
from jax import lax

from ricci_jax.layers import path_names
from ricci_jax.models import serialization
from ricci_jax.models.inspect import listing
from ricci_jax.nnx import zoo
from ricci_jax.nnx.ops import QuantHparam, QuantOp
from ricci_jax.nnx.quantize import INJECTION, SUPPORTED, contraction_layers, installed_op, quant_plan
from ricci_jax.nnx.trace import Call, trace
from ricci_jax.quant_config import QuantConfig

FRAMEWORK = "nnx"
"""The ``framework`` field of an NNX model's description (Linen descriptions have none)."""

COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat}
"""The variables a packed file stores, by the collection name of the Linen path."""

NOT_STORED = (QuantHparam, nnx.RngState)
"""Variables an eval-mode forward does not read (estimator hyperparameters act in the backward only)."""

PLAIN_OPS = {nnx.Linear: lax.dot_general, nnx.Conv: lax.conv_general_dilated, nnx.Einsum: jax.numpy.einsum}
"""What a quantizing op computes once nothing is left to quantize."""


class StateError(ValueError):
  """A state that does not fit its NNX model, or a model whose variables cannot be stored."""


def is_description(description: Any) -> bool:
  """Whether a packed file's model description is of an NNX model."""
  return isinstance(description, Mapping) and description.get("framework") == FRAMEWORK


def class_name(model: nnx.Module) -> str:
  return f"{type(model).__module__}.{type(model).__qualname__}"


# ----------------------------------------------------------------------------
# Variables.
# ----------------------------------------------------------------------------


def flat_state(state: Any) -> dict[str, Any]:
  """An ``nnx.State`` or a nested dict (``nnx.to_pure_dict``, a checkpoint) as ``{"a/b/leaf": value}``."""
  if isinstance(state, nnx.State):
    return {"/".join(str(k) for k in path): v.get_value() if isinstance(v, nnx.Variable) else v
            for path, v in nnx.to_flat_state(state)}
  if isinstance(state, Mapping):
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(state)))
    return {"/".join(str(k) for k in path): v for path, v in flat.items()}
  raise StateError(f"a state is an nnx.State or a nested dict of arrays, got {type(state).__name__}")


def model_state(model: nnx.Module) -> dict[str, dict[str, Any]]:
  """The model's own stored variables by collection, flat.

  Raises:
    StateError: a variable type that is neither stored (``nnx.Param``,
      ``nnx.BatchStat``) nor left out (hyperparameters, rng state): its value
      could change the forward pass, and the file would not hold it.
  """
  out: dict[str, dict[str, Any]] = {c: {} for c in COLLECTIONS}
  other = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    key = "/".join(str(k) for k in path)
    coll = next((c for c, t in COLLECTIONS.items() if isinstance(var, t)), None)
    if coll is not None:
      out[coll][key] = var.get_value()
    elif not isinstance(var, NOT_STORED):
      other[key] = type(var).__name__
  if other:
    raise StateError(f"{type(model).__name__} has variables of a type a packed file does not store: "
                     f"{listing([f'{k} ({t})' for k, t in sorted(other.items())])}; stored are nnx.Param and "
                     "nnx.BatchStat (estimator hyperparameters and rng state are left out)")
  return out


def variables(model: nnx.Module, state: Any = None, *, require_stats: bool = True
              ) -> dict[str, dict[str, np.ndarray]]:
  """``{"params": {path: array}, "batch_stats": {...}}`` of ``state`` (``None``: the model's own), checked.

  ``state`` is ``nnx.state(model)`` (or a part with every ``nnx.Param`` and
  ``nnx.BatchStat``), or the same as a nested dict; it is matched to the
  model by path. Its other variables (hyperparameters, rng state) are
  ignored. Values keep the model's dtypes.

  Raises:
    StateError: missing, unexpected or wrongly shaped leaves (all listed),
      a non-float leaf, or missing batch statistics when ``require_stats``.
  """
  own = model_state(model)
  if state is None:
    given = {k: v for c in own.values() for k, v in c.items()}
  else:
    given = flat_state(state)
  known = {"/".join(str(k) for k in p) for p, _ in nnx.to_flat_state(nnx.state(model))}
  problems = []
  extra = sorted(set(given) - known)
  if extra:
    problems.append(f"not in the model {listing(extra)}")
  out: dict[str, dict[str, np.ndarray]] = {}
  for coll, want in own.items():
    missing = sorted(set(want) - set(given))
    if missing and (coll == "params" or require_stats or len(missing) < len(want)):
      problems.append(f"{coll} missing {listing(missing)}")
    leaves = {}
    for key in sorted(set(want) & set(given)):
      value = np.asarray(jax.device_get(given[key]))
      if value.shape != tuple(want[key].shape):
        problems.append(f"{coll} {key} has shape {value.shape}, the model's is {tuple(want[key].shape)}")
      elif not (np.issubdtype(value.dtype, np.floating) or value.dtype == jax.numpy.bfloat16):
        problems.append(f"{coll} {key} has dtype {value.dtype}; variables are floating point")
      else:
        leaves[key] = value.astype(want[key].dtype)
    out[coll] = leaves
  if problems:
    raise StateError(f"the state does not fit the NNX model ({type(model).__name__}): " + "; ".join(problems))
  return out


def abstract_variables(model: nnx.Module) -> dict[str, dict[str, jax.ShapeDtypeStruct]]:
  """Shapes and dtypes of the model's stored variables by collection, flat."""
  return {c: {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in leaves.items()}
          for c, leaves in model_state(model).items()}


# ----------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
  """A module the forward pass calls, as the summary and the export read it.

  Attributes:
    module: the module (of a traced copy).
    output_shape: its output's shape, if one array.
    config: for an ``nnx.Linear`` / ``nnx.Conv``, its installed config (``None``: float).
    kernel_dtype: the dtype its quantizing op computes the kernel in (``None``: no op).
  """

  module: nnx.Module
  output_shape: tuple[int, ...] | None
  config: QuantConfig | None = None
  kernel_dtype: np.dtype | None = None

  @property
  def is_layer(self) -> bool:
    """An ``nnx.Linear`` or ``nnx.Conv`` (what a rule decides)."""
    return isinstance(self.module, SUPPORTED)


def layers(calls: Mapping[str, Call]) -> dict[str, Layer]:
  """Every traced module (:func:`ricci_jax.nnx.trace.trace`, eval mode) by path, in call order."""
  dtypes = {path.rpartition("/")[0]: np.dtype(c.inputs[1].dtype) for path, c in calls.items()
            if isinstance(c.module, QuantOp) and len(c.inputs) > 1}
  out = {}
  for path, call in calls.items():
    op = installed_op(call.module) if isinstance(call.module, SUPPORTED) else None
    out[path] = Layer(call.module, call.output_shape, None if op is None else op.config, dtypes.get(path))
  return out


def quantized_kernels(model: nnx.Module, input_shape: tuple[int, ...]) -> dict[str, tuple[Any, np.dtype]]:
  """``{"path/kernel": (weight quantizer, compute dtype)}`` of every kernel the forward pass quantizes."""
  calls = trace(model, jax.ShapeDtypeStruct((1, *input_shape), np.float32), eval_mode=True)
  return {f"{p}/kernel": (layer.config.weight, layer.kernel_dtype) for p, layer in layers(calls).items()
          if layer.config is not None and layer.config.weight is not None and layer.kernel_dtype is not None}


# ----------------------------------------------------------------------------
# The description, the rebuilt model and the serving model.
# ----------------------------------------------------------------------------


def describe_model(model: nnx.Module) -> dict[str, Any]:
  """A JSON-able description: the class, the zoo constructor's arguments (``None`` outside it), the plan."""
  plan = quant_plan(model)
  return {"framework": FRAMEWORK, "class": class_name(model), "init": zoo.init_args(model),
          "plan": [[p, serialization.quant_config_to_json(c)] for p, c in plan.items()]}


def plan_of(description: Mapping[str, Any]) -> dict[str, QuantConfig | None]:
  return {p: serialization.quant_config_from_json(c) for p, c in description["plan"]}


def install(model: nnx.Module, plan: Mapping[str, QuantConfig | None]) -> nnx.Module:
  """Sets, in place, every planned layer's op: quantizing by its config, or the plain op for ``None``.

  Layers the plan leaves float and that hold no quantizing op are not touched
  (a float layer keeps its own ``dot_general``).
  """
  found = contraction_layers(model)
  for path, config in plan.items():
    layer = found[path]
    attr, op = next(v for t, v in INJECTION.items() if isinstance(layer, t))
    if config is not None and config.enabled:
      setattr(layer, attr, nnx.data(op(config)))
    elif installed_op(layer) is not None:
      setattr(layer, attr, next(f for t, f in PLAIN_OPS.items() if isinstance(layer, t)))
  return model


def build_model(description: Mapping[str, Any], model: nnx.Module | None = None) -> nnx.Module:
  """The training model of a description: a new zoo model, or a copy of ``model``, quantized as packed.

  Raises:
    StateError: a model outside the NNX zoo and no ``model``; a ``model`` of
      another class, with other layers, or quantized otherwise than the file.
  """
  plan = plan_of(description)
  name = description["class"]
  if model is None:
    cls = zoo.ZOO.get(name.rpartition(".")[2]) if name.startswith(zoo.__name__ + ".") else None
    if cls is None or description.get("init") is None:
      raise StateError(
          f"the packed model is a user's NNX model ({name}), which a file cannot rebuild (an NNX module keeps "
          f"no record of its constructor's arguments): pass model=, an instance of {name.rpartition('.')[2]} "
          "built as for training (float or quantized; any weights, the file supplies them)")
    init = dict(description["init"])
    if init.get("dtype") is not None:
      init["dtype"] = jax.numpy.dtype(init["dtype"])
    return install(cls(**init, rngs=nnx.Rngs(0)), plan)
  if not isinstance(model, nnx.Module):
    raise StateError(f"model= must be the packed model's NNX module ({name}), got {type(model).__name__}")
  if class_name(model) != name:
    raise StateError(f"the packed model is a {name}, model= is a {class_name(model)}")
  have = quant_plan(model)
  if set(have) != set(plan):
    raise StateError(f"model= has layers {listing(sorted(have))}, the packed model {listing(sorted(plan))}")
  if any(c is not None for c in have.values()) and have != plan:
    differ = sorted(p for p in plan if have[p] != plan[p])
    raise StateError(f"model= is quantized otherwise than the packed model at {listing(differ)}; pass it "
                     "float or quantized by the same rule")
  return install(nnx.clone(model), plan)


def serving_model(model: nnx.Module) -> nnx.Module:
  """A copy of ``model`` in eval mode that takes its kernels as they come and quantizes inputs as in training."""
  serving = nnx.clone(model)
  plan = {p: None if c is None or c.act is None else QuantConfig(act=c.act) for p, c in quant_plan(model).items()}
  install(serving, plan)
  serving.eval()
  if any(c is not None and c.weight is not None for c in quant_plan(serving).values()):
    raise AssertionError("the serving model still quantizes kernels")  # pragma: no cover
  return serving


def apply_fn(serving: nnx.Module):
  """``f(variables, x)``: the serving model's logits with ``{"params": ..., "batch_stats": ...}`` (nested
  dicts by path, as :func:`ricci_jax.inference.rebuild_variables` gives them); pure, jit-able."""
  graphdef, stored, rest = nnx.split(serving, tuple(COLLECTIONS.values()), ...)

  def leaf_key(path):
    names = path_names(path)
    return "/".join(names[:-1] if names and names[-1] == "value" else names)

  def apply(tree, x):
    flat = {k: v for c in COLLECTIONS if c in tree
            for k, v in flax.traverse_util.flatten_dict(tree[c], sep="/").items()}
    state = jax.tree_util.tree_map_with_path(lambda p, _: flat[leaf_key(p)], stored)
    return nnx.merge(graphdef, state, rest, copy=True)(x)

  return apply

