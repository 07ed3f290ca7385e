"""Bit-packed export: every quantized kernel stored at its real bit width.

The training model keeps float32 *latent* weights and quantizes them in every
forward pass. What inference needs is only what that forward produces, so
:func:`pack` stores each quantized kernel as the integer level of every entry,
packed into words, plus the few floats that turn levels back into the exact
values the forward used:

=================================  ==========================================
forward (``TensorQuant``)          stored
=================================  ==========================================
``uniform`` / ``dorefa``, 1 bit    one bit per weight (sign, 1 = +1), 8 to a
                                   ``uint8`` (DoReFa's forward is again ±1)
``uniform`` / ``dorefa``, k bits   the level index q in [0, 2^k - 1] of RF-DNN
                                   Eq. 38, value ``2/(2^k-1) q - 1``; 8/k to a
                                   ``uint8`` when k divides 8, else
                                   floor(32/k) to a ``uint32``
``scale="tensor"`` / ``"channel"``  plus mean|W| (one value, or one per output
                                   channel), in the compute dtype
``ridge``, ``ridge_affine=True``   the integer q of every entry (k bits) and,
                                   per block and output channel, the fit's
                                   slope ``Cov(x,q)/(Var(q)+lambda)``, mean q
                                   and mean x (float32)
``ridge``, ``ridge_affine=False``  q + 2^(k-1) - 1/2 (k bits) and the fit's
                                   slope per block and output channel
=================================  ==========================================

**Ridge cannot be packed exactly, so** :func:`pack` **refuses it** unless
asked for ``exact=False``. Its forward computes the fit's coefficients (means
of x and q, their covariance, the variance of q) from the latent weights in
every pass, and XLA rounds those reductions differently depending on what it
fuses them with: the same ``ridge_dequantize`` compiled alone, inside a larger
jit, or run op by op gives kernels that differ in the last bit (measured), so
no stored coefficients can be *the* training forward's bit for bit. With
``exact=False`` the integers q (k bits) and the coefficients are stored (the
tensor is marked inexact in the file) and the served logits match the training
model's up to float rounding. (Every other forward is exact: sign, Eq. 38
levels and DoReFa are rounding-free given max|x|, a max is exact, and the
scales mean|W| are checked bit for bit.) Ridge with ``ridge_affine=False``
*and* N:M ``sparsity`` is refused even then: its pruned entries are 0, which
is off the half-integer grid, so k bits cannot hold them.

Everything else (the first and last layers when they are float, biases,
BatchNorm's scale, bias and running statistics) is stored as it is. Nothing is
approximated: :func:`pack` rebuilds every kernel from what it stored and checks
it is *bit for bit* the kernel the training forward computes
(:func:`ricci_jax.layers.quantize_tensor`), and fails if not, so a model served
from the packed file (:mod:`ricci_jax.inference`) gives exactly the training
model's eval-mode logits.

Which model, and how it is quantized, comes from ``config``, one of

* the training program's ``ml_collections`` config (the model and its
  :class:`~ricci_jax.models.QuantRule` are built as ``ricci_jax.train`` builds
  them; the number of classes is the dataset's);
* a model (``flax.linen.Module`` from :mod:`ricci_jax.models`): its own
  ``model.quant`` rule;
* a :class:`~ricci_jax.models.QuantRule`, together with ``model=``: the
  model with that rule (``model.clone(quant=rule)``; quantized and float models
  have the same parameters, so a float model can be packed as its quantized
  twin).

The file (:func:`save` / :func:`load`) is an uncompressed ``.npz`` with two
members: ``header``, zlib-compressed UTF-8 JSON (format name, version, the
model's class, attributes and rule, and every tensor's kind, shape, dtype,
quantizer and byte range), and ``data``, every array's little-endian bytes
back to back. The header records the data's length and CRC-32 and each array's
offset and length; a file of another version, a truncated or corrupted file,
or packed words with bits set past the last value fail with a clear error.

Example::

    packed = rj.export.pack(train.load_checkpoint(workdir), config)   # params + batch_stats
    print(packed.nbytes, "bytes")
    rj.export.save(packed, "resnet20_w1.npz")
    variables = rj.export.unpack("resnet20_w1.npz")   # the forward's kernels, not the latent weights
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import math
import re
import zipfile
import zlib
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ricci_jax import layers, models, quantizers
from ricci_jax.config import QuantConfig, TensorQuant
from ricci_jax.models import QuantRule

FORMAT = "ricci_jax.packed"
"""The ``format`` field of every packed file's header."""

VERSION = 1
"""The file format version this module writes and reads."""

KINDS = ("float", "levels", "ridge")
"""How a tensor is stored: as it is, as packed level indices (``uniform`` and
``dorefa``), or as packed ridge integers plus per-block fit coefficients."""

COLLECTIONS = ("params", "batch_stats")
"""The variable collections a packed model holds (``quant`` holds only
estimator hyperparameters, which no forward pass depends on)."""


class ExportError(ValueError):
  """A model, config or parameter tree that cannot be packed exactly."""


class PackedFileError(ValueError):
  """A file that is not a complete packed model of this format version."""


# ----------------------------------------------------------------------------
# Which model: from a training config, a model, or a rule plus a model.
# ----------------------------------------------------------------------------


def _is_training_config(config: Any) -> bool:
  return all(hasattr(config, k) for k in ("model", "quant", "dataset")) and not isinstance(
      config, (nn.Module, QuantRule))


def _architecture(model: nn.Module) -> dict[str, Any]:
  """A model's attributes other than its rule, name and parent."""
  return {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
          if f.init and f.name not in ("parent", "name", "quant")}


def resolve_model(config: Any = None, model: nn.Module | None = None) -> nn.Module:
  """The quantized model that ``config`` (and ``model``) describe.

  Args:
    config: the training program's ``ml_collections`` config, a
      :class:`~ricci_jax.models.QuantRule`, a model, or ``None`` (``model``'s
      own rule).
    model: a model; required with a ``QuantRule``. With a training config it
      must be the architecture the config builds (class and attributes; its
      ``norm_axis_name`` and rule may differ: the config's rule is used).

  Returns:
    The Flax module whose forward pass the config trains.

  Raises:
    ExportError: an unsupported ``config`` type, a rule without a model, or a
      model that is not the config's.
  """
  if isinstance(config, nn.Module):
    if model is not None and model is not config:
      raise ExportError("pass the model either as config or as model=, not two different ones")
    return config
  if config is None:
    if not isinstance(model, nn.Module):
      raise ExportError("no config and no model: pass a training config, a model, or a QuantRule "
                        "with model=")
    return model
  if isinstance(config, QuantRule):
    if not isinstance(model, nn.Module):
      raise ExportError("a QuantRule says how layers are quantized but not which layers a model has: "
                        "pass the model too (model=...), or pass the training config")
    if "quant" not in {f.name for f in dataclasses.fields(model)}:
      raise ExportError(f"{type(model).__name__} has no 'quant' attribute to take the QuantRule")
    return model.clone(quant=config)
  if _is_training_config(config):
    from ricci_jax import data, train  # noqa: PLC0415 - the training program's imports are heavy

    expected = train.build_model(config, data.get_spec(config.dataset.name).num_classes)
    expected = expected.clone(norm_axis_name=None) if hasattr(expected, "norm_axis_name") else expected
    if model is None:
      return expected
    if type(model) is not type(expected):
      raise ExportError(
          f"the config builds {type(expected).__name__} (model.name={config.model.name!r}), "
          f"but the model passed is a {type(model).__name__}")
    got, want = _architecture(model), _architecture(expected)
    diff = [f"{k}={got[k]!r} (config: {want[k]!r})" for k in want
            if k != "norm_axis_name" and got.get(k) != want[k]]
    if diff:
      raise ExportError(f"the model is not the one the config builds: {', '.join(diff)}")
    return model.clone(quant=expected.quant)
  raise ExportError(
      f"config must be the training program's ml_collections config, a QuantRule (with model=) or a "
      f"model, got {type(config).__name__}")


def input_shape_for(model: nn.Module, config: Any = None,
                    input_shape: tuple[int, ...] | None = None) -> tuple[int, ...]:
  """One example's input shape: given, the config's dataset's, or the model zoo's for the model's class."""
  if input_shape is not None:
    return tuple(int(d) for d in input_shape)
  if _is_training_config(config):
    from ricci_jax import data  # noqa: PLC0415

    return tuple(data.get_spec(config.dataset.name).image_shape)
  shapes = {info.input_shape for info in models.MODELS.values() if type(model) is info.cls}
  if len(shapes) == 1:
    return shapes.pop()
  raise ExportError(f"{type(model).__name__} is not a model of ricci_jax.models: pass input_shape=(H, W, C)")


def example_input(shape: tuple[int, ...]) -> jax.ShapeDtypeStruct:
  """An abstract batch of one example of ``shape`` (for tracing)."""
  return jax.ShapeDtypeStruct((1, *shape), jnp.float32)


def abstract_variables(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
  """Shapes and dtypes of ``model``'s variables (``jax.eval_shape``, no computation)."""
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), example_input(input_shape))


def random_variables(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
  """Concrete ``params`` and ``batch_stats`` of ``model`` drawn with NumPy (no ``init`` compile).

  He-normal kernels, batch-norm scales and variances uniform in [0.5, 1.5],
  everything else N(0, 0.1): realistic enough for sizes, packing and
  exactness checks, where the values themselves do not matter.
  """
  shapes = abstract_variables(model, input_shape)
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, size=s.shape)
    else:
      value = rng.normal(size=s.shape) * 0.1
    return np.asarray(value, s.dtype)

  return {k: jax.tree_util.tree_map_with_path(leaf, shapes[k]) for k in ("params", "batch_stats")}


def compute_dtype(model: nn.Module) -> np.dtype:
  """The dtype a quantized op sees its kernel in: the model's compute ``dtype`` (float32 if unset)."""
  dtype = getattr(model, "dtype", None)
  return np.dtype(jnp.dtype(dtype if dtype is not None else jnp.float32))


def flatten(tree: Any) -> dict[str, Any]:
  """A nested dict (or FrozenDict, or None) as ``{"a/b/leaf": value}``."""
  if tree is None:
    return {}
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


def split_variables(params: Any, batch_stats: Any = None) -> tuple[Any, Any]:
  """``(params, batch_stats)`` from a params tree, a variables dict or a checkpoint.

  ``params`` may be the params tree itself, or a mapping with a ``"params"``
  key (``{"params": ..., "batch_stats": ...}``, or what
  :func:`ricci_jax.train.load_checkpoint` returns; other keys such as
  ``opt_state`` are ignored).
  """
  if isinstance(params, Mapping) and "params" in params and isinstance(params["params"], Mapping):
    if batch_stats is not None and "batch_stats" in params:
      raise ExportError("batch_stats given twice: in the variables dict and as batch_stats=")
    return params["params"], params.get("batch_stats") if batch_stats is None else batch_stats
  return params, batch_stats


def check_variables(model: nn.Module, input_shape: tuple[int, ...], params: Any,
                    batch_stats: Any = None, *, require_stats: bool = True) -> dict[str, dict[str, np.ndarray]]:
  """Checks ``params`` (and ``batch_stats``) against the model's; returns them flat, as NumPy.

  Every leaf the model has must be there with its shape, and nothing else.
  Floating leaves are converted to the model's dtype for them (what the
  training model does with them too).

  Raises:
    ExportError: missing, unexpected or wrongly shaped leaves (all listed), a
      non-float leaf, or missing BatchNorm statistics when ``require_stats``.
  """
  expected = abstract_variables(model, input_shape)
  given = {"params": params, "batch_stats": batch_stats}
  out: dict[str, dict[str, np.ndarray]] = {}
  problems = []
  for coll in COLLECTIONS:
    want = flatten(expected.get(coll))
    if coll == "batch_stats" and given[coll] is None:
      if want and require_stats:
        problems.append(f"the model has BatchNorm statistics ({len(want)} arrays) but none were "
                        "given: pass batch_stats=... or the variables dict / checkpoint")
      out[coll] = {}
      continue
    got = flatten(given[coll])
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    shapes = [f"{k} {tuple(np.shape(got[k]))} (expected {tuple(want[k].shape)})"
              for k in sorted(set(want) & set(got)) if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if missing:
      problems.append(f"{coll} missing {_listing(missing)}")
    if extra:
      problems.append(f"{coll} not in the model {_listing(extra)}")
    if shapes:
      problems.append(f"{coll} with wrong shapes: {_listing(shapes)}")
    leaves = {}
    for k in sorted(set(want) & set(got)):
      value = np.asarray(jax.device_get(got[k]))
      if not np.issubdtype(value.dtype, np.floating) and value.dtype != jnp.bfloat16:
        problems.append(f"{coll} {k} has dtype {value.dtype}; parameters are floating point")
        continue
      leaves[k] = np.asarray(value, dtype=want[k].dtype)
    out[coll] = leaves
  if problems:
    raise ExportError(f"the parameters do not match the model ({type(model).__name__} with the config's "
                      f"rule): " + "; ".join(problems))
  return out


def _listing(items: list[str], limit: int = 8) -> str:
  shown = ", ".join(items[:limit])
  return f"[{shown}{f', ... ({len(items) - limit} more)' if len(items) > limit else ''}]"


# ----------------------------------------------------------------------------
# Packing integers into words.
# ----------------------------------------------------------------------------


def word_layout(bits: int) -> tuple[np.dtype, int]:
  """``(word dtype, values per word)`` for ``bits``-bit values.

  ``uint8`` with 8/bits values when bits divides 8 (1, 2, 4, 8: no bit
  wasted), else ``uint32`` with floor(32/bits) values (3 bits: 10 to a word, 2
  bits of 32 unused; 5: 6; 6: 5; 7: 4; 9-10: 3; 11-16: 2).
  """
  bits = quantizers.check_bits(bits)
  if 8 % bits == 0:
    return np.dtype(np.uint8), 8 // bits
  return np.dtype(np.uint32), 32 // bits


def num_words(count: int, bits: int) -> int:
  """Words that hold ``count`` values of ``bits`` bits."""
  return -(-int(count) // word_layout(bits)[1])


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
  """Packs non-negative integers < 2^bits, in C order, into words (value j of a word at bit j*bits).

  The last word's unused high bits are 0 (checked on load).
  """
  dtype, per = word_layout(bits)
  flat = np.asarray(indices).reshape(-1).astype(np.uint64)
  if flat.size and int(flat.max()) >= 1 << bits:
    raise ExportError(f"a level index {int(flat.max())} does not fit in {bits} bits")
  n = num_words(flat.size, bits)
  padded = np.zeros(n * per, np.uint64)
  padded[:flat.size] = flat
  shifts = np.arange(per, dtype=np.uint64) * np.uint64(bits)
  return np.bitwise_or.reduce(padded.reshape(n, per) << shifts, axis=1).astype(dtype)


def unpack_indices(words: jax.Array, bits: int, count: int) -> jax.Array:
  """The inverse of :func:`pack_indices` in JAX (jit-able): ``count`` integers in the words' dtype."""
  dtype, per = word_layout(bits)
  words = jnp.asarray(words)
  shifts = jnp.arange(per, dtype=words.dtype) * jnp.asarray(bits, words.dtype)
  values = (words[:, None] >> shifts) & jnp.asarray((1 << bits) - 1, words.dtype)
  return values.reshape(-1)[:count]


# ----------------------------------------------------------------------------
# One tensor: packing, exact reconstruction, sizes.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PackedTensor:
  """One stored tensor.

  Attributes:
    kind: one of :data:`KINDS`.
    shape: the tensor's shape.
    dtype: the dtype of the tensor it rebuilds (the model's compute dtype for
      a quantized kernel, the parameter's own otherwise).
    arrays: ``value`` (float); ``words`` and, with a scale mode, ``scale``
      (levels); ``words``, ``slope``, and for the affine fit ``mean_q`` and
      ``mean_x``, plus ``scale`` (ridge).
    spec: the kernel's quantizer (``None`` for a float tensor).
    exact: whether the rebuilt tensor is bit for bit the training forward's
      (False only for ridge packed with ``exact=False``).
  """

  kind: str
  shape: tuple[int, ...]
  dtype: str
  arrays: Mapping[str, np.ndarray]
  spec: TensorQuant | None = None
  exact: bool = True

  @property
  def bits(self) -> int:
    return self.spec.bits if self.spec is not None else 8 * np.dtype(self.dtype).itemsize

  @property
  def size(self) -> int:
    return int(math.prod(self.shape))

  @property
  def nbytes(self) -> int:
    """Bytes of the stored arrays."""
    return sum(int(a.nbytes) for a in self.arrays.values())


def contraction_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
  """A Flax ``Dense`` / ``Conv`` kernel's contraction axes: all but the last (output) axis."""
  return tuple(range(len(shape) - 1))


def _ridge_blocks(shape: tuple[int, ...], spec: TensorQuant) -> tuple[int, int, int]:
  """``(number of blocks, block size, outputs)`` of a ridge-quantized kernel."""
  k = int(math.prod(shape[:-1]))
  bs = k if spec.ridge_block_size is None else int(spec.ridge_block_size)
  if bs <= 0 or k % bs:
    raise ExportError(f"ridge block_size {spec.ridge_block_size} does not divide the contraction size {k}")
  return k // bs, bs, int(shape[-1])


def packed_nbytes(shape: tuple[int, ...], spec: TensorQuant | None, dtype: Any = np.float32) -> int:
  """Bytes :func:`pack` stores for a kernel of ``shape`` quantized by ``spec`` (``None``: float).

  ``dtype`` is the compute dtype the kernel is quantized in (scales are stored
  in it); the ridge fit's coefficients are float32.
  """
  itemsize = np.dtype(dtype).itemsize
  size = int(math.prod(shape))
  if spec is None:
    return size * itemsize
  word_dtype, _ = word_layout(spec.bits)
  total = num_words(size, spec.bits) * word_dtype.itemsize
  if spec.method == "ridge":
    blocks, _, out = _ridge_blocks(shape, spec)
    total += blocks * out * (3 if spec.ridge_affine else 1) * 4
  if spec.scale == "tensor":
    total += itemsize
  elif spec.scale == "channel":
    total += int(shape[-1]) * itemsize
  return total


def _level_values(indices: jax.Array, bits: int) -> jax.Array:
  """Eq. 38 levels from indices, with the training forward's own float32 arithmetic."""
  if bits == 1:
    return jnp.where(indices != 0, 1.0, -1.0).astype(jnp.float32)  # sign: +1 / -1
  n = 2.0**bits - 1.0
  return 2.0 / n * indices.astype(jnp.float32) - 1.0


def dequantize(tensor: PackedTensor, arrays: Mapping[str, jax.Array] | None = None) -> jax.Array:
  """The tensor :func:`pack` stored, rebuilt bit for bit (pure JAX, jit-able).

  Args:
    tensor: the packed tensor (its kind, shape, dtype and spec are static).
    arrays: its arrays, e.g. device arrays or tracers inside ``jit``
      (default: ``tensor.arrays``).
  """
  arrays = tensor.arrays if arrays is None else arrays
  dtype = jnp.dtype(tensor.dtype)
  if tensor.kind == "float":
    return jnp.asarray(arrays["value"], dtype)
  spec = tensor.spec
  idx = unpack_indices(arrays["words"], spec.bits, tensor.size)
  if tensor.kind == "levels":
    q = _level_values(idx, spec.bits).reshape(tensor.shape).astype(dtype)
  elif tensor.kind == "ridge":
    blocks, bs, out = _ridge_blocks(tensor.shape, spec)
    qf = idx.astype(jnp.float32).reshape(blocks, bs, out)
    if spec.ridge_affine:
      y = arrays["slope"] * (qf - arrays["mean_q"]) + arrays["mean_x"]
    else:
      y = arrays["slope"] * (qf - (2.0**(spec.bits - 1) - 0.5))
    q = y.reshape(tensor.shape).astype(dtype)
  else:  # pragma: no cover - kinds are checked on construction and load
    raise ExportError(f"unknown tensor kind {tensor.kind!r}")
  if spec.scale != "none":
    q = q * jnp.asarray(arrays["scale"]).astype(q.dtype)
  return q


@functools.partial(jax.jit, static_argnums=(1, 2))
def _reference(kernel: jax.Array, spec: TensorQuant, axes: tuple[int, ...]) -> jax.Array:
  """The training forward's quantized kernel."""
  return layers.quantize_tensor(kernel, spec, axes)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _scale(kernel: jax.Array, mode: str, axes: tuple[int, ...]) -> jax.Array:
  return quantizers.binary_scale(kernel, mode, reduce_axes=axes)


@functools.partial(jax.jit, static_argnums=(1,))
def _ridge_parts(kernel: jax.Array, spec: TensorQuant) -> dict[str, jax.Array]:
  """q and the fit's coefficients, computed as :func:`ricci_jax.quantizers.ridge_dequantize` does.

  For a kernel whose contraction axes are all but the last, that function's
  transpose is the identity and its blocks are ``reshape(K // bs, bs, out)``.
  """
  blocks_n, bs, out = _ridge_blocks(kernel.shape, spec)
  blocks = kernel.astype(jnp.float32).reshape(blocks_n, bs, out)
  nm = quantizers._parse_sparsity(spec.sparsity)  # noqa: SLF001 - the same parsing as the forward
  xs, mask = blocks, None
  if nm is not None:
    mask = quantizers.nm_sparsity_mask(blocks, *nm, axis=1)
    xs = blocks + jax.lax.stop_gradient(mask * blocks - blocks)
  q = quantizers._quantize_with_detached_noise(xs, spec.bits, spec.ridge_affine, axis=1)  # noqa: SLF001
  if mask is not None:
    q = q * mask
  if spec.ridge_affine:
    mx = jnp.mean(blocks, axis=1, keepdims=True)
    mq = jnp.mean(q, axis=1, keepdims=True)
    cov = jnp.mean((blocks - mx) * (q - mq), axis=1, keepdims=True)
    var = jnp.mean(jnp.square(q - mq), axis=1, keepdims=True)
    return {"q": q, "slope": cov / (var + spec.ridge_lambda), "mean_q": mq, "mean_x": mx}
  s = jnp.mean(q * blocks, axis=1, keepdims=True) / (jnp.mean(q * q, axis=1, keepdims=True) + spec.ridge_lambda)
  return {"q": q, "slope": s}


def _indices_from_values(values: np.ndarray, bits: int, offset: float, step: float) -> np.ndarray | None:
  """Integer indices i with values == offset + step * i exactly, or None if some value is off the grid."""
  v = np.asarray(values, np.float64)
  idx = np.rint((v - offset) / step)
  if not np.all(np.isfinite(idx)) or idx.min(initial=0) < 0 or idx.max(initial=0) > 2**bits - 1:
    return None
  return idx.astype(np.int64)


def _same_bits(a: Any, b: Any) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


RIDGE_TOLERANCE = 1e-5
"""With ``exact=False``: the largest difference allowed between a rebuilt ridge
kernel and the training forward's, relative to the kernel's largest value."""


def pack_kernel(kernel: np.ndarray, spec: TensorQuant, dtype: Any = np.float32, *,
                name: str = "kernel", exact: bool = True) -> PackedTensor:
  """Packs one kernel quantized by ``spec`` (contraction over all but the last axis).

  Args:
    kernel: the latent (float) kernel, as stored in the params.
    spec: its quantizer.
    dtype: the compute dtype the layer quantizes it in (the model's ``dtype``).
    name: for error messages.
    exact: refuse what cannot be rebuilt bit for bit (ridge); with False,
      ridge is packed and checked to :data:`RIDGE_TOLERANCE`.

  Raises:
    ExportError: a forward that cannot be stored exactly (ridge, unless
      ``exact=False``; ridge linear with sparsity; bf16 levels that collide),
      or a reconstruction that is not bit for bit the training forward's.
  """
  dtype = np.dtype(jnp.dtype(dtype))
  shape = tuple(int(d) for d in np.shape(kernel))
  if len(shape) < 2:
    raise ExportError(f"{name}: a kernel has at least 2 axes (inputs..., outputs), got shape {shape}")
  axes = contraction_axes(shape)
  x = jnp.asarray(kernel).astype(dtype)
  reference = np.asarray(_reference(x, spec, axes))
  arrays: dict[str, np.ndarray] = {}
  if spec.method in ("uniform", "dorefa"):
    kind = "levels"
    levels = np.asarray(_reference(x, dataclasses.replace(spec, scale="none"), axes))
    n = 2.0**spec.bits - 1.0
    idx = _indices_from_values(levels, spec.bits, -1.0, 2.0 / n)
  elif spec.method == "ridge":
    kind = "ridge"
    if exact:
      raise ExportError(
          f"{name}: a ridge-quantized kernel cannot be packed exactly: the forward computes its fit's "
          "coefficients (means, covariance, variance) from the latent weights in every pass, and XLA rounds "
          "those reductions differently in different compilations, so no stored coefficients reproduce the "
          "training forward bit for bit. Pass exact=False to pack it anyway (logits then match up to float "
          "rounding), or train with the uniform or dorefa method.")
    if not spec.ridge_affine and spec.sparsity is not None:
      raise ExportError(
          f"{name}: ridge with ridge_affine=False and sparsity={spec.sparsity!r} cannot be packed: the pruned "
          f"entries are 0, which is off the half-integer grid of {spec.bits}-bit values, so they would need "
          "another bit each. Use ridge_affine=True (pruned entries are level 0) or no sparsity.")
    parts = {k: np.asarray(v) for k, v in _ridge_parts(x, spec).items()}
    offset = 0.0 if spec.ridge_affine else -(2.0**(spec.bits - 1) - 0.5)
    idx = _indices_from_values(parts.pop("q"), spec.bits, offset, 1.0)
    arrays.update(parts)
  else:
    raise ExportError(f"{name}: the {spec.method!r} method is for activations, not kernels")
  if idx is None:
    raise ExportError(f"{name}: the {spec.method} forward's values are not on its {spec.bits}-bit grid, so "
                      "they cannot be stored as integers")
  arrays = {"words": pack_indices(idx, spec.bits), **arrays}
  if spec.scale != "none":
    arrays["scale"] = np.asarray(_scale(x, spec.scale, axes))
  tensor = PackedTensor(kind=kind, shape=shape, dtype=dtype.name, arrays=arrays, spec=spec,
                        exact=kind != "ridge")
  rebuilt = np.asarray(jax.jit(functools.partial(dequantize, tensor))(tensor.arrays))
  if not tensor.exact:
    ref32, got32 = reference.astype(np.float32), rebuilt.astype(np.float32)
    worst = float(np.max(np.abs(got32 - ref32), initial=0.0))
    if not worst <= RIDGE_TOLERANCE * max(float(np.max(np.abs(ref32), initial=0.0)), 1e-30):
      raise ExportError(f"{name}: the packed ridge kernel differs from the training forward's by {worst:.3g}, "
                        f"more than {RIDGE_TOLERANCE} of its largest value")
  elif not _same_bits(rebuilt, reference):
    differ = int(np.sum(rebuilt != reference))
    raise ExportError(
        f"{name}: the packed kernel does not reproduce the training forward bit for bit ({spec.method}, "
        f"{spec.bits} bits, scale {spec.scale!r}, dtype {dtype.name}: {differ} of {reference.size} values "
        "differ), so it cannot be packed exactly")
  if tensor.nbytes != packed_nbytes(shape, spec, dtype):  # pragma: no cover - a bookkeeping invariant
    raise AssertionError(f"{name}: {tensor.nbytes} bytes stored, {packed_nbytes(shape, spec, dtype)} accounted")
  return tensor


def float_tensor(value: np.ndarray) -> PackedTensor:
  value = np.asarray(value)
  return PackedTensor(kind="float", shape=tuple(value.shape), dtype=value.dtype.name,
                      arrays={"value": value})


# ----------------------------------------------------------------------------
# A whole model.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Packed:
  """A packed model: its description and every variable, quantized kernels at their bit width.

  Attributes:
    model: the model's description (:func:`describe_model`): class, attributes,
      quantization rule; :meth:`build_model` rebuilds it.
    input_shape: one example's input shape.
    tensors: every variable by ``"collection/path/leaf"`` (e.g.
      ``"params/stage1_block0_conv1/kernel"``, ``"batch_stats/bn_init/mean"``).
  """

  model: Mapping[str, Any]
  input_shape: tuple[int, ...]
  tensors: Mapping[str, PackedTensor]

  @property
  def nbytes(self) -> int:
    """Bytes of every stored array (the file adds its header and the container's few hundred bytes)."""
    return sum(t.nbytes for t in self.tensors.values())

  def nbytes_of(self, collection: str) -> int:
    return sum(t.nbytes for k, t in self.tensors.items() if k.split("/", 1)[0] == collection)

  def float32_nbytes(self, collection: str | None = None) -> int:
    """Bytes of the same variables as float32 (the training checkpoint's model part)."""
    return sum(4 * t.size for k, t in self.tensors.items()
               if collection is None or k.split("/", 1)[0] == collection)

  @property
  def exact(self) -> bool:
    """Whether every tensor is rebuilt bit for bit (False only after ``pack(..., exact=False)`` of ridge)."""
    return all(t.exact for t in self.tensors.values())

  def build_model(self) -> nn.Module:
    """The training model (latent weights quantized in the forward pass) this was packed from."""
    return model_from_description(self.model)

  def quantized(self) -> dict[str, PackedTensor]:
    """The quantized kernels by path."""
    return {k: t for k, t in self.tensors.items() if t.kind != "float"}


def pack(params: Any, config: Any = None, *, batch_stats: Any = None, model: nn.Module | None = None,
         input_shape: tuple[int, ...] | None = None, exact: bool = True) -> Packed:
  """Packs a quantized model's variables: quantized kernels at their real bit width.

  Args:
    params: the params tree, or a variables dict / training checkpoint with
      ``"params"`` and ``"batch_stats"`` (:func:`split_variables`).
    config: the training program's config, a model, or a ``QuantRule`` with
      ``model=`` (see the module docstring).
    batch_stats: BatchNorm running statistics, if not in ``params``; required
      when the model has BatchNorm (inference needs them).
    model: the model, with a ``QuantRule`` config (or to check against a
      training config).
    input_shape: one example's shape, for models outside the zoo.
    exact: refuse kernels that cannot be rebuilt bit for bit (ridge); False
      packs them too, marked inexact (see the module docstring).

  Returns:
    A :class:`Packed`; :func:`save` writes it.

  Raises:
    ExportError: parameters that do not match the model (missing, extra or
      wrongly shaped leaves), a model outside the zoo, or a kernel that cannot
      be stored exactly.
  """
  model = resolve_model(config, model)
  shape = input_shape_for(model, config, input_shape)
  params, batch_stats = split_variables(params, batch_stats)
  flat = check_variables(model, shape, params, batch_stats)
  description = describe_model(model)
  kernels = {"/".join(p): c for p, c in layers.quantized_kernels(model, example_input(shape), train=False).items()}
  dtype = compute_dtype(model)
  tensors: dict[str, PackedTensor] = {}
  for coll in COLLECTIONS:
    for path, value in flat[coll].items():
      cfg = kernels.get(path) if coll == "params" else None
      if cfg is not None and cfg.weight is not None:
        tensors[f"{coll}/{path}"] = pack_kernel(value, cfg.weight, dtype, name=path, exact=exact)
      else:
        tensors[f"{coll}/{path}"] = float_tensor(value)
  return Packed(model=description, input_shape=shape, tensors=tensors)


def unpack(packed: Packed | str | Any) -> dict[str, Any]:
  """The variables of a packed model (or file), as nested dicts of NumPy arrays.

  The quantized kernels are the values the training forward multiplies with
  (e.g. ±1 times the scale), not the latent float weights, which a packed
  model does not keep. Serve them with :mod:`ricci_jax.inference` (which does
  not quantize them again); the training model would quantize them a second
  time, which is the identity only for sign and Eq. 38 levels without a scale.

  Returns:
    ``{"params": ..., "batch_stats": ...}``.
  """
  if not isinstance(packed, Packed):
    packed = load(packed)
  out: dict[str, dict[str, np.ndarray]] = {c: {} for c in COLLECTIONS}
  for key, tensor in packed.tensors.items():
    coll, path = key.split("/", 1)
    value = tensor.arrays["value"] if tensor.kind == "float" else np.asarray(
        jax.jit(functools.partial(dequantize, tensor))(tensor.arrays))
    out[coll][path] = value
  return {c: flax.traverse_util.unflatten_dict(v, sep="/") for c, v in out.items()}


# ----------------------------------------------------------------------------
# JSON descriptions of configs and models.
# ----------------------------------------------------------------------------


def tensor_quant_to_json(spec: TensorQuant | None) -> dict | None:
  if spec is None:
    return None
  out = dataclasses.asdict(spec)
  out["hparams"] = [list(p) for p in spec.hparams]
  return out


def tensor_quant_from_json(data: Mapping | None) -> TensorQuant | None:
  if data is None:
    return None
  return TensorQuant(**{**data, "hparams": tuple((k, v) for k, v in data["hparams"])})


def quant_config_to_json(config: QuantConfig | None) -> dict | None:
  if config is None:
    return None
  return {"weight": tensor_quant_to_json(config.weight), "act": tensor_quant_to_json(config.act)}


def quant_config_from_json(data: Mapping | None) -> QuantConfig | None:
  if data is None:
    return None
  return QuantConfig(weight=tensor_quant_from_json(data["weight"]), act=tensor_quant_from_json(data["act"]))


def rule_to_json(rule: QuantRule | None) -> dict | None:
  if rule is None:
    return None
  return {
      "layers": rule.layers,
      "weight": tensor_quant_to_json(rule.weight),
      "act": tensor_quant_to_json(rule.act),
      **{k: quant_config_to_json(getattr(rule, k)) for k in ("first", "last", "downsample")},
      "overrides": [[p, quant_config_to_json(c)] for p, c in rule.overrides],
  }


def rule_from_json(data: Mapping | None) -> QuantRule | None:
  if data is None:
    return None
  return QuantRule(
      layers=data["layers"], weight=tensor_quant_from_json(data["weight"]),
      act=tensor_quant_from_json(data["act"]),
      **{k: quant_config_from_json(data[k]) for k in ("first", "last", "downsample")},
      overrides=tuple((p, quant_config_from_json(c)) for p, c in data["overrides"]))


def _attr_to_json(value: Any) -> Any:
  if isinstance(value, (str, bool, int, float)) or value is None:
    return value
  if isinstance(value, (tuple, list)):
    return [_attr_to_json(v) for v in value]
  try:
    return {"dtype": jnp.dtype(value).name}
  except TypeError:
    raise ExportError(f"model attribute value {value!r} cannot be stored in a packed file") from None


def _attr_from_json(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_attr_from_json(v) for v in value)
  if isinstance(value, dict) and set(value) == {"dtype"}:
    return jnp.dtype(value["dtype"])
  return value


def describe_model(model: nn.Module) -> dict[str, Any]:
  """A JSON-able description from which :func:`model_from_description` rebuilds ``model``.

  Only models of :mod:`ricci_jax.models` can be rebuilt from it (their class
  is looked up by name there).
  """
  attrs = {k: _attr_to_json(v) for k, v in _architecture(model).items() if k != "norm_axis_name"}
  return {"class": type(model).__name__, "attrs": attrs, "quant": rule_to_json(getattr(model, "quant", None))}


def _zoo_classes() -> dict[str, type[nn.Module]]:
  return {info.cls.__name__: info.cls for info in models.MODELS.values()}


def model_from_description(description: Mapping[str, Any]) -> nn.Module:
  """The model :func:`describe_model` described."""
  classes = _zoo_classes()
  name = description.get("class")
  if name not in classes:
    raise PackedFileError(f"the packed model's class {name!r} is not a ricci_jax.models class "
                          f"({', '.join(sorted(classes))}); pass model= to serve it")
  attrs = {k: _attr_from_json(v) for k, v in description["attrs"].items()}
  return classes[name](**attrs, quant=rule_from_json(description["quant"]))


# ----------------------------------------------------------------------------
# The file.
# ----------------------------------------------------------------------------


def _tensor_header(tensor: PackedTensor) -> dict[str, Any]:
  return {"kind": tensor.kind, "shape": list(tensor.shape), "dtype": tensor.dtype,
          "spec": tensor_quant_to_json(tensor.spec), "exact": tensor.exact}


def save(packed: Packed, path: Any) -> int:
  """Writes ``packed`` to ``path`` (an uncompressed ``.npz``, see the module docstring).

  Returns:
    The file's size in bytes.
  """
  chunks, entries, offset = [], {}, 0
  for key, tensor in packed.tensors.items():
    arrays = []
    for name, value in tensor.arrays.items():
      value = np.asarray(value)
      data = value.astype(value.dtype.newbyteorder("<"), copy=False).tobytes()
      arrays.append([name, value.dtype.name, list(value.shape), offset, len(data)])
      chunks.append(data)
      offset += len(data)
    entries[key] = {**_tensor_header(tensor), "arrays": arrays}
  blob = b"".join(chunks)
  header = {
      "format": FORMAT, "version": VERSION, "model": packed.model, "input_shape": list(packed.input_shape),
      "tensors": entries, "data": {"nbytes": len(blob), "crc32": zlib.crc32(blob)},
  }
  text = json.dumps(header, separators=(",", ":"), sort_keys=False).encode("utf-8")
  members = {"header": np.frombuffer(zlib.compress(text, 9), np.uint8),
             "data": np.frombuffer(blob, np.uint8)}
  buffer = io.BytesIO()
  np.savez(buffer, **members)
  payload = buffer.getvalue()
  with open(path, "wb") as f:
    f.write(payload)
  return len(payload)


def read_header(path: Any) -> dict[str, Any]:
  """The JSON header of a packed file (checked: format and version)."""
  return _read(path)[0]


def _read(path: Any) -> tuple[dict[str, Any], bytes]:
  where = str(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise PackedFileError(f"cannot read {where!r}: {e}") from None
  try:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
      names = set(z.files)
      if names != {"header", "data"}:
        raise PackedFileError(f"{where!r} is a .npz but not a packed model: it holds {sorted(names)}, "
                              "a packed file holds ['data', 'header']")
      header_bytes, blob = z["header"], z["data"]
  except PackedFileError:
    raise
  except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as e:
    raise PackedFileError(
        f"{where!r} ({len(raw)} bytes) is not a complete packed model: the .npz archive cannot be read "
        f"({type(e).__name__}: {e}); the file is truncated, corrupted or of another kind") from None
  try:
    header = json.loads(zlib.decompress(header_bytes.tobytes()).decode("utf-8"))
  except (zlib.error, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PackedFileError(f"{where!r}: the header cannot be decoded ({e}); the file is corrupted") from None
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise PackedFileError(f"{where!r} is not a {FORMAT} file (format {header.get('format')!r})"
                          if isinstance(header, dict) else f"{where!r}: the header is not a JSON object")
  if header.get("version") != VERSION:
    raise PackedFileError(
        f"{where!r} was written in {FORMAT} format version {header.get('version')!r}; this ricci_jax reads "
        f"version {VERSION} only. Re-export it with the ricci_jax that trained the model.")
  blob = blob.tobytes()
  expect = header["data"]
  if len(blob) != expect["nbytes"]:
    raise PackedFileError(f"{where!r}: the data holds {len(blob)} bytes but the header says {expect['nbytes']}: "
                          "the file is truncated or corrupted")
  if zlib.crc32(blob) != expect["crc32"]:
    raise PackedFileError(f"{where!r}: the data's CRC-32 does not match the header's: the file is corrupted")
  return header, blob


def _check_words(key: str, tensor: PackedTensor) -> None:
  words = tensor.arrays["words"]
  bits = tensor.spec.bits
  dtype, per = word_layout(bits)
  if words.dtype != dtype or words.shape != (num_words(tensor.size, bits),):
    raise PackedFileError(f"{key}: {tensor.size} values of {bits} bits need {num_words(tensor.size, bits)} "
                          f"{dtype.name} words, the file has {words.shape} {words.dtype.name}")
  width = 8 * dtype.itemsize
  if per * bits < width and np.any(words >> np.asarray(per * bits, dtype)):
    raise PackedFileError(f"{key}: bits are set outside the packed values (above bit {per * bits} of a word); "
                          "the file is corrupted")
  used = tensor.size - (words.size - 1) * per
  if words.size and used < per and int(words[-1]) >> (used * bits):
    raise PackedFileError(f"{key}: bits are set outside the packed values (past the last value of the last "
                          "word); the file is corrupted")


def _expected_arrays(tensor: PackedTensor) -> dict[str, tuple[tuple[int, ...], str]]:
  """Shape and dtype of every array a tensor of this kind, shape and spec must have."""
  if tensor.kind == "float":
    return {"value": (tuple(tensor.shape), tensor.dtype)}
  spec = tensor.spec
  dtype, _ = word_layout(spec.bits)
  out = {"words": ((num_words(tensor.size, spec.bits),), dtype.name)}
  if tensor.kind == "ridge":
    blocks, _, n_out = _ridge_blocks(tensor.shape, spec)
    names = ("slope", "mean_q", "mean_x") if spec.ridge_affine else ("slope",)
    out.update({n: ((blocks, 1, n_out), "float32") for n in names})
  if spec.scale == "tensor":
    out["scale"] = ((), tensor.dtype)
  elif spec.scale == "channel":
    out["scale"] = ((1,) * (len(tensor.shape) - 1) + (tensor.shape[-1],), tensor.dtype)
  return out


def load(path: Any) -> Packed:
  """Reads a file :func:`save` wrote, checking everything it can.

  Raises:
    PackedFileError: not a packed file, another format version, a truncated
      or corrupted file (lengths and CRC-32), arrays whose count, shape or
      dtype does not fit their tensor, or packed words with stray bits.
  """
  header, blob = _read(path)
  tensors: dict[str, PackedTensor] = {}
  offset = 0
  try:
    for key, entry in header["tensors"].items():
      if entry["kind"] not in KINDS:
        raise PackedFileError(f"{key}: unknown tensor kind {entry['kind']!r}; known: {', '.join(KINDS)}")
      arrays = {}
      for name, dtype, shape, start, nbytes in entry["arrays"]:
        dt = np.dtype(jnp.dtype(dtype)).newbyteorder("<")
        if start != offset or nbytes != dt.itemsize * math.prod(shape) or start + nbytes > len(blob):
          raise PackedFileError(f"{key}/{name}: byte range [{start}, {start + nbytes}) does not follow the "
                                f"previous array (at {offset}) or does not fit {shape} {dtype}: corrupted file")
        arrays[name] = np.frombuffer(blob, dt, math.prod(shape), start).reshape(shape).astype(
            dt.newbyteorder("="))
        offset += nbytes
      tensor = PackedTensor(kind=entry["kind"], shape=tuple(entry["shape"]), dtype=entry["dtype"],
                            arrays=arrays, spec=tensor_quant_from_json(entry["spec"]),
                            exact=bool(entry["exact"]))
      want = _expected_arrays(tensor)
      got = {n: (tuple(a.shape), a.dtype.name) for n, a in arrays.items()}
      if got != want:
        raise PackedFileError(f"{key}: arrays {got} do not fit a {tensor.kind} tensor of shape {tensor.shape} "
                              f"({want})")
      if tensor.kind != "float":
        _check_words(key, tensor)
      tensors[key] = tensor
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, PackedFileError):
      raise
    raise PackedFileError(f"{str(path)!r}: the header is malformed ({type(e).__name__}: {e})") from None
  if offset != len(blob):
    raise PackedFileError(f"{str(path)!r}: {len(blob) - offset} bytes of data belong to no array: corrupted file")
  return Packed(model=header["model"], input_shape=tuple(header["input_shape"]), tensors=tensors)


def float32_file_nbytes(variables: Mapping[str, Any]) -> int:
  """Size of the same variables written as float32 arrays in a plain ``.npz`` (for comparisons)."""
  buffer = io.BytesIO()
  flat = {}
  for coll in COLLECTIONS:
    for k, v in flatten(variables.get(coll)).items():
      flat[re.sub(r"[^A-Za-z0-9_]", "_", f"{coll}/{k}")] = np.asarray(v, np.float32)
  np.savez(buffer, **flat)
  return len(buffer.getvalue())
