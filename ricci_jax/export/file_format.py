"""The packed file: :func:`save` and :func:`load`, with every check a reader can make.

An uncompressed ``.npz`` with two members: ``header``, zlib-compressed UTF-8
JSON (format name, version, the model's description, and every tensor's kind,
shape, dtype, quantizer and byte ranges), and ``data``, every array's
little-endian bytes back to back. The header records the data's length and
CRC-32 and each array's offset and length; a file of another version, a
truncated or corrupted file, or packed words with bits set past the last value
fail with a clear :class:`~ricci_jax.export.PackedFileError`: one line that
names the file and what is wrong with it (a failure inside the ``.npz``
container itself, which has its own CRC-32 per member, is reported the same
way, whatever NumPy's or ``zipfile``'s exception was).

Pruned kernels (:mod:`ricci_jax.export.tensors`) need no new version: such a
tensor's header entry adds ``"pruned": p`` (the count of its pruned weights)
and its arrays add ``mask`` (one bit per weight), and its ``words`` hold the
kept weights' codes only. A tensor without pruned weights is written exactly
as before, so files of unpruned models are unchanged and every earlier file
reads as it did. A reader without pruning support refuses a pruned tensor
(its arrays do not fit), it never misreads one. The loader checks the mask
like the words (length, stray bits) and that it keeps exactly ``size - p``
weights.
"""

from __future__ import annotations

import io
import json
import math
import os
import zlib
from typing import Any

import jax.numpy as jnp
import numpy as np

from ricci_jax.export.bits import num_words, word_layout
from ricci_jax.export.errors import PackedFileError, one_line
from ricci_jax.export.tensors import KINDS, Packed, PackedTensor, ridge_blocks
from ricci_jax.models import serialization

FORMAT = "ricci_jax.packed"
"""The ``format`` field of every packed file's header."""

VERSION = 1
"""The file format version this module writes and reads."""


def _tensor_header(tensor: PackedTensor) -> dict[str, Any]:
  out = {"kind": tensor.kind, "shape": list(tensor.shape), "dtype": tensor.dtype,
         "spec": serialization.tensor_quant_to_json(tensor.spec), "exact": tensor.exact}
  if tensor.pruned:  # only then: an unpruned tensor's entry is as it always was
    out["pruned"] = tensor.pruned
  return out


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


ZIP_MAGIC = b"PK\x03\x04"
"""The first bytes of a ``.npz`` (zip) archive."""

NPY_MAGIC = b"\x93NUMPY"
"""The first bytes of a single ``.npy`` array."""


def _check_header(where: str, header: dict[str, Any]) -> None:
  """The header's top-level fields (a version-1 header's: the version is checked first)."""
  problems = [f"no {k!r}" for k in ("model", "input_shape", "tensors", "data") if k not in header]
  if not problems:
    shape, data = header["input_shape"], header["data"]
    if not isinstance(header["model"], dict):
      problems.append(f"'model' is a {type(header['model']).__name__}, not an object")
    if not isinstance(header["tensors"], dict):
      problems.append(f"'tensors' is a {type(header['tensors']).__name__}, not an object")
    if not (isinstance(shape, list) and shape and all(type(d) is int and d > 0 for d in shape)):
      problems.append(f"'input_shape' is {shape!r}, not a list of positive integers")
    if not (isinstance(data, dict) and all(type(data.get(k)) is int for k in ("nbytes", "crc32"))):
      problems.append(f"'data' is {data!r}, not {{'nbytes': int, 'crc32': int}}")
  if problems:
    raise PackedFileError(f"{where!r}: the header is malformed ({'; '.join(problems)}): the file is corrupted "
                          "or was not written by ricci_jax.export.save")


def _read(path: Any) -> tuple[dict[str, Any], bytes]:
  """The checked header (format, version, fields) and the data (length, CRC-32) of a packed file."""
  if not isinstance(path, (str, bytes, os.PathLike)):
    raise PackedFileError(f"a packed model is read from its file's path (str or os.PathLike), got a "
                          f"{type(path).__name__}; variables are packed first: ricci_jax.export.pack(variables, model)")
  where = os.fsdecode(path)
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise PackedFileError(f"cannot read {where!r}: {one_line(e)}") from None
  if raw.startswith(NPY_MAGIC):
    raise PackedFileError(f"{where!r} is a .npy array, not a complete packed model (a .npz archive holding "
                          "'header' and 'data', written by ricci_jax.export.save)")
  if not raw.startswith(ZIP_MAGIC):
    raise PackedFileError(f"{where!r} ({len(raw)} bytes) is not a complete packed model: a packed file is a .npz "
                          f"(zip) archive, which starts with {ZIP_MAGIC!r}, and this one starts with {raw[:4]!r} "
                          "(empty, damaged at its start, or a file of another kind)")
  try:
    with np.load(io.BytesIO(raw), allow_pickle=False) as z:
      names = set(z.files)
      if names != {"header", "data"}:
        raise PackedFileError(f"{where!r} is a .npz but not a packed model: it holds {sorted(names)}, "
                              "a packed file holds ['data', 'header']")
      header_bytes, blob = z["header"], z["data"]
  except PackedFileError:
    raise
  except Exception as e:  # noqa: BLE001 - zipfile and NumPy's parser raise many kinds on a damaged archive
    raise PackedFileError(
        f"{where!r} ({len(raw)} bytes) is not a complete packed model: the .npz archive cannot be read "
        f"({one_line(e)}); the file is truncated, corrupted or of another kind") from None
  try:
    header = json.loads(zlib.decompress(header_bytes.tobytes()).decode("utf-8"))
  except (zlib.error, ValueError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
    raise PackedFileError(f"{where!r}: the header cannot be decoded ({one_line(e)}); the file is corrupted") from None
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise PackedFileError(f"{where!r} is not a {FORMAT} file (format {header.get('format')!r})"
                          if isinstance(header, dict) else f"{where!r}: the header is not a JSON object")
  version = header.get("version")
  if version != VERSION:
    newer = type(version) is int and version > VERSION
    raise PackedFileError(
        f"{where!r} was written in {FORMAT} format version {version!r}; this ricci_jax reads version {VERSION} "
        "only. " + ("A newer ricci_jax wrote it: read it with that one (or upgrade), or re-export the model with "
                    "this one." if newer else "Re-export it with the ricci_jax that trained the model."))
  _check_header(where, header)
  blob = blob.tobytes()
  expect = header["data"]
  if len(blob) != expect["nbytes"]:
    raise PackedFileError(f"{where!r}: the data holds {len(blob)} bytes but the header says {expect['nbytes']}: "
                          "the file is truncated or corrupted")
  if zlib.crc32(blob) != expect["crc32"]:
    raise PackedFileError(f"{where!r}: the data's CRC-32 does not match the header's: the file is corrupted")
  return header, blob


def _check_words(key: str, tensor: PackedTensor) -> None:
  _check_packed(key, tensor.arrays["words"], tensor.spec.bits, tensor.kept)
  if not tensor.pruned:
    return
  mask = tensor.arrays["mask"]
  _check_packed(f"{key} (mask)", mask, 1, tensor.size)
  kept = int(np.unpackbits(mask, bitorder="little").sum())
  if kept != tensor.kept:
    raise PackedFileError(f"{key}: the mask keeps {kept} weights, the header says {tensor.kept} "
                          f"({tensor.size} less {tensor.pruned} pruned); the file is corrupted")


def _check_packed(key: str, words: np.ndarray, bits: int, count: int) -> None:
  dtype, per = word_layout(bits)
  if words.dtype != dtype or words.shape != (num_words(count, bits),):
    raise PackedFileError(f"{key}: {count} values of {bits} bits need {num_words(count, bits)} "
                          f"{dtype.name} words, the file has {words.shape} {words.dtype.name}")
  width = 8 * dtype.itemsize
  if per * bits < width and np.any(words >> np.asarray(per * bits, dtype)):
    raise PackedFileError(f"{key}: bits are set outside the packed values (above bit {per * bits} of a word); "
                          "the file is corrupted")
  used = count - (words.size - 1) * per
  if words.size and used < per and int(words[-1]) >> (used * bits):
    raise PackedFileError(f"{key}: bits are set outside the packed values (past the last value of the last "
                          "word); the file is corrupted")


def _expected_arrays(tensor: PackedTensor) -> dict[str, tuple[tuple[int, ...], str]]:
  """Shape and dtype of every array a tensor of this kind, shape and spec must have."""
  if tensor.kind == "float":
    return {"value": (tuple(tensor.shape), tensor.dtype)}
  spec = tensor.spec
  dtype, _ = word_layout(spec.bits)
  out = {"words": ((num_words(tensor.kept, spec.bits),), dtype.name)}
  if tensor.pruned:
    out["mask"] = ((num_words(tensor.size, 1),), word_layout(1)[0].name)
  if tensor.kind == "ridge":
    blocks, _, n_out = ridge_blocks(tensor.shape, spec)
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
    PackedFileError: not a path, not a packed file, another format version,
      a truncated or corrupted file (lengths and CRC-32), a malformed header,
      arrays whose count, shape or dtype does not fit their tensor, or packed
      words with stray bits; always one line naming the file.
  """
  header, blob = _read(path)
  where = os.fsdecode(path)
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
                            arrays=arrays, spec=serialization.tensor_quant_from_json(entry["spec"]),
                            exact=bool(entry["exact"]), pruned=int(entry.get("pruned", 0)))
      if tensor.pruned and (tensor.kind == "float" or not 0 < tensor.pruned <= tensor.size):
        raise PackedFileError(f"{key}: a {tensor.kind} tensor of {tensor.size} values cannot have "
                              f"{tensor.pruned} pruned weights (only quantized kernels store a mask)")
      want = _expected_arrays(tensor)
      got = {n: (tuple(a.shape), a.dtype.name) for n, a in arrays.items()}
      if got != want:
        raise PackedFileError(f"{key}: arrays {got} do not fit a {tensor.kind} tensor of shape {tensor.shape} "
                              f"({want})")
      if tensor.kind != "float":
        _check_words(key, tensor)
      tensors[key] = tensor
  except PackedFileError as e:  # a tensor's own message: name the file too
    raise PackedFileError(f"{where!r}: {e}") from None
  except (KeyError, TypeError, ValueError, AttributeError) as e:
    raise PackedFileError(f"{where!r}: the header is malformed ({one_line(e)})") from None
  if offset != len(blob):
    raise PackedFileError(f"{where!r}: {len(blob) - offset} bytes of data belong to no array: corrupted file")
  return Packed(model=header["model"], input_shape=tuple(header["input_shape"]), tensors=tensors)
