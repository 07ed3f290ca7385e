"""JSON of quantization configs and model descriptions.

:class:`~ricci_jax.quant_config.TensorQuant`, :class:`~ricci_jax.quant_config.QuantConfig`
and :class:`~ricci_jax.models.QuantRule` to and from JSON-able dicts, and a
model of :mod:`ricci_jax.models` as a description (class name, attributes,
rule) from which :func:`model_from_description` rebuilds it. The packed file's
header (:mod:`ricci_jax.export`) and the model summary's JSON use them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ricci_jax.quant_config import QuantConfig, TensorQuant
from ricci_jax.models import MODELS
from ricci_jax.models.inspect import architecture
from ricci_jax.models.rules import QuantRule


class DescriptionError(ValueError):
  """A model that cannot be described, or a description that names no model of the zoo."""


def tensor_quant_to_json(spec: TensorQuant | None) -> dict | None:
  """:meth:`TensorQuant.to_json`, or None for a float tensor."""
  return None if spec is None else spec.to_json()


def tensor_quant_from_json(data: Mapping | None) -> TensorQuant | None:
  return None if data is None else TensorQuant.from_json(data)


def quant_config_to_json(config: QuantConfig | None) -> dict | None:
  return None if config is None else config.to_json()


def quant_config_from_json(data: Mapping | None) -> QuantConfig | None:
  return None if data is None else QuantConfig.from_json(data)


def rule_to_json(rule: QuantRule | None) -> dict | None:
  return None if rule is None else rule.to_json()


def rule_from_json(data: Mapping | None) -> QuantRule | None:
  return None if data is None else QuantRule.from_json(data)


def _attr_to_json(value: Any) -> Any:
  if isinstance(value, (str, bool, int, float)) or value is None:
    return value
  if isinstance(value, (tuple, list)):
    return [_attr_to_json(v) for v in value]
  try:
    return {"dtype": jnp.dtype(value).name}
  except TypeError:
    raise DescriptionError(f"model attribute value {value!r} cannot be stored in a packed file") from None


def _attr_from_json(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_attr_from_json(v) for v in value)
  if isinstance(value, dict) and set(value) == {"dtype"}:
    return jnp.dtype(value["dtype"])
  return value


def describe_model(model: nn.Module) -> dict[str, Any]:
  """A JSON-able description from which :func:`model_from_description` rebuilds ``model``.

  Only models of :mod:`ricci_jax.models` can be rebuilt from it (their class
  is looked up by name there).

  Raises:
    DescriptionError: an attribute whose value JSON cannot hold.
  """
  attrs = {k: _attr_to_json(v) for k, v in architecture(model).items()}
  return {"class": type(model).__name__, "attrs": attrs, "quant": rule_to_json(getattr(model, "quant", None))}


def model_from_description(description: Mapping[str, Any]) -> nn.Module:
  """The model :func:`describe_model` described.

  Raises:
    DescriptionError: a class that is not one of :mod:`ricci_jax.models`.
  """
  classes = {info.cls.__name__: info.cls for info in MODELS.values()}
  name = description.get("class")
  if name not in classes:
    raise DescriptionError(f"the packed model's class {name!r} is not a ricci_jax.models class "
                           f"({', '.join(sorted(classes))}); pass model= to serve it")
  attrs = {k: _attr_from_json(v) for k, v in description["attrs"].items()}
  return classes[name](**attrs, quant=rule_from_json(description["quant"]))
