"""Input-pipeline throughput on this machine: host batches, then host + device augmentation.

Run from the repository root:

  python -m benchmarks.input_pipeline [--batch-size 128] [--seconds 3]

Measures, at the given batch size, for real Fashion-MNIST (Debian's
``dataset-fashion-mnist``) and the real CIFAR-10 subset (``shared/data``):

* ``host``: images/s of ``Dataset.iterator`` alone (the Grain iterator the
  training loop reads, epoch after epoch; uint8 batches in memory);
* ``host+augment``: the same plus ``augment`` on the device, waited for
  (``block_until_ready``), i.e. what a training loop pays for its input;
* ``augment``: the jit-compiled ``augment`` alone, on one batch.

Also times the ImageNet host transforms (random-resized crop + flip, and
resize + center crop) on synthetic 375x500 images, one thread, without JPEG
decoding. Prints a table and writes ``benchmarks/results/input_pipeline.json``.
Datasets that are not on the machine are reported as skipped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import pathlib
import platform
import time

import jax
import numpy as np

from experiments.configs import presets
from ricci_jax import data
from benchmarks.common import save_json

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "input_pipeline.json"


def _cifar_subset() -> pathlib.Path | None:
  found = pathlib.Path(presets.cifar10_subset_dir())
  return found if (found / "test_batch").is_file() else None


def _rate(fn, seconds: float) -> tuple[float, int]:
  """Calls ``fn() -> images`` until ``seconds`` have passed; returns (images/s, images)."""
  images, start = 0, time.perf_counter()
  while (elapsed := time.perf_counter() - start) < seconds:
    images += fn()
  return images / elapsed, images


def bench_dataset(name: str, batch_size: int, seconds: float, **load_kwargs) -> dict:
  start = time.perf_counter()
  ds = data.load(name, batch_size=batch_size, **load_kwargs)
  load_s = time.perf_counter() - start
  stream = ds.iterator()  # epoch after epoch, as the training loop reads it
  host = lambda: len(next(stream)["label"])
  host_rate, _ = _rate(host, seconds)

  key = jax.random.key(0)
  step = [0]

  def host_augment():
    batch = next(stream)
    data.augment(name, jax.random.fold_in(key, step[0]), batch["image"]).block_until_ready()
    step[0] += 1
    return len(batch["label"])

  host_augment()  # compile
  both_rate, _ = _rate(host_augment, seconds)
  batch = next(stream)["image"]
  aug_rate, _ = _rate(lambda: data.augment(name, key, batch).block_until_ready().shape[0], seconds)
  return dict(dataset=name, split=ds.split, num_examples=ds.num_examples, source=ds.source,
              batch_size=batch_size, load_s=round(load_s, 3),
              host_images_per_s=round(host_rate), host_plus_augment_images_per_s=round(both_rate),
              augment_only_images_per_s=round(aug_rate))


def bench_imagenet_transforms(seconds: float) -> dict:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 375, 500, 3), dtype=np.uint8)
  out = {}
  for mode in ("train", "eval"):
    i = [0]

    def one():
      r = np.random.default_rng([0, i[0]]) if mode == "train" else None
      data.imagenet_transform(images[i[0] % 16], r)
      i[0] += 1
      return 1

    out[f"{mode}_images_per_s_one_thread"] = round(_rate(one, seconds)[0])
  return dict(dataset="imagenet2012 host transforms (synthetic 375x500, no JPEG decode)", **out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
  args = parser.parse_args()

  load_before = [round(x, 2) for x in os.getloadavg()]  # these machines are shared: the load is part of the result
  results = []
  try:
    results.append(bench_dataset("fashion_mnist", args.batch_size, args.seconds, source="files"))
  except FileNotFoundError as e:
    results.append(dict(dataset="fashion_mnist", skipped=str(e).split(". To get it")[0]))
  subset = _cifar_subset()
  if subset is None:
    results.append(dict(dataset="cifar10 subset", skipped="not found"))
  else:
    results.append(bench_dataset("cifar10", args.batch_size, args.seconds, source="files",
                                 data_dir=subset))
  results.append(bench_imagenet_transforms(args.seconds))

  report = dict(
      machine=dict(platform=platform.platform(), cpus=os.cpu_count(), jax=jax.__version__,
                   grain=importlib.metadata.version("grain"), device=str(jax.devices()[0]),
                   load_average_1_5_15_min_before=load_before,
                   load_average_1_5_15_min_after=[round(x, 2) for x in os.getloadavg()]),
      command=f"python -m benchmarks.input_pipeline --batch-size {args.batch_size} "
              f"--seconds {args.seconds:g}",
      results=results)
  for r in results:
    print(json.dumps(r))
  save_json(report, RESULTS)


if __name__ == "__main__":
  main()
