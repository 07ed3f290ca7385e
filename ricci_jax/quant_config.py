"""Frozen, hashable descriptions of how a layer is quantized.

A :class:`QuantConfig` says how a layer's two operands are quantized: its
kernel (``weight``) and its input activation (``act``), each a
:class:`TensorQuant` or ``None`` (kept in float). Configs are validated when
they are built, so a typo fails before any work is done, and they are hashable,
so they can be static attributes of Flax modules.

Example::

    w1a32 = QuantConfig(weight=TensorQuant(bits=1, estimator="reste", scale="tensor"))
    w4a4 = QuantConfig(weight=TensorQuant(bits=4), act=TensorQuant(bits=4))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ricci_jax.estimators import get_estimator
from ricci_jax.quantizers import COARSE_ESTIMATORS, SCALE_MODES, STAIRCASE_ALPHA, check_bits

METHODS = ("uniform", "dorefa", "ridge", "staircase")
"""Forward families: ``uniform`` (RF-DNN Eqs. 37-38: sign for one bit, Q_k
otherwise), ``dorefa`` (tanh normalisation first), ``ridge`` (ridge-regression
denoising dequantization) and ``staircase`` (quantized ReLU; activations only)."""


@dataclasses.dataclass(frozen=True)
class TensorQuant:
  """How one operand (a kernel or an activation) is quantized.

  Attributes:
    bits: an integer in [1, 16].
    method: one of :data:`METHODS`.
    estimator: the backward, a name in ``ricci_jax.ESTIMATORS`` (ignored by
      ``ridge``, whose gradient is autodiff through its statistics).
    hparams: the estimator's initial hyperparameters, e.g. ``{"o": 1.0}``. At
      train time they live in the ``"quant"`` variable collection, where a
      schedule overwrites them (:func:`ricci_jax.layers.set_quant_hparams`).
      Stored as a sorted tuple of pairs so the config stays hashable.
    scale: weight scale mode, one of ``"none"``, ``"tensor"``, ``"channel"``.
    ridge_lambda, ridge_block_size, ridge_affine, sparsity: options of the
      ``ridge`` method (see :func:`ricci_jax.quantizers.ridge_dequantize`).
    alpha: the ``staircase`` resolution (default from ``STAIRCASE_ALPHA``).
  """

  bits: int = 1
  method: str = "uniform"
  estimator: str = "clipped_ste"
  hparams: Any = ()
  scale: str = "none"
  ridge_lambda: float = 0.01
  ridge_block_size: int | None = 128
  ridge_affine: bool = True
  sparsity: str | None = None
  alpha: float | None = None

  def __post_init__(self):
    object.__setattr__(self, "bits", check_bits(self.bits))
    if self.method not in METHODS:
      raise ValueError(f"unknown quantization method {self.method!r}; valid methods: {', '.join(METHODS)}")
    est = get_estimator(self.estimator)
    hp = dict(self.hparams) if isinstance(self.hparams, (Mapping, tuple, list)) else None
    if hp is None:
      raise ValueError(f"hparams must be a mapping of name to value, got {self.hparams!r}")
    est.resolve(hp)  # raises on unknown names and invalid values
    object.__setattr__(self, "hparams", tuple(sorted((k, float(v)) for k, v in hp.items())))
    if self.scale not in SCALE_MODES:
      raise ValueError(f"unknown scale mode {self.scale!r}; valid modes: {', '.join(SCALE_MODES)}")
    if self.method == "staircase":
      if self.estimator not in COARSE_ESTIMATORS:
        raise ValueError(
            f"the staircase method takes a coarse STE, one of {list(COARSE_ESTIMATORS)}; "
            f"got {self.estimator!r}")
      if self.alpha is None and self.bits not in STAIRCASE_ALPHA:
        raise ValueError(
            f"staircase has default resolutions only for bits in {sorted(STAIRCASE_ALPHA)}; "
            f"set alpha for bits={self.bits}")
    if self.method == "ridge":
      if not self.ridge_lambda >= 0:
        raise ValueError(f"ridge_lambda must be >= 0, got {self.ridge_lambda}")
      if self.ridge_block_size is not None and self.ridge_block_size <= 0:
        raise ValueError(f"ridge_block_size must be a positive integer or None, got {self.ridge_block_size}")
    elif self.sparsity is not None:
      raise ValueError("sparsity is an option of the 'ridge' method only")

  @property
  def hparams_dict(self) -> dict[str, float]:
    return dict(self.hparams)

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict (the packed file's header and the summary store it); :meth:`from_json` inverts it."""
    out = dataclasses.asdict(self)
    out["hparams"] = [list(p) for p in self.hparams]
    return out

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> TensorQuant:
    """The :class:`TensorQuant` of :meth:`to_json`'s dict (validated as at construction)."""
    return cls(**{**data, "hparams": tuple((k, v) for k, v in data["hparams"])})


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """How a layer's kernel and input activation are quantized (``None``: float)."""

  weight: TensorQuant | None = None
  act: TensorQuant | None = None

  def __post_init__(self):
    for name in ("weight", "act"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, TensorQuant):
        raise ValueError(f"QuantConfig.{name} must be a TensorQuant or None, got {value!r}")
    if self.weight is not None and self.weight.method == "staircase":
      raise ValueError("the staircase (quantized ReLU) method is for activations, not weights")

  @property
  def enabled(self) -> bool:
    return self.weight is not None or self.act is not None

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict; :meth:`from_json` inverts it."""
    return {name: None if (v := getattr(self, name)) is None else v.to_json() for name in ("weight", "act")}

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> QuantConfig:
    return cls(**{name: None if data[name] is None else TensorQuant.from_json(data[name])
                  for name in ("weight", "act")})
