"""What every benchmark script shares: saving its result; the references the export benchmark compares with."""

from __future__ import annotations

import io
import json
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from ricci_jax.models import inspect


def save_json(result: Any, path: str | pathlib.Path) -> pathlib.Path:
  """Writes ``result`` as indented JSON to ``path`` (creating its folder) and says so."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=2) + "\n")
  print(f"saved {path}")
  return path


def float32_file_nbytes(variables: Mapping[str, Any]) -> int:
  """Size of the same variables written as float32 arrays in a plain ``.npz`` (for comparisons)."""
  buffer = io.BytesIO()
  flat = {}
  for coll in inspect.COLLECTIONS:
    for k, v in inspect.flatten(variables.get(coll)).items():
      flat[re.sub(r"[^A-Za-z0-9_]", "_", f"{coll}/{k}")] = np.asarray(v, np.float32)
  np.savez(buffer, **flat)
  return len(buffer.getvalue())


def training_forward(model: nn.Module) -> Callable[[Mapping[str, Any], jax.Array], jax.Array]:
  """The training model's jitted eval-mode forward, ``f(variables, x)``: the reference of exactness."""
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))
