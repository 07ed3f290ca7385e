"""Input pipelines: readers, sources, order, sharding, resume, augmentation, errors.

Real data is used where it is on the machine (Fashion-MNIST from Debian's
``dataset-fashion-mnist``, the CIFAR-10 subset of ``shared/data``) and the
tests skip with the reason otherwise; the readers are always tested on small
synthetic folders in the official formats, and the TFDS path both on
``tfds.testing.mock_data`` and on tiny array_record datasets really prepared
in tmp_path (images given pre-encoded, so no TensorFlow is needed). The Grain
pipeline (order, sharding, padding, resume) is checked against NumPy references
on the synthetic folders. The tests go through ``ricci_jax.data``, the
package's public names; the last section checks the package's layout.
"""

import ast
import dataclasses
import gzip
import io
import json
import pathlib
import pickle
import struct
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import presets
from ricci_jax import data

FASHION_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
REPO = pathlib.Path(__file__).resolve().parents[1]


def _cifar_subset_dir():
  found = pathlib.Path(presets.cifar10_subset_dir())
  return found if (found / "test_batch").is_file() else None


CIFAR_SUBSET = _cifar_subset_dir()
needs_fashion = pytest.mark.skipif(
    not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"real Fashion-MNIST not in {FASHION_DIR}: apt-get install dataset-fashion-mnist")
needs_subset = pytest.mark.skipif(
    CIFAR_SUBSET is None,
    reason="CIFAR-10 subset not found at $RICCI_JAX_CIFAR10_SUBSET or <repo>/../shared/data/cifar10-subset")


# ----------------------------------------------------------------------------
# The file readers (ricci_jax.data.sources), on synthetic folders in the
# official formats.
# ----------------------------------------------------------------------------


def _write_cifar(path, images, labels, label_keys=(b"labels",)):
  """One batch file as the official ones: channel-major rows, protocol 2."""
  batch = {b"batch_label": b"synthetic", b"filenames": [b"x.png"] * len(labels),
           b"data": images.transpose(0, 3, 1, 2).reshape(len(images), -1)}
  for key in label_keys:
    batch[key] = [int(v) for v in labels]
  with open(path, "wb") as f:
    pickle.dump(batch, f, protocol=2)


def _write_idx(path, array):
  header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  """cifar-10-batches-py (5 x 12 train, 10 test), cifar-100-python, an MNIST IDX folder."""
  rng = np.random.default_rng(0)
  root = tmp_path_factory.mktemp("synthetic")
  out = {"root": root}
  c10 = root / "cifar-10-batches-py"
  c10.mkdir()
  train = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
  train_labels = rng.integers(0, 10, 60)
  for i in range(5):
    _write_cifar(c10 / f"data_batch_{i + 1}", train[12 * i:12 * (i + 1)], train_labels[12 * i:12 * (i + 1)])
  test = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
  _write_cifar(c10 / "test_batch", test, np.arange(10))
  out["cifar10"] = (train, train_labels, test)
  c100 = root / "cifar-100-python"
  c100.mkdir()
  fine = rng.integers(0, 100, 30)
  _write_cifar(c100 / "train", train[:30], fine, (b"fine_labels", b"coarse_labels"))
  _write_cifar(c100 / "test", test, fine[:10], (b"fine_labels", b"coarse_labels"))
  out["cifar100"] = fine
  mnist = root / "mnist"
  mnist.mkdir()
  digits = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
  _write_idx(mnist / "train-images-idx3-ubyte.gz", digits)
  _write_idx(mnist / "train-labels-idx1-ubyte.gz", np.arange(40) % 10)
  _write_idx(mnist / "t10k-images.idx3-ubyte", digits[:20])  # unzipped, Kaggle-style names
  _write_idx(mnist / "t10k-labels.idx1-ubyte", np.arange(20) % 10)
  out["mnist"] = digits
  return out


def test_cifar_reader_converts_channel_major_rows(synthetic):
  train, train_labels, test = synthetic["cifar10"]
  images, labels = data.read_cifar(synthetic["root"] / "cifar-10-batches-py" / "data_batch_2")
  np.testing.assert_array_equal(images, train[12:24])
  np.testing.assert_array_equal(labels, train_labels[12:24])
  assert images.dtype == np.uint8 and labels.dtype == np.int32 and images.flags.c_contiguous


def test_cifar10_files_source_reads_all_batches_in_order(synthetic):
  train, train_labels, test = synthetic["cifar10"]
  # data_dir may be the batches folder or its parent
  for folder in (synthetic["root"], synthetic["root"] / "cifar-10-batches-py"):
    ds = data.load("cifar10", batch_size=60, data_dir=folder, source="files", shuffle=False)
    batch = next(ds.epoch(0))
    np.testing.assert_array_equal(batch["image"], train)
    np.testing.assert_array_equal(batch["label"], train_labels)
  assert ds.source.startswith("files:") and ds.num_classes == 10 and ds.image_shape == (32, 32, 3)
  test_ds = data.load("cifar10", "test", batch_size=10, data_dir=synthetic["root"])
  np.testing.assert_array_equal(next(test_ds.epoch(0))["image"], test)


def test_cifar100_files_source_uses_fine_labels(synthetic):
  ds = data.load("cifar100", batch_size=30, data_dir=synthetic["root"], shuffle=False)
  assert ds.num_examples == 30 and ds.num_classes == 100
  np.testing.assert_array_equal(next(ds.epoch(0))["label"], synthetic["cifar100"])


def test_cifar_reader_refuses_pickles_that_run_code(tmp_path):
  class Evil:
    def __reduce__(self):
      return (print, ("this must never run",))
  with open(tmp_path / "data_batch_1", "wb") as f:
    pickle.dump({b"data": Evil(), b"labels": [0]}, f)
  with pytest.raises(pickle.UnpicklingError, match="refusing to load builtins.print"):
    data.read_cifar(tmp_path / "data_batch_1")


def test_idx_reader_and_mnist_files_source(synthetic, tmp_path):
  digits = synthetic["mnist"]
  np.testing.assert_array_equal(
      data.read_idx(synthetic["root"] / "mnist" / "train-images-idx3-ubyte.gz"), digits)
  ds = data.load("mnist", batch_size=40, data_dir=synthetic["root"], shuffle=False)
  batch = next(ds.epoch(0))
  assert batch["image"].shape == (40, 28, 28, 1) and ds.image_shape == (28, 28, 1)
  np.testing.assert_array_equal(batch["image"][..., 0], digits)
  np.testing.assert_array_equal(batch["label"], np.arange(40) % 10)
  test = data.load("mnist", "test", batch_size=20, data_dir=synthetic["root"] / "mnist")
  assert test.num_examples == 20
  # a truncated file is refused
  raw = (synthetic["root"] / "mnist" / "t10k-images.idx3-ubyte").read_bytes()
  (tmp_path / "bad").write_bytes(raw[:-5])
  with pytest.raises(ValueError, match="header says shape"):
    data.read_idx(tmp_path / "bad")


# ----------------------------------------------------------------------------
# The real CIFAR-10 subset (files source, validation hold-out).
# ----------------------------------------------------------------------------


@needs_subset
def test_real_cifar10_subset():
  train = data.load("cifar10", batch_size=128, data_dir=CIFAR_SUBSET, source="files")
  test = data.load("cifar10", "test", batch_size=932, data_dir=CIFAR_SUBSET, source="files")
  assert (train.num_examples, test.num_examples) == (4660, 932)
  batch = next(test.epoch(0))
  np.testing.assert_array_equal(batch["label"][:8], [3, 8, 8, 0, 6, 6, 1, 6])
  images = np.concatenate([b["image"] for b in data.load(
      "cifar10", batch_size=932, data_dir=CIFAR_SUBSET, shuffle=False).epoch(0)])
  assert images.shape == (4660, 32, 32, 3)
  np.testing.assert_allclose(images.reshape(-1, 3).mean(0) / 255, [0.493, 0.484, 0.448], atol=1e-3)
  # proportional 10% hold-out: the last 466 training images
  val = data.load("cifar10", "validation", batch_size=466, data_dir=CIFAR_SUBSET)
  assert val.num_examples == 466 == data.validation_size("cifar10", 4660)
  np.testing.assert_array_equal(next(val.epoch(0))["index"], np.arange(4660 - 466, 4660))


# ----------------------------------------------------------------------------
# Real Fashion-MNIST: order, coverage, sharding, resume, splits (ricci_jax.data.loader).
# ----------------------------------------------------------------------------


@needs_fashion
def test_fashion_mnist_found_automatically_with_its_sizes_and_constants():
  train = data.load("fashion_mnist", batch_size=1000, shuffle=False)
  test = data.load("fashion_mnist", "test", batch_size=1000)
  assert train.source == f"files:{FASHION_DIR}"
  assert (train.num_examples, test.num_examples) == (60_000, 10_000)
  assert (train.image_shape, train.num_classes, train.steps_per_epoch) == ((28, 28, 1), 10, 60)
  batches = list(train.epoch(0))
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert images.dtype == np.uint8 and images.shape == (60_000, 28, 28, 1)
  assert labels.dtype == np.int32 and set(np.unique(labels)) == set(range(10))
  np.testing.assert_array_equal(np.bincount(labels), [6000] * 10)
  spec = data.DATASETS["fashion_mnist"]
  np.testing.assert_allclose(images.mean() / 255, spec.mean, atol=1e-4)
  np.testing.assert_allclose(images.std() / 255, spec.std, atol=1e-4)
  # the images and labels read are the files' own
  np.testing.assert_array_equal(labels, data.read_idx(FASHION_DIR / "train-labels-idx1-ubyte.gz"))


@needs_fashion
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_each_epoch_visits_every_example_once(drop_remainder):
  ds = data.load("fashion_mnist", batch_size=1024, drop_remainder=drop_remainder)
  batches = list(ds.epoch(0))
  assert len(batches) == ds.steps_per_epoch == (58 if drop_remainder else 59)
  assert all(b["image"].shape == (1024, 28, 28, 1) for b in batches)
  seen = np.concatenate([b["index"][b["mask"]] for b in batches])
  assert len(seen) == len(np.unique(seen)) == (58 * 1024 if drop_remainder else 60_000)
  if not drop_remainder:
    last = batches[-1]
    assert last["mask"].sum() == 60_000 - 58 * 1024 and (last["index"][~last["mask"]] == -1).all()
    assert not last["image"][~last["mask"]].any()


@needs_fashion
def test_order_is_deterministic_from_seed_and_changes_across_epochs():
  first = lambda ds, e: next(ds.epoch(e))["index"]
  a, b = (data.load("fashion_mnist", batch_size=256, seed=3) for _ in range(2))
  np.testing.assert_array_equal(first(a, 0), first(b, 0))
  np.testing.assert_array_equal(first(a, 5), first(b, 5))
  assert not np.array_equal(first(a, 0), first(a, 1))
  assert not np.array_equal(first(a, 0), first(data.load("fashion_mnist", batch_size=256, seed=4), 0))
  # the image and label at each index are that example's
  batch = next(a.epoch(2))
  full = next(data.load("fashion_mnist", batch_size=60_000, shuffle=False).epoch(0))
  np.testing.assert_array_equal(batch["image"], full["image"][batch["index"]])
  np.testing.assert_array_equal(batch["label"], full["label"][batch["index"]])
  # eval splits keep the file order by default
  np.testing.assert_array_equal(first(data.load("fashion_mnist", "test", batch_size=64), 7), np.arange(64))


@needs_fashion
def test_two_hosts_partition_each_global_batch():
  single = data.load("fashion_mnist", batch_size=256, seed=1)
  hosts = [data.load("fashion_mnist", batch_size=256, seed=1, process_index=i, process_count=2)
           for i in range(2)]
  assert [h.host_batch_size for h in hosts] == [128, 128]
  assert hosts[0].steps_per_epoch == single.steps_per_epoch
  for step, (g, h0, h1) in enumerate(zip(single.epoch(4), hosts[0].epoch(4), hosts[1].epoch(4))):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), g[key])
    if step == 3:
      break
  with pytest.raises(ValueError, match="does not divide by process_count"):
    data.load("fashion_mnist", batch_size=255, process_index=0, process_count=2)


@needs_fashion
def test_start_step_resumes_exactly():
  ds = data.load("fashion_mnist", batch_size=512, seed=7)
  full = list(ds.epoch(2))
  resumed = list(ds.epoch(2, start_step=100))
  assert len(resumed) == ds.steps_per_epoch - 100
  for a, b in zip(full[100:], resumed):
    np.testing.assert_array_equal(a["index"], b["index"])
    np.testing.assert_array_equal(a["image"], b["image"])
  assert list(ds.epoch(2, start_step=ds.steps_per_epoch)) == []
  with pytest.raises(ValueError, match="start_step"):
    ds.epoch(2, start_step=ds.steps_per_epoch + 1)


@needs_fashion
def test_validation_split_is_the_held_out_tail_and_disjoint_from_train():
  train = data.load("fashion_mnist", batch_size=1000, validation=True, drop_remainder=False)
  val = data.load("fashion_mnist", "validation", batch_size=1000, drop_remainder=False)
  assert (train.num_examples, val.num_examples) == (55_000, 5_000)
  seen = lambda ds: np.concatenate([b["index"][b["mask"]] for b in ds.epoch(0)])
  t, v = seen(train), seen(val)
  assert not np.intersect1d(t, v).size
  np.testing.assert_array_equal(np.sort(np.concatenate([t, v])), np.arange(60_000))
  np.testing.assert_array_equal(v, np.arange(55_000, 60_000))
  small = data.load("fashion_mnist", batch_size=100, validation=True, limit=1000)
  assert small.num_examples == 1000 and seen(small).max() < 1000


# ----------------------------------------------------------------------------
# The Grain pipeline (ricci_jax.data.pipeline) against NumPy references on the
# synthetic folders: order, sharding, remainder, resume, bad input.
# ----------------------------------------------------------------------------


def _epoch_rows(ds, epoch):
  """This process's rows of one epoch in order, every batch key concatenated; and the number of batches."""
  batches = list(ds.epoch(epoch))
  return {k: np.concatenate([b[k] for b in batches]) for k in data.BATCH_KEYS}, len(batches)


def test_the_pipeline_is_grain_over_random_access_readers(synthetic):
  ds = data.load("cifar10", batch_size=6, data_dir=synthetic["root"])
  assert isinstance(ds.batches(), grain.MapDataset)
  assert isinstance(ds.iterator(), grain.DatasetIterator) and isinstance(ds.epoch(0), grain.DatasetIterator)
  train, labels, _ = synthetic["cifar10"]
  assert len(ds.reader) == 60
  np.testing.assert_array_equal(ds.reader[13]["image"], train[13])
  assert ds.reader[13]["label"] == labels[13]


@pytest.mark.parametrize("batch_size,drop_remainder", [(8, True), (7, False), (60, True), (4, False)])
def test_each_epoch_is_a_permutation_of_the_split(synthetic, batch_size, drop_remainder):
  train, labels, _ = synthetic["cifar10"]
  n = 60
  ds = data.load("cifar10", batch_size=batch_size, seed=3, drop_remainder=drop_remainder,
                 data_dir=synthetic["root"])
  steps = n // batch_size if drop_remainder else -(-n // batch_size)
  orders = set()
  for epoch in range(4):
    rows, count = _epoch_rows(ds, epoch)
    assert count == ds.steps_per_epoch == steps
    index = rows["index"][rows["mask"]]
    if drop_remainder:  # no example twice, the remainder dropped
      assert rows["mask"].all() and len(index) == len(set(index.tolist())) == steps * batch_size
    else:  # every example once, then padding to the last whole batch
      np.testing.assert_array_equal(np.sort(index), np.arange(n))
      np.testing.assert_array_equal(rows["mask"], np.arange(steps * batch_size) < n)
      assert (rows["index"][~rows["mask"]] == -1).all()
    # each row is that example: the image and label read from the files with NumPy
    np.testing.assert_array_equal(rows["image"][rows["mask"]], train[index])
    np.testing.assert_array_equal(rows["label"][rows["mask"]], labels[index])
    orders.add(tuple(index.tolist()))
  assert len(orders) == 4  # a new order each epoch


def test_positions_are_those_of_the_official_split(synthetic):
  seen = lambda ds: np.sort(_epoch_rows(ds, 1)[0]["index"])  # noqa: E731
  load = lambda split="train", **kw: data.load("cifar10", split, data_dir=synthetic["root"], **kw)  # noqa: E731
  np.testing.assert_array_equal(seen(load(batch_size=5, limit=20)), np.arange(20))
  np.testing.assert_array_equal(seen(load(batch_size=6, validation=True)), np.arange(54))
  np.testing.assert_array_equal(seen(load("validation", batch_size=6, shuffle=True)), np.arange(54, 60))


def test_the_order_follows_the_seed_and_only_the_seed(synthetic):
  def order(seed, epoch):
    return tuple(_epoch_rows(data.load("cifar10", batch_size=6, seed=seed, data_dir=synthetic["root"]),
                             epoch)[0]["index"].tolist())

  assert order(1, 0) == order(1, 0) and order(1, 3) == order(1, 3)  # separately loaded, the same
  orders = {(seed, epoch): order(seed, epoch) for seed in range(4) for epoch in range(3)}
  # different seeds differ; and neighbouring seeds are not each other's epochs shifted (Grain seeds
  # epoch e with seed + e, hence the hashed shuffle seed)
  assert len(set(orders.values())) == len(orders)
  assert len({data.shuffle_seed(s) for s in range(1000)}) == 1000
  # eval splits keep the file order
  np.testing.assert_array_equal(_epoch_rows(data.load("cifar10", "test", batch_size=5, data_dir=synthetic["root"]),
                                            2)[0]["index"], np.arange(10))


@dataclasses.dataclass
class _CountingReader:
  """A reader that records which examples it was asked for."""

  reader: object
  read: list = dataclasses.field(default_factory=list)

  @property
  def description(self):
    return self.reader.description

  def __len__(self):
    return len(self.reader)

  def __getitem__(self, index):
    self.read.append(int(index))
    return self.reader[index]


@pytest.mark.parametrize("split,batch_size,count", [("train", 8, 2), ("train", 12, 4), ("test", 4, 2),
                                                    ("test", 8, 4)])
def test_processes_read_disjoint_rows_that_make_the_one_process_batch(synthetic, split, batch_size, count):
  def load(**kw):
    return data.load("cifar10", split, batch_size=batch_size, seed=5, drop_remainder=split == "train",
                     data_dir=synthetic["root"], **kw)

  single = load()
  shards = [load(process_index=i, process_count=count) for i in range(count)]
  shards = [dataclasses.replace(s, reader=_CountingReader(s.reader)) for s in shards]
  assert {s.host_batch_size for s in shards} == {batch_size // count}
  assert {s.steps_per_epoch for s in shards} == {single.steps_per_epoch}
  for epoch in (0, 2):
    for s in shards:
      s.reader.read.clear()
    batches = [list(s.epoch(epoch)) for s in shards]
    for step, whole in enumerate(single.epoch(epoch)):
      parts = [b[step] for b in batches]
      for key in data.BATCH_KEYS:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])
      real = [set(p["index"][p["mask"]].tolist()) for p in parts]
      assert sum(map(len, real)) == len(set().union(*real))  # disjoint
    for s, b in zip(shards, batches):  # each process read its own rows, nothing else
      mine = np.concatenate([x["index"][x["mask"]] for x in b]).tolist()
      assert sorted(s.reader.read) == sorted(mine)


def test_the_padded_test_split_masks_exactly_the_missing_rows(synthetic):
  _, _, test = synthetic["cifar10"]  # 10 examples, labels 0 to 9
  ds = data.load("cifar10", "test", batch_size=4, drop_remainder=False, data_dir=synthetic["root"])
  for epoch in (0, 1):
    batches = list(ds.epoch(epoch))
    assert len(batches) == ds.steps_per_epoch == 3
    rows = {k: np.concatenate([b[k] for b in batches]) for k in data.BATCH_KEYS}
    np.testing.assert_array_equal(rows["mask"], np.arange(12) < 10)
    np.testing.assert_array_equal(rows["index"], np.r_[np.arange(10), -1, -1])
    np.testing.assert_array_equal(rows["label"], np.r_[np.arange(10), 0, 0])
    np.testing.assert_array_equal(rows["image"][:10], test)
    assert not rows["image"][10:].any()
    assert {k: v.dtype for k, v in batches[-1].items()} == {
        "image": np.uint8, "label": np.int32, "mask": np.bool_, "index": np.int32}
  # two processes: the second holds only padding in the last batch
  last = [list(data.load("cifar10", "test", batch_size=4, drop_remainder=False, data_dir=synthetic["root"],
                         process_index=i, process_count=2).epoch(0))[-1] for i in range(2)]
  np.testing.assert_array_equal(last[0]["index"], [8, 9])
  np.testing.assert_array_equal(last[1]["index"], [-1, -1])
  assert not last[1]["mask"].any()


@pytest.mark.parametrize("stop", [0, 3, 10, 17])
def test_a_saved_iterator_state_resumes_with_exactly_the_rest(synthetic, stop):
  def load(**kw):
    return data.load("cifar10", batch_size=6, seed=2, data_dir=synthetic["root"], **kw)  # 10 steps an epoch

  ds = load()
  whole = ds.iterator()
  reference = [next(whole) for _ in range(25)]  # two and a half epochs, uninterrupted
  interrupted = ds.iterator()
  for _ in range(stop):
    next(interrupted)
  state = json.loads(json.dumps(interrupted.get_state()))  # as the checkpoint stores it
  resumed = load().iterator(stop, state)
  for want in reference[stop:]:
    got = next(resumed)
    for key in data.BATCH_KEYS:
      np.testing.assert_array_equal(got[key], want[key])
  # epoch e, step s of the epochs is step e * steps_per_epoch + s of the iterator
  for epoch, step in ((0, 0), (1, 4), (2, 0)):
    np.testing.assert_array_equal(next(ds.epoch(epoch, step))["index"], reference[10 * epoch + step]["index"])
  # a state is the same on every process, and restores any of them
  shards = [load(process_index=i, process_count=2) for i in range(2)]
  iterators = [s.iterator() for s in shards]
  for it in iterators:
    for _ in range(stop):
      next(it)
  assert iterators[0].get_state() == iterators[1].get_state() == state
  halves = [next(s.iterator(stop, state)) for s in shards]
  np.testing.assert_array_equal(np.concatenate([h["index"] for h in halves]), reference[stop]["index"])
  with pytest.raises(ValueError, match=f"stands at step {stop}, not at the checkpoint's step {stop + 1}"):
    load().iterator(stop + 1, state)


def test_bad_sharding_and_positions_raise_clear_errors(synthetic):
  root = synthetic["root"]
  with pytest.raises(ValueError, match="batch_size 9 does not divide by process_count 2"):
    data.load("cifar10", batch_size=9, process_index=0, process_count=2, data_dir=root)
  with pytest.raises(ValueError, match=r"process_index must be in \[0, 1\], got 2"):
    data.load("cifar10", batch_size=8, process_index=2, process_count=2, data_dir=root)
  ds = data.load("cifar10", batch_size=6, data_dir=root)
  with pytest.raises(ValueError, match=r"start_step must be in \[0, 10\], got 11"):
    ds.epoch(0, start_step=11)
  with pytest.raises(ValueError, match="step must be >= 0"):
    ds.iterator(-1)
  with pytest.raises(ValueError, match="epoch must be an integer"):
    ds.epoch(1.0)
  with pytest.raises(ValueError, match="batch_size 6 does not divide by process_count 4"):
    data.ProcessRows(grain.MapDataset.range(12), 6, grain.sharding.ShardOptions(0, 4))
  with pytest.raises(ValueError, match="whole global batches of 5, got 12"):
    data.ProcessRows(grain.MapDataset.range(12), 5, grain.sharding.ShardOptions(0, 1))


# ----------------------------------------------------------------------------
# Device augmentation and normalisation (ricci_jax.data.augmentation).
# ----------------------------------------------------------------------------


def _images(n=16, shape=(32, 32, 3), seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _unnormalize(name, y):
  spec = data.DATASETS[name]
  return np.rint((np.asarray(y) * np.array(spec.std) + np.array(spec.mean)) * 255).astype(np.int64)


def test_augment_is_jittable_and_deterministic_per_rng():
  x = _images()
  key = jax.random.key(0)
  y = data.augment("cifar10", key, x)
  assert y.shape == x.shape and y.dtype == jnp.float32
  np.testing.assert_array_equal(y, data.augment("cifar10", key, x))
  np.testing.assert_array_equal(y, jax.jit(lambda k, im: data.augment("cifar10", k, im))(key, x))
  assert not np.array_equal(y, data.augment("cifar10", jax.random.key(1), x))
  # raw uint32 keys work too
  data.augment("cifar10", jax.random.PRNGKey(0), x)


def test_random_crop_is_a_shifted_window_of_the_zero_padded_image():
  x = _images(8)
  y = _unnormalize("cifar10", data.augment("cifar10", jax.random.key(2), x, flip=False))
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0))).astype(np.int64)
  shifts = []
  for img, out in zip(padded, y):
    hits = [(dy, dx) for dy in range(9) for dx in range(9)
            if np.array_equal(img[dy:dy + 32, dx:dx + 32], out)]
    assert hits, "the output is not a 32x32 window of the padded image"
    shifts.append(hits[0])
  assert len(set(shifts)) > 1


def test_flip_really_flips():
  x = _images(64)
  y = _unnormalize("cifar10", data.augment("cifar10", jax.random.key(3), x, pad=0))
  flipped = np.array([np.array_equal(o, i[:, ::-1]) for o, i in zip(y, x)])
  kept = np.array([np.array_equal(o, i) for o, i in zip(y, x)])
  assert (flipped ^ kept).all() and 10 < flipped.sum() < 54


def test_normalisation_constants():
  cifar = data.DATASETS["cifar10"]
  assert cifar.mean == (0.4914, 0.4822, 0.4465) and cifar.std == (0.2470, 0.2435, 0.2616)
  assert data.DATASETS["imagenet2012"].std == (0.229, 0.224, 0.225)
  white = np.full((1, 32, 32, 3), 255, np.uint8)
  np.testing.assert_allclose(data.preprocess("cifar10", white)[0, 0, 0],
                             (1 - np.array(cifar.mean)) / np.array(cifar.std), rtol=1e-6)
  x = _images(4)
  expected = (x / 255.0 - np.array(cifar.mean)) / np.array(cifar.std)
  np.testing.assert_allclose(data.preprocess("cifar10", x), expected, rtol=1e-5, atol=1e-5)
  # no augmentation: augment is preprocess
  np.testing.assert_array_equal(data.augment("cifar10", jax.random.key(0), x, pad=0, flip=False),
                                data.preprocess("cifar10", x))
  digits = _images(4, (28, 28, 1))
  np.testing.assert_array_equal(data.augment("fashion_mnist", jax.random.key(0), digits),
                                data.preprocess("fashion_mnist", digits))
  np.testing.assert_allclose(data.preprocess("mnist", digits), (digits / 255 - 0.1307) / 0.3081,
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"\[batch, H, W, 1\]"):
    data.preprocess("mnist", x)


# ----------------------------------------------------------------------------
# The TFDS source (ricci_jax.data.sources), on tfds.testing.mock_data (no
# TensorFlow needed), and the ImageNet host crops (ricci_jax.data.imagenet).
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,classes", [
    ("cifar10", (32, 32, 3), 10), ("cifar100", (32, 32, 3), 100),
    ("imagenet2012", (224, 224, 3), 1000)])
def test_tfds_source_on_mock_data(name, shape, classes, tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=20):
    train = data.load(name, batch_size=8, source="tfds", data_dir=tmp_path)
    test = data.load(name, "test", batch_size=8, source="tfds", data_dir=tmp_path,
                     drop_remainder=False)
    batches = list(train.epoch(0))
    test_batches = list(test.epoch(0))
  assert train.source.startswith("tfds:") and train.num_examples == 20
  assert train.image_shape == shape and train.num_classes == classes
  assert len(batches) == 2 and len(test_batches) == 3
  for b in batches + test_batches:
    assert b["image"].shape == (8, *shape) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32 and 0 <= b["label"].min() and b["label"].max() < classes
  assert test_batches[-1]["mask"].sum() == 4
  expected_test = "validation" if name == "imagenet2012" else "test"
  assert test.source.endswith(f":{expected_test}")


def _prepare_tfds(data_dir, name, splits, fmt):
  """Prepares a real array_record TFDS dataset (the named builder's version and
  features) from given examples. Images are given already encoded, so no
  TensorFlow is needed."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from PIL import Image
  real = tfds.builder(name, data_dir=data_dir)

  def encode(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt)
    buffer.seek(0)
    return buffer

  def generate(examples):
    for i, ex in enumerate(examples):
      yield i, {**ex, "image": encode(ex["image"])}

  with tfds.core.registered.skip_registration():
    builder_cls = type("Prepared", (tfds.core.GeneratorBasedBuilder,), {
        "name": name, "VERSION": real.version,
        "_info": lambda self: tfds.core.DatasetInfo(builder=self, features=real.info.features),
        "_split_generators": lambda self, dl: {k: generate(v) for k, v in splits.items()},
        "_generate_examples": lambda self: None})
  builder_cls(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_source_reads_really_prepared_array_record_data(tmp_path):
  """Not mocked: the real cifar10 builder reads array_record files from disk."""
  make = lambda n, base: [dict(id=f"{base}_{i}", label=i % 10,
                               image=np.full((32, 32, 3), base + i, np.uint8)) for i in range(n)]
  _prepare_tfds(tmp_path, "cifar10", {"train": make(30, 0), "test": make(10, 100)}, "PNG")
  ds = data.load("cifar10", batch_size=30, source="tfds", data_dir=tmp_path, shuffle=False)
  assert ds.source == f"tfds:{tmp_path}/cifar10/{ds.reader.source.dataset_info.version}:train"
  batch = next(ds.epoch(0))
  pixel = batch["image"][:, 0, 0, 0].astype(int)
  np.testing.assert_array_equal(batch["label"], pixel % 10)  # images and labels stay together
  np.testing.assert_array_equal(np.sort(pixel), np.arange(30))
  assert (batch["image"] == pixel[:, None, None, None]).all()
  test = data.load("cifar10", "test", batch_size=10, source="auto", data_dir=tmp_path)
  assert test.num_examples == 10 and (next(test.epoch(0))["image"] >= 100).all()
  # ImageNet: real JPEG decoding, then the host crop to 224
  images = [np.random.default_rng(i).integers(0, 256, (40 + 7 * i, 60 - 3 * i, 3), dtype=np.uint8)
            for i in range(6)]
  examples = [dict(image=im, label=i, file_name=f"n{i}.JPEG") for i, im in enumerate(images)]
  _prepare_tfds(tmp_path, "imagenet2012", {"train": examples, "validation": examples}, "JPEG")
  for split in ("train", "test"):
    batch = next(data.load("imagenet2012", split, batch_size=6, source="tfds",
                           data_dir=tmp_path).epoch(0))
    assert batch["image"].shape == (6, 224, 224, 3)
    assert sorted(batch["label"]) == list(range(6))


def test_imagenet_host_transforms_on_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    train = data.load("imagenet2012", batch_size=12, source="tfds", seed=5)
    raw_shapes = {train.reader.source[i]["image"].shape for i in range(12)}
    e0, e0_again, e1 = (next(train.epoch(e)) for e in (0, 0, 1))
    again = next(data.load("imagenet2012", batch_size=12, source="tfds", seed=5).epoch(0))
    test = data.load("imagenet2012", "test", batch_size=12, source="tfds")
    t0, t1 = next(test.epoch(0)), next(test.epoch(1))
  assert len(raw_shapes) > 1, "mock images should have varied sizes"
  np.testing.assert_array_equal(e0["image"], e0_again["image"])
  np.testing.assert_array_equal(e0["image"], again["image"])
  # the same example, cropped differently in another epoch
  at = lambda b, i: b["image"][list(b["index"]).index(i)]
  assert not np.array_equal(at(e0, 0), at(e1, 0))
  np.testing.assert_array_equal(t0["image"], t1["image"])  # eval: no randomness
  # a crop belongs to the example: two processes crop their halves as one process does
  with tfds.testing.mock_data(num_examples=12):
    one = next(data.load("imagenet2012", batch_size=4, source="tfds", seed=5).epoch(1))
    halves = [next(data.load("imagenet2012", batch_size=4, source="tfds", seed=5, process_index=i,
                             process_count=2).epoch(1)) for i in range(2)]
  for key in data.BATCH_KEYS:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), one[key])


def test_imagenet_crop_is_a_grain_map_seeded_by_the_example():
  image = _images(1, (60, 90, 3))[0]
  example = {"image": image, "label": np.int32(3), "mask": np.True_, "index": np.int32(17), "epoch": 2}
  crop = data.ImagenetCrop(seed=5, train=True)
  assert isinstance(crop, grain.transforms.Map)
  out = crop.map(example)
  np.testing.assert_array_equal(out["image"], data.imagenet_transform(image, np.random.default_rng([5, 2, 17])))
  assert out["label"] == 3 and out["index"] == 17 and out["image"].shape == (224, 224, 3)
  assert not np.array_equal(out["image"], crop.map({**example, "epoch": 3})["image"])
  np.testing.assert_array_equal(data.ImagenetCrop(seed=5, train=False).map(example)["image"],
                                data.imagenet_transform(image, None))
  padding = {**example, "mask": np.False_, "image": np.zeros((224, 224, 3), np.uint8)}
  assert crop.map(padding) is padding


def test_imagenet_crop_boxes():
  assert data.imagenet_eval_box(256, 512) == (144.0, 16.0, 368.0, 240.0)
  rng = np.random.default_rng(0)
  for h, w in [(375, 500), (500, 333), (20, 400), (64, 64)]:
    for _ in range(50):
      left, top, right, bottom = data.imagenet_train_box(h, w, rng)
      assert 0 <= left < right <= w and 0 <= top < bottom <= h
  # regular shapes: area fraction and aspect ratio within the ranges
  boxes = [data.imagenet_train_box(375, 500, rng) for _ in range(200)]
  area = np.array([(r - l) * (b - t) for l, t, r, b in boxes]) / (375 * 500)
  ratio = np.array([(r - l) / (b - t) for l, t, r, b in boxes])
  assert area.min() > 0.07 and area.max() <= 1.0 and ratio.min() > 0.7 and ratio.max() < 1.4
  image = _images(1, (60, 90, 3))[0]
  out = data.imagenet_transform(image, None)
  assert out.shape == (224, 224, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, data.imagenet_transform(image, None))


# ----------------------------------------------------------------------------
# Errors: bad input, and missing data failing fast.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(name="cifar1000"), "unknown dataset 'cifar1000'; known: cifar10, cifar100"),
    (dict(split="val"), "split must be one of"),
    (dict(source="internet"), "source must be one of"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(batch_size=12.0), "batch_size must be an integer"),
    (dict(batch_size=10, process_count=4, process_index=0), "does not divide by process_count"),
    (dict(process_count=2, process_index=2), r"process_index must be in \[0, 1\]"),
    (dict(limit=0), "limit must be >= 1"),
])
def test_bad_arguments_raise_before_any_reading(kwargs, match, tmp_path):
  args = dict(name="cifar100", split="train", batch_size=8, data_dir=tmp_path / "nothing")
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    data.load(args.pop("name"), args.pop("split"), **args)


def test_batch_and_limit_larger_than_the_dataset(synthetic):
  with pytest.raises(ValueError, match="batch_size 61 exceeds the 60 examples"):
    data.load("cifar10", batch_size=61, data_dir=synthetic["root"])
  with pytest.raises(ValueError, match="limit 61 exceeds"):
    data.load("cifar10", batch_size=8, data_dir=synthetic["root"], limit=61)
  # padded: one batch is fine
  ds = data.load("cifar10", "test", batch_size=16, data_dir=synthetic["root"], drop_remainder=False)
  assert ds.steps_per_epoch == 1 and next(ds.epoch(0))["mask"].sum() == 10
  with pytest.raises(ValueError, match="unknown dataset"):
    data.augment("svhn", jax.random.key(0), _images(1))


@pytest.mark.parametrize("name,hint", [
    ("cifar10", "tfds build cifar10 --file_format=array_record"),
    ("imagenet2012", "manual download"),
])
def test_missing_tfds_data_fails_fast(name, hint, tmp_path):
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as info:
    data.load(name, batch_size=8, source="tfds", data_dir=tmp_path)
  assert time.monotonic() - start < 5.0
  message = str(info.value)
  assert f"tfds: {tmp_path}" in message and "not prepared" in message and hint in message


def test_auto_source_lists_every_place_it_looked(tmp_path):
  start = time.monotonic()
  with pytest.raises(FileNotFoundError) as info:
    data.load("fashion_mnist", batch_size=8, data_dir=tmp_path)
  assert time.monotonic() - start < 5.0
  message = str(info.value)
  for place in (f"{tmp_path} (no train-images-idx3-ubyte[.gz])",
                f"{tmp_path / 'fashion-mnist'} (no such folder)", f"tfds: {tmp_path}"):
    assert place in message
  assert "apt-get install dataset-fashion-mnist" in message
  with pytest.raises(FileNotFoundError, match="no offline files reader"):
    data.load("imagenet2012", batch_size=8, source="files")


# ----------------------------------------------------------------------------
# The package's layout: small modules, public names only, no import circle.
# ----------------------------------------------------------------------------


def _package_modules():
  folder = pathlib.Path(data.__file__).parent
  return {p.stem: ast.parse(p.read_text()) for p in sorted(folder.glob("*.py"))}, folder


def test_package_modules_are_small_use_public_names_and_form_no_circle():
  modules, folder = _package_modules()
  for path in folder.glob("*.py"):
    assert len(path.read_text().splitlines()) <= 500, f"{path.name} is over 500 lines"
  graph = {}
  for name, tree in modules.items():
    deps = set()
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ricci_jax.data"):
        deps.add(node.module.rpartition(".")[2])
        private = [a.name for a in node.names if a.name.startswith("_")]
        assert not private, f"{name} imports private {private} from {node.module}"
    graph[name] = deps - {"data"}
  # the import graph between the modules is acyclic (a topological order exists)
  done = set()
  while len(done) < len(graph):
    ready = [m for m in graph if m not in done and graph[m] <= done]
    assert ready, f"import circle among {sorted(set(graph) - done)}"
    done.update(ready)


def test_package_reexports_its_public_names():
  assert sorted(data.__all__) == sorted(set(data.__all__))
  for name in data.__all__:
    assert getattr(data, name) is not None
  # the submodules stay reachable under their own names (none is shadowed by a function)
  from ricci_jax.data import augmentation, imagenet, loader, pipeline, sources, specs  # noqa: PLC0415
  assert data.augment is augmentation.augment and data.load is loader.load
  assert data.host_batches is pipeline.host_batches
  assert data.read_idx is sources.read_idx and data.DATASETS is specs.DATASETS
  assert data.imagenet_transform is imagenet.imagenet_transform


def test_check_int_refuses_bools_floats_and_out_of_range_values():
  from ricci_jax.data.checks import check_int  # noqa: PLC0415
  assert check_int("n", np.int64(3), 0) == 3 and type(check_int("n", np.int64(3), 0)) is int
  for value, match in [(True, "integer"), (2.0, "integer"), (-1, ">= 0"), (5, r"in \[0, 4\]")]:
    with pytest.raises(ValueError, match=f"n must be.*{match}"):
      check_int("n", value, 0, 4 if value == 5 else None)
