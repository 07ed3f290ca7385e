"""Which layers of a model are quantized, and how: :class:`QuantRule`.

Every conv and dense layer of a :mod:`ricci_jax.models` network has a stable
name (``conv_init``, ``stage1_block0_conv1``, ``head``, ...) and a *role*:

==============  ==============================================================
``first``       the first layer, the one that reads the raw input (image)
``last``        the classifier (``head``)
``downsample``  a projection shortcut (1x1 conv + BN) of a ResNet
``inner``       every other conv / dense
==============  ==============================================================

A :class:`QuantRule` maps (name, role) to a :class:`ricci_jax.QuantConfig` or
``None`` (float). Resolution, first match wins:

1. ``overrides``: ``(regex, QuantConfig | None)`` pairs matched with
   ``re.fullmatch`` against the layer name (Qwix style);
2. the explicit per-role configs ``first``, ``last``, ``downsample`` when set;
3. ``layers``: ``"inner"`` quantizes the inner layers only (common BNN
   practice: first conv, classifier and ResNet downsample convs stay float;
   ReSTE, Bi-Real Net, XNOR-Net), ``"all"`` every conv and dense (as in the
   MetaQuant tables that RF-DNN reuses, notes A8), ``"none"`` nothing.

A quantized layer quantizes its kernel (``weight``) and its own *input*
(``act``): that is how :class:`ricci_jax.QuantConfig` works. So the first
layer quantizes the raw image only when the rule says so (``layers="all"``
with an ``act``, or an explicit ``first`` / override).

Example::

    w1a1 = QuantRule(
        weight=TensorQuant(bits=1, estimator="reste", scale="tensor"),
        act=TensorQuant(bits=1, estimator="reste"))
    metaquant = QuantRule(layers="all", weight=TensorQuant(bits=1, estimator="dorefa"))
    custom = QuantRule(weight=..., overrides={r"stage3_.*": None})  # keep stage 3 float
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any

from ricci_jax.quant_config import QuantConfig, TensorQuant

LAYER_SETS = ("inner", "all", "none")
"""The allowed values of :attr:`QuantRule.layers`."""

ROLES = ("first", "inner", "last", "downsample")
"""The roles a model's conv / dense layers play (see the module docstring)."""


def _check_optional_config(name: str, value: Any) -> None:
  if value is not None and not isinstance(value, QuantConfig):
    raise ValueError(f"QuantRule.{name} must be a QuantConfig or None, got {value!r}")


@dataclasses.dataclass(frozen=True)
class QuantRule:
  """Which conv / dense layers of a model are quantized, and with what.

  Frozen and hashable, so it can be a static attribute of a Flax module.

  Attributes:
    layers: ``"inner"`` (default: all but the first layer, the classifier and
      the ResNet downsample convs), ``"all"`` or ``"none"``.
    weight: how the selected layers' kernels are quantized (``None``: float).
    act: how the selected layers' *inputs* are quantized (``None``: float).
    first: an explicit config for the first layer (takes precedence over
      ``layers``; ``QuantConfig()`` forces it to float).
    last: likewise for the classifier.
    downsample: likewise for the ResNet downsample (projection) convs.
    overrides: ``(pattern, config)`` pairs, or a mapping, applied before
      everything else: the first pattern that ``re.fullmatch``-es a layer's
      name gives its config (``None`` = float). Stored as a tuple of pairs;
      :meth:`unused_overrides` reports patterns that matched no layer.
  """

  layers: str = "inner"
  weight: TensorQuant | None = None
  act: TensorQuant | None = None
  first: QuantConfig | None = None
  last: QuantConfig | None = None
  downsample: QuantConfig | None = None
  overrides: Any = ()

  def __post_init__(self):
    if self.layers not in LAYER_SETS:
      raise ValueError(f"unknown QuantRule.layers {self.layers!r}; allowed: {', '.join(LAYER_SETS)}")
    # builds (and so validates) the shared config: e.g. a staircase weight raises here
    QuantConfig(weight=self.weight, act=self.act)
    for name in ("first", "last", "downsample"):
      _check_optional_config(name, getattr(self, name))
    overrides = self.overrides
    if isinstance(overrides, Mapping):
      overrides = tuple(overrides.items())
    try:
      pairs = tuple((p, c) for p, c in overrides)
    except (TypeError, ValueError):
      raise ValueError(
          "QuantRule.overrides must be a mapping or a sequence of (pattern, QuantConfig | None) "
          f"pairs, got {self.overrides!r}") from None
    for pattern, config in pairs:
      if not isinstance(pattern, str):
        raise ValueError(f"QuantRule.overrides: a pattern must be a string, got {pattern!r}")
      try:
        re.compile(pattern)
      except re.error as e:
        raise ValueError(f"QuantRule.overrides: bad regular expression {pattern!r}: {e}") from None
      _check_optional_config(f"overrides[{pattern!r}]", config)
    object.__setattr__(self, "overrides", pairs)

  @property
  def base(self) -> QuantConfig:
    """The config of the layers that ``layers`` selects."""
    return QuantConfig(weight=self.weight, act=self.act)

  def _match(self, name: str) -> int | None:
    for i, (pattern, _) in enumerate(self.overrides):
      if re.fullmatch(pattern, name):
        return i
    return None

  def config_for(self, name: str, role: str) -> QuantConfig | None:
    """The config of layer ``name`` playing ``role`` (``None``: float).

    Raises:
      ValueError: for a role not in :data:`ROLES`.
    """
    if role not in ROLES:
      raise ValueError(f"unknown layer role {role!r}; allowed: {', '.join(ROLES)}")
    i = self._match(name)
    if i is not None:
      config = self.overrides[i][1]
    elif role != "inner" and getattr(self, role) is not None:
      config = getattr(self, role)
    elif self.layers == "all" or (self.layers == "inner" and role == "inner"):
      config = self.base
    else:
      config = None
    return config if config is not None and config.enabled else None

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict; :meth:`from_json` inverts it."""
    def js(x):
      return None if x is None else x.to_json()
    return {"layers": self.layers, "weight": js(self.weight), "act": js(self.act),
            **{k: js(getattr(self, k)) for k in ("first", "last", "downsample")},
            "overrides": [[p, js(c)] for p, c in self.overrides]}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> QuantRule:
    tq = lambda d: None if d is None else TensorQuant.from_json(d)  # noqa: E731
    qc = lambda d: None if d is None else QuantConfig.from_json(d)  # noqa: E731
    return cls(layers=data["layers"], weight=tq(data["weight"]), act=tq(data["act"]),
               **{k: qc(data[k]) for k in ("first", "last", "downsample")},
               overrides=tuple((p, qc(c)) for p, c in data["overrides"]))

  def unused_overrides(self, names: Iterable[str]) -> list[str]:
    """The override patterns that decide no layer among ``names``.

    A pattern is unused when it matches no name, or only names that an
    earlier pattern already took (first match wins).
    """
    used = {self._match(n) for n in names}
    return [p for i, (p, _) in enumerate(self.overrides) if i not in used]


def resolve(rule: QuantRule | None, name: str, role: str) -> QuantConfig | None:
  """``rule.config_for(name, role)``, or ``None`` (float) when there is no rule."""
  if rule is None:
    if role not in ROLES:
      raise ValueError(f"unknown layer role {role!r}; allowed: {', '.join(ROLES)}")
    return None
  if not isinstance(rule, QuantRule):
    raise ValueError(f"quant must be a QuantRule or None, got {rule!r}")
  return rule.config_for(name, role)
