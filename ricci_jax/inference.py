"""Serving a packed model: the training model's jitted eval-mode logits, bit for bit, from the packed file.

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
are *equal* (not close) to the training model's **jitted** eval-mode forward,
``jax.jit(functools.partial(model.apply, train=False))(variables, x)``, on the
same backend (tested on CPU, on real Fashion-MNIST and mock CIFAR-10;
untested on GPU, where XLA autotunes conv algorithms per program and might
pick different ones for the two). That jitted call is the reference because
the Predictor's forward is one jitted program too: an eager
``model.apply(variables, x, train=False)`` runs op by op, and XLA fuses and
rounds a jitted program's float arithmetic (BatchNorm's, for one)
differently, so eager logits can differ from both in the last bits.

How the weight quantizer is switched off: the serving model is the training
model cloned with a :class:`~ricci_jax.models.QuantRule` whose overrides give
every conv / dense layer (by its name) a config with the training layer's
activation quantizer and no weight quantizer. It therefore needs a model of
:mod:`ricci_jax.models` (layers named uniquely and built through a rule).

**Flax NNX models** (packed from a model quantized by
:func:`ricci_jax.nnx.quantize`) are served the same way: a copy of the model
in eval mode whose quantizing ops keep only the input quantizer
(:func:`ricci_jax.nnx.describe.serving_model`), merged inside the jitted
forward with the rebuilt kernels; the logits equal the jitted eval-mode
forward of the model, ``nnx.jit(lambda m, x: m(x))(model, x)`` after
``model.eval()``, bit for bit on the same backend (an op-by-op call rounds
BatchNorm differently). The NNX zoo is rebuilt from the file; a user's own
class is passed as ``model=``.

**What a Predictor accepts.** A model given as ``model=`` must be the packed
one: for Linen the same class, attributes and rule as the file's
description, for NNX the same class and layers (float, or quantized by the
same rule); either way its variables must have the packed tensors' shapes.
Inputs are checked before the jitted call, by shape and dtype only (no device
sync, no change to the values): a batch ``(N, *input_shape)`` of the packed
model's one-example shape (a single example without its batch axis is
refused, not guessed at: ``x[None]`` serves it), of a floating dtype (the
training pipeline feeds float32 from :func:`ricci_jax.data.preprocess`; other
float widths are cast as the layers cast them). Integer or boolean inputs are
refused: raw ``uint8`` pixels would be served as values 0..255, not the
normalised inputs the model was trained on. Values are not checked: a NaN or
inf in the input is the caller's data, served as the jitted training model
would serve it (what a NaN becomes depends on the layers it meets). Every bad
input raises a one-line ``ValueError`` (:class:`~ricci_jax.export.PackedFileError`
for a file or model that does not fit) that says what was expected.

**XOR-popcount layers** (``xnor``, on by default on CPU; :mod:`ricci_jax.xnor`),
in Linen and NNX models alike: a conv or dense layer whose kernel *and* input
are both sign-binarized with no scale (1-bit ``uniform`` / ``dorefa`` kernel,
1-bit ``uniform`` input, scale ``none``, float32) is computed from the packed
bits directly: the input's signs packed along the channels, XOR with the
kernel's bits, popcount, ``C - 2 popcount`` per tap, padded taps left out.
That is exact: the float product of ±1 values sums integers below 2^24, which
float32 holds exactly in any order. With a scale it would not be (sums of ±s
round), so those layers are unpacked.

A *pruned* binary kernel (latent weights exactly 0, ternary {-1, 0, +1} in
the forward, :func:`ricci_jax.layers.quantize_tensor`) is computed exactly
too, not unpacked: its mask bits (1 = kept) are packed like its signs, a
pruned weight contributes 0, and per tap the output is
``kept - 2 popcount((x XOR w) AND mask)``, ``kept`` being the popcount of
the tap's mask (the XNOR-popcount of sparse binary networks; again a sum of
integers, so equal to the float layer's).

A Linen model's layer calls are intercepted with ``nn.intercept_methods``; an
NNX model's ``nnx.Linear`` / ``nnx.Conv`` calls are replaced while its jitted
forward is traced (:mod:`ricci_jax.nnx.xnor`). Either way the other layers run
their own code, and the XOR-popcount layers' kernels are kept as packed words only.

Speed and memory (measured numbers: ``benchmarks/README.md``, from
``benchmarks/export_inference.py``):

* With a weight scale, or a float input, every matmul stays a float matmul,
  whether its kernel came from latent weights (the training model quantizes
  them in every call) or from packed bits: unpacking on the fly costs about
  what quantizing did, and unpacking once runs at the float model's speed. The
  saving is memory and disk: the resident weights are the packed words. XLA
  still materialises the unpacked kernels as temporaries during a call, so the
  *peak* memory is about the float model's.
* W1A1 without a scale: the XOR-popcount layers work on the packed bits and
  keep no float copies of the binarized activations.

Example::

    predictor = rj.inference.Predictor("resnet20_w1.npz")
    logits = predictor(images)                      # float32 [batch, classes]
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ricci_jax import export
from ricci_jax.export.errors import one_line
from ricci_jax.models import QuantRule, inspect, serialization
from ricci_jax.nnx import describe
from ricci_jax.nnx import xnor as nnx_xnor
from ricci_jax.quant_config import QuantConfig
from ricci_jax.xnor import (  # noqa: F401 - all of them: the serving API's XOR-popcount layers, as before
    XNOR_METHODS,
    XnorLayer,
    pack_signs,
    xnor_apply,
    xnor_eligible,
    xnor_kernel_mask,
    xnor_kernel_words,
    xnor_layer,
    xnor_word_bits,
)

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
  plan = inspect.layer_plan(model, inspect.example_input(input_shape), train=False)
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
  x = inspect.example_input(input_shape)
  traced = inspect.trace(serving, x, train=False)
  if traced.kernels():  # pragma: no cover - the rule has no weight
    raise AssertionError("the serving model still quantizes kernels")
  want = {p: (c.act if c else None) for p, c in inspect.layer_plan(model, x, train=False).items()}
  got = {p: (c.act if c else None) for p, c in traced.plan().items()}
  if want != got:  # pragma: no cover - guards the rule's construction
    raise AssertionError(f"the serving model quantizes activations differently: {got} vs {want}")
  return serving


def description_differences(description: Mapping[str, Any], model: nn.Module) -> list[str]:
  """How ``model`` differs from a packed Linen model's description: class, attributes, rule (empty: none)."""
  try:
    mine = json.loads(json.dumps(serialization.describe_model(model)))
  except serialization.DescriptionError as e:
    return [str(e)]
  theirs = json.loads(json.dumps(description))
  if mine["class"] != theirs.get("class"):
    return [f"the packed model is a {theirs.get('class')}, model= is a {mine['class']}"]
  attrs, packed_attrs = mine["attrs"], theirs.get("attrs") or {}
  out = [f"{k}={attrs.get(k)!r} (packed: {packed_attrs.get(k)!r})"
         for k in sorted(set(attrs) | set(packed_attrs)) if attrs.get(k) != packed_attrs.get(k)]
  rule, packed_rule = mine["quant"], theirs.get("quant")
  if rule != packed_rule:
    if rule is None or packed_rule is None:
      out.append(f"quant={'None' if rule is None else 'a QuantRule'} (packed: "
                 f"{'None' if packed_rule is None else 'a QuantRule'})")
    else:
      fields = sorted(k for k in set(rule) | set(packed_rule) if rule.get(k) != packed_rule.get(k))
      out.append(f"another quant rule (differing in {', '.join(fields)})")
  return out


def linen_model(packed: export.Packed, model: Any = None) -> nn.Module:
  """The training model of a packed Linen model: rebuilt from its description, or ``model`` checked against it.

  Raises:
    export.PackedFileError: ``model`` is not a Linen module, or not the
      packed one (another class, other attributes or another rule than the
      file's description); a model that cannot take the packed input shape,
      or whose variables do not have the packed tensors' shapes (a header
      edited by hand, or a user's class whose code changed since packing).
  """
  if model is None:
    model = packed.build_model()
  elif not isinstance(model, nn.Module):
    raise export.PackedFileError(f"model= must be the packed model, a flax.linen.Module "
                                 f"({packed.model.get('class')}), got a {type(model).__name__}")
  elif differ := description_differences(packed.model, model):
    raise export.PackedFileError(f"model= is not the packed model: {'; '.join(differ)}; pass the model it was "
                                 "packed from (or none: a model of ricci_jax.models is rebuilt from the file)")
  shape = tuple(packed.input_shape)
  try:
    abstract = inspect.abstract_variables(model, shape)
  except Exception as e:  # noqa: BLE001 - whatever Flax or JAX raised while tracing, named on one line
    raise export.PackedFileError(f"the model ({type(model).__name__}) cannot take the packed input shape {shape} "
                                 f"({one_line(e)})") from None
  want = {f"{c}/{k}": tuple(v.shape) for c in inspect.COLLECTIONS for k, v in inspect.flatten(abstract.get(c)).items()}
  have = {k: tuple(t.shape) for k, t in packed.tensors.items()}
  if want != have:
    differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise export.PackedFileError(f"the packed tensors do not fit the model ({type(model).__name__}): "
                                 f"{inspect.listing([f'{k} {have.get(k)} (model: {want.get(k)})' for k in differ])}")
  return model


def rebuild_variables(tensors: Mapping[str, export.PackedTensor],
                      arrays: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, Any]:
  """``{"params": ..., "batch_stats": ...}`` from packed tensors (pure JAX, jit-able)."""
  flat: dict[str, dict[str, jax.Array]] = {c: {} for c in inspect.COLLECTIONS}
  for key, tensor in tensors.items():
    coll, path = key.split("/", 1)
    flat[coll][path] = export.dequantize(tensor, arrays[key])
  return {c: flax.traverse_util.unflatten_dict(v, sep="/") for c, v in flat.items() if v}


def xnor_layers(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, XnorLayer]:
  """The layers of ``model`` that XOR-popcount computes exactly, by path.

  Sign-binarized kernel and input without scales, float32, and a plain
  geometry: a dense layer, or a 2-D conv without groups or dilation with
  explicit (or ``VALID``) padding (:func:`ricci_jax.xnor.xnor_layer`; the NNX
  twin is :func:`ricci_jax.nnx.xnor.xnor_layers`).
  """
  dtype = inspect.compute_dtype(model)
  found: dict[str, XnorLayer] = {}
  for path, call in inspect.trace(model, inspect.example_input(input_shape), train=False).layers().items():
    mod, x = call.module, call.inputs[0]
    if not (xnor_eligible(call.config, dtype) and x.dtype == jnp.float32):
      continue
    layer = xnor_layer(mod, tuple(x.shape), dense=isinstance(mod, nn.Dense))
    if layer is not None:
      found[path] = layer
  return found


def _lookup(tree: Mapping[str, Any], path: str) -> Any:
  for part in path.split("/"):
    tree = tree[part]
  return tree


def nnx_serving(packed: export.Packed, model: Any, xnor: bool
                ) -> tuple[nnx.Module, nnx.Module, dict[str, XnorLayer], Any]:
  """``(training model, serving model, XOR-popcount layers, forward)`` of a packed NNX model.

  See :class:`Predictor`. ``xnor``: find the layers computed with
  XOR-popcount (:func:`ricci_jax.nnx.xnor.xnor_layers`; none when false).
  ``forward(variables, words, masks, x)`` is :func:`ricci_jax.nnx.xnor.apply_fn`
  of the serving model: pure, jit-able, the kernels of those layers not in
  ``variables`` but in ``words`` (and ``masks`` for pruned kernels) by path.

  Raises:
    export.PackedFileError: the file is not of an NNX model, a user's model
      without ``model``, a ``model`` that is a Linen module or of another
      class or layers, or whose variables do not fit the packed tensors.
  """
  if not describe.is_description(packed.model):
    raise export.PackedFileError(f"model= is a Flax NNX module but the packed model is a Linen "
                                 f"{packed.model.get('class')!r}; pass its Linen model or none")
  if isinstance(model, nn.Module):
    raise export.PackedFileError(f"model= is a Flax Linen module ({type(model).__name__}) but the packed model is "
                                 f"a Flax NNX {packed.model.get('class')}; pass an instance of that NNX class "
                                 "(or none for the NNX zoo)")
  training = packed.build_model(model)
  want = {f"{c}/{k}": tuple(v.shape) for c, leaves in describe.abstract_variables(training).items()
          for k, v in leaves.items()}
  have = {k: tuple(t.shape) for k, t in packed.tensors.items()}
  if want != have:
    differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise export.PackedFileError(f"the packed tensors do not fit the NNX model ({type(training).__name__}): "
                                 f"{inspect.listing([f'{k} {have.get(k)} (model: {want.get(k)})' for k in differ])}")
  serving = describe.serving_model(training)
  layers = nnx_xnor.xnor_layers(training, tuple(packed.input_shape)) if xnor else {}
  return training, serving, layers, nnx_xnor.apply_fn(serving, layers)


class Predictor:
  """Eval-mode logits of a packed model: the training model's jitted ones, bit for bit (module docstring).

  Args:
    packed: a :class:`ricci_jax.export.Packed` or the path of a packed file.
    model: the training model, for a model whose class is not in
      :mod:`ricci_jax.models` (default: rebuilt from the file's description).
      For a Flax NNX model packed by :func:`ricci_jax.export.pack`: the NNX
      zoo is rebuilt from the file; a user's own NNX model cannot be (an NNX
      module keeps no record of its constructor's arguments), so pass an
      instance of its class built as for training, float or quantized by the
      same rule, any weights: the file supplies them (:func:`ricci_jax.nnx.describe.build_model`).
    unpack: ``"on_the_fly"`` (default; packed words resident, kernels rebuilt
      in every jitted forward) or ``"once"`` (kernels rebuilt now, float
      kernels resident).
    xnor: compute the layers :func:`xnor_layers` (for an NNX model
      :func:`ricci_jax.nnx.xnor.xnor_layers`) finds with XOR-popcount from
      the packed bits (``None``, the default: on the CPU backend, where it is
      faster; ``False``: every layer through its own op on unpacked kernels;
      see the module docstring).

  Raises:
    export.PackedFileError: a file that cannot be read
      (:func:`ricci_jax.export.load`), or a ``model`` that is not the packed
      one (:func:`linen_model`, :func:`nnx_serving`).
    ValueError: an unknown ``unpack`` mode.

  Attributes:
    model: the training model.
    serving: the serving model (:func:`serving_model`; for an NNX model
      :func:`ricci_jax.nnx.describe.serving_model`).
    xnor_layers: the layers computed with XOR-popcount, by path.
    arrays: the device arrays the forward reads: ``"tensors"`` (packed, or
      rebuilt with ``"once"``), ``"xnor"`` (kernel bits of the XOR-popcount
      layers, whose packed kernels are then not kept) and ``"xnor_mask"``
      (the mask bits of those of them that are pruned).
  """

  def __init__(self, packed: export.Packed | Any, *, model: nn.Module | None = None,
               unpack: str = "on_the_fly", xnor: bool | None = None):
    if unpack not in UNPACK_MODES:
      raise ValueError(f"unknown unpack mode {unpack!r}; valid: {', '.join(UNPACK_MODES)}")
    if not isinstance(packed, export.Packed):
      packed = export.load(packed)
    self.packed_nbytes = packed.nbytes
    self.input_shape = tuple(packed.input_shape)
    self.unpack = unpack
    self._nnx_apply = None
    if xnor is None:
      xnor = jax.default_backend() == "cpu"
    if describe.is_description(packed.model) or isinstance(model, nnx.Module):
      self.model, self.serving, self.xnor_layers, self._nnx_apply = nnx_serving(packed, model, xnor)
    else:
      self.model = linen_model(packed, model)
      self.serving = serving_model(self.model, self.input_shape)
      self.xnor_layers = xnor_layers(self.model, self.input_shape) if xnor else {}
    xnor_keys = {f"params/{p}/kernel" for p in self.xnor_layers}
    # the tensors' static description only: the arrays travel as jit arguments
    self._tensors = {k: dataclasses.replace(t, arrays={}) for k, t in packed.tensors.items() if k not in xnor_keys}
    tensors = {k: {n: jnp.asarray(a) for n, a in t.arrays.items()}
               for k, t in packed.tensors.items() if k not in xnor_keys}
    words = {p: jnp.asarray(xnor_kernel_words(packed.tensors[f"params/{p}/kernel"], layer))
             for p, layer in self.xnor_layers.items()}
    masks = {p: jnp.asarray(m) for p, layer in self.xnor_layers.items()
             if (m := xnor_kernel_mask(packed.tensors[f"params/{p}/kernel"], layer)) is not None}
    if unpack == "once":
      tensors = jax.jit(lambda a: rebuild_variables(self._tensors, a))(tensors)
      self._forward = jax.jit(lambda a, x: self._apply(a["tensors"], a["xnor"], a["xnor_mask"], x))
    else:
      self._forward = jax.jit(lambda a, x: self._apply(rebuild_variables(self._tensors, a["tensors"]), a["xnor"],
                                                       a["xnor_mask"], x))
    self.arrays = {"tensors": tensors, "xnor": words, "xnor_mask": masks}

  def _apply(self, variables: Mapping[str, Any], words: Mapping[str, jax.Array],
             masks: Mapping[str, jax.Array], x: jax.Array) -> jax.Array:
    if self._nnx_apply is not None:
      return self._nnx_apply(variables, words, masks, x)
    if not self.xnor_layers:
      return self.serving.apply(variables, x, train=False)

    def intercept(next_fun, args, kwargs, context):
      path = "/".join(context.module.path)
      layer = self.xnor_layers.get(path) if context.method_name == "__call__" else None
      if layer is None or not isinstance(context.module, (nn.Conv, nn.Dense)):
        return next_fun(*args, **kwargs)
      bias = _lookup(variables["params"], path)["bias"] if layer.bias else None
      return xnor_apply(layer, args[0], words[path], bias, masks.get(path))

    with nn.intercept_methods(intercept):
      return self.serving.apply(variables, x, train=False)

  def check_input(self, x: Any) -> Any:
    """``x`` if it is a batch the packed model takes (module docstring), a list made an array; shape and dtype only.

    Raises:
      ValueError: a shape other than ``(N, *input_shape)`` (a single example
        without its batch axis among them), or a dtype that is not floating.
    """
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
      x = np.asarray(x)
    shape = tuple(x.shape)
    if shape[1:] != self.input_shape:
      single = "; a single example needs its batch axis: x[None]" if shape == self.input_shape else ""
      raise ValueError(f"Predictor expects images of shape (N, {', '.join(map(str, self.input_shape))}) (the packed "
                       f"model's input), got {shape}{single}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raw = " (raw pixels? preprocess them as in training: ricci_jax.data.preprocess)" if jnp.issubdtype(
          x.dtype, jnp.integer) else ""
      raise ValueError(f"Predictor expects preprocessed images of a float dtype (float32, as ricci_jax.data.preprocess "
                       f"gives; other float widths are cast by the layers), got {np.dtype(x.dtype).name}{raw}")
    return x

  def __call__(self, x: jax.Array) -> jax.Array:
    """Logits for a batch ``x`` of preprocessed inputs: the training model's jitted eval-mode logits, bit for bit.

    Raises:
      ValueError: ``x`` is not a batch the packed model takes (:meth:`check_input`).
    """
    return self._forward(self.arrays, self.check_input(x))

  @property
  def resident_nbytes(self) -> int:
    """Bytes of the arrays the predictor keeps on the device between calls."""
    return sum(int(a.nbytes) for a in jax.tree.leaves(self.arrays))

  def compiled(self, x: jax.Array) -> Any:
    """The compiled forward for ``x``'s shape (for ``memory_analysis()`` and ``cost_analysis()``).

    ``x`` is an array or a ``jax.ShapeDtypeStruct``, checked as for a call (:meth:`check_input`).
    """
    return self._forward.lower(self.arrays, self.check_input(x)).compile()


def device_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """``{"params", "batch_stats"}`` of a variables dict or training checkpoint, as device arrays."""
  params, batch_stats = inspect.split_variables(variables)
  out = {"params": params} if batch_stats is None else {"params": params, "batch_stats": batch_stats}
  return jax.tree.map(lambda v: jnp.asarray(np.asarray(v)), out)
