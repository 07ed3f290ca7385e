"""What packing saves, measured: file sizes, inference speed and memory, printed and saved as JSON.

    python -m benchmarks.export_inference [--quick] [--out benchmarks/results/export_inference.json]

1. Sizes of a binarized CIFAR ResNet-20 (binary inner kernels; float first
   conv, classifier and BatchNorm), as the training program saves it and as
   ``ricci_jax.export`` packs it:

   * the training program's Orbax checkpoint (the whole train state: latent
     float32 weights, BatchNorm statistics and the optimizer's state), for SGD
     (clipped STE) and RF-DNN's ``rf_sgd``;
   * the model alone in float32 (params + BatchNorm statistics): raw bytes, an
     Orbax checkpoint and a plain ``.npz``;
   * the packed payload and the packed ``.npz`` file.

   The same for the paper's "all layers" ResNet-20 and an ImageNet ResNet-18
   (sizes only).
2. Eval-mode inference of ResNet-20 (W1A32; W1A1 with ReSTE's mean|W| scale;
   W1A1 without a scale) at batch 1 and 128, timed interleaved (median of
   repeats): the float model (same weights, nothing quantized), the training
   model in eval mode (latent weights quantized in every call), the packed
   model unpacked inside every call, the packed model unpacked once, and, for
   W1A1 without a scale, the packed model with XOR-popcount layers
   (``inference.Predictor(xnor=True)``). Every packed variant's logits are
   checked equal to the training model's. Memory: the bytes each keeps
   resident between calls, and XLA's compiled memory analysis (arguments +
   temporaries + outputs).
3. One W1A1 layer (sign kernel, sign input, no scale), ResNet-20 conv shapes
   and an MLP dense: XLA's float conv / matmul of +-1 values against the
   XOR-popcount layer the predictor uses, exact (checked) and timed.

Times are medians of jitted, compiled calls (block_until_ready), each variant
timed in turn within every repeat so machine load hits all of them alike; the
1-minute load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import ricci_jax as rj
from ricci_jax import export, inference, layers, models, train
from ricci_jax.models import QuantRule, inspect
from benchmarks.common import float32_file_nbytes, save_json, training_forward

W1 = rj.TensorQuant(bits=1, estimator="clipped_ste")




def _dir_bytes(path: pathlib.Path) -> int:
  return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _training_checkpoint_bytes(config, model, variables, workdir: pathlib.Path) -> int:
  """The train state written exactly as ``ricci_jax.train`` writes it (its checkpoint manager and save)."""
  x = jnp.zeros((1, 32, 32, 3))
  params = jax.tree.map(jnp.asarray, variables["params"])
  mask = layers.quantized_kernel_mask(params, rj.quantized_kernels(model, x, train=False))
  tx = train.build_optimizer(config, train.learning_rate_schedule(config, 352), mask)
  # As after training: Orbax writes no chunk that is all zeros, so a step-0 state (zero momentum) would
  # understate the checkpoint; every floating leaf of the optimizer state gets non-zero values.
  rng = np.random.default_rng(1)
  opt_state = jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
      tx.init(params))
  state = train.TrainState(
      step=jnp.asarray(70_400, jnp.int32), params=params,
      batch_stats=jax.tree.map(jnp.asarray, variables["batch_stats"]), opt_state=opt_state, quant={},
      nonfinite_total=jnp.zeros((), jnp.int32), nonfinite_streak=jnp.zeros((), jnp.int32))
  mgr = train.checkpoints.manager(workdir, config.keep_checkpoints)  # the program's own writer
  train.checkpoints.save(mgr, jax.device_get(state), {"steps_per_epoch": 352, "name": config.name})
  mgr.close()
  return _dir_bytes(workdir / "checkpoints")


def _orbax_model_bytes(variables, path: pathlib.Path) -> int:
  import orbax.checkpoint as ocp  # noqa: PLC0415

  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, jax.tree.map(np.asarray, variables))
  return _dir_bytes(path)


def bench_sizes(tmp: pathlib.Path) -> dict:
  from experiments.configs import presets  # noqa: PLC0415

  out = {}
  cases = {
      "resnet20_w1a32_inner": ("inner", None),
      "resnet20_w1a32_all": ("all", None),
      "resnet18_imagenet_w1a32_inner": ("inner", "resnet18"),
  }
  for name, (rule_layers, imagenet) in cases.items():
    if imagenet:
      model = models.create(imagenet, num_classes=1000, quant=QuantRule(layers=rule_layers, weight=W1))
      shape = (224, 224, 3)
    else:
      config = presets.cifar_paper("cifar10", "resnet20", method="clipped_ste", layers=rule_layers)
      model = train.build_model(config, num_classes=10)
      shape = (32, 32, 3)
    variables = inspect.random_variables(model, shape)
    t0 = time.perf_counter()
    packed = export.pack(variables, model)
    pack_s = time.perf_counter() - t0
    packed_file = export.save(packed, tmp / f"{name}.npz")
    row = {
        "float32_model_bytes": packed.float32_nbytes(),
        "float32_params_bytes": packed.float32_nbytes("params"),
        "float32_model_npz_bytes": float32_file_nbytes(variables),
        "packed_payload_bytes": packed.nbytes,
        "packed_params_bytes": packed.nbytes_of("params"),
        "packed_file_bytes": packed_file,
        "pack_seconds": pack_s,
    }
    if not imagenet:
      row["float32_model_orbax_bytes"] = _orbax_model_bytes(variables, tmp / f"{name}_orbax")
      for method in ("clipped_ste", "rfdnn"):
        cfg = presets.cifar_paper("cifar10", "resnet20", method=method, layers=rule_layers)
        row[f"training_checkpoint_{method}_bytes"] = _training_checkpoint_bytes(
            cfg, train.build_model(cfg, num_classes=10), variables, tmp / f"{name}_{method}")
    out[name] = row
  return out


def _ratio(a, b):
  return a / b if b else float("inf")


def report_sizes(sizes: dict) -> list[dict]:
  verdicts = []
  for name, r in sizes.items():
    f = r["packed_file_bytes"]
    print(f"\n  {name}: packed {r['packed_payload_bytes']:,} B payload, {f:,} B file "
          f"(packed in {r['pack_seconds']:.1f} s)")
    refs = [("float32 params only, raw", r["float32_params_bytes"], r["packed_params_bytes"]),
            ("float32 params + BN statistics, raw", r["float32_model_bytes"], r["packed_payload_bytes"]),
            ("float32 model .npz vs packed file", r["float32_model_npz_bytes"], f)]
    if "float32_model_orbax_bytes" in r:
      refs += [("float32 model Orbax checkpoint vs packed file", r["float32_model_orbax_bytes"], f),
               ("training checkpoint, SGD (clipped STE) vs packed file", r["training_checkpoint_clipped_ste_bytes"], f),
               ("training checkpoint, rf_sgd (RF-DNN) vs packed file", r["training_checkpoint_rfdnn_bytes"], f)]
    for label, big, small in refs:
      ratio = _ratio(big, small)
      verdict = "meets" if ratio >= 25 else "misses"
      print(f"    {label:<55} {big:>12,} B / {small:>10,} B = {ratio:6.2f}x  ({verdict} the 25x bar)")
      verdicts.append({"model": name, "reference": label, "float_bytes": big, "packed_bytes": small,
                       "ratio": ratio, "meets_25x": ratio >= 25})
  return verdicts


# ----------------------------------------------------------------------------
# Inference speed and memory.
# ----------------------------------------------------------------------------


def _interleaved(fns: dict, repeats: int, sample_s: float = 0.05) -> dict:
  """Median over ``repeats`` samples per variant, the variants taking turns within every repeat.

  A sample is the mean of as many back-to-back calls as fill about ``sample_s``
  (calibrated on the warm-up call), so millisecond calls are not at the mercy
  of one scheduler hiccup on a loaded machine.
  """
  calls = {}
  for k, fn in fns.items():
    jax.block_until_ready(fn())  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    calls[k] = max(1, int(sample_s / max(time.perf_counter() - t0, 1e-6)))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      for _ in range(calls[k]):
        out = fn()
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t0) / calls[k])
  return {k: {"median_s": float(np.median(v)), "min_s": float(np.min(v)), "n": len(v), "calls_per_sample": calls[k]}
          for k, v in times.items()}


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "generated_code")}
  out["peak_estimate"] = out["argument"] + out["output"] + out["temp"]
  return out


def bench_inference(batches, repeats: int) -> dict:
  rows = {}
  for label, rule, order in [
      ("resnet20_w1a32_inner", QuantRule(layers="inner", weight=W1), "conv_bn_relu"),
      ("resnet20_w1a1_reste_inner (scale tensor)", QuantRule(
          layers="inner", weight=rj.TensorQuant(bits=1, estimator="reste", scale="tensor"),
          act=rj.TensorQuant(bits=1, estimator="reste")), "conv_relu_bn"),
      ("resnet20_w1a1_inner (no scale)", QuantRule(
          layers="inner", weight=W1, act=rj.TensorQuant(bits=1, estimator="ste")), "conv_relu_bn"),
  ]:
    model = models.create("resnet20", num_classes=10, quant=rule, order=order)
    float_model = model.clone(quant=None)
    variables = inspect.random_variables(model, (32, 32, 3))
    packed = export.pack(variables, model)
    dev_vars = inference.device_variables(variables)
    predictors = {"packed, unpack on the fly": inference.Predictor(packed, xnor=False),
                  "packed, unpacked once": inference.Predictor(packed, unpack="once", xnor=False)}
    xnor = inference.Predictor(packed, xnor=True)
    if xnor.xnor_layers:
      predictors[f"packed, XOR-popcount ({len(xnor.xnor_layers)} layers)"] = xnor
    trained = training_forward(model)
    floated = training_forward(float_model)
    for batch in batches:
      x = jnp.asarray(np.random.default_rng(batch).normal(size=(batch, 32, 32, 3)), jnp.float32)
      want = np.asarray(trained(dev_vars, x))
      for name, p in predictors.items():
        np.testing.assert_array_equal(np.asarray(p(x)), want, err_msg=name)
      fns = {"float model": lambda: floated(dev_vars, x), "training model, eval": lambda: trained(dev_vars, x),
             **{name: (lambda p=p: p(x)) for name, p in predictors.items()}}
      timing = _interleaved(fns, repeats)
      resident = sum(int(a.nbytes) for a in jax.tree.leaves(dev_vars))
      memory = {"float model": {"resident_bytes": resident, **_memory(floated.lower(dev_vars, x).compile())},
                "training model, eval": {"resident_bytes": resident,
                                         **_memory(trained.lower(dev_vars, x).compile())},
                **{name: {"resident_bytes": p.resident_nbytes, **_memory(p.compiled(x))}
                   for name, p in predictors.items()}}
      base = timing["training model, eval"]["median_s"]
      print(f"\n  {label}, batch {batch} (every packed variant's logits equal the training model's):")
      print(f"    {'variant':<38} {'median ms':>10} {'vs training':>12} {'resident B':>12} {'XLA temp B':>12} "
            f"{'XLA peak B':>12}")
      for k in fns:
        t, m = timing[k], memory[k]
        print(f"    {k:<38} {1e3 * t['median_s']:>10.2f} {t['median_s'] / base:>11.2f}x {m['resident_bytes']:>12,} "
              f"{m.get('temp', 0):>12,} {m.get('peak_estimate', 0):>12,}")
      rows[f"{label}, batch {batch}"] = {"timing": timing, "memory": memory}
  return rows


# ----------------------------------------------------------------------------
# XOR-popcount layers against the float layers of +-1 values.
# ----------------------------------------------------------------------------


def bench_xnor(repeats: int) -> dict:
  """One W1A1 layer (sign kernel, sign input, no scale): XLA's float conv / matmul vs XOR-popcount.

  The XOR-popcount side is the serving code (``inference.xnor_apply``), input packing included.
  """
  rows = []
  cases = [
      ("conv", (128, 32, 32, 16), (3, 3, 16, 16), 1, "ResNet-20 stage 1 conv, batch 128"),
      ("conv", (128, 16, 16, 32), (3, 3, 32, 32), 1, "ResNet-20 stage 2 conv, batch 128"),
      ("conv", (128, 8, 8, 64), (3, 3, 64, 64), 1, "ResNet-20 stage 3 conv, batch 128"),
      ("conv", (128, 16, 16, 32), (3, 3, 32, 64), 2, "ResNet-20 stage 3 first conv (stride 2), batch 128"),
      ("conv", (1, 32, 32, 16), (3, 3, 16, 16), 1, "ResNet-20 stage 1 conv, batch 1"),
      ("dense", (128, 256), (256, 256), 1, "MLP hidden layer, batch 128"),
  ]
  for kind, x_shape, k_shape, stride, what in cases:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=x_shape), jnp.float32)
    w = rng.normal(size=k_shape).astype(np.float32)
    tensor = export.pack_kernel(w, W1)
    fan_in = k_shape[-2]
    if kind == "conv":
      layer = inference.XnorLayer("conv", fan_in, inference.xnor_word_bits(fan_in), k_shape[:2], (stride, stride),
                                  ((1, 1), (1, 1)))
      float_fn = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
          rj.binarize(x), rj.binarize(w), (stride, stride), ((1, 1), (1, 1)),
          dimension_numbers=("NHWC", "HWIO", "NHWC")))
    else:
      layer = inference.XnorLayer("dense", fan_in, inference.xnor_word_bits(fan_in))
      float_fn = jax.jit(lambda x, w: jnp.dot(rj.binarize(x), rj.binarize(w)))
    words = jnp.asarray(inference.xnor_kernel_words(tensor, layer))
    xnor_fn = jax.jit(lambda x, words: inference.xnor_apply(layer, x, words))
    w = jnp.asarray(w)
    np.testing.assert_array_equal(np.asarray(xnor_fn(x, words)), np.asarray(float_fn(x, w)))
    t = _interleaved({"float": lambda: float_fn(x, w), "xnor": lambda: xnor_fn(x, words)}, repeats)
    ratio = t["float"]["median_s"] / t["xnor"]["median_s"]
    print(f"  {what:<52} float {1e3 * t['float']['median_s']:8.2f} ms, XOR-popcount "
          f"{1e3 * t['xnor']['median_s']:8.2f} ms: {ratio:.2f}x faster (results equal)")
    rows.append({"what": what, "x": list(x_shape), "kernel": list(k_shape), "stride": stride, "timing": t,
                 "speedup": ratio})
  return {"rows": rows}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="fewer repeats")
  parser.add_argument("--out", default="benchmarks/results/export_inference.json")
  args = parser.parse_args(argv)
  repeats = 5 if args.quick else 15
  load_before = os.getloadavg()
  print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs, load average {load_before[0]:.2f}")
  with tempfile.TemporaryDirectory() as tmp:
    print("\n1. Sizes")
    sizes = bench_sizes(pathlib.Path(tmp))
    verdicts = report_sizes(sizes)
  print("\n2. Inference (eval mode), ResNet-20, interleaved medians")
  speed = bench_inference((1, 128), repeats)
  print("\n3. One W1A1 layer without a scale: XLA's float op on +-1 values vs XOR-popcount")
  xnor = bench_xnor(repeats)
  load_after = os.getloadavg()
  print(f"\nload average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} CPUs")
  result = {
      "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                  "backend": jax.default_backend(), "jax": jax.__version__,
                  "load_average_before": load_before, "load_average_after": load_after},
      "repeats": repeats, "sizes": sizes, "size_ratios": verdicts, "inference": speed, "xnor_popcount": xnor,
  }
  out = pathlib.Path(args.out)
  save_json(result, out)
  return result


if __name__ == "__main__":
  main()
