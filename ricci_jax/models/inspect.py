"""Model introspection: one abstract trace of a Flax Linen model, and what it tells.

:func:`trace` runs ``model.init`` under ``jax.eval_shape`` (no computation,
cheap even for ImageNet models) with every module call intercepted
(``flax.linen.intercept_methods``), and records each module the forward pass
calls: its path, the module, the shapes of its first call's positional
inputs and output, and for a conv / dense layer the :class:`QuantConfig` of
the quantizing op injected into it (:mod:`ricci_jax.layers`). Everything that
asks "which layers does this model have and how are they quantized" reads
that one trace: :func:`quantized_kernels`, :func:`layer_plan`,
:func:`unused_overrides`, the model summary (:mod:`ricci_jax.summary`), the
export (:mod:`ricci_jax.export`) and serving (:mod:`ricci_jax.inference`).

The rest of this module is about a model's variables without computing them:
their abstract shapes (:func:`abstract_variables`), synthetic values
(:func:`random_variables`), and checking a params tree or checkpoint against
the model (:func:`split_variables`, :func:`check_variables`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ricci_jax.quant_config import QuantConfig
from ricci_jax.layers import QuantConvGeneralDilated, QuantDotGeneral

QUANT_OPS = (QuantDotGeneral, QuantConvGeneralDilated)
"""The injected quantizing ops: a conv / dense layer quantizes through one of these."""

LAYER_TYPES = (nn.Conv, nn.Dense)
"""The layers a quantizing op is injected into (their kernel parameter is ``kernel``)."""

COLLECTIONS = ("params", "batch_stats")
"""The variable collections a model's forward pass in eval mode reads (``quant``
holds only estimator hyperparameters, which no forward pass depends on)."""


class VariablesError(ValueError):
  """Variables (params, batch statistics) that do not fit their model."""


# ----------------------------------------------------------------------------
# The trace.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Call:
  """One module the forward pass called (its first call).

  Attributes:
    path: the module's path in the model (``()`` for the model itself).
    module: the bound module.
    inputs: shape and dtype of each positional argument that is an array.
    output_shape: the output's shape, if it is one array.
    config: for a conv / dense layer, the config of its quantizing op
      (``None``: a float layer); ``None`` for any other module.
  """

  path: tuple[str, ...]
  module: nn.Module
  inputs: tuple[jax.ShapeDtypeStruct, ...]
  output_shape: tuple[int, ...] | None
  config: QuantConfig | None = None

  @property
  def name(self) -> str:
    """The ``/``-joined path."""
    return "/".join(self.path)

  @property
  def is_layer(self) -> bool:
    """A conv or dense layer (what a :class:`~ricci_jax.models.QuantRule` decides)."""
    return isinstance(self.module, LAYER_TYPES)


@dataclasses.dataclass(frozen=True)
class Trace:
  """What :func:`trace` recorded.

  Attributes:
    calls: every module called, by ``/``-joined path, in the order of their
      first calls (a layer comes before the ops inside it).
  """

  calls: Mapping[str, Call]

  def layers(self) -> dict[str, Call]:
    """The conv / dense layers, by path, in call order."""
    return {k: c for k, c in self.calls.items() if c.is_layer}

  def plan(self) -> dict[str, QuantConfig | None]:
    """Every conv / dense layer's config (``None``: float), by path, in call order."""
    return {k: c.config for k, c in self.layers().items()}

  def kernels(self) -> dict[tuple[str, ...], QuantConfig]:
    """The path of every quantized kernel in ``params`` (op's parent + ``"kernel"``) with its config."""
    return {c.path[:-1] + ("kernel",): c.module.config for c in self.calls.values()
            if isinstance(c.module, QUANT_OPS) and c.module.config.weight is not None}


def _abstract(value: Any) -> jax.ShapeDtypeStruct | None:
  shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
  return None if shape is None or dtype is None else jax.ShapeDtypeStruct(tuple(shape), dtype)


def trace(model: nn.Module, *args, rngs: Any = None, method: Callable | str | None = None,
          **kwargs) -> Trace:
  """Traces ``model.init(rngs, *args, **kwargs)`` abstractly, recording every module call.

  ``args`` are traced (arrays or ``jax.ShapeDtypeStruct``); ``kwargs`` are
  passed as they are (static), so Python flags such as ``train=False`` stay
  Python values. ``method`` is ``init``'s. Quantizing ops are assumed to be
  injected into a layer whose kernel parameter is called ``kernel`` (as
  ``nn.Dense`` and ``nn.Conv`` do).
  """
  seen: dict[tuple[str, ...], dict[str, Any]] = {}
  op_configs: dict[tuple[str, ...], QuantConfig] = {}

  def record(next_fun, call_args, call_kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*call_args, **call_kwargs)
    mod = context.module
    path = tuple(mod.path)
    first = path not in seen
    if first:
      inputs = tuple(s for s in map(_abstract, call_args) if s is not None)
      seen[path] = {"module": mod, "inputs": inputs, "output_shape": None}
    if isinstance(mod, QUANT_OPS):
      op_configs[path[:-1]] = mod.config
    out = next_fun(*call_args, **call_kwargs)
    if first:
      out_struct = _abstract(out)
      seen[path]["output_shape"] = None if out_struct is None else out_struct.shape
    return out

  if rngs is None:
    rngs = jax.random.key(0)
  init_kwargs = {} if method is None else {"method": method}
  with nn.intercept_methods(record):
    jax.eval_shape(functools.partial(model.init, rngs, **init_kwargs, **kwargs), *args)
  calls = {}
  for path, entry in seen.items():
    config = op_configs.get(path) if isinstance(entry["module"], LAYER_TYPES) else None
    calls["/".join(path)] = Call(path=path, config=config, **entry)
  return Trace(calls)


def quantized_kernels(
    model: nn.Module, *args, rngs: Any = None, method: Callable | str | None = None, **kwargs
) -> dict[tuple[str, ...], QuantConfig]:
  """Maps the path of every quantized kernel in ``params`` to its config.

  Traces ``model.init(rngs, *args, **kwargs)`` abstractly (:func:`trace`, no
  computation) and records each quantizing op that runs. ``args`` are
  traced; ``kwargs`` are passed as they are (static), so Python flags such as
  ``train=False`` stay Python values. Assumes the op is injected into a layer
  whose kernel parameter is called ``kernel`` (as ``nn.Dense`` and ``nn.Conv``
  do).
  """
  return trace(model, *args, rngs=rngs, method=method, **kwargs).kernels()


def layer_plan(model: nn.Module, *args, **kwargs) -> dict[str, QuantConfig | None]:
  """Every conv / dense layer of ``model``, by ``/``-joined path, with its config.

  Traces ``model.init`` abstractly (no computation), so it is cheap even for
  ImageNet models. Arguments are those of ``model.init`` after the rng, e.g.
  ``layer_plan(model, jnp.zeros((1, 32, 32, 3)), train=False)``. A float
  layer maps to ``None``.
  """
  return trace(model, *args, **kwargs).plan()


def unused_overrides(model: nn.Module, *args, **kwargs) -> list[str]:
  """The ``model.quant.overrides`` patterns that decide none of its layers.

  Arguments as for :func:`layer_plan`. Layers are matched by their name in the
  model (the last path component).
  """
  rule = getattr(model, "quant", None)
  if rule is None or not rule.overrides:
    return []
  names = [path.split("/")[-1] for path in layer_plan(model, *args, **kwargs)]
  return rule.unused_overrides(names)


# ----------------------------------------------------------------------------
# A model's attributes and dtype.
# ----------------------------------------------------------------------------


def architecture(model: nn.Module) -> dict[str, Any]:
  """A model's dataclass attributes other than its rule (``quant``), name and parent."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.init and f.name not in ("parent", "name", "quant")}


def compute_dtype(model: nn.Module) -> np.dtype:
  """The dtype a quantized op sees its kernel in: the model's compute ``dtype`` (float32 if unset)."""
  dtype = getattr(model, "dtype", None)
  return np.dtype(jnp.dtype(dtype if dtype is not None else jnp.float32))


# ----------------------------------------------------------------------------
# Variables.
# ----------------------------------------------------------------------------


def example_input(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
  """An abstract batch of one example of ``shape`` (for tracing)."""
  return jax.ShapeDtypeStruct((1, *shape), jnp.float32)


def abstract_variables(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
  """Shapes and dtypes of ``model``'s variables (``jax.eval_shape``, no computation)."""
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), example_input(input_shape))


def random_variables(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
  """Concrete ``params`` and ``batch_stats`` of ``model`` drawn with NumPy (no ``init`` compile).

  He-normal kernels, batch-norm scales and variances uniform in [0.5, 1.5],
  everything else N(0, 0.1): realistic enough for sizes, packing and
  exactness checks, where the values themselves do not matter.
  """
  shapes = abstract_variables(model, input_shape)
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=s.shape)
    else:
      value = rng.normal(size=s.shape) * 0.1
    return np.asarray(value, s.dtype)

  return {k: jax.tree_util.tree_map_with_path(leaf, shapes[k]) for k in COLLECTIONS}


def flatten(tree: Any) -> dict[str, Any]:
  """A nested dict (or FrozenDict, or None) as ``{"a/b/leaf": value}``."""
  if tree is None:
    return {}
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def split_variables(params: Any, batch_stats: Any = None) -> tuple[Any, Any]:
  """``(params, batch_stats)`` from a params tree, a variables dict or a checkpoint.

  ``params`` may be the params tree itself, or a mapping with a ``"params"``
  key (``{"params": ..., "batch_stats": ...}``, or what
  :func:`ricci_jax.train.load_checkpoint` returns; other keys such as
  ``opt_state`` are ignored).

  Raises:
    VariablesError: ``batch_stats`` both in the mapping and given.
  """
  if isinstance(params, Mapping) and "params" in params and isinstance(params["params"], Mapping):
    if batch_stats is not None and "batch_stats" in params:
      raise VariablesError("batch_stats given twice: in the variables dict and as batch_stats=")
    return params["params"], params.get("batch_stats") if batch_stats is None else batch_stats
  return params, batch_stats


def listing(items: list[str], limit: int = 8) -> str:
  """``[a, b, ...]`` with at most ``limit`` items shown and the rest counted."""
  shown = ", ".join(items[:limit])
  return f"[{shown}{f', ... ({len(items) - limit} more)' if len(items) > limit else ''}]"


def check_variables(model: nn.Module, input_shape: tuple[int, ...], params: Any,
                    batch_stats: Any = None, *, require_stats: bool = True) -> dict[str, dict[str, np.ndarray]]:
  """Checks ``params`` (and ``batch_stats``) against the model's; returns them flat, as NumPy.

  Every leaf the model has must be there with its shape, and nothing else.
  Floating leaves are converted to the model's dtype for them (what the
  training model does with them too).

  Raises:
    VariablesError: missing, unexpected or wrongly shaped leaves (all listed),
      a non-float leaf, or missing BatchNorm statistics when ``require_stats``.
  """
  expected = abstract_variables(model, input_shape)
  given = {"params": params, "batch_stats": batch_stats}
  out: dict[str, dict[str, np.ndarray]] = {}
  problems = []
  for coll in COLLECTIONS:
    want = flatten(expected.get(coll))
    if coll == "batch_stats" and given[coll] is None:
      if want and require_stats:
        problems.append(f"the model has BatchNorm statistics ({len(want)} arrays) but none were "
                        "given: pass batch_stats=... or the variables dict / checkpoint")
      out[coll] = {}
      continue
    got = flatten(given[coll])
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = [f"{k} {tuple(np.shape(got[k]))} (expected {tuple(want[k].shape)})"
              for k in sorted(set(want) & set(got)) if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if missing:
      problems.append(f"{coll} missing {listing(missing)}")
    if extra:
      problems.append(f"{coll} not in the model {listing(extra)}")
    if shapes:
      problems.append(f"{coll} with wrong shapes: {listing(shapes)}")
    leaves = {}
    for k in sorted(set(want) & set(got)):
      value = np.asarray(jax.device_get(got[k]))
      if not np.issubdtype(value.dtype, np.floating) and value.dtype != jnp.bfloat16:
        problems.append(f"{coll} {k} has dtype {value.dtype}; parameters are floating point")
        continue
      leaves[k] = np.asarray(value, dtype=want[k].dtype)
    out[coll] = leaves
  if problems:
    raise VariablesError(f"the parameters do not match the model ({type(model).__name__} with its "
                         f"rule): " + "; ".join(problems))
  return out
