"""Quantizing an existing Flax NNX model in place: :func:`quantize`.

Which layers are quantized is decided by a :class:`ricci_jax.models.QuantRule`,
as for the Linen zoo. The layers a rule can decide are the model's
contractions with a kernel: ``nnx.Linear``, ``nnx.Conv`` and ``nnx.Einsum``
(quantized here; an einsum only when it is simple: two operands, an explicit
output, letters) and ``nnx.LinearGeneral``, ``nnx.ConvTranspose`` (known, not
quantized: a rule that selects one fails). Each such layer gets a role:

* ``first``: the first of them, ``last``: the last of them (one layer alone
  is ``last``, as in the Linen MLP), ``inner``: every other one;
* the order is the order of the forward pass when example inputs are given
  (one abstract trace, ``jax.eval_shape``: no computation, the model's state
  is left as it was), otherwise the order in which the modules were assigned
  in ``__init__`` (definition order, which for a sequential network is the
  same);
* ``downsample`` is a Linen zoo role that a generic NNX model does not mark:
  such layers are ``inner`` here (name them in ``overrides`` to keep them float).

Override patterns are matched (``re.fullmatch``) against a layer's
``/``-joined path in the model (``"conv1"``, ``"blocks/0/conv"``); for a flat
model that is its attribute name, the Linen zoo's layer name.

A selected layer's ``dot_general`` / ``conv_general_dilated`` attribute is
replaced by a quantizing op (:mod:`ricci_jax.nnx.ops`); nothing else of the
model changes, so its ``nnx.Param`` state keeps its paths and shapes and a
float checkpoint loads into the quantized model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ricci_jax.layers import path_names
from ricci_jax.models.inspect import listing
from ricci_jax.models.rules import QuantRule
from ricci_jax.nnx.trace import join, trace
from ricci_jax.nnx.ops import OPERANDS, QuantConv, QuantDot, QuantEinsum, QuantHparam, QuantOp, einsum_contraction_axes
from ricci_jax.quant_config import QuantConfig

INJECTION = {nnx.Linear: ("dot_general", QuantDot), nnx.Conv: ("conv_general_dilated", QuantConv),
             nnx.Einsum: ("einsum_op", QuantEinsum)}
"""The layer types we quantize, with the attribute their op replaces and the op."""

SUPPORTED = tuple(INJECTION)
"""``nnx.Linear``, ``nnx.Conv`` and ``nnx.Einsum`` (a simple one: :func:`ricci_jax.nnx.ops.einsum_contraction_axes`)."""

KNOWN_UNSUPPORTED = (nnx.LinearGeneral, nnx.ConvTranspose)
"""Contractions with a kernel that take part in the roles but cannot be quantized here."""


def supported_names() -> str:
  return ", ".join(f"nnx.{t.__name__}" for t in SUPPORTED)


# ----------------------------------------------------------------------------
# The layers, in order.
# ----------------------------------------------------------------------------


def _children(node: Any) -> Iterator[tuple[Any, Any]]:
  """A node's sub-nodes in assignment order (``vars`` keeps it; NNX's own walk sorts keys)."""
  if isinstance(node, nnx.List):
    yield from enumerate(node)
  elif isinstance(node, (list, tuple)):
    yield from enumerate(node)
  elif isinstance(node, dict):
    yield from node.items()
  elif isinstance(node, nnx.Module) or hasattr(node, "__dict__"):
    for name, value in vars(node).items():
      if not str(name).startswith("_pytree__"):
        yield name, value


def _definition_order(model: nnx.Module) -> list[int]:
  """``id`` of every module reachable from ``model``, depth first, in assignment order."""
  order: list[int] = []
  seen: set[int] = set()

  def visit(node, depth):
    if id(node) in seen or depth > 64:
      return
    seen.add(id(node))
    if isinstance(node, nnx.Module):
      order.append(id(node))
    if isinstance(node, (nnx.Module, nnx.List, list, tuple, dict)) or isinstance(node, nnx.Pytree):
      for _, child in _children(node):
        if isinstance(child, (nnx.Module, nnx.Pytree, list, tuple, dict)):
          visit(child, depth + 1)

  visit(model, 0)
  return order


def contraction_layers(model: nnx.Module, *example_args, **example_kwargs) -> dict[str, nnx.Module]:
  """Every ``nnx.Linear`` / ``nnx.Conv`` (and known unsupported contraction) by ``/``-joined path, in order.

  In call order when example inputs are given, else in definition order
  (see the module docstring). A layer reachable by two paths is listed once.
  """
  if not isinstance(model, nnx.Module):
    raise ValueError(f"expected a Flax NNX module, got {type(model).__name__}")
  found: dict[int, tuple[str, nnx.Module]] = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, SUPPORTED + KNOWN_UNSUPPORTED) and id(module) not in found:
      found[id(module)] = (join(path), module)
  if example_args or example_kwargs:
    called = {p: n for n, p in enumerate(trace(model, *example_args, **example_kwargs))}
    rank = {i: called.get(path, len(called)) for i, (path, _) in found.items()}
  else:
    order = {i: n for n, i in enumerate(_definition_order(model))}
    rank = {i: order.get(i, len(order)) for i in found}
  first_seen = {i: n for n, i in enumerate(found)}
  ids = sorted(found, key=lambda i: (rank[i], first_seen[i]))
  return {found[i][0]: found[i][1] for i in ids}


# ----------------------------------------------------------------------------
# The plan and the quantization.
# ----------------------------------------------------------------------------


def roles(paths: list[str]) -> dict[str, str]:
  """``first`` / ``inner`` / ``last`` for the ordered layer paths (one layer alone: ``last``)."""
  out = {p: "inner" for p in paths}
  if paths:
    out[paths[0]] = "first"
    out[paths[-1]] = "last"
  return out


def installed_op(layer: nnx.Module) -> QuantOp | None:
  """The quantizing op in ``layer``, or ``None`` for a float layer."""
  for layer_type, (attr, _) in INJECTION.items():
    if isinstance(layer, layer_type):
      op = getattr(layer, attr, None)
      return op if isinstance(op, QuantOp) else None
  return None


def is_quantized(model: nnx.Module) -> bool:
  """Whether any layer of ``model`` already computes through a quantizing op."""
  return any(installed_op(m) is not None for _, m in nnx.iter_modules(model))


def plan(model: nnx.Module, rule: QuantRule, *example_args, **example_kwargs) -> dict[str, QuantConfig | None]:
  """What :func:`quantize` would do: every contraction layer's config (``None``: float), by path.

  Raises:
    ValueError: ``rule`` is not a ``QuantRule``; the model has no contraction
      layer; an override pattern matches no layer path; the rule selects no
      layer, or selects a layer type we cannot quantize. Every message lists
      the model's layer paths.
  """
  if not isinstance(rule, QuantRule):
    raise ValueError(f"rule must be a ricci_jax.models.QuantRule, got {rule!r}")
  layers = contraction_layers(model, *example_args, **example_kwargs)
  paths = list(layers)
  if not paths:
    raise ValueError(f"{type(model).__name__} has no layer a rule can quantize ({supported_names()})")
  unused = rule.unused_overrides(paths)
  if unused:
    raise ValueError(f"QuantRule.overrides pattern(s) {unused} match no layer of {type(model).__name__}; "
                     f"its layer paths are {listing(paths, 32)}")
  out = {p: rule.config_for(p, role) for p, role in roles(paths).items()}
  for path, config in out.items():
    if config is not None and not isinstance(layers[path], SUPPORTED):
      raise ValueError(f"the rule selects {path!r}, an nnx.{type(layers[path]).__name__}, which cannot be "
                       f"quantized; supported layer types: {supported_names()} (keep it float with "
                       f"overrides={{{path!r}: None}})")
  if all(c is None for c in out.values()):
    raise ValueError(f"the rule (layers={rule.layers!r}) quantizes no layer of {type(model).__name__}; "
                     f"its layer paths are {listing(paths, 32)} (in order: the first and the last are "
                     "float under layers='inner')")
  return out


def quantize(model: nnx.Module, rule: QuantRule, *example_args, **example_kwargs) -> nnx.Module:
  """Quantizes ``model`` in place by ``rule`` and returns it.

  Every ``nnx.Linear`` / ``nnx.Conv`` the rule selects computes with its
  kernel (and, when ``rule.act`` or its config's ``act`` is set, its input)
  quantized by the ``custom_vjp`` quantizers (:mod:`ricci_jax.nnx.ops`).
  Example inputs, if given, fix the layers' order by one abstract forward
  pass (``model(*example_args, **example_kwargs)``); otherwise definition
  order is used (see the module docstring).

  A selected ``nnx.Conv`` with a ``mask`` is quantized as it is: the mask
  zeroes kernel weights before the op, and a weight that is exactly 0
  quantizes to 0 (a pruned weight, :func:`ricci_jax.layers.quantize_tensor`).

  Raises:
    ValueError: everything :func:`plan` refuses; a model already quantized;
      a selected ``nnx.Einsum`` whose equation is not simple.
  """
  if not isinstance(model, nnx.Module):
    raise ValueError(f"expected a Flax NNX module, got {type(model).__name__}")
  if is_quantized(model):
    raise ValueError(f"{type(model).__name__} is already quantized: quantize the float model (a float "
                     "checkpoint's nnx.Param state loads into a fresh quantized model)")
  decided = plan(model, rule, *example_args, **example_kwargs)
  layers = contraction_layers(model)
  for path, config in decided.items():
    einsum = getattr(layers[path], "einsum_str", None) if isinstance(layers[path], nnx.Einsum) else None
    if config is not None and einsum is not None:
      try:
        einsum_contraction_axes(einsum, None, len(layers[path].kernel.shape))
      except ValueError as e:
        raise ValueError(f"{path!r}: {e} (keep it float with overrides={{{path!r}: None}})") from None
  for path, config in decided.items():
    if config is None:
      continue
    layer = layers[path]
    attr, op = next(v for t, v in INJECTION.items() if isinstance(layer, t))
    setattr(layer, attr, nnx.data(op(config)))
  return model


def quant_plan(model: nnx.Module) -> dict[str, QuantConfig | None]:
  """Every ``nnx.Linear`` / ``nnx.Conv`` of a (quantized) model with its installed config, by path."""
  out = {}
  for path, module in nnx.iter_modules(model):
    if isinstance(module, SUPPORTED):
      op = installed_op(module)
      out[join(path)] = None if op is None else op.config
  return out


def kernel_mask(model: nnx.Module) -> nnx.State:
  """A tree like ``nnx.state(model, nnx.Param)``: True at the quantized kernels.

  The tree is pure (``nnx.as_pure``: a bool where the state has a ``Param``),
  so it is a prefix both of the ``Param`` state and of the plain arrays that
  ``nnx.Optimizer.update`` hands to optax.

  The quantized kernels are those of the layers whose op quantizes the
  weight (what the rule gave :func:`quantize`); pass the tree as ``rf_sgd``'s
  ``quantized=``: those kernels take the Ricci-flow update, the rest SGD.
  """
  wanted = {tuple(p.split("/")) + ("kernel",) for p, c in quant_plan(model).items()
            if c is not None and c.weight is not None}

  def leaf(path, _):
    names = path_names(path)
    if names and names[-1] == "value":
      names = names[:-1]
    return names in wanted

  return nnx.as_pure(jax.tree_util.tree_map_with_path(leaf, nnx.state(model, nnx.Param)))


def set_hparams(model: nnx.Module, operand: str | None = None, **values) -> nnx.Module:
  """Sets the named estimator hyperparameters of every quantized operand, in place.

  ``values`` may be traced (a schedule's output inside ``nnx.jit``, or after
  ``nnx.merge`` inside ``jax.jit``): they are array data, so changing them
  never recompiles (inside ``jax.grad``, merge with ``copy=True`` so the
  variables belong to that trace). ``operand`` limits the change to ``"weight"`` or
  ``"act"``. A name no operand has raises, listing the names present.
  """
  if operand not in (None, *OPERANDS):
    raise ValueError(f"operand must be 'weight', 'act' or None, got {operand!r}")
  present, used = set(), set()
  for _, module in nnx.iter_modules(model):
    if not isinstance(module, QuantOp):
      continue
    for name in (OPERANDS if operand is None else (operand,)):
      variables = getattr(module, name)
      for key, var in ({} if variables is None else variables).items():
        if not isinstance(var, QuantHparam):  # e.g. nnx.capture's bookkeeping attribute
          continue
        present.add(key)
        if key in values:
          used.add(key)
          current = var.get_value()
          var.set_value(jnp.broadcast_to(jnp.asarray(values[key], current.dtype), current.shape))
  unknown = set(values) - used
  if unknown:
    raise ValueError(f"no quantized operand{f' ({operand})' if operand else ''} has hyperparameter(s) "
                     f"{sorted(unknown)}; present: {sorted(present) or 'none'}")
  return model


__all__ = ["KNOWN_UNSUPPORTED", "QuantHparam", "SUPPORTED", "contraction_layers", "is_quantized",
           "kernel_mask", "plan", "quant_plan", "quantize", "roles", "set_hparams"]
