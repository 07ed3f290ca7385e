"""Random-access sources of one official split: the original files, or TFDS.

Sources (``source=`` of :func:`ricci_jax.data.load`):

* ``"files"``: the original files. MNIST-format IDX files
  (``train-images-idx3-ubyte[.gz]``, ...) for ``mnist`` and ``fashion_mnist``;
  the CIFAR python batches (the ``cifar-10-batches-py`` and
  ``cifar-100-python`` layouts) for ``cifar10`` and ``cifar100``. Without
  ``data_dir`` they are looked for under ``$RICCI_JAX_DATA_DIR``,
  ``/usr/share/datasets`` (where Debian's ``dataset-fashion-mnist`` puts
  Fashion-MNIST) and ``~/.keras/datasets``.
* ``"tfds"``: data already prepared by tensorflow-datasets in the
  ``array_record`` format, read through ``tfds.data_source`` (no TensorFlow
  needed). Nothing is ever downloaded: a dataset that is not prepared fails at
  once. ``imagenet2012`` is read only from here (TFDS manual download).
* ``"auto"`` (default): the files, then TFDS; if neither is there the
  ``FileNotFoundError`` lists every place looked at and how to get the data.

:func:`open_split` returns a :class:`Reader`, a Grain random-access data source
(``grain.sources.RandomAccessDataSource``: a length and ``reader[i]``, one
example as ``dict(image=uint8 [H, W, C], label=int32)``), so the loader's Grain
pipeline reads only the examples it asks for, in whatever order it asks.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import pathlib
import pickle
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ricci_jax.data.specs import DatasetSpec

PathLike = str | os.PathLike

SOURCES = ("auto", "files", "tfds")
"""Where :func:`load` reads from."""

DATA_DIR_ENV = "RICCI_JAX_DATA_DIR"
"""Environment variable naming an extra root folder searched for the files."""

DEFAULT_FILE_ROOTS = ("/usr/share/datasets", "~/.keras/datasets")
"""Root folders searched for the files when no ``data_dir`` is given (after
``$RICCI_JAX_DATA_DIR``)."""


# ----------------------------------------------------------------------------
# File readers.
# ----------------------------------------------------------------------------


def read_idx(path: PathLike) -> np.ndarray:
  """Reads one MNIST-format IDX file of unsigned bytes (gzipped if it ends in ``.gz``).

  Returns:
    A read-only ``uint8`` array with the file's shape, e.g. (60000, 28, 28).
  """
  path = pathlib.Path(path)
  with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
    data = f.read()
  if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
    raise ValueError(f"{path} is not an IDX file of unsigned bytes (header {data[:4]!r})")
  ndim = data[3]
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  offset = 4 + 4 * ndim
  if len(data) - offset != math.prod(shape):
    raise ValueError(f"{path}: header says shape {shape} but holds {len(data) - offset} bytes")
  return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


class _ArrayUnpickler(pickle.Unpickler):
  """Unpickles the CIFAR batches: dicts, lists, bytes and numpy arrays only."""

  ALLOWED = {
      ("numpy", "ndarray"), ("numpy", "dtype"),
      ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
      ("_codecs", "encode"),
  }

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in self.ALLOWED:
      raise pickle.UnpicklingError(
          f"refusing to load {module}.{name}: CIFAR batch files hold only dicts, "
          "lists and numpy arrays")
    return super().find_class(module, name)


def read_cifar(path: PathLike, label_key: str = "labels") -> tuple[np.ndarray, np.ndarray]:
  """Reads one CIFAR python batch file (``data_batch_1``, ``test_batch``, ``train``...).

  Only dicts, lists and numpy arrays are unpickled; anything else is refused.

  Args:
    path: the pickled batch.
    label_key: ``"labels"`` (CIFAR-10), ``"fine_labels"`` or ``"coarse_labels"``
      (CIFAR-100).

  Returns:
    ``(images, labels)``: ``uint8`` [N, 32, 32, 3] (converted from the files'
    channel-major rows) and ``int32`` [N].
  """
  path = pathlib.Path(path)
  with open(path, "rb") as f:
    batch = _ArrayUnpickler(f, encoding="bytes").load()
  if not isinstance(batch, dict) or b"data" not in batch or label_key.encode() not in batch:
    keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
    raise ValueError(f"{path} is not a CIFAR batch with b'data' and {label_key.encode()!r}: {keys}")
  data = np.asarray(batch[b"data"])
  labels = np.asarray(batch[label_key.encode()], dtype=np.int32)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
    raise ValueError(f"{path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
  if labels.shape != (data.shape[0],):
    raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape} labels")
  images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  return images, labels


# Files each layout needs for the official "train" / "test" splits; each name
# may also appear gzipped, and MNIST names with a dot ("train-images.idx3-ubyte").
_LAYOUT_FILES = {
    "idx": {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
            "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")},
    "cifar10": {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test": ("test_batch",)},
    "cifar100": {"train": ("train",), "test": ("test",)},
}


def _resolve(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
  names = [stem, stem.replace("-idx", ".idx")] if "-idx" in stem else [stem]
  for n in names:
    for candidate in (folder / n, folder / f"{n}.gz"):
      if candidate.is_file():
        return candidate
  return None


def _file_folders(spec: DatasetSpec, data_dir: PathLike | None) -> list[pathlib.Path]:
  """The folders searched for ``spec``'s files, in order."""
  if data_dir is not None:
    root = pathlib.Path(data_dir).expanduser()
    return [root] + [root / s for s in spec.file_subdirs]
  roots = [os.environ[DATA_DIR_ENV]] if os.environ.get(DATA_DIR_ENV) else []
  roots += DEFAULT_FILE_ROOTS
  return [pathlib.Path(r).expanduser() / s for r in roots for s in spec.file_subdirs]


def _stamp(paths: Sequence[pathlib.Path]) -> tuple:
  return tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size) for p in paths)


@functools.lru_cache(maxsize=8)
def _read_files_cached(layout: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
  """Reads (and caches, read-only) one official split from its files."""
  paths = [pathlib.Path(s[0]) for s in stamp]
  if layout == "idx":
    images, labels = read_idx(paths[0]), read_idx(paths[1]).astype(np.int32)
    if images.ndim != 3 or labels.shape != images.shape[:1]:
      raise ValueError(f"{paths[0]} {images.shape} and {paths[1]} {labels.shape} do not match")
    images = images[..., None]
  else:
    key = "fine_labels" if layout == "cifar100" else "labels"
    parts = [read_cifar(p, key) for p in paths]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


class _NotFound(Exception):
  """A source does not hold the dataset; the message says where it looked."""


# ----------------------------------------------------------------------------
# Readers: random access to one official split.
# ----------------------------------------------------------------------------


class Reader(Protocol):
  """One official split as a Grain random-access data source (``grain.sources.RandomAccessDataSource``).

  ``reader[i]`` is example ``i`` of the split, ``dict(image=uint8 [H, W, C],
  label=int32)``; ImageNet images keep their decoded size (the loader crops
  them). ``description`` says where the data is read from (``files:<folder>``
  or ``tfds:<dir>:<split>``). Readers hold no state between reads, so Grain may
  call them from several threads and in any order.
  """

  description: str

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, np.ndarray]: ...


@dataclasses.dataclass(frozen=True, eq=False)
class _ArrayReader:
  """An official split held in memory (the files source)."""

  images: np.ndarray
  labels: np.ndarray
  description: str

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}

  def __repr__(self) -> str:  # short: Grain names a source by its repr, and the default would print arrays
    return f"_ArrayReader({self.description!r}, {len(self)} examples)"


def _open_files(spec: DatasetSpec, split: str, data_dir: PathLike | None) -> _ArrayReader:
  if spec.file_layout is None:
    raise _NotFound(f"files: {spec.name} has no offline files reader (TFDS only)")
  stems = _LAYOUT_FILES[spec.file_layout][split]
  looked = []
  for folder in _file_folders(spec, data_dir):
    paths = [_resolve(folder, s) for s in stems]
    if all(paths):
      images, labels = _read_files_cached(spec.file_layout, _stamp(paths))
      if images.shape[1:] != spec.image_shape:
        raise ValueError(f"{folder}: images of shape {images.shape[1:]}, expected {spec.image_shape}")
      if labels.size and not 0 <= labels.min() <= labels.max() < spec.num_classes:
        raise ValueError(f"{folder}: labels outside [0, {spec.num_classes})")
      return _ArrayReader(images, labels, f"files:{folder}")
    missing = [s for s, p in zip(stems, paths) if p is None]
    looked.append(f"{folder} (no {missing[0]}[.gz])" if folder.is_dir() else f"{folder} (no such folder)")
  raise _NotFound("files: " + "; ".join(looked))


@dataclasses.dataclass(frozen=True, eq=False)
class _TfdsReader:
  """An official split read through ``tfds.data_source`` (array_record), decoded per example.

  Images other than ImageNet's must already have the spec's shape; ImageNet's
  keep their own size here and are cropped by the loader's Grain transform
  (:class:`ricci_jax.data.imagenet.ImagenetCrop`), seeded per example.
  """

  source: Any
  spec: DatasetSpec
  description: str

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    example = self.source[int(index)]
    image = np.asarray(example["image"], np.uint8)
    if self.spec.name != "imagenet2012" and image.shape != self.spec.image_shape:
      raise ValueError(f"{self.description}: example {index} has shape {image.shape}, "
                       f"expected {self.spec.image_shape}")
    return {"image": image, "label": np.int32(example["label"])}

  def __repr__(self) -> str:  # short: Grain names a source by its repr
    return f"_TfdsReader({self.description!r}, {len(self)} examples)"


def _open_tfds(spec: DatasetSpec, split: str, data_dir: PathLike | None) -> _TfdsReader:
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _NotFound(f"tfds: tensorflow-datasets cannot be imported ({e})") from None
  tfds_split = dict(spec.tfds_splits)[split]
  data_dir = None if data_dir is None else os.fspath(pathlib.Path(data_dir).expanduser())
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)
  where = f"tfds: {builder.data_dir}"
  try:
    # download=False: never download; a dataset that is not prepared raises at once.
    source = tfds.data_source(spec.tfds_name, split=tfds_split, data_dir=data_dir, download=False)
  except Exception as e:  # pylint: disable=broad-except
    if not builder.is_prepared():
      raise _NotFound(f"{where} (not prepared)") from None
    fmt = getattr(builder.info.file_format, "value", builder.info.file_format)
    if fmt != "array_record":
      raise _NotFound(
          f"{where} (prepared as {fmt}; reading without TensorFlow needs array_record: "
          f"`tfds convert_format --dataset_version_dir={builder.data_dir} "
          "--out_file_format=array_record`)") from None
    raise _NotFound(f"{where} ({type(e).__name__}: {e})") from None
  if len(source) == 0:
    raise _NotFound(f"{where} (split {tfds_split!r} is empty)")
  return _TfdsReader(source, spec, f"tfds:{builder.data_dir}:{tfds_split}")


def open_split(spec: DatasetSpec, split: str, source: str, data_dir: PathLike | None) -> Reader:
  """Opens the official ``split`` ("train" or "test") from ``source``.

  Args:
    spec: the dataset.
    split: the official split, ``"train"`` or ``"test"`` (the validation
      split is cut out of ``"train"`` by the loader).
    source: ``"auto"``, ``"files"`` or ``"tfds"``.
    data_dir: the folder of the files (or its parent) and the TFDS data dir;
      ``None`` searches the default places.

  Raises:
    FileNotFoundError: no source holds the data; the message lists every
      place looked at and how to get the data.
  """
  looked = []
  if source in ("auto", "files"):
    try:
      return _open_files(spec, split, data_dir)
    except _NotFound as e:
      looked.append(str(e))
  if source in ("auto", "tfds"):
    try:
      return _open_tfds(spec, split, data_dir)
    except _NotFound as e:
      looked.append(str(e))
  raise FileNotFoundError(
      f"{spec.name} ({split}) not found with source={source!r}. Looked at: "
      + "; ".join(looked) + f". To get it: {spec.how_to_get}.")

