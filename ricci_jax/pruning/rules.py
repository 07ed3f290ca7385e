"""Which weights may be pruned: :class:`PruneRule`, and the ordered layers it reads.

A rule decides per conv / dense *layer* (a ``/``-joined module path such as
``"conv1"`` or ``"stage1_block0_conv1"``; its kernel is the params leaf at
path + ``"/kernel"``), plus any extra params leaves named by a regex.
Resolution, first match wins:

1. ``overrides``: ``(regex, bool)`` pairs matched with ``re.fullmatch``
   against the layer path (True: prunable, False: not), as in
   :class:`ricci_jax.models.QuantRule`;
2. ``layers``: ``"inner"`` (default) prunes every conv / dense layer but the
   first and the last in call order: the stem conv reads raw pixels (which
   can be negative, so AP's sign argument does not hold there, AP notes
   §5.3) and the classifier is small (our default: the paper's intended
   scope is not known, AP notes §8.5 B6); ``"all"`` prunes every layer, as
   the official AP code does (AP notes §8.2, §8.5 B6).

``extra`` adds non-kernel leaves by their ``/``-joined params path: the
official AP code prunes every parameter whose name contains ``weight``,
which in PyTorch includes the BatchNorm scales (AP notes §8.2), i.e.
``PruneRule(layers="all", extra=(r".*/scale",))`` (:data:`OFFICIAL_AP_RULE`).

The layers come in call order from the model: :func:`layer_paths` for a
Linen model (one abstract trace, :func:`ricci_jax.models.inspect.trace`) and
:func:`nnx_layer_paths` for a Flax NNX model
(:func:`ricci_jax.nnx.contraction_layers`). Both import the rest of the
library lazily: :mod:`ricci_jax.quantizers` imports this package (for
:mod:`ricci_jax.pruning.nm`), so it must load without the models.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax

from ricci_jax.pruning.paths import join

__all__ = ["LAYER_SCOPES", "OFFICIAL_AP_RULE", "PruneRule", "layer_paths", "nnx_layer_paths"]

LAYER_SCOPES = ("inner", "all")
"""The allowed values of :attr:`PruneRule.layers`."""


def _check_regex(field: str, pattern: Any) -> None:
  if not isinstance(pattern, str):
    raise ValueError(f"PruneRule.{field}: a pattern must be a string (a regular expression), got {pattern!r}")
  try:
    re.compile(pattern)
  except re.error as e:
    raise ValueError(f"PruneRule.{field}: bad regular expression {pattern!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class PruneRule:
  """Which conv / dense kernels (and extra leaves) of a params tree are prunable.

  Frozen and hashable (overrides and extra are stored as tuples).

  Attributes:
    layers: ``"inner"`` (default: every layer but the first and the last in
      call order) or ``"all"``.
    overrides: ``(pattern, bool)`` pairs, or a mapping, applied first: the
      first pattern that ``re.fullmatch``-es a layer path decides it (True:
      prunable, False: not).
    extra: regexes ``re.fullmatch``-ed against ``/``-joined params leaf
      paths; every leaf one matches is prunable too (e.g. ``r".*/scale"``
      for the BatchNorm scales, as the official AP code).
  """

  layers: str = "inner"
  overrides: Any = ()
  extra: tuple[str, ...] = ()

  def __post_init__(self):
    if self.layers not in LAYER_SCOPES:
      raise ValueError(f"unknown PruneRule.layers {self.layers!r}; allowed: {', '.join(LAYER_SCOPES)}")
    overrides = self.overrides
    if isinstance(overrides, Mapping):
      overrides = tuple(overrides.items())
    try:
      pairs = tuple((p, b) for p, b in overrides)
    except (TypeError, ValueError):
      raise ValueError(
          f"PruneRule.overrides must be a mapping or a sequence of (pattern, bool) pairs, got {self.overrides!r}"
      ) from None
    for pattern, flag in pairs:
      _check_regex("overrides", pattern)
      if not isinstance(flag, bool):
        raise ValueError(
            f"PruneRule.overrides[{pattern!r}] must be True (prunable) or False (not), got {flag!r}")
    if isinstance(self.extra, str):
      raise ValueError(f"PruneRule.extra must be a sequence of regular expressions, got the string {self.extra!r}")
    try:
      extra = tuple(self.extra)
    except TypeError:
      raise ValueError(f"PruneRule.extra must be a sequence of regular expressions, got {self.extra!r}") from None
    for pattern in extra:
      _check_regex("extra", pattern)
    object.__setattr__(self, "overrides", pairs)
    object.__setattr__(self, "extra", extra)

  def selects(self, index: int, path: str, count: int) -> bool:
    """Whether the layer at ``path``, number ``index`` of ``count`` in call order, is prunable."""
    for pattern, flag in self.overrides:
      if re.fullmatch(pattern, path):
        return flag
    return self.layers == "all" or 0 < index < count - 1

  def selected_layers(self, layers: Sequence[str]) -> list[str]:
    """The layer paths among ``layers`` (call order) whose kernels this rule prunes."""
    layers = list(layers)
    return [p for i, p in enumerate(layers) if self.selects(i, p, len(layers))]

  def prunable(self, params: Any, layers: Sequence[str]) -> Any:
    """A tree of Python bools like ``params``: True at each selected kernel and each ``extra`` leaf.

    Args:
      params: a Flax params pytree (nested dicts of arrays).
      layers: the conv / dense layer paths in call order (:func:`layer_paths`).

    Raises:
      ValueError: when a layer path has no ``kernel`` leaf in ``params``, or
        when the rule selects no leaf at all (both list the layer paths).
    """
    if isinstance(layers, str):
      raise ValueError(f"layers must be a sequence of layer paths, got the string {layers!r}")
    layers = list(layers)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    paths = [join(p) for p, _ in flat]
    present = set(paths)
    missing = [p for p in layers if f"{p}/kernel" not in present]
    if missing:
      raise ValueError(
          f"PruneRule: layer path(s) {missing} have no 'kernel' leaf in params; the layers given: {layers}")
    kernels = {f"{p}/kernel" for p in self.selected_layers(layers)}
    flags = [p in kernels or any(re.fullmatch(x, p) for x in self.extra) for p in paths]
    if not any(flags):
      raise ValueError(
          f"PruneRule(layers={self.layers!r}, overrides={list(self.overrides)}, extra={list(self.extra)}) "
          f"selects no params leaf; the layers given: {layers}")
    return jax.tree.unflatten(treedef, flags)

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict; :meth:`from_json` inverts it."""
    return {"layers": self.layers, "overrides": [[p, b] for p, b in self.overrides], "extra": list(self.extra)}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> PruneRule:
    return cls(layers=data["layers"], overrides=tuple((p, b) for p, b in data["overrides"]),
               extra=tuple(data["extra"]))


OFFICIAL_AP_RULE = PruneRule(layers="all", extra=(r".*/scale",))
"""The official AP code's scope: every conv / dense kernel (stem and classifier
included) and every BatchNorm scale (AP notes §8.2 "Masked set", §8.5 B6).
Biases are never pruned there either."""


def layer_paths(model: Any, *args, **kwargs) -> list[str]:
  """The conv / dense layer paths of a Flax Linen model, in call order.

  One abstract trace of ``model.init`` (:func:`ricci_jax.models.inspect.trace`,
  no computation); arguments are ``init``'s after the rng, e.g.
  ``layer_paths(model, jnp.zeros((1, 28, 28, 1)), train=False)``.
  """
  from ricci_jax.models.inspect import trace  # lazily: the models import the quantizers, which import us
  return list(trace(model, *args, **kwargs).layers())


def nnx_layer_paths(model: Any, *example_inputs, **example_kwargs) -> list[str]:
  """The contraction layer paths (``nnx.Linear``, ``nnx.Conv``, ...) of a Flax NNX model, in order.

  In call order when example inputs are given (one abstract trace, the
  model's state untouched), else in definition order; see
  :func:`ricci_jax.nnx.contraction_layers`. For :meth:`PruneRule.prunable`,
  pass the NNX params as nested dicts (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``).
  """
  from ricci_jax.nnx.quantize import contraction_layers  # lazily, as layer_paths
  return list(contraction_layers(model, *example_inputs, **example_kwargs))
