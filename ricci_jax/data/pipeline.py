"""The Grain pipeline of one split: order, epochs, remainder, per-process rows, batches.

:func:`host_batches` chains Grain ``MapDataset`` transformations. Element ``k``
of the result is this process's batch of step ``k`` of a run (epoch ``k //
steps_per_epoch``), computed from ``k`` alone, so a run can start reading at
any step (the exact resume) and every process computes the same global order
without talking to the others:

1. ``grain.MapDataset.range``: the positions of the split's examples.
2. ``shuffle``: Grain's global index shuffle, a new permutation each epoch.
   Past the first epoch Grain hands every transformation the index ``epoch *
   length + i``, and the shuffle seeds epoch ``e`` with ``seed + e``; the seed
   is a hash of the run's seed (:func:`shuffle_seed`).
3. The remainder of the split after whole global batches: ``slice`` drops it,
   or ``concatenate`` pads it to one whole batch with padding positions, read
   as padding examples (``mask`` False, ``index`` -1, zero image and label),
   since evaluation needs every example once and the jitted step a fixed shape.
4. :class:`ProcessRows`: this process's rows of every global batch.
5. ``map_with_index``: the example at each position, read from the split's
   reader (a Grain random-access data source) and labelled with its position in
   the official split (``index``) and its epoch. Only this process's rows are
   ever read.
6. The host transforms (ImageNet crops), ``batch`` and ``repeat`` (epochs).

The reader is read through a map over positions rather than wrapped in
``grain.MapDataset.source``, which meters every read for Grain's monitoring,
at a cost larger than all the other steps together on data held in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from ricci_jax.data.sources import Reader

BATCH_KEYS = ("image", "label", "mask", "index")
"""The keys of a batch: ``image`` uint8 [b, H, W, C], ``label`` int32 [b],
``mask`` bool [b] (False for padding), ``index`` int32 [b] (the position in
the official split, -1 for padding)."""


def shuffle_seed(seed: int) -> int:
  """The Grain shuffle seed of a run's seed: NumPy's ``SeedSequence`` hash, in Grain's seed range.

  Grain reshuffles epoch ``e`` with ``shuffle seed + e``; fed the run seeds
  directly, runs with neighbouring seeds (the seeds of one experiment) would
  see each other's orders one epoch apart, and their spread would not be the
  spread of independent runs.
  """
  return int(np.random.SeedSequence(seed).generate_state(1, np.uint32)[0])


class ProcessRows(grain.MapDataset):
  """This process's rows of every global batch of ``parent``: sharding by batch rows, as a Grain ``MapDataset``.

  Grain's own sharding (``ShardOptions`` with ``even_split``, or ``ds[shard_index::shard_count]``) gives
  each process a part of the examples in an order of its own, so the global batch would depend on the
  number of processes. Here every process follows the same global order and keeps the
  ``shard.shard_index``-th block of ``batch_size // shard.shard_count`` rows of each global batch: the
  processes read disjoint rows whose concatenation is the one-process batch, which is what makes a
  multi-process run equal to a one-process run on as many devices.

  Element ``k`` is row ``k % rows`` of this process's block of global batch ``k // rows``. ``parent``
  must hold whole global batches; indices past its length carry on into its next epochs, as in every
  Grain ``MapDataset``.
  """

  def __init__(self, parent: grain.MapDataset, batch_size: int, shard: grain.sharding.ShardOptions):
    super().__init__(parent)
    if batch_size % shard.shard_count:
      raise ValueError(f"batch_size {batch_size} does not divide by process_count {shard.shard_count}: "
                       "the global batch is split evenly across processes")
    if len(parent) % batch_size:
      raise ValueError(f"ProcessRows needs whole global batches of {batch_size}, got {len(parent)} examples")
    self._batch_size = batch_size
    self._rows = batch_size // shard.shard_count
    self._first = shard.shard_index * self._rows
    self._length = len(parent) // batch_size * self._rows

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f"ProcessRows(rows {self._first}:{self._first + self._rows} of {self._batch_size})"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    step, row = divmod(index, self._rows)
    return self._parent[step * self._batch_size + self._first + row]


@dataclasses.dataclass(frozen=True, eq=False)
class _Read(grain.transforms.MapWithIndex):
  """The example at a position of the split (padding at -1), with its official position and its epoch."""

  reader: Reader
  offset: int
  rows_per_epoch: int
  padding: dict = dataclasses.field(repr=False)

  def map_with_index(self, index: int, position: int) -> dict:
    if position < 0:
      return self.padding
    example = self.reader[self.offset + position]
    return {"image": example["image"], "label": np.int32(example["label"]), "mask": np.True_,
            "index": np.int32(self.offset + position), "epoch": index // self.rows_per_epoch}


def _stack(examples: Sequence[dict]) -> dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in BATCH_KEYS}


def host_batches(
    reader: Reader,
    *,
    offset: int,
    num_examples: int,
    batch_size: int,
    shard: grain.sharding.ShardOptions,
    shuffle: bool,
    seed: int,
    drop_remainder: bool,
    image_shape: tuple[int, int, int],
    transforms: Sequence[grain.transforms.Map] = (),
) -> grain.MapDataset:
  """This process's batches of a split, epoch after epoch, endless (see the module docstring).

  Args:
    reader: the official split (a Grain random-access data source).
    offset: where the split starts in ``reader`` (the validation hold-out).
    num_examples: the split's examples, ``reader[offset:offset + num_examples]``.
    batch_size: the global batch size.
    shard: this process (``shard_index``) among ``shard_count``.
    shuffle: a new permutation each epoch, else the split's order.
    seed: the run's seed (:func:`shuffle_seed`).
    drop_remainder: drop the last partial global batch, else pad it.
    image_shape: the batch's image shape (padding examples).
    transforms: Grain map transforms of each example (ImageNet crops), after
      sharding, so each process maps only its own rows.

  Returns:
    A ``grain.MapDataset`` whose element ``k`` is the batch of step ``k``,
    ``dict`` of :data:`BATCH_KEYS` with ``batch_size // shard.shard_count`` rows.
  """
  steps = num_examples // batch_size if drop_remainder else -(-num_examples // batch_size)
  whole = steps * batch_size
  positions = grain.MapDataset.range(num_examples)
  if shuffle:
    positions = positions.shuffle(seed=shuffle_seed(seed))
  if whole < num_examples:
    positions = positions[:whole]
  elif whole > num_examples:
    positions = grain.MapDataset.concatenate(
        [positions, grain.MapDataset.range(whole - num_examples).map(lambda _: -1)])
  rows = ProcessRows(positions, batch_size, shard)
  padding = {"image": np.zeros(image_shape, np.uint8), "label": np.int32(0), "mask": np.False_,
             "index": np.int32(-1)}
  examples = rows.map_with_index(_Read(reader, offset, len(rows), padding))
  for transform in transforms:
    examples = examples.map(transform)
  return examples.batch(batch_size // shard.shard_count, batch_fn=_stack).repeat()
