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
training model on the same backend (tested on CPU, on real Fashion-MNIST and
mock CIFAR-10; untested on GPU, where XLA autotunes conv algorithms per
program and might pick different ones for the two).

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
forward of the model (an op-by-op call rounds BatchNorm differently). The NNX
zoo is rebuilt from the file; a user's own class is passed as ``model=``.

**XOR-popcount layers** (``xnor``, on by default on CPU): a conv or dense
layer whose kernel *and* input are both sign-binarized with no scale (1-bit
``uniform`` / ``dorefa`` kernel, 1-bit ``uniform`` input, scale ``none``,
float32) is computed from the packed bits directly: the input's signs packed
along the channels, XOR with the kernel's bits, popcount, ``C - 2 popcount``
per tap, padded taps left out. That is exact: the float product of ±1 values
sums integers below 2^24, which float32 holds exactly in any order. With a
scale it would not be (sums of ±s round), so those layers are unpacked.

A *pruned* binary kernel (latent weights exactly 0, ternary {-1, 0, +1} in
the forward, :func:`ricci_jax.layers.quantize_tensor`) is computed exactly
too, not unpacked: its mask bits (1 = kept) are packed like its signs, a
pruned weight contributes 0, and per tap the output is
``kept - 2 popcount((x XOR w) AND mask)``, ``kept`` being the popcount of
the tap's mask (the XNOR-popcount of sparse binary networks; again a sum of
integers, so equal to the float layer's).

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
import functools
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
from ricci_jax.quant_config import QuantConfig
from ricci_jax.models import QuantRule, inspect
from ricci_jax.nnx import describe

UNPACK_MODES = ("on_the_fly", "once")
"""When kernels are rebuilt from the packed words: in every forward pass, or once."""

XNOR_METHODS = ("uniform", "dorefa")
"""Kernel methods whose 1-bit forward values are +-1 (DoReFa's: the sign of tanh(w)/max|tanh(w)|)."""


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


def rebuild_variables(tensors: Mapping[str, export.PackedTensor],
                      arrays: Mapping[str, Mapping[str, jax.Array]]) -> dict[str, Any]:
  """``{"params": ..., "batch_stats": ...}`` from packed tensors (pure JAX, jit-able)."""
  flat: dict[str, dict[str, jax.Array]] = {c: {} for c in inspect.COLLECTIONS}
  for key, tensor in tensors.items():
    coll, path = key.split("/", 1)
    flat[coll][path] = export.dequantize(tensor, arrays[key])
  return {c: flax.traverse_util.unflatten_dict(v, sep="/") for c, v in flat.items() if v}


@dataclasses.dataclass(frozen=True)
class XnorLayer:
  """A conv or dense layer computed with XOR-popcount.

  Attributes:
    kind: ``"conv"`` or ``"dense"``.
    fan_in: the contraction length per tap (input channels of a conv, inputs of a dense).
    word_bits: bits per word of the packed channels (8, 16 or 32).
    window: a conv's kernel window (kh, kw).
    strides: a conv's strides.
    padding: a conv's ((top, bottom), (left, right)) zero padding.
    bias: whether the layer adds a bias.
  """

  kind: str
  fan_in: int
  word_bits: int
  window: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  padding: tuple[tuple[int, int], ...] = ()
  bias: bool = False


_WORD_DTYPES = {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}


def xnor_word_bits(fan_in: int) -> int:
  """Word size for a fan-in's sign bits: 8, 16 or 32 (larger fan-ins take several 32-bit words)."""
  return 8 if fan_in <= 8 else 16 if fan_in <= 16 else 32


def pack_signs(x: jax.Array, word_bits: int) -> jax.Array:
  """Sign bits (1 for x >= 0, as :func:`ricci_jax.binarize`) of the last axis, packed into words.

  The last axis is zero-padded to a multiple of ``word_bits``; padded bits are
  0 in the kernel's words too, so they never differ.
  """
  dtype = _WORD_DTYPES[word_bits]
  n = x.shape[-1]
  words = -(-n // word_bits)
  bits = (x >= 0).astype(dtype)
  if words * word_bits != n:
    bits = jnp.pad(bits, [(0, 0)] * (x.ndim - 1) + [(0, words * word_bits - n)])
  bits = bits.reshape(*x.shape[:-1], words, word_bits)
  return jnp.sum(bits << jnp.arange(word_bits, dtype=dtype), axis=-1, dtype=dtype)


def _xnor_eligible(config: QuantConfig | None, dtype: np.dtype) -> bool:
  w = None if config is None else config.weight
  a = None if config is None else config.act
  return (w is not None and a is not None and w.bits == 1 and a.bits == 1 and w.method in XNOR_METHODS
          and a.method == "uniform" and w.scale == "none" and a.scale == "none" and dtype == np.float32)


def _explicit_padding(padding: Any, n: int) -> tuple[tuple[int, int], ...] | None:
  if isinstance(padding, str):
    return ((0, 0),) * n if padding.upper() == "VALID" else None
  if isinstance(padding, int):
    return ((padding, padding),) * n
  try:
    pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
  except (TypeError, ValueError):
    return None
  return pairs if len(pairs) == n else None


def _ones(value: Any, n: int) -> bool:
  return value is None or (value == 1 if isinstance(value, int) else tuple(value) == (1,) * n)


def xnor_layers(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, XnorLayer]:
  """The layers of ``model`` that XOR-popcount computes exactly, by path.

  Sign-binarized kernel and input without scales, float32, and a plain
  geometry: a dense layer, or a 2-D conv without groups or dilation with
  explicit (or ``VALID``) padding.
  """
  dtype = inspect.compute_dtype(model)
  found: dict[str, XnorLayer] = {}
  for path, call in inspect.trace(model, inspect.example_input(input_shape), train=False).layers().items():
    mod, x = call.module, call.inputs[0]
    if not (_xnor_eligible(call.config, dtype) and x.dtype == jnp.float32):
      continue
    if isinstance(mod, nn.Dense):
      k = int(x.shape[-1])
      found[path] = XnorLayer("dense", k, xnor_word_bits(k), bias=bool(mod.use_bias))
    else:
      window = tuple(mod.kernel_size) if not isinstance(mod.kernel_size, int) else (mod.kernel_size,)
      padding = _explicit_padding(mod.padding, len(window))
      plain = (len(window) == 2 and len(x.shape) == 4 and mod.feature_group_count == 1
               and all(_ones(d, len(window)) for d in (mod.input_dilation, mod.kernel_dilation)))
      if plain and padding is not None:
        strides = (1, 1) if mod.strides is None else (
            (mod.strides,) * 2 if isinstance(mod.strides, int) else tuple(mod.strides))
        c = int(x.shape[-1])
        found[path] = XnorLayer("conv", c, xnor_word_bits(c), window, strides, padding, bool(mod.use_bias))
  return found


def xnor_kernel_words(tensor: export.PackedTensor, layer: XnorLayer) -> np.ndarray:
  """A packed 1-bit kernel re-laid for XOR-popcount: (out, [kh, kw,] words over the fan-in).

  Bit 1 is +1; a pruned weight's bit is 0 (its mask, :func:`xnor_kernel_mask`, leaves it out).
  """
  values = np.asarray(jax.jit(functools.partial(export.dequantize, tensor))(tensor.arrays), np.float32)
  values = np.moveaxis(np.where(values == 0, -1.0, values), -1, 0)  # (out, ..., fan_in) as +-1
  return np.asarray(pack_signs(jnp.asarray(values), layer.word_bits))


def xnor_kernel_mask(tensor: export.PackedTensor, layer: XnorLayer) -> np.ndarray | None:
  """A pruned 1-bit kernel's mask laid out as :func:`xnor_kernel_words` (bit 1: kept); ``None`` if unpruned."""
  if not tensor.pruned:
    return None
  kept = np.asarray(export.unpack_indices(tensor.arrays["mask"], 1, tensor.size)).reshape(tensor.shape)
  kept = np.moveaxis(kept, -1, 0).astype(np.float32) * 2 - 1  # kept: +1 (bit 1), pruned: -1 (bit 0)
  return np.asarray(pack_signs(jnp.asarray(kept), layer.word_bits))


def _tap(a: jax.Array, words: jax.Array, mask: jax.Array | None, fan_in: int) -> jax.Array:
  """Sum over the fan-in of (input sign) x (kernel value) as int32: kept - 2 popcount(mismatch & mask)."""
  mismatch = a[..., None, :] ^ words
  if mask is None:
    kept = fan_in
  else:
    mismatch = mismatch & mask
    kept = jnp.sum(jax.lax.population_count(mask), axis=-1, dtype=jnp.int32)  # per output
  return kept - 2 * jnp.sum(jax.lax.population_count(mismatch), axis=-1, dtype=jnp.int32)


def xnor_apply(layer: XnorLayer, x: jax.Array, words: jax.Array, bias: jax.Array | None = None,
               mask: jax.Array | None = None) -> jax.Array:
  """The layer's float32 output, computed with XOR-popcount (exactly the float layer's on sign inputs).

  ``mask`` (from :func:`xnor_kernel_mask`) leaves a pruned kernel's zeros out: exact for a ternary kernel.
  """
  a = pack_signs(x, layer.word_bits)
  if layer.kind == "dense":
    y = _tap(a, words, mask, layer.fan_in).astype(jnp.float32)
    return y if bias is None else y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  (pt, pb), (pl, pr) = layer.padding
  (kh, kw), (sh, sw) = layer.window, layer.strides
  b, h, w, _ = x.shape
  oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  padded = jnp.pad(a, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  valid = jnp.pad(jnp.ones((h, w), jnp.int32), ((pt, pb), (pl, pr)))
  out = jnp.zeros((b, oh, ow, words.shape[0]), jnp.int32)
  for i in range(kh):
    for j in range(kw):
      rows = slice(i, i + (oh - 1) * sh + 1, sh)
      cols = slice(j, j + (ow - 1) * sw + 1, sw)
      tap = padded[:, rows, cols, :]  # (b, oh, ow, words)
      dot = _tap(tap, words[:, i, j, :], None if mask is None else mask[:, i, j, :], layer.fan_in)
      out = out + valid[rows, cols][None, :, :, None] * dot  # (b, oh, ow, out)
  y = out.astype(jnp.float32)
  return y if bias is None else y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)


def _lookup(tree: Mapping[str, Any], path: str) -> Any:
  for part in path.split("/"):
    tree = tree[part]
  return tree


def nnx_serving(packed: export.Packed, model: Any, xnor: bool | None) -> tuple[Any, Any, Any]:
  """``(training model, serving model, forward)`` of a packed NNX model (see :class:`Predictor`).

  Raises:
    export.PackedFileError: the file is not of an NNX model, a user's model
      without ``model``, a ``model`` of another class or layers, or whose
      variables do not fit the packed tensors; ``xnor=True``.
  """
  if xnor:
    raise ValueError("XOR-popcount layers are computed for Linen models only; serve an NNX model with xnor=None "
                     "or False")
  if not describe.is_description(packed.model):
    raise export.PackedFileError(f"model= is a Flax NNX module but the packed model is a Linen "
                                 f"{packed.model.get('class')!r}; pass its Linen model or none")
  training = packed.build_model(model)
  want = {f"{c}/{k}": tuple(v.shape) for c, leaves in describe.abstract_variables(training).items()
          for k, v in leaves.items()}
  have = {k: tuple(t.shape) for k, t in packed.tensors.items()}
  if want != have:
    differ = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise export.PackedFileError(f"the packed tensors do not fit the NNX model ({type(training).__name__}): "
                                 f"{inspect.listing([f'{k} {have.get(k)} (model: {want.get(k)})' for k in differ])}")
  serving = describe.serving_model(training)
  return training, serving, describe.apply_fn(serving)


class Predictor:
  """Eval-mode logits of a packed model.

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
    xnor: compute the layers :func:`xnor_layers` finds with XOR-popcount from
      the packed bits (``None``, the default: on the CPU backend, where it is
      faster; see the module docstring). NNX models are served through their
      own forward pass with unpacked kernels: ``xnor=True`` is refused.

  Attributes:
    model: the training model.
    serving: the serving model (:func:`serving_model`).
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
    if describe.is_description(packed.model) or isinstance(model, nnx.Module):
      self.model, self.serving, self._nnx_apply = nnx_serving(packed, model, xnor)
      xnor = False
    else:
      self.model = packed.build_model() if model is None else model
      self.serving = serving_model(self.model, self.input_shape)
    if xnor is None:
      xnor = jax.default_backend() == "cpu"
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
      return self._nnx_apply(variables, x)
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


def device_variables(variables: Mapping[str, Any]) -> dict[str, Any]:
  """``{"params", "batch_stats"}`` of a variables dict or training checkpoint, as device arrays."""
  params, batch_stats = inspect.split_variables(variables)
  out = {"params": params} if batch_stats is None else {"params": params, "batch_stats": batch_stats}
  return jax.tree.map(lambda v: jnp.asarray(np.asarray(v)), out)
