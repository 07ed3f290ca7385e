"""One abstract forward pass of a Flax NNX model, with every module call recorded: :func:`trace`.

The NNX twin of :func:`ricci_jax.models.inspect.trace`: it tells which
modules the forward pass calls, in which order, with which input and output
shapes. NNX has no method interceptor, so the ``__call__`` of every module
class in the model is wrapped for the duration of the trace (and restored
after). The model runs under ``jax.eval_shape`` on a merged copy: nothing is
computed, and the model's own state (batch statistics, rng counters) is left
as it was. Layer order for :func:`ricci_jax.nnx.quantize`, the model summary,
the packed export and serving all read this one trace.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class Call:
  """One module the forward pass called (its first call).

  Attributes:
    path: the module's ``/``-joined path in the model (``""`` for the model itself).
    module: the module (of the traced copy: read its attributes, do not call it).
    inputs: shape and dtype of each positional argument that is an array.
    output: shape and dtype of the output, if it is one array.
  """

  path: str
  module: nnx.Module
  inputs: tuple[jax.ShapeDtypeStruct, ...]
  output: jax.ShapeDtypeStruct | None

  @property
  def output_shape(self) -> tuple[int, ...] | None:
    return None if self.output is None else tuple(self.output.shape)


def join(path) -> str:
  """An NNX path (a tuple of names and indices) as ``"a/0/b"``."""
  return "/".join(str(p) for p in path)


def abstract(value: Any) -> jax.ShapeDtypeStruct | None:
  """``value``'s shape and dtype, or ``None`` when it is not an array."""
  shape, dtype = getattr(value, "shape", None), getattr(value, "dtype", None)
  return None if shape is None or dtype is None else jax.ShapeDtypeStruct(tuple(shape), dtype)


def call_owners(types: set[type]) -> set[type]:
  """Every class in the MROs of ``types`` that defines ``__call__`` (a subclass may call its parent's)."""
  return {c for t in types for c in t.__mro__ if c is not object and "__call__" in c.__dict__}


@contextlib.contextmanager
def recording(types: set[type], on_call) -> Iterator[None]:
  """Calls ``on_call(module, args, run)`` instead of every ``__call__`` of ``types``' instances.

  ``run()`` runs the original call and returns its result. The classes are
  patched for the duration of the ``with`` block only (restored after, even
  on an error); nothing else changes.
  """
  originals = {t: t.__dict__["__call__"] for t in call_owners(types)}

  def wrap(original):
    def call(self, *args, **kwargs):
      return on_call(self, args, lambda: original(self, *args, **kwargs))
    return call

  try:
    for t, original in originals.items():
      t.__call__ = wrap(original)
    yield
  finally:
    for t, original in originals.items():
      t.__call__ = original


def trace(model: nnx.Module, *args, eval_mode: bool = False, **kwargs) -> dict[str, Call]:
  """Every module ``model(*args, **kwargs)`` calls, by path, in the order of their first calls.

  ``args`` are traced (arrays or ``jax.ShapeDtypeStruct``), ``kwargs`` passed
  as they are. ``eval_mode`` runs the copy after ``.eval()`` (running
  BatchNorm statistics, no dropout), the mode a served model runs in. A
  module called before the modules inside it comes before them.
  """
  if not isinstance(model, nnx.Module):
    raise ValueError(f"expected a Flax NNX module, got {type(model).__name__}")
  graphdef, state = nnx.split(model)
  seen: dict[int, dict[str, Any]] = {}
  paths: dict[int, str] = {}

  def on_call(module, call_args, run):
    first = id(module) not in seen
    if first:
      seen[id(module)] = {"module": module, "inputs": tuple(s for s in map(abstract, call_args) if s is not None),
                          "output": None}
    out = run()
    if first:
      seen[id(module)]["output"] = abstract(out)
    return out

  def run(*a):
    copy = nnx.merge(graphdef, state, copy=True)
    if eval_mode:
      copy.eval()
    paths.update({id(m): join(p) for p, m in nnx.iter_modules(copy)})
    return jax.tree.map(jnp.asarray, copy(*a, **kwargs))

  types = {type(m) for _, m in nnx.iter_modules(model)}
  with recording(types, on_call):
    jax.eval_shape(run, *args)
  return {paths[i]: Call(path=paths[i], **entry) for i, entry in seen.items() if i in paths}
