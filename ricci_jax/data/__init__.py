"""Input pipelines: CIFAR-10/100, ImageNet, MNIST and Fashion-MNIST.

The host yields ``uint8`` batches in a deterministic, seeded order from a
Grain pipeline (index sampling, shuffling, per-process sharding, epochs,
checkpointable iterators); the train-time augmentation and the normalisation
are jit-compiled JAX functions that run on the device (:func:`augment`,
:func:`preprocess`), so a CPU training loop spends little host time on input.

===================  ========================================================
``load``             opens a split and returns a :class:`Dataset`.
``Dataset.epoch``    one epoch of this process's batches: ``dict(image=uint8
                     [b, H, W, C], label=int32 [b], mask=bool [b],
                     index=int32 [b])``, from any step.
``Dataset.iterator`` the batches of every epoch, as a Grain iterator whose
                     ``get_state()`` a checkpoint saves (exact resume).
``augment``          train-time augmentation + normalisation -> float32
                     (CIFAR: pad-4 random crop and horizontal flip).
``preprocess``       eval-time normalisation -> float32.
``DATASETS``         every dataset by name, with its constants.
===================  ========================================================

Modules (each imports only those above it):

* :mod:`~ricci_jax.data.checks`: argument checks shared by the others.
* :mod:`~ricci_jax.data.imagenet`: ImageNet host-side crops (numpy + PIL), a
  Grain map transform.
* :mod:`~ricci_jax.data.specs`: :class:`DatasetSpec`, the registry
  :data:`DATASETS`, the splits and the validation hold-out.
* :mod:`~ricci_jax.data.sources`: the original-file readers, the TFDS reader
  (both Grain random-access data sources) and the ``source=`` choice
  (``"auto"``, ``"files"``, ``"tfds"``).
* :mod:`~ricci_jax.data.pipeline`: the Grain pipeline of a split: order,
  epochs, remainder, per-process rows, batches.
* :mod:`~ricci_jax.data.loader`: :func:`load` and :class:`Dataset` (its
  iterators and their resumable state).
* :mod:`~ricci_jax.data.augmentation`: on-device augmentation and normalisation.
"""

from ricci_jax.data.augmentation import augment, preprocess
from ricci_jax.data.imagenet import (
    ImagenetCrop,
    imagenet_eval_box,
    imagenet_train_box,
    imagenet_transform,
)
from ricci_jax.data.loader import Dataset, load
from ricci_jax.data.pipeline import BATCH_KEYS, ProcessRows, host_batches, shuffle_seed
from ricci_jax.data.sources import SOURCES, read_cifar, read_idx
from ricci_jax.data.specs import DATASETS, SPLITS, DatasetSpec, get_spec, validation_size

__all__ = [
    "BATCH_KEYS",
    "DATASETS",
    "SOURCES",
    "SPLITS",
    "Dataset",
    "DatasetSpec",
    "ImagenetCrop",
    "ProcessRows",
    "augment",
    "get_spec",
    "host_batches",
    "imagenet_eval_box",
    "imagenet_train_box",
    "imagenet_transform",
    "load",
    "preprocess",
    "read_cifar",
    "read_idx",
    "shuffle_seed",
    "validation_size",
]
