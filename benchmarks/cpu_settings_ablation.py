"""What each ``ricci_jax.runtime`` setting is worth, timed interleaved across processes.

    python -m benchmarks.cpu_settings_ablation [--rounds 10] [--model binary|float]
        [--out benchmarks/results/cpu_settings_ablation.json]

The malloc setting is process-wide, so each combination of settings lives in
its own worker process (``stock``: neither; ``xla``: the XLA CPU options only;
``malloc``: the allocator only; ``both``: what the training program uses).
The parent sends one step at a time to each worker in turn (the order reversed
every other round), on the same fresh batch, so the four are timed
interleaved; only one worker runs at a time. Reported per setting: wall time,
process CPU time (user + system), system time and minor page faults per step,
median and minimum over rounds, and the step's loss (the same batches, so the
losses show whether results changed).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
from benchmarks.common import save_json

SETTINGS = {
    "stock": {"RICCI_JAX_XLA_OPTIONS": "0", "RICCI_JAX_MALLOC_TUNING": "0"},
    "xla": {"RICCI_JAX_XLA_OPTIONS": "1", "RICCI_JAX_MALLOC_TUNING": "0"},
    "malloc": {"RICCI_JAX_XLA_OPTIONS": "0", "RICCI_JAX_MALLOC_TUNING": "1"},
    "both": {"RICCI_JAX_XLA_OPTIONS": "1", "RICCI_JAX_MALLOC_TUNING": "1"},
}


def worker(binary: bool, batch_size: int) -> None:
  """Reads ``<seed>`` lines; runs one train step per line; writes one JSON line per step."""
  import resource  # noqa: PLC0415

  import numpy as np  # noqa: PLC0415

  from benchmarks import train_step_vs_pytorch as bench  # noqa: PLC0415 - configures the runtime

  trainer = bench.JaxTrainer(binary)
  print(json.dumps({"ready": True, "runtime": bench.runtime.configure_cpu()}), flush=True)
  for line in sys.stdin:
    rng = np.random.default_rng(int(line))
    images = rng.standard_normal((batch_size, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, batch_size).astype(np.int32)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    wall = trainer(images, labels)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({
        "wall_s": wall, "cpu_s": (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime),
        "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt,
        "loss": float(trainer.loss)}), flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--model", choices=("binary", "float"), default="binary")
  parser.add_argument("--out", default="benchmarks/results/cpu_settings_ablation.json")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    worker(args.model == "binary", args.batch_size)
    return

  import numpy as np  # noqa: PLC0415

  procs = {}
  for name, env in SETTINGS.items():
    cmd = [sys.executable, "-m", "benchmarks.cpu_settings_ablation", "--worker", "--model", args.model,
           "--batch-size", str(args.batch_size)]
    procs[name] = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, **env})
  runtime = {}
  for name, p in procs.items():  # wait until every worker has compiled
    runtime[name] = json.loads(p.stdout.readline())["runtime"]

  def step(name, seed):
    procs[name].stdin.write(f"{seed}\n")
    procs[name].stdin.flush()
    return json.loads(procs[name].stdout.readline())

  names = list(procs)
  for w in range(args.warmup):
    for name in names:
      step(name, 10_000 + w)
  records = {name: [] for name in names}
  load_before = os.getloadavg()
  for r in range(args.rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      records[name].append(step(name, r))
    print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
        f"{k} {v[-1]['wall_s']:.3f}s" for k, v in records.items()), flush=True)
  load_after = os.getloadavg()
  for p in procs.values():
    p.stdin.close()
    p.wait()

  def summary(recs):
    out = {}
    for key in ("wall_s", "cpu_s", "sys_s", "minor_faults"):
      vals = [rec[key] for rec in recs]
      out[key] = {"median": float(np.median(vals)), "min": float(np.min(vals))}
    out["losses"] = [rec["loss"] for rec in recs]
    return out

  result = {"model": args.model, "batch_size": args.batch_size, "rounds": args.rounds,
            "load_average_before": load_before, "load_average_after": load_after,
            "cpu_count": os.cpu_count(), "runtime": runtime,
            "settings": {name: summary(recs) for name, recs in records.items()}}
  base = result["settings"]["stock"]
  print(f"{'setting':<8}{'wall med':>10}{'min':>8}{'cpu med':>10}{'sys med':>10}{'faults/step':>13}"
        f"{'wall vs stock':>15}{'cpu vs stock':>14}")
  for name, s in result["settings"].items():
    s["wall_median_vs_stock"] = s["wall_s"]["median"] / base["wall_s"]["median"]
    s["cpu_median_vs_stock"] = s["cpu_s"]["median"] / base["cpu_s"]["median"]
    s["max_abs_loss_diff_vs_stock"] = float(np.max(np.abs(np.subtract(s["losses"], base["losses"]))))
    print(f"{name:<8}{s['wall_s']['median']:>9.3f}s{s['wall_s']['min']:>7.3f}s{s['cpu_s']['median']:>9.3f}s"
          f"{s['sys_s']['median']:>9.3f}s{s['minor_faults']['median']:>13.0f}"
          f"{s['wall_median_vs_stock']:>15.2f}{s['cpu_median_vs_stock']:>14.2f}")
  print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} on {os.cpu_count()} cores")
  path = pathlib.Path(args.out)
  save_json(result, path)


if __name__ == "__main__":
  main()
