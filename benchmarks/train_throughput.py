"""Images per second of the training program's ResNet-20 step, float against binarized, and the
input pipeline against the step, on this machine; printed and saved as JSON.

    python -m benchmarks.train_throughput [--quick] [--out benchmarks/results/train_throughput.json]

The steps are the training program's own jitted ``train_step`` (augmentation,
loss, optimizer, non-finite guard), built from the paper's CIFAR preset with
the quantization changed: float (no quantized layer), binarized weights with a
clipped STE (SGD), and binarized with RF-DNN (``rf_sgd``, default fraction).
They are timed interleaved, round by round, on the same batches; the input
pipeline (host batches of the real CIFAR-10 subset plus the on-device
augmentation, as ``benchmarks.input_pipeline`` measures it) is timed in the
same process.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import input_pipeline
from experiments.configs import presets
from ricci_jax import layers, runtime, train
from ricci_jax.models import inspect
from benchmarks.common import save_json


def _step(method: str, batch_size: int):
  config = presets.cifar_paper("cifar10", "resnet20", method=method)
  train.schema.apply_overrides(config, [f"batch_size={batch_size}", "quant.layers=inner"])
  model = train.build_model(config, num_classes=10)
  x = jnp.zeros((1, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)
  mask = layers.quantized_kernel_mask(variables["params"], inspect.quantized_kernels(model, x, train=False))
  program, state = train.build_program(config, model, variables, mask, steps_per_epoch=351)
  # jitted exactly as the training program does (its CPU options; the state is not donated here
  # because every round reuses it)
  return jax.jit(functools.partial(train.train_step, program), compiler_options=runtime.compiler_options()), state


def main(argv=None):
  runtime.configure_cpu()  # the training program's allocator setting
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=8)
  parser.add_argument("--out", default="benchmarks/results/train_throughput.json")
  args = parser.parse_args(argv)
  batch_size = 16 if args.quick else args.batch_size
  rounds = 2 if args.quick else args.rounds

  rng = np.random.default_rng(0)
  batches = [{"image": rng.integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8),
              "label": rng.integers(0, 10, batch_size).astype(np.int32),
              "mask": np.ones(batch_size, bool)} for _ in range(rounds)]
  steps = {m: _step(m, batch_size) for m in ("float", "clipped_ste", "rfdnn")}
  for fn, state in steps.values():
    jax.block_until_ready(fn(state, batches[0]))  # compile
  times = {m: [] for m in steps}
  for batch in batches:
    for m, (fn, state) in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(state, batch))
      times[m].append(time.perf_counter() - t0)
  result = {"batch_size": batch_size, "rounds": rounds, "steps": {}}
  for m, t in times.items():
    med = float(np.median(t))
    result["steps"][m] = {"median_s": med, "min_s": float(np.min(t)), "images_per_second": batch_size / med}
  base = result["steps"]["float"]["images_per_second"]
  for m, r in result["steps"].items():
    r["relative_to_float"] = r["images_per_second"] / base
    print(f"  {m:<12} {r['images_per_second']:8.1f} images/s  (median {r['median_s']:.3f} s, "
          f"{r['relative_to_float']:.2f}x float)")

  subset = input_pipeline._cifar_subset()  # noqa: SLF001
  if subset is not None:
    pipe = input_pipeline.bench_dataset("cifar10", batch_size, 1.0 if args.quick else 3.0, data_dir=str(subset))
    slowest = min(r["images_per_second"] for r in result["steps"].values())
    pipe["headroom_over_slowest_step"] = pipe["host_plus_augment_images_per_s"] / slowest
    result["input_pipeline_cifar10_subset"] = pipe
    print(f"  input pipeline (host + device augmentation): {pipe['host_plus_augment_images_per_s']:,.0f} images/s, "
          f"{pipe['headroom_over_slowest_step']:,.0f}x the slowest step: it keeps the step fed")
  else:
    print("  input pipeline: the CIFAR-10 subset is not on this machine, skipped")
  result["machine"] = {"platform": platform.platform(), "cpu_count": __import__("os").cpu_count(),
                       "jax": jax.__version__, "load_average": list(__import__("os").getloadavg())}
  out = pathlib.Path(args.out)
  save_json(result, out)


if __name__ == "__main__":
  main()
