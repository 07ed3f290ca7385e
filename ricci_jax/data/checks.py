"""Argument checks shared by the loader and the device augmentation."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
  """``value`` as a Python int, or a ``ValueError`` naming ``name``.

  Refuses booleans and non-integers (``12.0`` included) and values outside
  ``[low, high]`` (``high=None``: no upper bound), so a bad argument fails
  before any data is read.
  """
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  value = int(value)
  if value < low or (high is not None and value > high):
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be {bound}, got {value}")
  return value
