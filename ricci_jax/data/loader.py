"""The seeded, sharded, resumable epochs: :func:`load` and :class:`Dataset`.

Order: epoch ``e`` visits the examples in the permutation drawn by
``numpy.random.default_rng([seed, e])``; every host draws the same permutation,
cuts it into global batches of ``batch_size`` and keeps its own
``batch_size // process_count`` rows of each. ``Dataset.epoch(e, start_step)``
starts at any step, for an exact resume.

``load(..., split="train", validation=True)`` leaves out the validation
examples (the last ones of the training split; see
:mod:`ricci_jax.data.specs`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import numpy as np

from ricci_jax.data.checks import check_int
from ricci_jax.data.sources import SOURCES, PathLike, Reader, open_split
from ricci_jax.data.specs import DATASETS, SPLITS, DatasetSpec, get_spec, validation_size


def epoch_order(seed: int, epoch: int, num_examples: int, shuffle: bool = True) -> np.ndarray:
  """The global visiting order of one epoch: a permutation from ``(seed, epoch)``.

  Every host computes the same order. Without ``shuffle`` it is ``arange``.
  (NumPy's PCG64 permutation: reproducible for a given NumPy version, which
  is what an exact resume needs.)
  """
  if not shuffle:
    return np.arange(num_examples)
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


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
    reader: the random-access source of the official split the examples
      are read from (:class:`ricci_jax.data.sources.Reader`).
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
  reader: Reader = dataclasses.field(repr=False)
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
    epoch = check_int("epoch", epoch, 0)
    start_step = check_int("start_step", start_step, 0, self.steps_per_epoch)
    return self._batches(self.order(epoch), epoch, start_step)

  def _rows(self, order: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
    b = self.host_batch_size
    positions = step * self.batch_size + self.process_index * b + np.arange(b)
    mask = positions < self.num_examples
    return self._offset + order[positions[mask]], mask

  def _batches(self, order: np.ndarray, epoch: int, start_step: int) -> Iterator[dict[str, np.ndarray]]:
    def submit(step):
      indices, mask = self._rows(order, step)
      return indices, mask, self.reader.submit(indices, epoch)

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
      examples of the training split; see :mod:`ricci_jax.data.specs`).
    batch_size: the global batch size, whatever the number of hosts; it must
      divide by ``process_count``.
    seed: order seed (and ImageNet host augmentation seed).
    source: ``"auto"``, ``"files"`` or ``"tfds"`` (see :mod:`ricci_jax.data.sources`).
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
  batch_size = check_int("batch_size", batch_size, 1)
  seed = check_int("seed", seed, 0)
  process_count = check_int(
      "process_count", jax.process_count() if process_count is None else process_count, 1)
  process_index = check_int(
      "process_index", jax.process_index() if process_index is None else process_index,
      0, process_count - 1)
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} does not divide by process_count "
                     f"{process_count}: the global batch is split evenly across hosts")
  if limit is not None:
    limit = check_int("limit", limit, 1)
  shuffle = split == "train" if shuffle is None else bool(shuffle)

  official = "test" if split == "test" else "train"
  reader = open_split(spec, official, source, data_dir, train_transform=split == "train", seed=seed)
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
                 process_count=process_count, source=reader.description, reader=reader,
                 _offset=offset)

