"""Where the binarized ResNet-20 train step spends its time on the CPU: a per-op profile, stock against tuned.

    python -m benchmarks.profile_train_step [--batch-size 128] [--steps 3] [--out benchmarks/results/profile_train_step.json]

The step is the one ``benchmarks.train_step_vs_pytorch`` times (sign weights
with a clipped STE, first conv and last dense in float, SGD Nesterov). It is
compiled twice, without and with ``ricci_jax.runtime``'s XLA CPU options, and
each is traced with ``jax.profiler`` over ``--steps`` steps. Every XLA op
event on the CPU worker threads is attributed, through the compiled HLO, to a
category: convolution forward, input gradient, weight gradient, the
transpose/copy fusions that lay out the weight gradients' operands, batch-norm
reductions, other elementwise fusions. Times are thread time per step (both
cores summed), so they add up to about twice the wall time when both cores are
busy. The malloc setting is process-wide and is on for both (see
``benchmarks/cpu_settings_ablation.py`` for its separate effect).
"""

from __future__ import annotations

from ricci_jax import runtime

runtime.configure_cpu()

import argparse  # noqa: E402
import collections  # noqa: E402
import glob  # noqa: E402
import os  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import train_step_vs_pytorch as vs  # noqa: E402
from benchmarks.common import save_json  # noqa: E402


def _fusion_contents(hlo: str) -> tuple[dict, dict]:
  """Per ENTRY instruction: (output shape, op_name metadata, the ops inside the fusion it calls)."""
  bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n%(\S+) \([^\n]*\) -> [^\n]*\{\n(.*?)\n\}", hlo, re.S)}
  entry = hlo[hlo.index("\nENTRY"):]
  info = {}
  for line in entry.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = (\S+) (\w+)\(", line)
    if not m:
      continue
    called = re.search(r"calls=%([\w.\-]+)", line)
    body = bodies.get(called.group(1), "") if called else ""
    ops = set(re.findall(r"= \S+ (convolution|dot|reduce|transpose|reduce-window)\(", body))
    if m.group(3) in ("convolution", "dot"):
      ops.add(m.group(3))
    op_name = re.search(r'op_name="([^"]*)"', line)
    info[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "", ops)
  return info, bodies


def _category(name: str, info: dict) -> str:
  shape, op_name, ops = info.get(name, ("?", "", set()))
  if "convolution" in ops:
    dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0])]
    if any(a == b and a in (1, 3) for a, b in zip(dims, dims[1:])):  # a kernel-shaped output
      return "conv weight gradient"
    return "conv input gradient" if "transpose(" in op_name else "conv forward"
  if name.startswith("transpose") or ("transpose" in ops and "reduce" not in ops):
    return "transpose/copy fusions"
  if "reduce" in ops:
    return "reductions (batch norm, loss)"
  if "dot" in ops:
    return "dense"
  return "elementwise fusions"


def profile(options: dict, batch_size: int, steps: int) -> dict:
  trainer = vs.JaxTrainer(True, "sgd", options=options)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((batch_size, 32, 32, 3)).astype(np.float32)
  labels = rng.integers(0, 10, batch_size).astype(np.int32)
  for _ in range(2):
    trainer(images, labels)  # compile and warm
  walls = []
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for _ in range(steps):
        t = time.perf_counter()
        trainer(images, labels)
        walls.append(time.perf_counter() - t)
    from jax._src.lib import _profile_data  # noqa: PLC0415 - the profiler's own reader
    pd = _profile_data.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0])
  info, _ = _fusion_contents(trainer.compiled_text())
  per_op = collections.defaultdict(float)  # only events named after an HLO instruction: no wrappers
  for plane in pd.planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      for ev in line.events:
        if ev.name in info:
          per_op[ev.name] += ev.duration_ns / 1e6 / steps
  cats = collections.defaultdict(float)
  for name, ms in per_op.items():
    cats[_category(name, info)] += ms
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
  return {"wall_ms_median": 1e3 * float(np.median(walls)), "thread_ms_total": sum(per_op.values()),
          "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
          "top_ops_ms": {k: v for k, v in top}}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--out", default="benchmarks/results/profile_train_step.json")
  args = parser.parse_args(argv)
  result = {"batch_size": args.batch_size, "steps": args.steps, "load_average_before": list(os.getloadavg()),
            "profiles": {}}
  for label, options in (("stock", {}), ("tuned", runtime.compiler_options())):
    p = profile(options, args.batch_size, args.steps)
    result["profiles"][label] = p
    print(f"{label}: wall {p['wall_ms_median']:.0f} ms/step, op thread time {p['thread_ms_total']:.0f} ms/step")
    for cat, ms in p["categories_ms"].items():
      print(f"  {ms:8.1f} ms  {cat}")
  result["load_average_after"] = list(os.getloadavg())
  result["machine"] = {"cpu_count": os.cpu_count(), "jax": jax.__version__}
  out = pathlib.Path(args.out)
  save_json(result, out)


if __name__ == "__main__":
  main()
