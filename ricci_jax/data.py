"""Input pipelines: CIFAR-10/100, ImageNet, MNIST and Fashion-MNIST.

The host yields ``uint8`` batches in a deterministic, seeded order; the
train-time augmentation and the normalisation are jit-compiled JAX functions
that run on the device (:func:`augment`, :func:`preprocess`), so a CPU training
loop spends almost no host time on input.

===================  ========================================================
``load``             opens a split and returns a :class:`Dataset`.
``Dataset.epoch``    one epoch of this host's batches: ``dict(image=uint8
                     [b, H, W, C], label=int32 [b], mask=bool [b],
                     index=int32 [b])``, resumable at any step.
``augment``          train-time augmentation + normalisation -> float32
                     (CIFAR: pad-4 random crop and horizontal flip).
``preprocess``       eval-time normalisation -> float32.
``DATASETS``         every dataset by name, with its constants.
===================  ========================================================

Sources (``source=``):

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

Splits: ``"train"``, ``"test"`` and ``"validation"``. ``"validation"`` is held
out of the training split: its **last** ``round(fraction * n_train)`` examples
(``DatasetSpec.validation_fraction``: 10% for CIFAR, the paper's 45k/5k; 1/12
for the MNIST family, the usual 55k/5k; 1% for ImageNet). ``load(...,
split="train", validation=True)`` returns the rest. The held-out part is a
fixed set that depends on neither the seed nor ``limit``. For ImageNet
``"test"`` is the official 50k validation set.

Order: epoch ``e`` visits the examples in the permutation drawn by
``numpy.random.default_rng([seed, e])``; every host draws the same permutation,
cuts it into global batches of ``batch_size`` and keeps its own
``batch_size // process_count`` rows of each.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import gzip
import math
import numbers
import os
import pathlib
import pickle
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "DATASETS",
    "SOURCES",
    "SPLITS",
    "Dataset",
    "DatasetSpec",
    "augment",
    "epoch_order",
    "get_spec",
    "imagenet_eval_box",
    "imagenet_train_box",
    "imagenet_transform",
    "load",
    "preprocess",
    "read_cifar",
    "read_idx",
    "validation_size",
]

Array = jax.Array
PathLike = str | os.PathLike

SPLITS = ("train", "validation", "test")
"""Splits :func:`load` accepts; ``validation`` is held out of ``train``."""

SOURCES = ("auto", "files", "tfds")
"""Where :func:`load` reads from."""

DATA_DIR_ENV = "RICCI_JAX_DATA_DIR"
"""Environment variable naming an extra root folder searched for the files."""

DEFAULT_FILE_ROOTS = ("/usr/share/datasets", "~/.keras/datasets")
"""Root folders searched for the files when no ``data_dir`` is given (after
``$RICCI_JAX_DATA_DIR``)."""

IMAGENET_SIZE = 224
IMAGENET_RESIZE = 256
IMAGENET_SCALE = (0.08, 1.0)
IMAGENET_RATIO = (3 / 4, 4 / 3)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """The constants of one dataset.

  Attributes:
    name: the name :func:`load` takes.
    num_classes: number of labels.
    image_shape: (H, W, C) of the images the host yields (ImageNet: after the
      host-side crop).
    mean: per-channel mean of the training images, in [0, 1].
    std: per-channel standard deviation of the training images, in [0, 1].
    pad: :func:`augment`'s default random-crop padding (0: no crop).
    flip: :func:`augment`'s default random horizontal flip.
    validation_fraction: fraction of the training split held out as the
      validation split (its last examples).
    tfds_name: the tensorflow-datasets name.
    tfds_splits: TFDS split name for the official ``train`` and ``test``.
    file_layout: ``"idx"``, ``"cifar10"``, ``"cifar100"`` or ``None`` (TFDS only).
    file_subdirs: folder names the files are looked for under a root folder.
    how_to_get: how to obtain the data, for error messages.
  """

  name: str
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  pad: int
  flip: bool
  validation_fraction: float
  tfds_name: str
  tfds_splits: tuple[tuple[str, str], ...]
  file_layout: str | None
  file_subdirs: tuple[str, ...]
  how_to_get: str


_TFDS_BUILD = (
    "or prepare it with tensorflow-datasets in the array_record format, on any "
    "machine with internet and TensorFlow (reading needs neither): `tfds build "
    "{tfds} --file_format=array_record [--data_dir=DIR]`, then pass that "
    "data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")

DATASETS: dict[str, DatasetSpec] = {
    s.name: s for s in [
        DatasetSpec(
            name="cifar10", num_classes=10, image_shape=(32, 32, 3),
            mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
            pad=4, flip=True, validation_fraction=0.1,
            tfds_name="cifar10", tfds_splits=(("train", "train"), ("test", "test")),
            file_layout="cifar10", file_subdirs=("cifar-10-batches-py", "cifar10"),
            how_to_get=(
                "download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, "
                "extract it and pass data_dir=<the cifar-10-batches-py folder or its "
                "parent>; " + _TFDS_BUILD.format(tfds="cifar10"))),
        DatasetSpec(
            name="cifar100", num_classes=100, image_shape=(32, 32, 3),
            mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762),
            pad=4, flip=True, validation_fraction=0.1,
            tfds_name="cifar100", tfds_splits=(("train", "train"), ("test", "test")),
            file_layout="cifar100", file_subdirs=("cifar-100-python", "cifar100"),
            how_to_get=(
                "download https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz, "
                "extract it and pass data_dir=<the cifar-100-python folder or its "
                "parent>; " + _TFDS_BUILD.format(tfds="cifar100"))),
        DatasetSpec(
            name="imagenet2012", num_classes=1000,
            image_shape=(IMAGENET_SIZE, IMAGENET_SIZE, 3),
            mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
            pad=0, flip=False, validation_fraction=0.01,
            tfds_name="imagenet2012",
            tfds_splits=(("train", "train"), ("test", "validation")),
            file_layout=None, file_subdirs=(),
            how_to_get=(
                "imagenet2012 is a manual download in TFDS: register at "
                "https://image-net.org/download-images, put ILSVRC2012_img_train.tar "
                "and ILSVRC2012_img_val.tar in <data_dir>/downloads/manual/, then, on "
                "a machine with TensorFlow, `tfds build imagenet2012 "
                "--file_format=array_record --data_dir=<data_dir>` and pass that "
                "data_dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")),
        DatasetSpec(
            name="mnist", num_classes=10, image_shape=(28, 28, 1),
            mean=(0.1307,), std=(0.3081,),
            pad=0, flip=False, validation_fraction=1 / 12,
            tfds_name="mnist", tfds_splits=(("train", "train"), ("test", "test")),
            file_layout="idx", file_subdirs=("mnist", "MNIST/raw"),
            how_to_get=(
                "put the four IDX files (train-images-idx3-ubyte.gz, "
                "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                "t10k-labels-idx1-ubyte.gz, e.g. from "
                "https://storage.googleapis.com/cvdf-datasets/mnist/) in a folder "
                "and pass data_dir=<that folder>; " + _TFDS_BUILD.format(tfds="mnist"))),
        DatasetSpec(
            name="fashion_mnist", num_classes=10, image_shape=(28, 28, 1),
            mean=(0.2860,), std=(0.3530,),
            pad=0, flip=False, validation_fraction=1 / 12,
            tfds_name="fashion_mnist", tfds_splits=(("train", "train"), ("test", "test")),
            file_layout="idx",
            file_subdirs=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw"),
            how_to_get=(
                "on Debian/Ubuntu `apt-get install dataset-fashion-mnist` (found "
                "automatically in /usr/share/datasets/fashion-mnist); or put the four "
                "IDX files from https://github.com/zalandoresearch/fashion-mnist in a "
                "folder and pass data_dir=<that folder>; "
                + _TFDS_BUILD.format(tfds="fashion_mnist"))),
    ]
}
"""Every dataset by name. Normalisation constants are the usual published ones
(CIFAR-10: the per-channel std over all training pixels, not the 0.2023, 0.1994,
0.2010 that circulates; Fashion-MNIST: computed on its 60k training images)."""


def get_spec(name: str) -> DatasetSpec:
  """Returns the :class:`DatasetSpec` of ``name`` or raises a ``ValueError``."""
  try:
    return DATASETS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}") from None


def validation_size(name: str, num_train: int) -> int:
  """Number of examples the validation split holds out of ``num_train`` training examples."""
  return max(1, round(num_train * get_spec(name).validation_fraction))


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


class _Reader(Protocol):
  description: str

  def __len__(self) -> int: ...

  def submit(self, indices: np.ndarray, epoch: int) -> concurrent.futures.Future: ...


def _done(value: Any) -> concurrent.futures.Future:
  future = concurrent.futures.Future()
  future.set_result(value)
  return future


@dataclasses.dataclass(frozen=True, eq=False)
class _ArrayReader:
  """An official split held in memory (the files source)."""

  images: np.ndarray
  labels: np.ndarray
  description: str

  def __len__(self) -> int:
    return len(self.labels)

  def submit(self, indices: np.ndarray, epoch: int) -> concurrent.futures.Future:
    del epoch
    return _done((self.images[indices], self.labels[indices]))


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


@dataclasses.dataclass(eq=False)
class _TfdsReader:
  """An official split read through ``tfds.data_source`` (array_record).

  ImageNet images are cropped and resized here (train: random-resized crop and
  flip, seeded per example by ``(seed, epoch, index)``; eval: resize and
  center crop); the others must already have the spec's shape.
  """

  source: Any
  spec: DatasetSpec
  train_transform: bool
  seed: int
  description: str
  _batches: concurrent.futures.ThreadPoolExecutor = dataclasses.field(
      default_factory=lambda: concurrent.futures.ThreadPoolExecutor(1))
  _examples: concurrent.futures.ThreadPoolExecutor = dataclasses.field(
      default_factory=lambda: concurrent.futures.ThreadPoolExecutor(min(32, (os.cpu_count() or 1) + 2)))

  def __len__(self) -> int:
    return len(self.source)

  def submit(self, indices: np.ndarray, epoch: int) -> concurrent.futures.Future:
    return self._batches.submit(self._read, indices, epoch)

  def _read(self, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    examples = list(self._examples.map(functools.partial(self._example, epoch=epoch), indices))
    if not examples:
      return np.zeros((0, *self.spec.image_shape), np.uint8), np.zeros(0, np.int32)
    return np.stack([e[0] for e in examples]), np.array([e[1] for e in examples], np.int32)

  def _example(self, index: int, epoch: int) -> tuple[np.ndarray, int]:
    example = self.source[int(index)]
    image = np.asarray(example["image"], np.uint8)
    if self.spec.name == "imagenet2012":
      rng = np.random.default_rng([self.seed, epoch, int(index)]) if self.train_transform else None
      image = imagenet_transform(image, rng)
    elif image.shape != self.spec.image_shape:
      raise ValueError(f"{self.description}: example {index} has shape {image.shape}, "
                       f"expected {self.spec.image_shape}")
    return image, int(example["label"])


def _open_tfds(spec: DatasetSpec, split: str, data_dir: PathLike | None, *,
               train_transform: bool, seed: int) -> _TfdsReader:
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
  return _TfdsReader(source, spec, train_transform, seed, f"tfds:{builder.data_dir}:{tfds_split}")


def _open(spec: DatasetSpec, split: str, source: str, data_dir: PathLike | None, *,
          train_transform: bool, seed: int) -> _Reader:
  """Opens the official ``split`` ("train" or "test") from ``source``."""
  looked = []
  if source in ("auto", "files"):
    try:
      return _open_files(spec, split, data_dir)
    except _NotFound as e:
      looked.append(str(e))
  if source in ("auto", "tfds"):
    try:
      return _open_tfds(spec, split, data_dir, train_transform=train_transform, seed=seed)
    except _NotFound as e:
      looked.append(str(e))
  raise FileNotFoundError(
      f"{spec.name} ({split}) not found with source={source!r}. Looked at: "
      + "; ".join(looked) + f". To get it: {spec.how_to_get}.")


# ----------------------------------------------------------------------------
# ImageNet host-side transforms (numpy + PIL).
# ----------------------------------------------------------------------------


def imagenet_train_box(
    height: int, width: int, rng: np.random.Generator,
    scale: tuple[float, float] = IMAGENET_SCALE, ratio: tuple[float, float] = IMAGENET_RATIO,
) -> tuple[int, int, int, int]:
  """The random-resized-crop box (Inception / torchvision algorithm).

  Draws an area fraction in ``scale`` and a log-uniform aspect ratio in
  ``ratio`` up to 10 times until the box fits; otherwise takes the largest
  centered box whose ratio is clipped to ``ratio``.

  Returns:
    ``(left, top, right, bottom)`` in pixels, as PIL's ``box``.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = round(math.sqrt(target * aspect))
    h = round(math.sqrt(target / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  aspect = width / height
  w, h = width, height
  if aspect < ratio[0]:
    h = round(w / ratio[0])
  elif aspect > ratio[1]:
    w = round(h * ratio[1])
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def imagenet_eval_box(height: int, width: int, resize: int = IMAGENET_RESIZE,
                      crop: int = IMAGENET_SIZE) -> tuple[float, float, float, float]:
  """The box that "resize the shorter side to ``resize``, center crop ``crop``" keeps.

  Returns:
    ``(left, top, right, bottom)`` in the original image's pixels (a centered
    square of side ``crop / resize`` times the shorter side).
  """
  side = min(height, width) * crop / resize
  top, left = (height - side) / 2, (width - side) / 2
  return left, top, left + side, top + side


def imagenet_transform(image: np.ndarray, rng: np.random.Generator | None,
                       size: int = IMAGENET_SIZE) -> np.ndarray:
  """Crops and resizes one decoded ImageNet image to ``size`` x ``size`` (uint8 HWC).

  Args:
    image: uint8 [H, W, 3].
    rng: train: random-resized crop (scale (0.08, 1)) and a horizontal flip
      with probability 1/2, drawn from ``rng``; ``None``: eval, resize 256 and
      center crop 224 (done as one bilinear, antialiased resize of the box).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top

  h, w = image.shape[:2]
  box = imagenet_eval_box(h, w) if rng is None else imagenet_train_box(h, w, rng)
  out = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=box))
  if rng is not None and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


# ----------------------------------------------------------------------------
# Order, sharding and the Dataset.
# ----------------------------------------------------------------------------


def epoch_order(seed: int, epoch: int, num_examples: int, shuffle: bool = True) -> np.ndarray:
  """The global visiting order of one epoch: a permutation from ``(seed, epoch)``.

  Every host computes the same order. Without ``shuffle`` it is ``arange``.
  (NumPy's PCG64 permutation: reproducible for a given NumPy version, which
  is what an exact resume needs.)
  """
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  value = int(value)
  if value < low or (high is not None and value > high):
    bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
    raise ValueError(f"{name} must be {bound}, got {value}")
  return value


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split, batched and sharded for this host. Build it with :func:`load`.

  Attributes:
    name: dataset name.
    split: ``"train"``, ``"validation"`` or ``"test"``.
    num_examples: examples in the split (after ``validation`` and ``limit``).
    batch_size: the global batch size (all hosts together).
    seed: the order (and ImageNet host augmentation) seed.
    shuffle: whether each epoch is a fresh permutation.
    drop_remainder: drop the last partial global batch; otherwise it is padded
      (``mask`` False, ``index`` -1, zero images and labels).
    process_index: this host.
    process_count: number of hosts.
    source: where the data is read from (``files:<folder>`` or ``tfds:<dir>``).
  """

  name: str
  split: str
  num_examples: int
  batch_size: int
  seed: int
  shuffle: bool
  drop_remainder: bool
  process_index: int
  process_count: int
  source: str
  _reader: _Reader = dataclasses.field(repr=False)
  _offset: int = dataclasses.field(repr=False)

  @property
  def spec(self) -> DatasetSpec:
    return DATASETS[self.name]

  @property
  def num_classes(self) -> int:
    return self.spec.num_classes

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the yielded images."""
    return self.spec.image_shape

  @property
  def host_batch_size(self) -> int:
    """Examples this host yields per step: ``batch_size // process_count``."""
    return self.batch_size // self.process_count

  @property
  def steps_per_epoch(self) -> int:
    div = divmod(self.num_examples, self.batch_size)
    return div[0] if self.drop_remainder else div[0] + (div[1] > 0)

  def __len__(self) -> int:
    """Steps per epoch (as a PyTorch ``DataLoader``'s length), not examples."""
    return self.steps_per_epoch

  def order(self, epoch: int) -> np.ndarray:
    """Global visiting order of ``epoch``: positions in [0, num_examples)."""
    return epoch_order(self.seed, epoch, self.num_examples, self.shuffle)

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """This host's batches of one epoch, from ``start_step`` on.

    Step ``s`` holds rows ``[s * batch_size, (s + 1) * batch_size)`` of
    :meth:`order`, of which this host yields its slice ``[process_index * b,
    (process_index + 1) * b)``, ``b = host_batch_size``. The next batch is
    read while the current one is used.

    Args:
      epoch: epoch number (>= 0): picks the permutation.
      start_step: first step to yield, for an exact resume (0 to
        ``steps_per_epoch``).

    Yields:
      ``dict(image=uint8 [b, H, W, C], label=int32 [b], mask=bool [b],
      index=int32 [b])``; ``index`` is the example's position in the official
      split (-1 for padding).
    """
    epoch = _check_int("epoch", epoch, 0)
    start_step = _check_int("start_step", start_step, 0, self.steps_per_epoch)
    return self._batches(self.order(epoch), epoch, start_step)

  def _rows(self, order: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    b = self.host_batch_size
    positions = step * self.batch_size + self.process_index * b + np.arange(b)
    mask = positions < self.num_examples
    return self._offset + order[positions[mask]], mask

  def _batches(self, order: np.ndarray, epoch: int, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    def submit(step):
      indices, mask = self._rows(order, step)
      return indices, mask, self._reader.submit(indices, epoch)

    pending = submit(start_step) if start_step < self.steps_per_epoch else None
    for step in range(start_step, self.steps_per_epoch):
      following = submit(step + 1) if step + 1 < self.steps_per_epoch else None
      indices, mask, future = pending
      images, labels = future.result()
      yield self._assemble(indices, mask, images, labels)
      pending = following

  def _assemble(self, indices, mask, images, labels) -> dict[str, np.ndarray]:
    if mask.all():
      return dict(image=images, label=labels, mask=mask, index=indices.astype(np.int32))
    b = len(mask)
    out = dict(image=np.zeros((b, *self.image_shape), np.uint8), label=np.zeros(b, np.int32),
               mask=mask, index=np.full(b, -1, np.int32))
    out["image"][mask], out["label"][mask], out["index"][mask] = images, labels, indices
    return out


def load(
    name: str,
    split: str = "train",
    *,
    batch_size: int,
    seed: int = 0,
    source: str = "auto",
    data_dir: PathLike | None = None,
    validation: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    limit: int | None = None,
    shuffle: bool | None = None,
) -> Dataset:
  """Opens one split of a dataset, batched and sharded for this host.

  Args:
    name: a name in :data:`DATASETS`.
    split: ``"train"``, ``"test"`` or ``"validation"`` (the held-out last
      examples of the training split; see the module docstring).
    batch_size: the global batch size, whatever the number of hosts; it must
      divide by ``process_count``.
    seed: order seed (and ImageNet host augmentation seed).
    source: ``"auto"``, ``"files"`` or ``"tfds"`` (see the module docstring).
    data_dir: the folder of the original files (or its parent) and the TFDS
      data dir; ``None`` searches the default places.
    validation: with ``split="train"``, leave out the validation examples
      (RF-DNN's 45k/5k on CIFAR). Ignored by the other splits.
    process_index: this host, default ``jax.process_index()``.
    process_count: number of hosts, default ``jax.process_count()``.
    drop_remainder: drop the last partial global batch (default), or pad it
      and mark the padding with ``mask`` False.
    limit: use only the first ``limit`` examples of the split.
    shuffle: draw a new permutation each epoch; default True for ``train``
      and False otherwise.

  Raises:
    ValueError: an unknown name, split or source; a bad batch size, process
      or limit.
    FileNotFoundError: the data is in none of the places looked at (the
      message lists them and says how to get the data). Nothing is downloaded.
  """
  spec = get_spec(name)
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if source not in SOURCES:
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
  batch_size = _check_int("batch_size", batch_size, 1)
  seed = _check_int("seed", seed, 0)
  process_count = _check_int(
      "process_count", jax.process_count() if process_count is None else process_count, 1)
  process_index = _check_int(
      "process_index", jax.process_index() if process_index is None else process_index,
      0, process_count - 1)
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} does not divide by process_count "
                     f"{process_count}: the global batch is split evenly across hosts")
  if limit is not None:
    limit = _check_int("limit", limit, 1)
  shuffle = split == "train" if shuffle is None else bool(shuffle)

  official = "test" if split == "test" else "train"
  reader = _open(spec, official, source, data_dir, train_transform=split == "train", seed=seed)
  offset, count = 0, len(reader)
  if split == "validation" or (split == "train" and validation):
    held = validation_size(name, count)
    offset, count = (count - held, held) if split == "validation" else (0, count - held)
  if limit is not None:
    if limit > count:
      raise ValueError(f"limit {limit} exceeds the {count} examples of {name} {split}")
    count = limit
  if drop_remainder and batch_size > count:
    raise ValueError(f"batch_size {batch_size} exceeds the {count} examples of {name} "
                     f"{split}: no full batch (use a smaller batch or drop_remainder=False)")
  return Dataset(name=name, split=split, num_examples=count, batch_size=batch_size, seed=seed,
                 shuffle=shuffle, drop_remainder=drop_remainder, process_index=process_index,
                 process_count=process_count, source=reader.description, _reader=reader,
                 _offset=offset)


# ----------------------------------------------------------------------------
# On-device augmentation and normalisation.
# ----------------------------------------------------------------------------


def _normalize(spec: DatasetSpec, images: Array) -> Array:
  if images.ndim != 4 or images.shape[-1] != len(spec.mean):
    raise ValueError(f"{spec.name} images must be [batch, H, W, {len(spec.mean)}], got {images.shape}")
  mean = jnp.asarray(spec.mean, jnp.float32) * 255.0
  inv_std = 1.0 / (jnp.asarray(spec.std, jnp.float32) * 255.0)
  return (images.astype(jnp.float32) - mean) * inv_std


def _random_crop(key: Array, images: Array, pad: int) -> Array:
  b, h, w, c = images.shape
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)
  crop = lambda img, o: lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c))
  return jax.vmap(crop)(padded, offsets)


def _random_flip(key: Array, images: Array) -> Array:
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
  return jnp.where(flip, images[:, :, ::-1, :], images)


@functools.partial(jax.jit, static_argnames=("name", "pad", "flip"))
def augment(name: str, rng: Array, images: Array, *, pad: int | None = None,
            flip: bool | None = None) -> Array:
  """Train-time augmentation and normalisation, on the device (jit-compiled).

  CIFAR: zero-pad by 4, random 32x32 crop, random horizontal flip, then
  per-channel normalisation. MNIST family: normalisation only. ImageNet:
  normalisation only (the random-resized crop and flip run on the host).

  Args:
    name: a name in :data:`DATASETS` (static).
    rng: a PRNG key; the output is a deterministic function of it.
    images: uint8 [batch, H, W, C].
    pad: random-crop padding, default the dataset's (0 turns the crop off).
    flip: random horizontal flip, default the dataset's.

  Returns:
    float32 [batch, H, W, C], ``(x / 255 - mean) / std``.
  """
  spec = get_spec(name)
  pad = spec.pad if pad is None else _check_int("pad", pad, 0)
  flip = spec.flip if flip is None else bool(flip)
  images = jnp.asarray(images)
  crop_key, flip_key = jax.random.split(rng)
  if pad:
    images = _random_crop(crop_key, images, pad)
  if flip:
    images = _random_flip(flip_key, images)
  return _normalize(spec, images)


@functools.partial(jax.jit, static_argnames=("name",))
def preprocess(name: str, images: Array) -> Array:
  """Eval-time normalisation (jit-compiled): uint8 [batch, H, W, C] -> float32."""
  return _normalize(get_spec(name), jnp.asarray(images))
