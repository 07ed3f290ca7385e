"""Packing k-bit integers into words, and back."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ricci_jax import quantizers
from ricci_jax.export.errors import ExportError


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
  _, per = word_layout(bits)
  words = jnp.asarray(words)
  shifts = jnp.arange(per, dtype=words.dtype) * jnp.asarray(bits, words.dtype)
  values = (words[:, None] >> shifts) & jnp.asarray((1 << bits) - 1, words.dtype)
  return values.reshape(-1)[:count]
