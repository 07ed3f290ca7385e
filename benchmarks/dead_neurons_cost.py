"""What measuring the dead neuron rate costs against a training step, printed and saved as JSON.

    python -m benchmarks.dead_neurons_cost [--quick] [--out benchmarks/results/dead_neurons_cost.json]

Binarized LeNet-5 (sign weights with a clipped STE in the inner layers, the
first conv and the head float), batch 128, 28x28x1:

* ``train_step``: one jitted training step in train mode: forward, backward
  and an SGD-momentum update (new parameters, optimizer state and batch
  statistics);
* ``measure``: one jitted :func:`ricci_jax.dead_neurons.relu_activity` on the
  same batch in train mode (the dynamic DNR: one forward pass, the ReLU
  outputs compared with 0 and summed over the batch);
* ``measure_and_summarize``: the same plus :func:`~ricci_jax.dead_neurons.add_counts`
  and :func:`~ricci_jax.dead_neurons.summarize` on the host (what a log line costs).

Timed interleaved, round by round, in one process (medians; the minimum-time
ratio beside them), with the training program's CPU settings
(``ricci_jax.runtime``). Measuring every K steps adds ``ratio / K`` of the
training time.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import time

from ricci_jax import runtime

runtime.configure_cpu()  # the training program's CPU settings (RICCI_JAX_CPU_TUNING=0: stock)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ricci_jax as rj  # noqa: E402
from ricci_jax import dead_neurons, models  # noqa: E402
from benchmarks.common import save_json  # noqa: E402


def _setup(batch_size: int):
  rule = models.QuantRule(layers="inner", weight=rj.TensorQuant(bits=1, estimator="clipped_ste"))
  model = models.create("lenet5", num_classes=10, quant=rule)
  x = jax.random.normal(jax.random.key(0), (batch_size, 28, 28, 1))
  y = jax.random.randint(jax.random.key(1), (batch_size,), 0, 10)
  variables = model.init(jax.random.key(2), x, train=False)
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)

  def train_step(params, stats, opt_state, images, labels):
    def loss_fn(p):
      logits, new = model.apply({"params": p, "batch_stats": stats}, images, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  def measure(variables, images, mask):
    return dead_neurons.relu_activity(model, variables, images, train=True, mask=mask)

  options = runtime.compiler_options()
  state = (variables["params"], variables["batch_stats"], tx.init(variables["params"]))
  return (jax.jit(train_step, compiler_options=options), jax.jit(measure, compiler_options=options),
          variables, state, x, y)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="batch 16, 3 rounds (seconds)")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=30)
  parser.add_argument("--out", default="benchmarks/results/dead_neurons_cost.json")
  args = parser.parse_args(argv)
  batch_size = 16 if args.quick else args.batch_size
  rounds = 3 if args.quick else args.rounds

  step, measure, variables, state, x, y = _setup(batch_size)
  mask = jnp.ones((batch_size,), bool)
  counts = measure(variables, x, mask)
  total = dead_neurons.init_counts(counts)
  jax.block_until_ready((step(*state, x, y), counts))  # compile both

  def run_step():
    jax.block_until_ready(step(*state, x, y))

  def run_measure():
    jax.block_until_ready(measure(variables, x, mask))

  def run_measure_and_summarize():
    dead_neurons.summarize(dead_neurons.add_counts(total, measure(variables, x, mask)))

  cases = {"train_step": run_step, "measure": run_measure, "measure_and_summarize": run_measure_and_summarize}
  times = {k: [] for k in cases}
  for _ in range(rounds):  # interleaved: each round times every case once
    for k, fn in cases.items():
      t0 = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t0)

  base_med, base_min = float(np.median(times["train_step"])), float(np.min(times["train_step"]))
  result = {"model": "lenet5, weights binarized (clipped STE) in the inner layers", "batch_size": batch_size,
            "rounds": rounds, "cases": {}}
  for k, t in times.items():
    med, low = float(np.median(t)), float(np.min(t))
    result["cases"][k] = {"median_s": med, "min_s": low, "ratio_to_train_step_median": med / base_med,
                          "ratio_to_train_step_min": low / base_min, "times_s": [float(v) for v in t]}
    print(f"  {k:<24} median {med * 1e3:8.2f} ms  ({med / base_med:.3f}x the train step; "
          f"min-ratio {low / base_min:.3f}x)")
  ratio = result["cases"]["measure"]["ratio_to_train_step_median"]
  result["overhead_every_k_steps"] = {str(k): ratio / k for k in (1, 10, 100, 1000)}
  print("  measuring every K steps adds: " + ", ".join(
      f"K={k}: {100 * v:.2f}%" for k, v in result["overhead_every_k_steps"].items()))
  result["sites"] = sorted(counts.positive)
  result["machine"] = {"platform": platform.platform(), "processor": platform.processor(),
                       "cpu_count": os.cpu_count(), "jax": jax.__version__,
                       "devices": [str(d) for d in jax.devices()], "load_average": list(os.getloadavg())}
  result["cpu_settings"] = runtime.configure_cpu()
  save_json(result, pathlib.Path(args.out))


if __name__ == "__main__":
  main()
