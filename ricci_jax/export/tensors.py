"""Packed tensors: one kernel at its bit width, exactly rebuilt; and a packed model's container.

:func:`pack_kernel` stores a quantized kernel as the integers of its forward
values packed into words (:mod:`ricci_jax.export.bits`) plus the few floats
that turn them back into those values, and checks that :func:`dequantize`
rebuilds the training forward's kernel bit for bit. :class:`Packed` holds a
whole model's tensors with its description.

**Pruned kernels.** A latent weight that is exactly 0 is pruned and its
quantized value is exactly 0 (:func:`ricci_jax.layers.quantize_tensor`). A
quantized kernel with such zeros stores, beside its usual arrays, ``mask``:
one bit per weight (1 = kept, C order, 8 to a ``uint8``, as
:func:`~ricci_jax.export.bits.pack_indices` packs 1-bit values), and its
``words`` hold the codes of the *kept* weights only, in C order (a pruned
binary kernel: its mask and the signs of its kept weights, i.e. a ternary
kernel). A kernel of n weights with p pruned thus takes n mask bits plus
k (n - p) code bits instead of k n: smaller than dense when p / n > 1 / k
(never for a binary kernel, where the mask costs what the pruned signs
saved; at p = n / 2 its 1.5 bits per weight are the entropy of a ternary
weight with P(0) = 1/2). A kernel without zeros is stored exactly as before
(no mask); float tensors are stored as they are, zeros included.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ricci_jax import layers, quantizers
from ricci_jax.quant_config import TensorQuant
from ricci_jax.export.bits import num_words, pack_indices, unpack_indices, word_layout
from ricci_jax.export.errors import ExportError, PackedFileError, one_line
from ricci_jax.models import serialization
from ricci_jax.nnx import describe

KINDS = ("float", "levels", "ridge")
"""How a tensor is stored: as it is, as packed level indices (``uniform`` and
``dorefa``), or as packed ridge integers plus per-block fit coefficients."""

RIDGE_TOLERANCE = 1e-5
"""With ``exact=False``: the largest difference allowed between a rebuilt ridge
kernel and the training forward's, relative to the kernel's largest value."""


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
    pruned: how many of a quantized kernel's weights are pruned (exactly 0,
      see the module docstring); when > 0, ``arrays`` has ``mask`` and
      ``words`` holds the kept weights' codes only.
  """

  kind: str
  shape: tuple[int, ...]
  dtype: str
  arrays: Mapping[str, np.ndarray]
  spec: TensorQuant | None = None
  exact: bool = True
  pruned: int = 0

  @property
  def bits(self) -> int:
    return self.spec.bits if self.spec is not None else 8 * np.dtype(self.dtype).itemsize

  @property
  def size(self) -> int:
    return int(math.prod(self.shape))

  @property
  def kept(self) -> int:
    """Weights that are not pruned (all of them for a float tensor)."""
    return self.size - self.pruned

  @property
  def nbytes(self) -> int:
    """Bytes of the stored arrays."""
    return sum(int(a.nbytes) for a in self.arrays.values())


@dataclasses.dataclass(frozen=True)
class Packed:
  """A packed model: its description and every variable, quantized kernels at their bit width.

  Attributes:
    model: the model's description
      (:func:`ricci_jax.models.serialization.describe_model`): class,
      attributes, quantization rule; :meth:`build_model` rebuilds it.
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

  def build_model(self, model: Any = None) -> Any:
    """The training model (latent weights quantized in the forward pass) this was packed from.

    For a Linen model, rebuilt from the description. For an NNX model
    (:mod:`ricci_jax.nnx.describe`): a new zoo model, or for a user's own
    model a copy of ``model`` (its class, passed again), quantized as packed.

    Raises:
      PackedFileError: a Linen class that is not one of :mod:`ricci_jax.models`;
        an NNX model outside the NNX zoo without ``model``, or a ``model``
        that is not the packed one's class and layers; a description this
        ricci_jax cannot build (an attribute or config field it does not
        know: a file of another ricci_jax, or a hand-edited one).
    """
    try:
      if describe.is_description(self.model):
        return describe.build_model(self.model, model)
      return serialization.model_from_description(self.model)
    except (describe.StateError, serialization.DescriptionError) as e:
      raise PackedFileError(str(e)) from None
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # the class or a config refused the description
      raise PackedFileError(f"the packed model's description does not build a {self.model.get('class')} of this "
                            f"ricci_jax ({one_line(e)}): the file was written by another ricci_jax or edited") from None

  def quantized(self) -> dict[str, PackedTensor]:
    """The quantized kernels by path."""
    return {k: t for k, t in self.tensors.items() if t.kind != "float"}

  @property
  def pruned(self) -> int:
    """Pruned weights (exact zeros) in the quantized kernels, stored with a mask."""
    return sum(t.pruned for t in self.tensors.values())


def contraction_axes(shape: tuple[int, ...]) -> tuple[int, ...]:
  """A Flax ``Dense`` / ``Conv`` kernel's contraction axes: all but the last (output) axis."""
  return tuple(range(len(shape) - 1))


def ridge_blocks(shape: tuple[int, ...], spec: TensorQuant) -> tuple[int, int, int]:
  """``(number of blocks, block size, outputs)`` of a ridge-quantized kernel."""
  k = int(math.prod(shape[:-1]))
  bs = k if spec.ridge_block_size is None else int(spec.ridge_block_size)
  if bs <= 0 or k % bs:
    raise ExportError(f"ridge block_size {spec.ridge_block_size} does not divide the contraction size {k}")
  return k // bs, bs, int(shape[-1])


def packed_nbytes(shape: tuple[int, ...], spec: TensorQuant | None, dtype: Any = np.float32, *,
                  pruned: int = 0) -> int:
  """Bytes :func:`pack_kernel` stores for a kernel of ``shape`` quantized by ``spec`` (``None``: float).

  ``dtype`` is the compute dtype the kernel is quantized in (scales are stored
  in it); the ridge fit's coefficients are float32. ``pruned`` weights (exact
  zeros of a quantized kernel) cost their mask bit and no code: the kernel
  stores one mask bit per weight and the codes of the others (a float tensor
  is stored as it is, zeros included).
  """
  itemsize = np.dtype(dtype).itemsize
  size = int(math.prod(shape))
  if spec is None:
    return size * itemsize
  if not 0 <= int(pruned) <= size:
    raise ValueError(f"pruned must be in [0, {size}] for a kernel of shape {tuple(shape)}, got {pruned}")
  word_dtype, _ = word_layout(spec.bits)
  total = num_words(size - int(pruned), spec.bits) * word_dtype.itemsize
  if pruned:
    total += num_words(size, 1) * word_layout(1)[0].itemsize
  if spec.method == "ridge":
    blocks, _, out = ridge_blocks(shape, spec)
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
  """The tensor :func:`pack_kernel` stored, rebuilt bit for bit (pure JAX, jit-able).

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
  idx, kept = _codes(tensor, arrays)
  if tensor.kind == "levels":
    q = _level_values(idx, spec.bits).reshape(tensor.shape).astype(dtype)
  elif tensor.kind == "ridge":
    blocks, bs, out = ridge_blocks(tensor.shape, spec)
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
  if kept is not None:  # the pruning rule, in the training forward's order: scaled, then zeroed
    q = jnp.where(kept.reshape(tensor.shape), q, jnp.zeros((), q.dtype))
  return q


def _codes(tensor: PackedTensor, arrays: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array | None]:
  """Every weight's code in C order, and the kept mask (``None`` for an unpruned kernel).

  A pruned kernel's words hold the kept weights' codes only: the i-th kept
  weight (C order) takes code i, found with a running count of the mask;
  a pruned weight gets some code, which :func:`dequantize` then zeroes.
  """
  bits = tensor.spec.bits
  idx = unpack_indices(arrays["words"], bits, tensor.kept)
  if not tensor.pruned:
    return idx, None
  kept = unpack_indices(arrays["mask"], 1, tensor.size) != 0
  if not tensor.kept:
    return jnp.zeros((tensor.size,), idx.dtype), kept
  position = jnp.maximum(jnp.cumsum(kept, dtype=jnp.int32) - 1, 0)
  return idx[position], kept


@functools.partial(jax.jit, static_argnums=(1, 2))
def _reference(kernel: jax.Array, spec: TensorQuant, axes: tuple[int, ...]) -> jax.Array:
  """The training forward's quantized kernel."""
  return layers.quantize_tensor(kernel, spec, axes, operand="weight")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _scale(kernel: jax.Array, mode: str, axes: tuple[int, ...]) -> jax.Array:
  return quantizers.binary_scale(kernel, mode, reduce_axes=axes)


@functools.partial(jax.jit, static_argnums=(1,))
def _ridge_parts(kernel: jax.Array, spec: TensorQuant) -> dict[str, jax.Array]:
  """q and the fit's coefficients, as :func:`ricci_jax.quantizers.ridge_dequantize` computes them.

  For a kernel whose contraction axes are all but the last, that function's
  transpose is the identity and its blocks are ``reshape(K // bs, bs, out)``.
  """
  blocks_n, bs, out = ridge_blocks(kernel.shape, spec)
  blocks = kernel.astype(jnp.float32).reshape(blocks_n, bs, out)
  q = quantizers.ridge_quantize(blocks, spec.bits, affine=spec.ridge_affine, sparsity=spec.sparsity, axis=1)
  return {"q": q, **quantizers.ridge_fit(blocks, q, spec.ridge_lambda, affine=spec.ridge_affine, axis=1)}


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


def pack_kernel(kernel: np.ndarray, spec: TensorQuant, dtype: Any = np.float32, *,
                name: str = "kernel", exact: bool = True) -> PackedTensor:
  """Packs one kernel quantized by ``spec`` (contraction over all but the last axis).

  Weights that are exactly 0 in ``dtype`` are pruned: stored as a mask bit
  and no code (see the module docstring); their rebuilt value is 0, as in the
  training forward.

  Args:
    kernel: the latent (float) kernel, as stored in the params.
    spec: its quantizer.
    dtype: the compute dtype the layer quantizes it in (the model's ``dtype``).
    name: for error messages.
    exact: refuse what cannot be rebuilt bit for bit (ridge); with False,
      ridge is packed and checked to :data:`RIDGE_TOLERANCE`.

  Raises:
    ExportError: a latent weight that is NaN or inf in ``dtype`` (a corrupted
      or diverged checkpoint: its code would be garbage stored as a valid
      level, e.g. sign(inf) = +1), a forward that cannot be stored exactly
      (ridge, unless ``exact=False``; ridge linear with sparsity; bf16 levels
      that collide), or a reconstruction that is not bit for bit the
      training forward's.
  """
  dtype = np.dtype(jnp.dtype(dtype))
  shape = tuple(int(d) for d in np.shape(kernel))
  if len(shape) < 2:
    raise ExportError(f"{name}: a kernel has at least 2 axes (inputs..., outputs), got shape {shape}")
  axes = contraction_axes(shape)
  x = jnp.asarray(kernel).astype(dtype)
  bad = int(x.size - np.count_nonzero(np.asarray(jnp.isfinite(x))))
  if bad:
    raise ExportError(f"{name}: {bad} of {x.size} latent weights are NaN or inf (in {dtype.name}); a corrupted "
                      "or diverged checkpoint is not packed, as its codes would be stored as valid levels")
  reference = np.asarray(_reference(x, spec, axes))
  kept = ~np.asarray(layers.pruned_mask(x)).reshape(-1)  # zeros in the dtype the forward sees
  pruned = int(kept.size - np.count_nonzero(kept))
  arrays: dict[str, np.ndarray] = {}
  if spec.method in ("uniform", "dorefa"):
    kind = "levels"
    levels = np.asarray(_reference(x, dataclasses.replace(spec, scale="none"), axes))
    n = 2.0**spec.bits - 1.0
    idx = _indices_from_values(levels.reshape(-1)[kept], spec.bits, -1.0, 2.0 / n)
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
    idx = _indices_from_values(parts.pop("q").reshape(-1)[kept], spec.bits, offset, 1.0)
    arrays.update(parts)
  else:
    raise ExportError(f"{name}: the {spec.method!r} method is for activations, not kernels")
  if idx is None:
    raise ExportError(f"{name}: the {spec.method} forward's values are not on its {spec.bits}-bit grid, so "
                      "they cannot be stored as integers")
  mask = {"mask": pack_indices(kept.astype(np.uint8), 1)} if pruned else {}
  arrays = {"words": pack_indices(idx, spec.bits), **mask, **arrays}
  if spec.scale != "none":
    arrays["scale"] = np.asarray(_scale(x, spec.scale, axes))
  tensor = PackedTensor(kind=kind, shape=shape, dtype=dtype.name, arrays=arrays, spec=spec,
                        exact=kind != "ridge", pruned=pruned)
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
  accounted = packed_nbytes(shape, spec, dtype, pruned=pruned)
  if tensor.nbytes != accounted:  # pragma: no cover - a bookkeeping invariant
    raise AssertionError(f"{name}: {tensor.nbytes} bytes stored, {accounted} accounted")
  return tensor


def float_tensor(value: np.ndarray) -> PackedTensor:
  """A tensor stored as it is."""
  value = np.asarray(value)
  return PackedTensor(kind="float", shape=tuple(value.shape), dtype=value.dtype.name,
                      arrays={"value": value})
