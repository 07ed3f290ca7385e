"""XOR-popcount serving of a Flax NNX model: its W1A1 layers computed from the packed bits.

The NNX twin of the Linen path in :class:`ricci_jax.inference.Predictor`
(:mod:`ricci_jax.xnor` for what is computed and why it is exact):

* :func:`xnor_layers` finds the eligible ``nnx.Linear`` / ``nnx.Conv`` layers
  in the one abstract eval-mode trace that the NNX summary and export read
  (:func:`ricci_jax.nnx.describe.layers`): the installed config (1-bit
  kernel and input, no scale), the kernel's compute dtype and the input's,
  the window, strides, padding and bias, giving the same
  :class:`ricci_jax.xnor.XnorLayer` descriptions as the Linen path.
* :func:`apply_fn` is the serving model's forward with those layers computed
  by :func:`ricci_jax.xnor.xnor_apply` from the kernel words (and masks of
  pruned kernels) passed in. NNX has no method interceptor, so, as in
  :func:`ricci_jax.nnx.trace.trace`, the layer classes' ``__call__`` is
  replaced while the jitted forward is traced, and restored after: the
  replacement computes only the listed layers of the model merged in that
  trace (by identity) and runs every other call as it was. Nothing in the
  training or serving model changes. Their kernels are merged as abstract
  shapes, so they are neither resident nor computed, and a call that
  escaped the replacement would fail rather than read a wrong kernel.

A layer is computed this way only if its class does not override
``nnx.Linear.__call__`` / ``nnx.Conv.__call__`` (what it computes is then
known) and a conv has no ``mask`` (the packed kernel is the unmasked one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import numpy as np
from flax import nnx

from ricci_jax.layers import path_names
from ricci_jax.nnx import describe
from ricci_jax.nnx.trace import join, recording, trace
from ricci_jax.xnor import XnorLayer, xnor_apply, xnor_eligible, xnor_layer

LAYER_TYPES = (nnx.Linear, nnx.Conv)
"""The NNX layers computed with XOR-popcount, whose ``__call__`` the serving forward replaces."""


def _plain_type(module: nnx.Module) -> type | None:
  """``nnx.Linear`` / ``nnx.Conv`` when ``module`` computes exactly what that class's ``__call__`` does."""
  base = next((t for t in LAYER_TYPES if isinstance(module, t)), None)
  return base if base is not None and type(module).__call__ is base.__call__ else None


def xnor_layers(model: nnx.Module, input_shape: tuple[int, ...]) -> dict[str, XnorLayer]:
  """The layers of ``model`` that XOR-popcount computes exactly, by path, in call order.

  As :func:`ricci_jax.inference.xnor_layers` for a Linen model: a W1A1
  config without scales (:func:`ricci_jax.xnor.xnor_eligible`), a float32
  input, kernel and output, and a plain geometry (:func:`ricci_jax.xnor.xnor_layer`).
  """
  calls = trace(model, jax.ShapeDtypeStruct((1, *input_shape), np.float32), eval_mode=True)
  found: dict[str, XnorLayer] = {}
  for path, layer in describe.layers(calls).items():
    call, base = calls[path], _plain_type(layer.module)
    if base is None or not call.inputs or call.output is None:
      continue
    x = call.inputs[0]
    if not (xnor_eligible(layer.config, layer.kernel_dtype) and x.dtype == np.float32
            and call.output.dtype == np.float32):
      continue
    if base is nnx.Conv and getattr(layer.module, "mask", None) is not None:
      continue
    description = xnor_layer(layer.module, tuple(x.shape), dense=base is nnx.Linear)
    if description is not None:
      found[path] = description
  return found


def apply_fn(serving: nnx.Module, layers: Mapping[str, XnorLayer]
             ) -> Callable[[Mapping[str, Any], Mapping[str, jax.Array], Mapping[str, jax.Array], jax.Array], jax.Array]:
  """``f(variables, words, masks, x)``: the serving model's logits, ``layers`` computed with XOR-popcount.

  ``variables`` is ``{"params": ..., "batch_stats": ...}`` as
  :func:`ricci_jax.nnx.describe.apply_fn` takes it, without the kernels of
  ``layers``; ``words`` and ``masks`` (pruned kernels only) are by layer
  path (:func:`ricci_jax.xnor.xnor_kernel_words`, :func:`ricci_jax.xnor.xnor_kernel_mask`).
  Pure and jit-able; the class patch is active only while it runs.
  """
  graphdef, stored, rest = nnx.split(serving, tuple(describe.COLLECTIONS.values()), ...)
  skipped = {f"{p}/kernel" for p in layers}

  def leaf_key(path):
    names = path_names(path)
    return "/".join(names[:-1] if names and names[-1] == "value" else names)

  def leaf(flat, path, value):
    key = leaf_key(path)
    return jax.ShapeDtypeStruct(np.shape(value), value.dtype) if key in skipped else flat[key]

  def apply(tree, words, masks, x):
    flat = {k: v for c in describe.COLLECTIONS if c in tree
            for k, v in flax.traverse_util.flatten_dict(tree[c], sep="/").items()}
    state = jax.tree_util.tree_map_with_path(lambda p, v: leaf(flat, p, v), stored)
    model = nnx.merge(graphdef, state, rest, copy=True)
    if not layers:
      return model(x)
    by_id = {id(m): join(p) for p, m in nnx.iter_modules(model) if join(p) in layers}

    def on_call(module, args, run):
      path = by_id.get(id(module))
      if path is None or not args:
        return run()
      layer = layers[path]
      bias = module.bias[...] if layer.bias else None
      return xnor_apply(layer, args[0], words[path], bias, masks.get(path))

    with recording(set(LAYER_TYPES), on_call):
      return model(x)

  return apply
