"""The seeded, sharded, resumable batches of a split: :func:`load` and :class:`Dataset`.

The batches come from a Grain pipeline (:mod:`ricci_jax.data.pipeline`):
Grain's index shuffle draws each epoch's order from the seed and the epoch,
every process computes the same order and reads only its own rows of each
global batch (``batch_size // process_count``), and the iterators are Grain's,
whose ``get_state()`` the training loop saves in its checkpoints, so a resumed
run continues with exactly the batch that would have come next.

``load(..., split="train", validation=True)`` leaves out the validation
examples (the last ones of the training split; see
:mod:`ricci_jax.data.specs`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import grain

from ricci_jax.data.checks import check_int
from ricci_jax.data.imagenet import ImagenetCrop
from ricci_jax.data.pipeline import host_batches
from ricci_jax.data.sources import SOURCES, PathLike, Reader, open_split
from ricci_jax.data.specs import DATASETS, SPLITS, DatasetSpec, get_spec, validation_size


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """One split, batched and sharded for this process. Build it with :func:`load`.

  Attributes:
    name: dataset name.
    split: ``"train"``, ``"validation"`` or ``"test"``.
    num_examples: examples in the split (after ``validation`` and ``limit``).
    batch_size: the global batch size (all processes together).
    seed: the order (and ImageNet host crop) seed.
    shuffle: whether each epoch is a fresh permutation.
    drop_remainder: drop the last partial global batch; otherwise it is padded
      (``mask`` False, ``index`` -1, zero images and labels).
    process_index: this process.
    process_count: number of processes.
    source: where the data is read from (``files:<folder>`` or ``tfds:<dir>``).
    reader: the official split the examples are read from, a Grain
      random-access data source (:class:`ricci_jax.data.sources.Reader`).
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
    """Examples this process yields per step: ``batch_size // process_count``."""
    return self.batch_size // self.process_count

  @property
  def steps_per_epoch(self) -> int:
    div = divmod(self.num_examples, self.batch_size)
    return div[0] if self.drop_remainder else div[0] + (div[1] > 0)

  def __len__(self) -> int:
    """Steps per epoch (as a PyTorch ``DataLoader``'s length), not examples."""
    return self.steps_per_epoch

  @property
  def shard(self) -> grain.sharding.ShardOptions:
    """This process among the others, as Grain's sharding options."""
    return grain.sharding.ShardOptions(shard_index=self.process_index, shard_count=self.process_count)

  @property
  def read_options(self) -> grain.ReadOptions:
    """How Grain reads ahead: no threads for data in memory, threads for TFDS files.

    Data held in memory costs less to read on the consuming thread than to
    hand over between threads under the GIL (Grain's own advice); a TFDS
    example is read from disk and decoded, which threads overlap. A thread
    prepares one whole batch, so the buffer counts batches.
    """
    if self.source.startswith("files:"):
      return grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    threads = min(grain.ReadOptions().num_threads, os.cpu_count() or 1)
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads)

  def batches(self) -> grain.MapDataset:
    """This process's batches as a Grain ``MapDataset``: element ``k`` is step ``k`` of a run.

    Epoch after epoch without end (epoch ``k // steps_per_epoch``); see
    :func:`ricci_jax.data.pipeline.host_batches`.
    """
    transforms = []
    if self.name == "imagenet2012":
      transforms.append(ImagenetCrop(seed=self.seed, train=self.split == "train"))
    return host_batches(
        self.reader, offset=self._offset, num_examples=self.num_examples, batch_size=self.batch_size,
        shard=self.shard, shuffle=self.shuffle, seed=self.seed, drop_remainder=self.drop_remainder,
        image_shape=self.image_shape, transforms=transforms)

  def iterator(self, step: int = 0, state: dict[str, Any] | None = None) -> grain.DatasetIterator:
    """This process's batches from run step ``step`` on, across epochs: a checkpointable Grain iterator.

    Its ``get_state()`` (a small JSON-able dict) says where it stands: the
    next step of the run. That is the same on every process and for any
    number of processes (each process's pipeline has one element per global
    batch), so one process's saved state restores all of them.

    Args:
      step: the run step of the first batch (``epoch * steps_per_epoch +
        step in the epoch``).
      state: a ``get_state()`` saved with a checkpoint of step ``step``; it is
        restored and must stand at ``step``.

    Raises:
      ValueError: ``state`` stands at another step (it belongs to another
        checkpoint or another pipeline).
    """
    step = check_int("step", step, 0)
    iterator = iter(self.batches().to_iter_dataset(self.read_options))
    if state is not None:
      iterator.set_state(state)
    else:
      grain.experimental.set_next_index(iterator, step)
    at = grain.experimental.get_next_index(iterator)
    if at != step:
      raise ValueError(f"the saved input pipeline state {state} stands at step {at}, not at the "
                       f"checkpoint's step {step}: it belongs to another checkpoint or pipeline")
    return iterator

  def epoch(self, epoch: int, start_step: int = 0) -> grain.DatasetIterator:
    """This process's batches of one epoch, from ``start_step`` on, as a Grain iterator.

    Step ``s`` of epoch ``e`` is step ``e * steps_per_epoch + s`` of
    :meth:`iterator`: the rows ``[s * batch_size, (s + 1) * batch_size)`` of
    the epoch's order, of which this process yields its block ``[process_index
    * b, (process_index + 1) * b)``, ``b = host_batch_size``.

    Args:
      epoch: epoch number (>= 0): picks the permutation.
      start_step: first step to yield (0 to ``steps_per_epoch``).

    Returns:
      A Grain iterator of ``dict(image=uint8 [b, H, W, C], label=int32 [b],
      mask=bool [b], index=int32 [b])``; ``index`` is the example's position in
      the official split (-1 for padding).
    """
    epoch = check_int("epoch", epoch, 0)
    start_step = check_int("start_step", start_step, 0, self.steps_per_epoch)
    first = epoch * self.steps_per_epoch
    return iter(self.batches()[first + start_step:first + self.steps_per_epoch]
                .to_iter_dataset(self.read_options))


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
    seed: order seed (and ImageNet host crop seed).
    source: ``"auto"``, ``"files"`` or ``"tfds"`` (see :mod:`ricci_jax.data.sources`).
    data_dir: the folder of the original files (or its parent) and the TFDS
      data dir; ``None`` searches the default places.
    validation: with ``split="train"``, leave out the validation examples
      (RF-DNN's 45k/5k on CIFAR). Ignored by the other splits.
    process_index: this process, default ``jax.process_index()`` (Grain's
      ``ShardByJaxProcess``).
    process_count: number of processes, default ``jax.process_count()``.
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
  if process_index is None or process_count is None:
    jax_process = grain.sharding.ShardByJaxProcess()
    process_count = jax_process.shard_count if process_count is None else process_count
    process_index = jax_process.shard_index if process_index is None else process_index
  process_count = check_int("process_count", process_count, 1)
  process_index = check_int("process_index", process_index, 0, process_count - 1)
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} does not divide by process_count "
                     f"{process_count}: the global batch is split evenly across hosts")
  if limit is not None:
    limit = check_int("limit", limit, 1)
  shuffle = split == "train" if shuffle is None else bool(shuffle)

  official = "test" if split == "test" else "train"
  reader = open_split(spec, official, source, data_dir)
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

