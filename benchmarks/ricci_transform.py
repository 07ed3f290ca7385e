"""Cost of the RF-DNN machinery on this machine, printed and saved as JSON.

    python -m benchmarks.ricci_transform [--quick] [--out benchmarks/results/ricci_transform.json]

1. The Ricci transform's ``update`` alone, as a fraction of a binarized CIFAR
   ResNet-20 train step at batch 128 (target: under 3%).
2. N (Eq. 35) against layer size, 1e3 to 1e7 weights, rank-1 and (where it
   fits) the dense n x n reference (target: linear).
3. The whole RF-DNN step (translated gradients included) against the
   clipped-STE step, at fraction 1 (the paper's cost, at most 5.5x) and at the
   default fraction (target: at most 1.5x). Timed interleaved in one process.
4. Optimizer state bytes per quantized weight, rf_sgd against SGD.

Times are medians over repeats of jitted, compiled calls (block_until_ready);
ratios are of medians measured side by side. The steps use the training
program's CPU settings (``ricci_jax.runtime``); ``RICCI_JAX_CPU_TUNING=0``
measures without them.
"""

from __future__ import annotations

import argparse
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
from ricci_jax import lne, ricci_flow, transform  # noqa: E402
from benchmarks.common import save_json  # noqa: E402


def _time(fn, *args, repeats: int) -> list[float]:
  jax.block_until_ready(fn(*args))  # compile and warm up
  out = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    out.append(time.perf_counter() - t0)
  return out


def _stats(times):
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "n": len(times)}


def bench_residual_scaling(sizes, repeats):
  """N (and its gradient) for one layer of each size; dense where n^2 floats fit in 1 GiB."""
  rows = []
  for n in sizes:
    w = jax.random.normal(jax.random.key(0), (n,)) * 0.05
    g4 = jax.random.normal(jax.random.key(1), (4, n))
    tau = lne.auto_tau(w)
    prev = ricci_flow.initial_previous(w, tau)
    eta = jnp.float32(0.1)
    rank1 = jax.jit(jax.value_and_grad(lambda w: ricci_flow.residual_norm(w, g4, prev, tau, eta)[0]))
    row = {"n": n, "rank1": _stats(_time(rank1, w, repeats=repeats))}
    if n * n * 4 * 6 <= 8 * 2**30:  # six n x n float32 matrices live at once in the reference
      def dense(w):
        steps = jax.lax.stop_gradient(jnp.stack([eta * lne.natural_gradient(w, g4[s], tau) for s in range(4)]))
        a = jnp.tanh(tau * (w - steps[0]))
        return jnp.sum(ricci_flow.flow_residual_dense(a, prev) ** 2)
      row["dense"] = _stats(_time(jax.jit(dense), w, repeats=max(2, repeats // 3)))
    rows.append(row)
    print(f"  N for n={n:>9,d}: rank-1 {row['rank1']['median_s'] * 1e3:9.3f} ms"
          + (f", dense {row['dense']['median_s'] * 1e3:9.3f} ms" if "dense" in row else ", dense: does not fit"))
  ns = np.array([r["n"] for r in rows], float)
  ts = np.array([r["rank1"]["median_s"] for r in rows])
  big = ns >= 1e5  # fixed overheads dominate below
  slope = float(np.polyfit(np.log(ns[big]), np.log(ts[big]), 1)[0]) if big.sum() >= 2 else float("nan")
  print(f"  log-log slope of rank-1 time over n >= 1e5: {slope:.2f} (1 = linear)")
  return {"rows": rows, "loglog_slope_n_ge_1e5": slope}


def _resnet20_setup(batch_size: int):
  from ricci_jax import models  # noqa: PLC0415

  rule = models.QuantRule(layers="inner", weight=rj.TensorQuant(bits=1, estimator="clipped_ste"))
  model = models.create("resnet20", num_classes=10, quant=rule)
  x = jax.random.normal(jax.random.key(0), (batch_size, 32, 32, 3))
  y = jax.random.randint(jax.random.key(1), (batch_size,), 0, 10)
  variables = model.init(jax.random.key(2), x, train=False)
  params, batch_stats = variables["params"], variables["batch_stats"]
  mask = rj.layers.quantized_kernel_mask(params, rj.quantized_kernels(model, x, train=False))

  def loss_fn(p, batch, stats=batch_stats):
    logits, _ = model.apply({"params": p, "batch_stats": stats}, batch["image"], train=True,
                            mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

  return model, params, batch_stats, mask, loss_fn, {"image": x, "label": y}


def bench_steps(batch_size, repeats, fractions):
  """Clipped-STE SGD step vs RF-DNN steps, interleaved; and the transform's update alone."""
  model, params, batch_stats, mask, loss_fn, batch = _resnet20_setup(batch_size)
  sgd = optax.chain(optax.add_decayed_weights(5e-4), optax.trace(0.9, nesterov=True), optax.scale(-0.1))

  def ste_step(p, s, b):
    grads = jax.grad(loss_fn)(p, b)
    u, s = sgd.update(grads, s, p)
    return optax.apply_updates(p, u), s

  steps = {"ste": (jax.jit(ste_step, compiler_options=runtime.compiler_options()), sgd.init(params))}
  for fraction in fractions:
    tx = rj.rf_sgd(0.1, quantized=mask)

    def rf_step(p, s, b, tx=tx, fraction=fraction):
      grads = jax.grad(loss_fn)(p, b)
      shifted = rj.translated_grads(loss_fn, p, b, fraction=fraction)
      u, s = tx.update(grads, s, p, translated_grads=shifted)
      return optax.apply_updates(p, u), s

    steps[f"rfdnn_fraction_{fraction:g}"] = (
        jax.jit(rf_step, compiler_options=runtime.compiler_options()), tx.init(params))

  for fn, st in steps.values():  # compile all first
    jax.block_until_ready(fn(params, st, batch))
  times = {k: [] for k in steps}
  for _ in range(repeats):  # interleaved: each round times every step once
    for k, (fn, st) in steps.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(params, st, batch))
      times[k].append(time.perf_counter() - t0)
  out = {k: _stats(v) for k, v in times.items()}
  base = out["ste"]["median_s"]
  for k in out:
    out[k]["ratio_to_ste"] = out[k]["median_s"] / base
    print(f"  {k:<24} median {out[k]['median_s']:.3f} s  ({out[k]['ratio_to_ste']:.2f}x STE)")

  # (1) the transform's update alone (grads and translated grads given)
  tx = rj.rf_sgd(0.1, quantized=mask)
  grads = jax.grad(loss_fn)(params, batch)
  shifted = rj.translated_grads(loss_fn, params, batch)
  update = jax.jit(lambda g, s, p, t: tx.update(g, s, p, translated_grads=t),
                   compiler_options=runtime.compiler_options())
  state = tx.init(params)
  update_times = _time(update, grads, state, params, shifted, repeats=repeats * 3)
  frac = float(np.median(update_times)) / base
  print(f"  transform update alone: {np.median(update_times) * 1e3:.2f} ms = {frac:.2%} of the STE step")

  # (4) optimizer state bytes per quantized weight
  n_quant = sum(int(np.size(p)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m)
  nbytes = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
  quant_state = nbytes(jax.tree.map(lambda x: x, transform.layer_diagnostics(state)))  # diagnostics are tiny
  rf_bytes, sgd_bytes = nbytes(state), nbytes(sgd.init(params))
  n_float = sum(int(np.size(p)) for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if not m)
  per_weight = (rf_bytes - sgd_bytes) / n_quant + 4  # momentum (4 B) + the Ricci state
  print(f"  optimizer state: rf_sgd {rf_bytes:,d} B, sgd {sgd_bytes:,d} B; "
        f"{per_weight:.2f} B per quantized weight ({n_quant:,d} quantized, {n_float:,d} float params)")
  return {
      "steps": out,
      "transform_update": {**_stats(update_times), "fraction_of_ste_step": frac},
      "state_bytes": {"rf_sgd": rf_bytes, "sgd": sgd_bytes, "quantized_weights": n_quant,
                      "float_params": n_float, "rf_sgd_bytes_per_quantized_weight": per_weight,
                      "diagnostics_bytes": quant_state},
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (seconds)")
  parser.add_argument("--out", default="benchmarks/results/ricci_transform.json")
  parser.add_argument("--batch-size", type=int, default=128)
  args = parser.parse_args(argv)

  sizes = [10**3, 10**4, 10**5] if args.quick else [10**3, 10**4, 10**5, 10**6, 10**7]
  repeats = 3 if args.quick else 10
  print("N (Eq. 35) and its gradient against layer size:")
  scaling = bench_residual_scaling(sizes, repeats)
  print(f"binarized ResNet-20 train step, batch {args.batch_size}:")
  steps = bench_steps(args.batch_size if not args.quick else 16, 2 if args.quick else repeats,
                      fractions=(1.0, 0.125))
  result = {
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": __import__("os").cpu_count(), "jax": jax.__version__,
                  "devices": [str(d) for d in jax.devices()]},
      "cpu_settings": runtime.configure_cpu(), "load_average": __import__("os").getloadavg(),
      "quick": args.quick, "batch_size": args.batch_size if not args.quick else 16,
      "residual_scaling": scaling, **steps,
  }
  out = pathlib.Path(args.out)
  save_json(result, out)


if __name__ == "__main__":
  main()
