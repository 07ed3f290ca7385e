"""Iterative magnitude pruning with and without AP, and the dead-neuron rates, at the scale of 2 CPU cores.

    python -m experiments.pruning_study                       # every part, every seed (resumes; hours)
    python -m experiments.pruning_study --shard 0/2 &         # two workers share the jobs
    python -m experiments.pruning_study --shard 1/2
    python -m experiments.pruning_study --stage report        # tables, statistics and plots from the runs
    python -m experiments.pruning_study --quick               # a tiny version (the test suite runs it)

The protocol is results/pruning/PROTOCOL.md (committed before the first run). Every run is
``ricci_jax.train.train_pruned`` of a preset with a pruning schedule: a dense training, then cycles
that remove 20% of the alive prunable weights each, rewind to the initialisation (lottery-ticket
IMP, the official AP code's ``lt`` mode) and retrain with the learning-rate schedule restarted.
The arms differ only in how each cycle's 20% is chosen:

* ``imp``: global magnitude (all 20%);
* ``ap``: global magnitude 18% + AP 2% (negative survivors that moved least in the cycle, the official
  code's setting);
* ``ap_random``: magnitude 18% + 2% at random among the negative survivors (AP's null control: the
  same sign preference and count, no "moved least" choice).

Parts: ``lenet_float`` (float LeNet-5, full Fashion-MNIST), ``lenet_binary`` (its inner layers
binarized, clipped STE: sparse binary networks), ``lenet_rfdnn`` (binarized, trained with RF-DNN),
``resnet_float`` (float ResNet-20 on the real CIFAR-10 subset). Runs train into ``--workdir``
(outside the repository, so a study never dirties the tree it runs from); ``--stage report``
writes ``results/pruning/``: runs.json (every cycle of every run, with its commit and device),
analysis.json, README.md and the plots.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Any

import numpy as np
import scipy.stats

from experiments import cli
from experiments.configs import presets
from ricci_jax import reporting, statistics
from ricci_jax.train import schema

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "pruning"
SEEDS = (0, 1, 2)
AP_SHARE = 0.02
COMPARISONS = (("ap", "imp"), ("ap_random", "imp"), ("ap", "ap_random"))
"""The paired comparisons (a minus b): AP against its host, the null against the host, AP against the null."""


@dataclasses.dataclass(frozen=True)
class Part:
  """One experiment: a preset, its budget per cycle, the number of pruning cycles and its arms."""

  title: str
  method: str  # the preset's method (float, clipped_ste, rfdnn)
  model: str
  epochs: int  # per cycle
  cycles: int  # after the dense training
  arms: tuple[str, ...] = ("imp", "ap")
  dnr_every: int = 25

  def config(self, arm: str, seed: int, quick: bool = False):
    if self.model == "lenet5":
      c = presets.fashion_mnist(self.method, model="lenet5", weight_bits=32 if self.method == "float" else 1,
                                epochs=self.epochs)
    else:
      c = presets.cifar10_subset(self.method, model=self.model, weight_bits=32, epochs=self.epochs)
    c.name = f"{c.name}_{arm}"
    c.seed = seed
    c.progress = False
    c.pruning.cycles = self.cycles
    c.pruning.rate = 0.2
    c.pruning.rewind = "init"
    c.pruning.ap_share = 0.0 if arm == "imp" else AP_SHARE
    c.pruning.ap_score = "random" if arm == "ap_random" else "change"
    c.dnr.every_steps = self.dnr_every
    c.dnr.test = True
    c.checkpoint_every_steps = 200
    if quick:
      c.dataset.train_limit, c.dataset.test_limit, c.batch_size = 256, 128, 64
      c.epochs, c.pruning.cycles, c.dnr.every_steps, c.plots = 1, 2, 2, False
    return c


PARTS = {
    "lenet_float": Part("float LeNet-5, Fashion-MNIST", "float", "lenet5", epochs=2, cycles=10,
                        arms=("imp", "ap", "ap_random")),
    "lenet_binary": Part("binarized LeNet-5 (clipped STE), Fashion-MNIST", "clipped_ste", "lenet5", epochs=2, cycles=8),
    "resnet_float": Part("float ResNet-20, CIFAR-10 subset", "float", "resnet20", epochs=8, cycles=5, dnr_every=9),
    "lenet_rfdnn": Part("binarized LeNet-5 trained with RF-DNN, Fashion-MNIST", "rfdnn", "lenet5", epochs=2, cycles=8),
}
"""The parts, in the order they run (the first is the main experiment)."""


def jobs(parts, seeds) -> list[tuple[str, str, int]]:
  """Every (part, arm, seed), seeds outermost within a part so that early stops leave whole seeds."""
  return [(p, arm, s) for p in parts for s in seeds for arm in PARTS[p].arms]


def run_dir(workdir: pathlib.Path, part: str, arm: str, seed: int) -> pathlib.Path:
  return workdir / part / arm / f"seed_{seed}"


def run(parts, seeds, workdir: pathlib.Path, shard: tuple[int, int], quick: bool) -> None:
  from ricci_jax import train  # noqa: PLC0415

  todo = jobs(parts, seeds)[shard[0]::shard[1]]
  for i, (part, arm, seed) in enumerate(todo):
    print(f"[{i + 1}/{len(todo)}] {part} {arm} seed {seed}", flush=True)
    summary = train.train_pruned(PARTS[part].config(arm, seed, quick), run_dir(workdir, part, arm, seed))
    last = summary["cycles"][-1]
    print(f"  cycle {last['cycle']}: {100 * last['remaining']:.1f}% remaining, test accuracy "
          f"{100 * last['final_test_accuracy']:.2f}%", flush=True)


# ----------------------------------------------------------------------------
# The report.
# ----------------------------------------------------------------------------


def collect(parts, seeds, workdir: pathlib.Path) -> list[dict]:
  """Every finished run: its cycles, and each cycle's commit, dirty flag and device."""
  out = []
  for part, arm, seed in jobs(parts, seeds):
    d = run_dir(workdir, part, arm, seed)
    if not (d / "results.json").is_file():
      continue
    summary = json.loads((d / "results.json").read_text())
    sources = []
    for row in summary["cycles"]:
      cycle_results = json.loads((d / f"cycle_{row['cycle']:02d}" / "results.json").read_text())
      sources.append({"commit": cycle_results["source"].get("commit"), "dirty": cycle_results["source"].get("dirty"),
                      "device": cycle_results["device"]})
    out.append({"part": part, "arm": arm, "seed": seed, "cycles": summary["cycles"], "sources": sources,
                "schedule": summary["pruning"]["schedule"]})
  return out


def _series(runs, part, arm, key):
  """{seed: [value per cycle]} of one arm."""
  return {r["seed"]: [row.get(key) for row in r["cycles"]] for r in runs if r["part"] == part and r["arm"] == arm}


def analyse(runs: list[dict]) -> dict:
  """Per part: accuracy and DNR per cycle and arm (mean, std over seeds), AP minus IMP (paired by seed)
  per cycle and over the pruned cycles (the primary endpoint), and whether DNR falls with sparsity."""
  out = {}
  for part in dict.fromkeys(r["part"] for r in runs):
    arms = [a for a in PARTS[part].arms if any(r["part"] == part and r["arm"] == a for r in runs)]
    acc = {a: _series(runs, part, a, "final_test_accuracy") for a in arms}
    seeds = sorted(set.intersection(*(set(acc[a]) for a in arms)))
    res: dict[str, Any] = {"title": PARTS[part].title, "seeds": seeds, "arms": {}}
    for a in arms:
      rem = next(r["cycles"] for r in runs if r["part"] == part and r["arm"] == a)
      per_cycle = []
      for k in range(len(rem)):
        vals = [acc[a][s][k] for s in seeds if len(acc[a][s]) > k]
        dnr = [v for v in (_series(runs, part, a, "dnr_train")[s][k] for s in seeds
                           if len(acc[a][s]) > k) if v is not None]
        dnr_test = [v for v in (_series(runs, part, a, "dnr_test")[s][k] for s in seeds
                                if len(acc[a][s]) > k) if v is not None]
        per_cycle.append({"cycle": k, "remaining": rem[k]["remaining"], "n": len(vals),
                          "accuracy_mean": float(np.mean(vals)), "accuracy_std": float(np.std(vals, ddof=1))
                          if len(vals) > 1 else float("nan"), "accuracy": vals,
                          "dnr_train_mean": float(np.mean(dnr)) if dnr else None,
                          "dnr_test_mean": float(np.mean(dnr_test)) if dnr_test else None})
      res["arms"][a] = {"cycles": per_cycle, "dnr_trend": _dnr_trend(runs, part, a)}
    cycles = max(r["schedule"]["cycles"] for r in runs if r["part"] == part)
    for a, b in COMPARISONS:
      if a not in arms or b not in arms:
        continue
      full = [s for s in seeds if len(acc[a][s]) == len(acc[b][s]) == cycles + 1]
      if not full:
        continue
      per_cycle = []
      for k in range(1, cycles + 1):
        d = statistics.paired_difference([acc[a][s][k] for s in full], [acc[b][s][k] for s in full])
        per_cycle.append({"cycle": k, **{x: d[x] for x in ("mean", "differences", "wins")}})
      dnr = {arm: _series(runs, part, arm, "dnr_train") for arm in (a, b)}
      dnr_full = [s for s in full if all(v is not None for arm in (a, b) for v in dnr[arm][s][1:])]
      res[f"{a}_minus_{b}"] = {
          "seeds": full, "per_cycle": per_cycle,
          "dnr_train_mean_over_pruned_cycles": statistics.paired_difference(
              [float(np.mean(dnr[a][s][1:])) for s in dnr_full], [float(np.mean(dnr[b][s][1:])) for s in dnr_full])
          if dnr_full else None,
          "mean_over_pruned_cycles": statistics.paired_difference(
              [float(np.mean(acc[a][s][1:])) for s in full], [float(np.mean(acc[b][s][1:])) for s in full]),
          "last_cycle": statistics.paired_difference([acc[a][s][-1] for s in full], [acc[b][s][-1] for s in full])}
    out[part] = res
  return out


def _dnr_trend(runs, part, arm) -> dict:
  """Spearman correlation of remaining weights and DNR per run: > 0 means DNR falls as pruning proceeds."""
  out = {}
  for key in ("dnr_train", "dnr_test"):
    rhos = []
    for r in runs:
      if r["part"] == part and r["arm"] == arm and len(r["cycles"]) > 2:
        pairs = [(row["remaining"], row[key]) for row in r["cycles"] if row.get(key) is not None]
        if len(pairs) > 2:
          rhos.append(float(scipy.stats.spearmanr(*zip(*pairs)).statistic))
    out[key] = {"rho_per_seed": rhos, "falls_with_pruning": sum(r > 0 for r in rhos), "runs": len(rhos)}
  return out


def plot(analysis: dict, out: pathlib.Path) -> None:
  plt = reporting.pyplot()
  for part, res in analysis.items():
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (arm, a) in enumerate(res["arms"].items()):
      x = [100 * c["remaining"] for c in a["cycles"]]
      mean = np.array([100 * c["accuracy_mean"] for c in a["cycles"]])
      std = np.nan_to_num(np.array([100 * c["accuracy_std"] for c in a["cycles"]]))
      axes[0].plot(x, mean, "o-", ms=3, color=f"C{i}", label=arm)
      axes[0].fill_between(x, mean - std, mean + std, color=f"C{i}", alpha=0.15)
      for key, ax in (("dnr_train_mean", axes[1]), ("dnr_test_mean", axes[2])):
        ax.plot(x, [c[key] if c[key] is not None else np.nan for c in a["cycles"]], "o-", ms=3, color=f"C{i}",
                label=arm)
    axes[0].set_ylabel("test accuracy % (mean ± std over seeds)")
    axes[1].set_ylabel("dynamic DNR (training batches, last epoch)")
    axes[2].set_ylabel("DNR on the test set (eval mode)")
    for ax in axes:
      ax.set_xscale("log")
      ax.invert_xaxis()
      ax.set_xlabel("remaining prunable weights %")
      ax.grid(alpha=0.3, which="both")
      ax.legend(fontsize=8)
    fig.suptitle(f"{res['title']}: IMP with and without AP, seeds {res['seeds']}")
    fig.tight_layout()
    fig.savefig(out / f"{part}.png", dpi=100)
    plt.close(fig)


def _pct(x, signed=False):
  return "" if x is None or x != x else (f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}")


def _summary(analysis: dict) -> list[str]:
  """One row per part: where pruning ended, AP against IMP (the primary endpoint), and the DNR questions."""
  rows = []
  for part, res in analysis.items():
    diff = res.get("ap_minus_imp")
    imp, ap = res["arms"]["imp"]["cycles"], res["arms"].get("ap", {}).get("cycles", [])
    if not diff:
      continue
    m, dnr = diff["mean_over_pruned_cycles"], diff["dnr_train_mean_over_pruned_cycles"]
    trend = "; ".join(f"{a} {t['dnr_train']['falls_with_pruning']}/{t['dnr_train']['runs']}"
                      for a, t in ((a, res["arms"][a]["dnr_trend"]) for a in ("imp", "ap")))
    rows.append([f"`{part}`", len(diff["seeds"]), f"{100 * imp[-1]['remaining']:.1f}", _pct(imp[0]["accuracy_mean"]),
                 _pct(imp[-1]["accuracy_mean"]), _pct(ap[-1]["accuracy_mean"]) if ap else "",
                 f"{_pct(m['mean'], True)} ({m['wins']}/{m['n']}; p {m['p_sign_flip']:.2g})",
                 f"{dnr['mean']:+.4f} (lower on {dnr['n'] - dnr['wins']}/{dnr['n']})" if dnr else "", trend])
  if not rows:
    return []
  header = ["part", "paired seeds", "remaining % at the end", "dense accuracy %", "IMP at the end %",
            "AP at the end %", "AP − IMP, pruned cycles (ahead on; sign-flip p)", "dynamic DNR, AP − IMP",
            "DNR falls with pruning (runs)"]
  return ["## Summary", "", reporting.markdown_table(header, rows), "",
          "Accuracy: test accuracy at the end of a cycle, mean over the paired seeds. AP − IMP: the primary "
          "endpoint, the mean over the pruned cycles of the per-seed difference, in points; with 3 seeds the "
          "smallest possible sign-flip p is 0.25. DNR falls with pruning: runs whose Spearman ρ of remaining "
          "weights and dynamic DNR over the cycles is positive.", ""]


def readme(analysis: dict, runs: list[dict]) -> str:
  p = reporting.provenance({"source": {"commit": s["commit"], "dirty": s["dirty"]}, "device": s["device"]}
                            for r in runs for s in r["sources"])
  commits, dirty, devices = p["commits"], p["dirty"], p["devices"]
  lines = ["# Pruning with and without AP (generated by `python -m experiments.pruning_study --stage report`)", "",
           "Protocol: [PROTOCOL.md](PROTOCOL.md). Raw data: `runs.json` (every cycle of every run); statistics: "
           "`analysis.json`.", "",
           f"Runs: {len(runs)} finished of the protocol's {len(jobs(PARTS, SEEDS))} (the study resumes where it "
           f"stopped; parts without a paired seed are not shown); commits {', '.join(commits)}; cycles trained "
           f"from a dirty tree: {dirty}; devices: {'; '.join(devices)}.", ""]
  lines += _summary(analysis)
  for part, res in analysis.items():
    lines += [f"## {res['title']} (`{part}`)", "", f"Seeds: {res['seeds']}. ![{part}]({part}.png)", ""]
    arms = list(res["arms"])
    header = ["cycle", "remaining %"] + [f"{a} accuracy %" for a in arms] + [f"{a} DNR train / test" for a in arms]
    rows = []
    for k, c0 in enumerate(res["arms"][arms[0]]["cycles"]):
      row = [k, f"{100 * c0['remaining']:.1f}"]
      for a in arms:
        cs = res["arms"][a]["cycles"]
        std = cs[k]["accuracy_std"] if k < len(cs) else float("nan")
        row.append("" if k >= len(cs) else _pct(cs[k]["accuracy_mean"]) + (f" ± {_pct(std)}" if std == std else ""))
      for a in arms:
        cs = res["arms"][a]["cycles"]
        row.append(f"{cs[k]['dnr_train_mean']:.3f} / {cs[k]['dnr_test_mean']:.3f}"
                   if k < len(cs) and cs[k]["dnr_train_mean"] is not None else "")
      rows.append(row)
    lines += [reporting.markdown_table(header, rows), ""]
    for a, b in COMPARISONS:
      diff = res.get(f"{a}_minus_{b}")
      if diff:
        m, last = diff["mean_over_pruned_cycles"], diff["last_cycle"]
        lines.append(f"* **{a} − {b}**, mean over the pruned cycles, paired over seeds "
                     f"{diff['seeds']}: {_pct(m['mean'], True)} points (per seed "
                     f"{', '.join(_pct(d, True) for d in m['differences'])}; t-test p = {m['p']:.3g}, exact "
                     f"sign-flip p = {m['p_sign_flip']:.3g}); at the last cycle {_pct(last['mean'], True)} "
                     f"(ahead on {last['wins']}/{last['n']} seeds).")
        dnr = diff.get("dnr_train_mean_over_pruned_cycles")
        if dnr:
          lines.append(f"  Dynamic DNR, {a} − {b}, mean over the pruned cycles: {dnr['mean']:+.4f} (per seed "
                       f"{', '.join(f'{d:+.4f}' for d in dnr['differences'])}; lower on {dnr['n'] - dnr['wins']}/"
                       f"{dnr['n']} seeds).")
    for a in arms:
      t = res["arms"][a]["dnr_trend"]
      lines.append(f"* DNR against sparsity, {a}: the dynamic DNR falls as pruning proceeds (Spearman ρ of "
                   f"remaining weights and DNR > 0) in {t['dnr_train']['falls_with_pruning']}/{t['dnr_train']['runs']}"
                   f" runs (ρ {', '.join(f'{x:+.2f}' for x in t['dnr_train']['rho_per_seed'])}); the test-set DNR in "
                   f"{t['dnr_test']['falls_with_pruning']}/{t['dnr_test']['runs']}.")
    lines.append("")
  return "\n".join(lines)


def report(parts, seeds, workdir: pathlib.Path, out: pathlib.Path) -> dict:
  runs = collect(parts, seeds, workdir)
  if not runs:
    raise SystemExit(f"no finished run under {workdir}")
  out.mkdir(parents=True, exist_ok=True)
  analysis = analyse(runs)
  (out / "runs.json").write_text(json.dumps(reporting.to_jsonable(runs), indent=1))
  (out / "analysis.json").write_text(json.dumps(reporting.to_jsonable(analysis), indent=1))
  plot(analysis, out)
  (out / "README.md").write_text(readme(analysis, runs) + "\n")
  return analysis


def main(argv=None) -> int:
  parser = cli.parser(__doc__)
  parser.add_argument("--stage", choices=("run", "report", "all"), default="all")
  parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {', '.join(PARTS)}")
  parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
  parser.add_argument("--workdir", type=pathlib.Path, default=ROOT.parent / "pruning_runs")
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  parser.add_argument("--shard", default="0/1", help="i/n: this worker runs every n-th job from the i-th")
  parser.add_argument("--quick", action="store_true", help="a tiny version of everything (tests)")
  args = parser.parse_args(argv)
  parts = [p for p in args.parts.split(",") if p]
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    parser.error(f"unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
  seeds = [int(s) for s in args.seeds.split(",")]
  i, n = (int(x) for x in args.shard.split("/"))
  if not 0 <= i < n:
    parser.error(f"--shard i/n needs 0 <= i < n, got {args.shard}")
  for part in parts:  # every config is checked before the first run
    for arm in PARTS[part].arms:
      schema.validate(PARTS[part].config(arm, seeds[0], args.quick))
  if args.stage in ("run", "all"):
    run(parts, seeds, args.workdir, (i, n), args.quick)
  if args.stage in ("report", "all") and i == 0:
    report(parts, seeds, args.workdir, args.out)
  return 0


if __name__ == "__main__":
  from ricci_jax import runtime

  runtime.configure_cpu()  # process-wide CPU settings, before JAX starts: a program's choice, never the library's
  sys.exit(cli.run(main))
