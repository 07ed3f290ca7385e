"""XOR-popcount layers: a W1A1 conv or dense layer computed from packed bits, exactly.

A conv or dense layer whose kernel *and* input are both sign-binarized with
no scale (1-bit ``uniform`` / ``dorefa`` kernel, 1-bit ``uniform`` input,
scale ``none``, float32) is computed from the packed bits directly: the
input's signs packed along the channels, XOR with the kernel's bits,
popcount, ``C - 2 popcount`` per tap, padded taps left out. That is exact:
the float product of ±1 values sums integers below 2^24, which float32 holds
exactly in any order. With a scale it would not be (sums of ±s round), so
those layers are unpacked.

A *pruned* binary kernel (latent weights exactly 0, ternary {-1, 0, +1} in
the forward, :func:`ricci_jax.layers.quantize_tensor`) is computed exactly
too: its mask bits (1 = kept) are packed like its signs, a pruned weight
contributes 0, and per tap the output is ``kept - 2 popcount((x XOR w) AND
mask)``, ``kept`` being the popcount of the tap's mask (again a sum of
integers, so equal to the float layer's).

This module is framework-neutral: :func:`xnor_layer` reads the attributes
that a Linen ``nn.Dense`` / ``nn.Conv`` and an NNX ``nnx.Linear`` /
``nnx.Conv`` share, so the Linen serving path (:mod:`ricci_jax.inference`)
and the NNX one (:mod:`ricci_jax.nnx.xnor`) describe a layer the same way
and compute it with the same :func:`xnor_apply`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ricci_jax import export
from ricci_jax.quant_config import QuantConfig

XNOR_METHODS = ("uniform", "dorefa")
"""Kernel methods whose 1-bit forward values are +-1 (DoReFa's: the sign of tanh(w)/max|tanh(w)|)."""


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


def xnor_eligible(config: QuantConfig | None, dtype: Any) -> bool:
  """Whether a layer quantized by ``config``, its kernel computed in ``dtype``, multiplies +-1 by +-1."""
  w = None if config is None else config.weight
  a = None if config is None else config.act
  return (w is not None and a is not None and w.bits == 1 and a.bits == 1 and w.method in XNOR_METHODS
          and a.method == "uniform" and w.scale == "none" and a.scale == "none" and dtype == np.float32)


def _explicit_padding(padding: Any, n: int) -> tuple[tuple[int, int], ...] | None:
  """Explicit pads, or ``None`` when they depend on the input's size (``SAME``) or are not zeros."""
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


def xnor_layer(module: Any, input_shape: tuple[int, ...], *, dense: bool) -> XnorLayer | None:
  """The XOR-popcount description of a layer, or ``None`` for a geometry :func:`xnor_apply` does not compute.

  ``module`` is a Linen ``nn.Dense`` / ``nn.Conv`` or an NNX ``nnx.Linear`` /
  ``nnx.Conv`` (they name these attributes alike), ``input_shape`` its input's.
  A dense layer is always computed; a conv when it is 2-D on a batch of
  images, without groups or dilation, with explicit (or ``VALID``) padding.
  Whether its config is W1A1 is :func:`xnor_eligible`'s question.
  """
  bias = bool(module.use_bias)
  if dense:
    k = int(input_shape[-1])
    return XnorLayer("dense", k, xnor_word_bits(k), bias=bias)
  window = tuple(module.kernel_size) if not isinstance(module.kernel_size, int) else (module.kernel_size,)
  padding = _explicit_padding(module.padding, len(window))
  plain = (len(window) == 2 and len(input_shape) == 4 and module.feature_group_count == 1
           and all(_ones(d, len(window)) for d in (module.input_dilation, module.kernel_dilation)))
  if not plain or padding is None:
    return None
  strides = (1, 1) if module.strides is None else (
      (module.strides,) * 2 if isinstance(module.strides, int) else tuple(module.strides))
  c = int(input_shape[-1])
  return XnorLayer("conv", c, xnor_word_bits(c), window, strides, padding, bias)


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
