"""The datasets: their constants (:class:`DatasetSpec`) and the registry :data:`DATASETS`.

Splits: ``"train"``, ``"test"`` and ``"validation"``. ``"validation"`` is held
out of the training split: its **last** ``round(fraction * n_train)`` examples
(``DatasetSpec.validation_fraction``: 10% for CIFAR, the paper's 45k/5k; 1/12
for the MNIST family, the usual 55k/5k; 1% for ImageNet). The held-out part is
a fixed set that depends on neither the seed nor ``limit``. For ImageNet
``"test"`` is the official 50k validation set.
"""

from __future__ import annotations

import dataclasses

from ricci_jax.data.imagenet import IMAGENET_SIZE

SPLITS = ("train", "validation", "test")
"""Splits :func:`load` accepts; ``validation`` is held out of ``train``."""


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

