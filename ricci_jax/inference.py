"""Serving a packed model: the training model's eval-mode logits, exactly, from the packed file.

:class:`Predictor` runs the model's own Flax forward pass with one change:
kernels are not quantized again, because they arrive quantized. It rebuilds
them from the packed words inside the jitted forward (``unpack="on_the_fly"``,
the default: only the packed arrays stay in memory) or once when it is built
(``unpack="once"``: float kernels in memory, the float model's speed). Input
activations are quantized exactly as in training (the same
:func:`ricci_jax.layers.quantize_tensor` call in the same injected op).

Because :func:`ricci_jax.export.pack` checks that every rebuilt kernel is bit
for bit the one the training forward computes, and the serving model is the
training model's own code with the weight quantizer switched off, the logits
are *equal* (not close) to ``model.apply(variables, x, train=False)`` of the
training model on the same backend (tested on real Fashion-MNIST and mock
CIFAR-10).

How the weight quantizer is switched off: the serving model is the training
model cloned with a :class:`~ricci_jax.models.QuantRule` whose overrides give
every conv / dense layer (by its name) a config with the training layer's
activation quantizer and no weight quantizer. It therefore needs a model of
:mod:`ricci_jax.models` (layers named uniquely and built through a rule).

Speed, honestly: on CPU a W1A32 layer's matmul is the same float matmul
whether its kernel came from latent weights (sign, in the training model) or
from packed bits; unpacking costs about what quantizing does, so on-the-fly
serving runs at the training model's eval speed, and serving with
``unpack="once"`` at the float model's. The saving is memory: 1/32 of the
kernels' float bytes stay resident. XOR-popcount kernels are not used: in XLA
on CPU they are slower than the float matmul they would replace
(``benchmarks/export_inference.py`` measures both).

Example::

    predictor = rj.inference.Predictor("resnet20_w1.npz")
    logits = predictor(images)                      # float32 [batch, classes]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ricci_jax import export, layers, models
from ricci_jax.config import QuantConfig
from ricci_jax.models import QuantRule

UNPACK_MODES = ("on_the_fly", "once")
"""When kernels are rebuilt from the packed words: in every forward pass, or once."""


def serving_rule(model: nn.Module, input_shape: tuple[int, ...]) -> QuantRule:
  """A rule under which ``model`` quantizes each layer's input as before and no kernel.

  Raises:
    export.ExportError: a model without a ``quant`` rule, or with two layers of
      the same name (the rule matches layers by name).
  """
  if "quant" not in {f.name for f in dataclasses.fields(model)}:
    raise export.ExportError(f"{type(model).__name__} has no 'quant' rule attribute: only models built "
                             "through a QuantRule (ricci_jax.models) can be served from packed kernels")
  plan = models.layer_plan(model, export._example(input_shape), train=False)  # noqa: SLF001
  names = [path.split("/")[-1] for path in plan]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise export.ExportError(f"layer names {repeated} occur more than once; the serving rule matches by name")
  overrides = []
  for path, config in plan.items():
    act = None if config is None else config.act
    overrides.append((re.escape(path.split("/")[-1]), None if act is None else QuantConfig(act=act)))
  return QuantRule(layers="none", overrides=tuple(overrides))


def serving_model(model: nn.Module, input_shape: tuple[int, ...]) -> nn.Module:
  """``model`` with its kernels taken as they come and its activations quantized as in training.

  Checked: the serving model quantizes no kernel, and every layer quantizes its
  input exactly as ``model``'s does.
  """
  serving = model.clone(quant=serving_rule(model, input_shape))
  x = export._example(input_shape)  # noqa: SLF001
  if layers.quantized_kernels(serving, x, train=False):  # pragma: no cover - the rule has no weight
    raise AssertionError("the serving model still quantizes kernels")
  want = {p: (c.act if c else None) for p, c in models.layer_plan(model, x, train=False).items()}
  got = {p: (c.act if c else None) for p, c in models.layer_plan(serving, x, train=False).items()}
  if want != got:  # pragma: no cover - guards the rule's construction
    raise AssertionError(f"the serving model quantizes activations differently: {got} vs {want}")
  return serving


def rebuild_variables(tensors: Mapping[str, export.PackedTensor],
                      arrays: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, Any]:
  """``{"params": ..., "batch_stats": ...}`` from packed tensors (pure JAX, jit-able)."""
  flat: dict[str, dict[str, jax.Array]] = {c: {} for c in export.COLLECTIONS}
  for key, tensor in tensors.items():
    coll, path = key.split("/", 1)
    flat[coll][path] = export.dequantize(tensor, arrays[key])
  return {c: flax.traverse_util.unflatten_dict(v, sep="/") for c, v in flat.items() if v}


class Predictor:
  """Eval-mode logits of a packed model.

  Args:
    packed: a :class:`ricci_jax.export.Packed` or the path of a packed file.
    model: the training model, for a model whose class is not in
      :mod:`ricci_jax.models` (default: rebuilt from the file's description).
    unpack: ``"on_the_fly"`` (default; packed words resident, kernels rebuilt
      in every jitted forward) or ``"once"`` (kernels rebuilt now, float
      kernels resident).

  Attributes:
    model: the training model.
    serving: the serving model (:func:`serving_model`).
    arrays: the device arrays the forward reads (packed, or rebuilt with ``"once"``).
  """

  def __init__(self, packed: export.Packed | Any, *, model: nn.Module | None = None,
               unpack: str = "on_the_fly"):
    if unpack not in UNPACK_MODES:
      raise ValueError(f"unknown unpack mode {unpack!r}; valid: {', '.join(UNPACK_MODES)}")
    if not isinstance(packed, export.Packed):
      packed = export.load(packed)
    self.packed_nbytes = packed.nbytes
    self.input_shape = tuple(packed.input_shape)
    self.model = packed.build_model() if model is None else model
    self.serving = serving_model(self.model, self.input_shape)
    self.unpack = unpack
    # the tensors' static description only: the arrays travel as jit arguments
    self._tensors = {k: dataclasses.replace(t, arrays={}) for k, t in packed.tensors.items()}
    packed_arrays = {k: {n: jnp.asarray(a) for n, a in t.arrays.items()} for k, t in packed.tensors.items()}
    if unpack == "once":
      self.arrays = jax.jit(lambda a: rebuild_variables(self._tensors, a))(packed_arrays)
      self._forward = jax.jit(self._apply)
    else:
      self.arrays = packed_arrays
      self._forward = jax.jit(lambda a, x: self._apply(rebuild_variables(self._tensors, a), x))

  def _apply(self, variables: Mapping[str, Any], x: jax.Array) -> jax.Array:
    return self.serving.apply(variables, x, train=False)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits for a batch ``x`` of preprocessed inputs, exactly as the training model's in eval mode."""
    return self._forward(self.arrays, x)

  @property
  def resident_nbytes(self) -> int:
    """Bytes of the arrays the predictor keeps on the device between calls."""
    return sum(int(a.nbytes) for a in jax.tree.leaves(self.arrays))

  def compiled(self, x: jax.Array) -> Any:
    """The compiled forward for ``x``'s shape (for ``memory_analysis()`` and ``cost_analysis()``)."""
    return self._forward.lower(self.arrays, x).compile()


def predict(packed: export.Packed | Any, x: jax.Array, **kwargs) -> jax.Array:
  """One-shot :class:`Predictor` call (compiles every time: build a Predictor to reuse)."""
  return Predictor(packed, **kwargs)(x)


def training_forward(model: nn.Module) -> Callable[[Mapping[str, Any], jax.Array], jax.Array]:
  """The training model's jitted eval-mode forward, ``f(variables, x)``: the reference of exactness."""
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def device_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """``{"params", "batch_stats"}`` of a variables dict or training checkpoint, as device arrays."""
  params, batch_stats = export.split_variables(variables)
  out = {"params": params} if batch_stats is None else {"params": params, "batch_stats": batch_stats}
  return jax.tree.map(lambda v: jnp.asarray(np.asarray(v)), out)
