"""The values every numeric key of the training config accepts (:data:`RANGES`).

:func:`ricci_jax.train.schema.validate` checks them before any work, so a
negative learning rate, a momentum of 1.5 or a string where a number goes is
refused in one line that names the key, the value and the allowed range,
instead of training to a run that means nothing.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import ml_collections


class Range(NamedTuple):
  """The values a numeric config key accepts: a number (an integer if ``integer``) in an interval."""

  low: float
  high: float = math.inf
  low_open: bool = False  # True: low itself is not allowed
  high_open: bool = True  # True: high itself is not allowed (inf: no finite upper bound)
  integer: bool = False
  none: bool = False  # None is allowed (the key's feature is off)

  def describe(self) -> str:
    kind = "an integer" if self.integer else "a number"
    interval = f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
    return f"{kind} in {interval}{' or None' if self.none else ''}"

  def check(self, key: str, value: Any):
    """Raises a ``ValueError`` naming the key, the value and the range, unless ``value`` is in range."""
    if value is None and self.none:
      return
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if number and self.integer and isinstance(value, float):
      number = False
    if not number:
      raise ValueError(f"{key} = {value!r} is not {self.describe()}")
    above = value > self.low if self.low_open else value >= self.low
    below = value < self.high if self.high_open else value <= self.high
    if not (above and below):  # NaN fails both
      raise ValueError(f"{key} = {value!r} is out of range: allowed {self.describe()}")


_POSITIVE_INT, _COUNT = Range(1, integer=True), Range(0, integer=True)
_POSITIVE, _NON_NEGATIVE = Range(0, low_open=True), Range(0)
RANGES: dict[str, Range] = {
    "optimizer.learning_rate": _POSITIVE,  # the peak rate; finite
    "optimizer.momentum": Range(0, 1),
    "optimizer.weight_decay": _NON_NEGATIVE,
    "optimizer.decay_factor": Range(0, 1, low_open=True, high_open=False),
    "optimizer.warmup_epochs": _COUNT,
    "rfdnn.tau_scale": _POSITIVE,
    "rfdnn.alpha": _NON_NEGATIVE,
    "rfdnn.rho": Range(0, none=True),
    "rfdnn.epsilon": Range(0, high_open=False),  # inf: the gate cannot close
    "rfdnn.epsilon_relative": Range(0, low_open=True, none=True),
    "rfdnn.median_window": _POSITIVE_INT,
    "rfdnn.fraction": Range(0, 1, low_open=True, high_open=False),
    "quant.ede_t_min": _POSITIVE,
    "pruning.cycles": _COUNT,
    "pruning.target_sparsity": Range(0, 1, none=True),
    "pruning.rate": Range(0, 1, low_open=True),
    "pruning.ap_share": Range(0, 1),
    "pruning.ap_start_cycle": _POSITIVE_INT,
    "pruning.rewind_step": _COUNT,
    "dnr.every_steps": _COUNT,  # 0: off
    "dataset.train_limit": _COUNT,  # 0: all
    "dataset.test_limit": _COUNT,
    "batch_size": _POSITIVE_INT,
    "epochs": _POSITIVE_INT,
    "seed": _COUNT,
    "eval_every_epochs": _POSITIVE_INT,
    "last_epochs": _POSITIVE_INT,
    "log_every_steps": _POSITIVE_INT,
    "checkpoint_every_steps": _POSITIVE_INT,
    "keep_checkpoints": _POSITIVE_INT,
    "max_consecutive_nonfinite": _POSITIVE_INT,
    "stop_after_steps": _COUNT,  # 0: run to the end
}
"""Every numeric key's valid values, checked by :func:`ricci_jax.train.schema.validate` before any work."""


def check_ranges(config: ml_collections.ConfigDict):
  """Raises for the first key of :data:`RANGES` whose value is out of its range (or not a number)."""
  for key, allowed in RANGES.items():
    section, _, leaf = key.rpartition(".")
    allowed.check(key, (config[section] if section else config)[leaf])
