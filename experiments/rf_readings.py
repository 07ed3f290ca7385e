"""Does RF-DNN beat clipped STE, and under which reading of the paper? The study that can decide it.

    python -m experiments.rf_readings              # every stage in order; resumes, finished runs are not retrained
    python -m experiments.rf_readings --stage test # one stage: determinism, tune, test, followup, collect, report
    python -m experiments.rf_readings --stage report --runs results/rf_readings/runs.json   # tables from the committed data
    python -m experiments.rf_readings --quick --workdir /tmp/q --out /tmp/q_out   # the pipeline in minutes; proves nothing

The protocol, fixed before the first run, is ``results/rf_readings/PROTOCOL.md``: full Fashion-MNIST with
5,000 training images held out for validation, binarized LeNet-5 (inner layers), 6 epochs, batch 128, cosine
learning rate. Stages:

* ``determinism``: two identical runs of two arms must give bit-identical parameters, so seeds pair.
* ``tune``: each arm's learning rate from {0.5, 1, 2} x 0.05 on the validation split, 2 seeds.
* ``test``: every arm at its chosen rate, 10 paired seeds, on the test set.
* ``followup``: for each RF-DNN reading that beats the null control on the test seeds, the regulariser as
  a ratio (rho 0.1, 0.3) and the gate (epsilon twice the running median of N), 6 seeds.
* ``edge`` (exploratory, not in the protocol; added after every arm chose the grid's largest rate): each
  arm once more on the validation split at 4 x 0.05, to see whether the grid's edge bound the choice. It
  changes no choice and no test run.
* ``collect``: every run's raw numbers (per-epoch accuracies, diagnostics, flip rates, latent-weight norms,
  the commit and device) into ``OUT/runs.json``.
* ``report``: tables, the narrative's numbers and plots, generated from ``runs.json`` alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from experiments import cli

ARMS = ("clipped_ste", "random_null", "dorefa", "rfdnn", "rfdnn_tau1", "rfdnn_hessian", "rfdnn_hessian_matched")
READING_ARMS = ("rfdnn", "rfdnn_tau1", "rfdnn_hessian", "rfdnn_hessian_matched")
CONTROL_ARM = "clipped_ste"
NULL_ARM = "random_null"
BASE_LR = 0.05
LR_MULTIPLIERS = (0.5, 1.0, 2.0)
TUNE_SEEDS = (100, 101)
TEST_SEEDS = tuple(range(10))
FOLLOWUP_SEEDS = tuple(range(6))
FOLLOWUP_VARIANTS = {
    "rho0.1": ("rfdnn.rho=0.1",),
    "rho0.3": ("rfdnn.rho=0.3",),
    "gate2": ("rfdnn.epsilon_relative=2.0",),
}
BEATS_NULL_P = 0.05
DETERMINISM_ARMS = ("clipped_ste", "rfdnn_hessian")
EDGE_MULTIPLIER = 4.0  # exploratory, added after the tuning: every arm chose the grid's largest rate
STAGES = ("determinism", "tune", "test", "followup", "edge", "collect", "report")
EPOCHS = 6


class Plan:
  """What a stage runs: the full protocol, or the quick pipeline check."""

  def __init__(self, quick: bool):
    self.quick = quick
    self.arms = ("clipped_ste", "random_null", "rfdnn_hessian") if quick else ARMS
    self.readings = ("rfdnn_hessian",) if quick else READING_ARMS
    self.lr_multipliers = (1.0, 2.0) if quick else LR_MULTIPLIERS
    self.tune_seeds = TUNE_SEEDS[:1] if quick else TUNE_SEEDS
    self.test_seeds = TEST_SEEDS[:2] if quick else TEST_SEEDS
    self.followup_seeds = FOLLOWUP_SEEDS[:2] if quick else FOLLOWUP_SEEDS
    self.followup_variants = dict(list(FOLLOWUP_VARIANTS.items())[:1]) if quick else FOLLOWUP_VARIANTS


def config_for(arm: str, lr_multiplier: float, seed: int, split: str, quick: bool, overrides: Sequence[str] = ()):
  """One run's configuration: the Fashion-MNIST preset of ``arm``, trained without the validation images."""
  from experiments.configs import presets  # noqa: PLC0415
  from ricci_jax import train  # noqa: PLC0415

  c = presets.fashion_mnist(arm, epochs=EPOCHS)
  c.dataset.holdout_validation = True  # the last 5,000 training images are never trained on
  c.dataset.eval_split = split
  c.optimizer.learning_rate = BASE_LR * lr_multiplier
  c.seed = seed
  c.progress = False
  if quick:
    c.epochs, c.batch_size, c.log_every_steps = 1, 64, 4
    c.dataset.train_limit, c.dataset.test_limit = 768, 256
  train.schema.apply_overrides(c, list(overrides))
  return c


def _run(config, run_dir: pathlib.Path) -> dict:
  from ricci_jax import train  # noqa: PLC0415

  config.seeds = ()
  return train.train_seeds(config, run_dir)["runs"][0]


def _run_all(jobs: list[tuple[str, Any, pathlib.Path]], title: str):
  """Validates every job's config first, then trains them in order with one progress bar."""
  from tqdm.auto import tqdm  # noqa: PLC0415

  from ricci_jax import train  # noqa: PLC0415

  for _, config, run_dir in jobs:
    train.schema.validate(config, run_dir)
  bar = tqdm(jobs, desc=title, unit="run", dynamic_ncols=True)
  for label, config, run_dir in bar:
    bar.set_postfix_str(label)
    summary = _run(config, run_dir)
    bar.write(f"{label}: {100 * summary['last_epochs']['mean']:.2f}% ({summary['seconds']:.0f} s)")


def _dir(workdir: pathlib.Path, stage: str, arm: str, lr_multiplier: float, seed: int, variant: str = "") -> pathlib.Path:
  return workdir / stage / (f"{arm}+{variant}" if variant else arm) / f"lr_x{lr_multiplier:g}" / f"seed_{seed}"


# ----------------------------------------------------------------------------
# Stages that train.
# ----------------------------------------------------------------------------


def stage_determinism(plan: Plan, workdir: pathlib.Path) -> dict:
  """Each arm trained twice from scratch with the same seed: are the parameters bit-identical?"""
  from ricci_jax import train  # noqa: PLC0415

  jobs = []
  for arm in DETERMINISM_ARMS:
    for copy in ("a", "b"):
      c = config_for(arm, 1.0, 0, "validation", plan.quick)
      c.epochs = 1
      jobs.append((f"{arm} copy {copy}", c, workdir / "determinism" / arm / copy))
  _run_all(jobs, "determinism")
  out = {}
  for arm in DETERMINISM_ARMS:
    a, b = (train.load_checkpoint(workdir / "determinism" / arm / x) for x in ("a", "b"))
    out[arm] = {"params_identical": _tree_digest(a["params"]) == _tree_digest(b["params"]),
                "opt_state_identical": _tree_digest(a["opt_state"]) == _tree_digest(b["opt_state"]),
                "params_sha256": _tree_digest(a["params"]), "steps": int(a["step"])}
  (workdir / "determinism" / "determinism.json").write_text(json.dumps(out, indent=2))
  return out


def _tree_digest(tree) -> str:
  import jax  # noqa: PLC0415

  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    arr = np.ascontiguousarray(np.asarray(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def stage_tune(plan: Plan, workdir: pathlib.Path):
  jobs = [(f"tune {arm} lr x{m:g} seed {s}", config_for(arm, m, s, "validation", plan.quick),
           _dir(workdir, "tune", arm, m, s))
          for arm in plan.arms for m in plan.lr_multipliers for s in plan.tune_seeds]
  _run_all(jobs, "tune")


def chosen_multipliers(records: list[dict], plan: Plan) -> dict[str, float]:
  """Per arm, the multiplier with the best mean validation statistic over the tuning seeds (ties: the smaller)."""
  out = {}
  for arm in plan.arms:
    scores = []
    for m in plan.lr_multipliers:
      stats = [r["statistic"] for r in records if r["stage"] == "tune" and r["arm"] == arm and r["lr_multiplier"] == m]
      if len(stats) != len(plan.tune_seeds):
        raise ValueError(f"the tuning of {arm!r} at lr x{m:g} is incomplete ({len(stats)} of "
                         f"{len(plan.tune_seeds)} seeds): run the tune stage first")
      scores.append((float(np.mean(stats)), -m))
    out[arm] = -max(scores)[1]
  return out


def stage_test(plan: Plan, workdir: pathlib.Path):
  chosen = chosen_multipliers(collect_records(workdir), plan)
  jobs = [(f"test {arm} lr x{chosen[arm]:g} seed {s}", config_for(arm, chosen[arm], s, "test", plan.quick),
           _dir(workdir, "test", arm, chosen[arm], s)) for arm in plan.arms for s in plan.test_seeds]
  _run_all(jobs, "test")


def stage_edge(plan: Plan, workdir: pathlib.Path):
  jobs = [(f"edge {arm} lr x{EDGE_MULTIPLIER:g} seed {s}", config_for(arm, EDGE_MULTIPLIER, s, "validation", plan.quick),
           _dir(workdir, "tune", arm, EDGE_MULTIPLIER, s)) for arm in plan.arms for s in plan.tune_seeds]
  _run_all(jobs, "edge")


def edge_check(records: list[dict], plan: Plan) -> dict[str, dict] | None:
  """Per arm, the validation statistic at the exploratory rate against the chosen one (None if not run)."""
  chosen = chosen_multipliers(records, plan)
  out = {}
  for arm in plan.arms:
    edge = [r["statistic"] for r in records if r["stage"] == "tune" and r["arm"] == arm
            and r["lr_multiplier"] == EDGE_MULTIPLIER]
    if len(edge) != len(plan.tune_seeds):
      return None
    best = [r["statistic"] for r in records if r["stage"] == "tune" and r["arm"] == arm
            and r["lr_multiplier"] == chosen[arm]]
    out[arm] = {"chosen": chosen[arm], "chosen_mean": float(np.mean(best)), "edge_mean": float(np.mean(edge)),
                "edge_better": bool(np.mean(edge) > np.mean(best))}
  return out


def readings_beating_the_null(records: list[dict], plan: Plan) -> dict[str, dict]:
  """Each reading's paired test-set difference to the null control, and whether it beats it (mean > 0, p < 0.05)."""
  from ricci_jax import statistics  # noqa: PLC0415

  out = {}
  null = _per_seed(records, "test", NULL_ARM, plan.test_seeds)
  for arm in plan.readings:
    diff = statistics.paired_difference(_per_seed(records, "test", arm, plan.test_seeds), null)
    out[arm] = {**diff, "beats_null": bool(diff["mean"] > 0 and diff["p"] < BEATS_NULL_P)}
  return out


def stage_followup(plan: Plan, workdir: pathlib.Path) -> list[str]:
  records = collect_records(workdir)
  chosen = chosen_multipliers(records, plan)
  verdicts = readings_beating_the_null(records, plan)
  selected = [a for a in plan.readings if verdicts[a]["beats_null"]]
  if plan.quick:
    selected = list(plan.readings)  # the pipeline check runs the follow-ups whatever the verdict
  jobs = [(f"followup {arm}+{v} seed {s}",
           config_for(arm, chosen[arm], s, "test", plan.quick, overrides),
           _dir(workdir, "followup", arm, chosen[arm], s, v))
          for arm in selected for v, overrides in plan.followup_variants.items() for s in plan.followup_seeds]
  if jobs:
    _run_all(jobs, "followup")
  return selected


# ----------------------------------------------------------------------------
# Raw data: every run's numbers, from its working directory.
# ----------------------------------------------------------------------------


def _diagnostics_summary(path: pathlib.Path) -> dict:
  from ricci_jax import reporting  # noqa: PLC0415

  records = reporting.read_jsonl(path)
  if not records:
    return {}
  out = {}
  for layer in records[0]["layers"]:
    def series(key, layer=layer):
      return np.array([float(r["layers"][layer][key]) for r in records])
    out[layer] = {
        "s_mean": float(series("s").mean()), "correction_mean": float(series("correction").mean()),
        "correction_max": float(series("correction").max()), "residual_mean": float(series("residual").mean()),
        "regularizer_mean": float(series("regularizer").mean()), "alpha_mean": float(series("alpha").mean()),
        "gate_open_fraction": float(series("gate_open_fraction")[-1]), "logged_steps": len(records)}
  return out


def _latent_summary(run_dir: pathlib.Path, layers: list[str]) -> dict:
  from ricci_jax import train  # noqa: PLC0415

  params = train.load_checkpoint(run_dir)["params"]
  out = {}
  for layer in layers:
    node = params
    for part in layer.split("/"):
      node = node[part]
    w = np.asarray(node, np.float64)
    out[layer] = {"rms": float(np.sqrt(np.mean(w * w))), "share_beyond_clip": float(np.mean(np.abs(w) > 1.0))}
  return out


def run_record(run_dir: pathlib.Path, stage: str, arm: str, variant: str, lr_multiplier: float, seed: int) -> dict:
  """The compact raw record of one finished run."""
  from ricci_jax import reporting  # noqa: PLC0415

  summary = json.loads((run_dir / "results.json").read_text())
  config = json.loads((run_dir / "config.json").read_text())
  evals = reporting.read_jsonl(run_dir / "eval.jsonl")
  metrics = reporting.read_jsonl(run_dir / "metrics.jsonl")
  steps_per_epoch = summary["steps"] // max(1, summary["epochs_done"])
  flips = {}
  for m in metrics:
    flips.setdefault(int(m["epoch"]), []).append(m.get("quant/flip_rate", float("nan")))
  return {
      "stage": stage, "arm": arm, "variant": variant, "lr_multiplier": lr_multiplier,
      "learning_rate": config["optimizer"]["learning_rate"], "seed": seed,
      "split": config["dataset"]["eval_split"], "epochs": config["epochs"], "steps": summary["steps"],
      "steps_per_epoch": steps_per_epoch, "accuracy_per_epoch": [e["accuracy"] for e in evals],
      "statistic": summary["last_epochs"]["mean"], "last_epochs": summary["last_epochs"]["epochs"],
      "final_accuracy": summary["final_test_accuracy"], "nonfinite_steps": summary["nonfinite_steps"],
      "flip_rate_per_epoch": [float(np.nanmean(v)) for _, v in sorted(flips.items())],
      "diagnostics": _diagnostics_summary(run_dir / "diagnostics.jsonl"),
      "latent": _latent_summary(run_dir, summary["quantized_layers"]),
      "seconds": summary.get("seconds"), "device": summary.get("device"), "source": summary.get("source"),
  }


def collect_records(workdir: pathlib.Path) -> list[dict]:
  """Every finished run under ``workdir`` (stages tune, test, followup) as :func:`run_record` dicts."""
  records = []
  for stage in ("tune", "test", "followup"):
    for results in sorted((workdir / stage).glob("*/lr_x*/seed_*/results.json")):
      run_dir = results.parent
      summary = json.loads(results.read_text())
      if summary.get("interrupted"):
        continue
      arm, _, variant = run_dir.parent.parent.name.partition("+")
      records.append(run_record(run_dir, stage, arm, variant, float(run_dir.parent.name.removeprefix("lr_x")),
                                int(run_dir.name.removeprefix("seed_"))))
  return records


def _per_seed(records: list[dict], stage: str, arm: str, seeds: Sequence[int], variant: str = "") -> list[float]:
  by_seed = {r["seed"]: r["statistic"] for r in records if r["stage"] == stage and r["arm"] == arm
             and r["variant"] == variant}
  missing = [s for s in seeds if s not in by_seed]
  if missing:
    raise ValueError(f"{stage} runs of {arm}{'+' + variant if variant else ''} are missing seeds {missing}")
  return [by_seed[s] for s in seeds]


# ----------------------------------------------------------------------------
# The report: generated from runs.json alone.
# ----------------------------------------------------------------------------


def _pct(x: float, digits: int = 2) -> str:
  return f"{100 * x:.{digits}f}"


def _signed(x: float, digits: int = 2) -> str:
  return f"{100 * x:+.{digits}f}"


def _p(p: float) -> str:
  return "n/a" if p != p else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def analyse(records: list[dict], plan: Plan) -> dict:
  """Every number the report states, computed from the raw records."""
  from ricci_jax import statistics  # noqa: PLC0415

  chosen = chosen_multipliers(records, plan)
  tuning = {arm: {f"{m:g}": float(np.mean([r["statistic"] for r in records if r["stage"] == "tune"
                                             and r["arm"] == arm and r["lr_multiplier"] == m]))
                  for m in plan.lr_multipliers} for arm in plan.arms}
  test_done = all(len([r for r in records if r["stage"] == "test" and r["arm"] == a]) >= len(plan.test_seeds)
                  for a in plan.arms)
  out: dict[str, Any] = {"chosen_multiplier": chosen, "tuning": tuning, "test_complete": test_done}
  if not test_done:
    return out
  control = _per_seed(records, "test", CONTROL_ARM, plan.test_seeds)
  arms = {}
  for arm in plan.arms:
    values = _per_seed(records, "test", arm, plan.test_seeds)
    runs = [r for r in records if r["stage"] == "test" and r["arm"] == arm]
    within = [float(np.std(r["accuracy_per_epoch"][-r["last_epochs"]:])) for r in runs]
    arms[arm] = {"per_seed": values, "mean": float(np.mean(values)), "std_of_seeds": float(np.std(values, ddof=1)),
                 "within_run_std": float(np.mean(within)),
                 "vs_control": statistics.paired_difference(values, control) if arm != CONTROL_ARM else None,
                 "spread_vs_control": (statistics.paired_variance_test(values, control)
                                       if arm != CONTROL_ARM and len(values) >= 3 else None),
                 "flip_rate": float(np.mean([np.mean(r["flip_rate_per_epoch"]) for r in runs])),
                 "latent": _mean_over_runs([r["latent"] for r in runs]),
                 "diagnostics": _mean_over_runs([r["diagnostics"] for r in runs]),
                 "seconds": float(np.mean([r["seconds"] for r in runs]))}
  adjusted = statistics.holm({a: v["vs_control"]["p"] for a, v in arms.items() if v["vs_control"]})
  for arm, p in adjusted.items():
    arms[arm]["vs_control"]["p_holm"] = p
  out["arms"] = arms
  out["vs_null"] = readings_beating_the_null(records, plan)
  followups = {}
  for arm in plan.readings:
    base = [r for r in records if r["stage"] == "test" and r["arm"] == arm]
    for variant in plan.followup_variants:
      runs = [r for r in records if r["stage"] == "followup" and r["arm"] == arm and r["variant"] == variant]
      if len(runs) < len(plan.followup_seeds) or not base:
        continue
      values = _per_seed(records, "followup", arm, plan.followup_seeds, variant)
      followups[f"{arm}+{variant}"] = {
          "arm": arm, "variant": variant, "mean": float(np.mean(values)),
          "std_of_seeds": float(np.std(values, ddof=1)),
          "vs_reading": statistics.paired_difference(values, _per_seed(records, "test", arm, plan.followup_seeds)),
          "vs_control": statistics.paired_difference(
              values, _per_seed(records, "test", CONTROL_ARM, plan.followup_seeds)),
          "diagnostics": _mean_over_runs([r["diagnostics"] for r in runs])}
  out["followups"] = followups
  out["edge"] = edge_check(records, plan)
  return out


def _mean_over_runs(dicts: list[dict]) -> dict:
  """{layer: {key: mean over runs}} of nested per-layer dicts."""
  if not dicts or not dicts[0]:
    return {}
  return {layer: {k: float(np.mean([d[layer][k] for d in dicts])) for k in dicts[0][layer]} for layer in dicts[0]}


def _sources(records: list[dict]) -> tuple[list[str], list[str], str]:
  """Commits, devices, and a sentence on the runs whose tree was dirty (empty when none was)."""
  from ricci_jax import reporting  # noqa: PLC0415

  p = reporting.provenance(records)
  if not p["dirty"]:
    return p["commits"], p["devices"], ""
  what = f"uncommitted paths recorded: {', '.join(f'`{c}`' for c in p['changes'])}" if p["changes"] else ""
  if p["unrecorded_changes"]:
    what += ("; " if what else "") + f"{p['unrecorded_changes']} of them predate the record of which paths differed"
  return p["commits"], p["devices"], (f"{p['dirty']} of {p['runs']} runs were made from a DIRTY tree ({what}); "
                                      "see the deviations in PROTOCOL.md")


def render(records: list[dict], plan: Plan, determinism: dict | None, command: str) -> str:
  from ricci_jax import reporting  # noqa: PLC0415

  a = analyse(records, plan)
  commits, devices, dirty = _sources(records)
  lines = ["# RF-DNN's readings against clipped STE and a null control (generated; do not edit)", "",
           f"Generated by `{command}` from `runs.json` ({len(records)} runs). Protocol: `PROTOCOL.md`.", "",
           f"Runs made by commit(s) {', '.join(c[:10] for c in commits)}"
           f"{', clean trees' if not dirty else ''}; on {'; '.join(devices)}.", ""]
  if dirty:
    lines += [f"**{dirty}.**", ""]
  if plan.quick:
    lines += ["**Quick mode: a few steps per run. This checks the pipeline and is not evidence.**", ""]
  lines += ["## Determinism", ""]
  if determinism:
    for arm, d in determinism.items():
      lines.append(f"* {arm}: two runs from scratch, {d['steps']} steps each: parameters "
                   f"{'bit-identical' if d['params_identical'] else 'DIFFERENT'}, optimizer state "
                   f"{'bit-identical' if d['opt_state_identical'] else 'DIFFERENT'} (sha256 {d['params_sha256'][:12]}).")
    lines.append("")
  else:
    lines += ["Not run.", ""]
  lines += ["## Learning rates chosen on the validation split", "",
            f"Mean validation accuracy (%) over {len(plan.tune_seeds)} seeds, the statistic of the last 3 epochs; "
            f"base rate {BASE_LR}.", ""]
  rows = [[arm] + [_pct(a["tuning"][arm][f"{m:g}"]) for m in plan.lr_multipliers]
          + [f"x{a['chosen_multiplier'][arm]:g} ({BASE_LR * a['chosen_multiplier'][arm]:g})"] for arm in plan.arms]
  lines.append(reporting.markdown_table(["arm"] + [f"lr x{m:g}" for m in plan.lr_multipliers] + ["chosen"], rows))
  if not a["test_complete"]:
    lines += ["The test stage has not finished.", ""]
    return "\n".join(lines)
  arms = a["arms"]
  n = len(plan.test_seeds)
  lines += ["## Test accuracy, paired against clipped STE", "",
            f"{n} seeds per arm, the same seeds for every arm (same initialisation and batches). Statistic per seed: "
            "mean test accuracy of the last 3 epochs. Differences in points; p: paired t-test, Holm-adjusted over "
            f"the {len(plan.arms) - 1} comparisons with clipped STE (the primary endpoint); sign-flip: exact "
            "permutation test.", ""]
  rows = []
  for arm in plan.arms:
    v = arms[arm]
    c = v["vs_control"]
    rows.append([arm, f"x{a['chosen_multiplier'][arm]:g}", f"{_pct(v['mean'])}", _pct(v["std_of_seeds"]),
                 _pct(v["within_run_std"]),
                 "0" if c is None else f"{_signed(c['mean'])} [{_signed(c['ci95'][0])}, {_signed(c['ci95'][1])}]",
                 "" if c is None else f"{c['wins']}/{c['n']}", "" if c is None else _p(c["p"]),
                 "" if c is None else _p(c["p_holm"]), "" if c is None else _p(c["p_sign_flip"])])
  lines.append(reporting.markdown_table(
      ["arm", "lr", "accuracy %", "std of seeds", "within-run std", "minus clipped STE (95% CI)", "wins",
       "p", "p (Holm)", "p (sign-flip)"], rows))
  lines += ["## Spread across seeds (the paper's stability claim)", "",
            "The paper reads RF-DNN's smaller standard deviation over seeds as evidence that the metric perturbation "
            "is damped. Ratio: each arm's standard deviation of the seed statistics over clipped STE's; p: "
            "Pitman-Morgan test of equal variances for paired samples.", ""]
  rows = [[arm, _pct(arms[arm]["std_of_seeds"]), f"{v['ratio']:.2f}", _p(v["p"])]
          for arm in plan.arms if (v := arms[arm]["spread_vs_control"])]
  lines.append(reporting.markdown_table(["arm", "std of seeds (points)", "ratio to clipped STE", "p"], rows))
  lines += ["## Readings against the null control", "",
            f"The null (`{NULL_ARM}`) is clipped STE plus, in every layer and step, a random direction whose norm is "
            "that of `rfdnn_hessian`'s correction. A reading beats it when its paired mean difference is positive "
            f"with p < {BEATS_NULL_P} (unadjusted: this only decides which readings get follow-up runs).", ""]
  rows = [[arm, f"{_signed(v['mean'])} [{_signed(v['ci95'][0])}, {_signed(v['ci95'][1])}]", f"{v['wins']}/{v['n']}",
           _p(v["p"]), "yes" if v["beats_null"] else "no"] for arm, v in a["vs_null"].items()]
  lines.append(reporting.markdown_table(["reading", "minus null (95% CI)", "wins", "p", "beats the null"], rows))
  lines += ["## What each arm did to the weights", "",
            "Means over the test runs: the share of quantized weights whose sign flips per step, the latent weights' "
            "RMS and share beyond the clip |w| > 1 at the end (mean over layers); for RF-DNN arms, per-layer means over "
            "training of the correction |u - d|/|d|, s, the regulariser |alpha grad N|/|d| and the gate's open share. "
            "Seconds: wall time per run, on a machine that other jobs shared at times: not a measure of cost "
            "(`benchmarks/` measures that).",
            ""]
  rows = []
  for arm in plan.arms:
    v = arms[arm]
    lat = v["latent"]
    dg = v["diagnostics"]
    fmt = lambda key: ", ".join(f"{dg[layer][key]:.3g}" for layer in dg) if dg else "-"  # noqa: E731
    rows.append([arm, f"{100 * v['flip_rate']:.4f}", f"{np.mean([x['rms'] for x in lat.values()]):.4f}",
                 f"{np.mean([x['share_beyond_clip'] for x in lat.values()]):.4f}", fmt("correction_mean"),
                 fmt("s_mean"), fmt("regularizer_mean"), fmt("gate_open_fraction"), f"{v['seconds']:.0f}"])
  layers = list(next((v["diagnostics"] for v in arms.values() if v["diagnostics"]), {}))
  lines.append(reporting.markdown_table(
      ["arm", "flips % / step", "latent RMS", "share |w| > 1", f"correction ({', '.join(layers)})", "s",
       "regulariser", "gate open", "seconds / run"], rows))
  if a.get("edge"):
    e = a["edge"]
    better = [k for k, v in e.items() if v["edge_better"]]
    lines += ["## Exploratory: was the learning-rate grid wide enough?", "",
              f"Not in the protocol: added after every arm chose the largest rate of the grid. Each arm once more on "
              f"the validation split at x{EDGE_MULTIPLIER:g} ({BASE_LR * EDGE_MULTIPLIER:g}); no choice and no test "
              "run changes.", ""]
    rows = [[arm, f"x{v['chosen']:g}", _pct(v["chosen_mean"]), _pct(v["edge_mean"]),
             _signed(v["edge_mean"] - v["chosen_mean"])] for arm, v in e.items()]
    lines.append(reporting.markdown_table(
        ["arm", "chosen", "validation % at the chosen rate", f"at x{EDGE_MULTIPLIER:g}", "difference"], rows))
    lines += [(f"Better at x{EDGE_MULTIPLIER:g}: {', '.join(better)}: their tuned rate may be below their best, "
               "so the test comparison is between rates that may all sit below the optimum."
               if better else f"No arm is better at x{EDGE_MULTIPLIER:g}: the grid's edge did not bind."), ""]
  lines += ["## Follow-ups: the Ricci-flow regulariser as a ratio, and the gate", ""]
  if a["followups"]:
    rows = [[k, _pct(v["mean"]), _pct(v["std_of_seeds"]),
             f"{_signed(v['vs_reading']['mean'])} [{_signed(v['vs_reading']['ci95'][0])}, "
             f"{_signed(v['vs_reading']['ci95'][1])}]", _p(v["vs_reading"]["p"]),
             f"{_signed(v['vs_control']['mean'])}", _p(v["vs_control"]["p"])] for k, v in a["followups"].items()]
    lines.append(reporting.markdown_table(
        ["run", "accuracy %", "std of seeds", "minus its reading (95% CI)", "p", "minus clipped STE", "p"], rows))
  elif any(v["beats_null"] for v in a["vs_null"].values()):
    lines += [f"Not finished: {', '.join(k for k, v in a['vs_null'].items() if v['beats_null'])} beat the null, so by "
              "the protocol its regulariser-ratio and gate variants are trained (`--stage followup`); they are not "
              "all in the data yet.", ""]
  else:
    lines += ["None ran: no reading beat the null control on the test seeds, so by the protocol the "
              "regulariser-ratio and gate variants were not trained.", ""]
  return "\n".join(lines)


def plot(records: list[dict], plan: Plan, out: pathlib.Path):
  from ricci_jax import reporting  # noqa: PLC0415

  a = analyse(records, plan)
  if not a["test_complete"]:
    return
  plt = reporting.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
  for i, arm in enumerate(plan.arms):
    v = a["arms"][arm]
    ax1.scatter(np.full(len(v["per_seed"]), i) + np.linspace(-0.15, 0.15, len(v["per_seed"])),
                100 * np.asarray(v["per_seed"]), s=12)
    ax1.errorbar(i + 0.3, 100 * v["mean"], yerr=100 * v["std_of_seeds"], fmt="ko", capsize=3)
    c = v["vs_control"]
    if c is not None:
      ax2.errorbar(i, 100 * c["mean"], yerr=[[100 * (c["mean"] - c["ci95"][0])], [100 * (c["ci95"][1] - c["mean"])]],
                   fmt="o", capsize=4)
  for ax in (ax1, ax2):
    ax.set_xticks(range(len(plan.arms)), plan.arms, rotation=30, ha="right", fontsize=8)
    ax.grid(alpha=0.3)
  ax1.set_ylabel("test accuracy (%), per seed")
  ax2.axhline(0, color="k", lw=0.8)
  ax2.set_ylabel("minus clipped STE (points), 95% CI")
  fig.suptitle("Binarized LeNet-5, Fashion-MNIST: RF-DNN readings")
  fig.tight_layout()
  fig.savefig(out / "test_accuracy.png", dpi=110)
  plt.close(fig)
  curves = {arm: [[100 * x for x in r["accuracy_per_epoch"]] for r in records
                  if r["stage"] == "test" and r["arm"] == arm] for arm in plan.arms}
  reporting.plot_comparison(curves, out / "test_curves.png", title="test accuracy per epoch (mean, min-max band)")


def report(records: list[dict], plan: Plan, out: pathlib.Path, determinism: dict | None, command: str) -> str:
  out.mkdir(parents=True, exist_ok=True)
  text = render(records, plan, determinism, command)
  (out / "README.md").write_text(text + "\n")
  (out / "analysis.json").write_text(json.dumps(_jsonable(analyse(records, plan)), indent=1))
  plot(records, plan, out)
  return text


def _jsonable(x):
  from ricci_jax import reporting  # noqa: PLC0415
  return reporting.to_jsonable(x)


# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def _refuse_dirty_tree(quick: bool, allow_dirty: bool):
  from ricci_jax import reporting  # noqa: PLC0415

  source = reporting.source_version()
  if source["dirty"] and not (quick or allow_dirty):
    raise SystemExit("error: the working tree has uncommitted changes; a study's runs must come from a commit "
                     "(commit first, or pass --allow-dirty for a throwaway run)")


def main(argv=None) -> int:
  parser = cli.parser(__doc__)
  parser.add_argument("--stage", default="all", help=f"all or one of {', '.join(STAGES)}")
  parser.add_argument("--quick", action="store_true", help="tiny budgets: checks the pipeline, proves nothing")
  parser.add_argument("--workdir", default="runs/rf_readings")
  parser.add_argument("--out", default="results/rf_readings")
  parser.add_argument("--runs", default=None, help="report from this runs.json instead of collecting the workdir")
  parser.add_argument("--allow-dirty", action="store_true", help="train from a tree with uncommitted changes")
  args = parser.parse_args(argv)
  stages = STAGES if args.stage == "all" else (args.stage,)
  if any(s not in STAGES for s in stages):
    print(f"error: unknown stage {args.stage!r}; valid: all, {', '.join(STAGES)}", file=sys.stderr)
    return 2
  plan = Plan(args.quick)
  workdir, out = pathlib.Path(args.workdir), pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  runners = {"determinism": stage_determinism, "tune": stage_tune, "test": stage_test, "followup": stage_followup,
             "edge": stage_edge}
  if any(s in runners for s in stages):
    _refuse_dirty_tree(args.quick, args.allow_dirty)
  try:
    for stage in stages:
      if stage in runners:
        runners[stage](plan, workdir)  # writes only under workdir: an output in the tree would make it dirty
      elif stage == "collect":
        records = collect_records(workdir)
        (out / "runs.json").write_text(json.dumps(_jsonable(records), separators=(",", ":")))
        det = workdir / "determinism" / "determinism.json"
        if det.is_file():
          (out / "determinism.json").write_text(det.read_text())
      else:
        runs = pathlib.Path(args.runs) if args.runs else out / "runs.json"
        records = json.loads(runs.read_text())
        det = out / "determinism.json"
        command = "python -m experiments.rf_readings" + (" --quick" if args.quick else "")
        print(report(records, plan, out, json.loads(det.read_text()) if det.is_file() else None, command))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from ricci_jax import runtime
  runtime.configure_cpu()  # process-wide CPU settings, before JAX starts: a program's choice, never the library's
  sys.exit(cli.run(main))
