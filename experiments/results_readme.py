"""Writes ``results/README.md``: every table and narrative number from the committed raw data in ``results/``.

    python -m experiments.results_readme [--results results] [--check]

Each section reads its folder's JSON (``rf_readings/analysis.json`` and ``runs.json``, ``study_*/results.json``,
``study_*/diagnostics.json``, ``study_metric/*_metric.json``, ``coarse_gradient/metrics.json``); a folder whose
data is missing says so instead of a number. ``--check`` exits 1 when the committed README differs from what
the data gives (the tests run it), so a hand edit or stale number cannot stay.
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any

import numpy as np

from ricci_jax import reporting, statistics

from experiments import cli

FOLDERS = (
    ("rf_readings/", "`python -m experiments.rf_readings`",
     "RF-DNN's readings against clipped STE, DoReFa and a null control: tuned learning rates, 10 paired seeds "
     "(protocol committed before the runs)"),
    ("study_fashion/", "`python -m experiments.study --parts fashion`", "8 methods x 5 seeds, binarized LeNet-5 on "
     "Fashion-MNIST, one untuned learning rate"),
    ("study_bits/", "`python -m experiments.study --parts bits`",
     "weight bits 1/2/4/8, RF-DNN and clipped STE, 3 seeds (Fig. 6(b) analogue)"),
    ("study_cifar/", "`python -m experiments.study --parts cifar`",
     "binarized ResNet-20 on the real CIFAR-10 subset, 3 methods x 3 seeds (Table 1 analogue)"),
    ("study_metric/", "`python -m experiments.study --parts metric`",
     "the metric perturbation over training and its exponential fit"),
    ("study_alpha/", "`python -m experiments.study --parts alpha`",
     "RF-DNN's regulariser weight alpha (with its own alpha = 1 control) and tau_scale"),
    ("pruning/", "`python -m experiments.pruning_study`",
     "iterative magnitude pruning with and without AP (and AP's null control), float and binarized LeNet-5, "
     "RF-DNN, ResNet-20 on the CIFAR subset, 3 seeds; dead-neuron rates (protocol committed before the runs)"),
    ("coarse_gradient/", "`python -m experiments.coarse_gradient.run`",
     "the two-linear-layer coarse-gradient experiment (Yin et al. 2019) and our extensions"),
    ("main_job/<n>_<commit>_<what>/", "`python -m experiments.compare` at that commit",
     "the README's main job at the commits before and after a change that must not move it"),
)


def _load(path: pathlib.Path) -> Any:
  return json.loads(path.read_text()) if path.is_file() else None


def _pct(x: float, d: int = 2) -> str:
  return f"{100 * x:.{d}f}"


def _pts(x: float, d: int = 2) -> str:
  return f"{100 * x:+.{d}f}"


def _runs(study: dict) -> list[dict]:
  return [run for r in study.values() for run in r["runs"]]


def _where(results: pathlib.Path) -> str:
  lines = ["## Where they ran, and from which code", ""]
  rows = []
  for folder in ("rf_readings", "study_fashion", "study_bits", "study_cifar", "study_metric", "study_alpha",
                 "pruning"):
    if folder == "rf_readings":
      runs = _load(results / folder / "runs.json") or []
    elif folder == "pruning":  # a record per cycle: every cycle is a run of its own
      runs = [{"source": {"commit": c["commit"], "dirty": c["dirty"]}, "device": c["device"], "seconds": 0}
              for r in (_load(results / folder / "runs.json") or []) for c in r["sources"]]
    else:
      study = _load(results / folder / "results.json")
      runs = _runs(study) if study else []
    if not runs:
      rows.append([folder, "no data", "", ""])
      continue
    p = reporting.provenance(runs)
    devices = p["devices"]
    commits = [c for c in p["commits"] if c != "unrecorded"]
    timed = sum(r.get("seconds") is not None for r in runs)
    if commits:
      code = ", ".join(c[:10] for c in commits)
      if p["dirty"]:
        changes = p["changes"]
        code += (f" ({p['dirty']} of {len(runs)} runs from a dirty tree"
                 + (f": {', '.join(f'`{c.strip()}`' for c in changes)}" if changes else ", paths not recorded")
                 + (f"; see `{folder}/PROTOCOL.md`, deviations" if (results / folder / "PROTOCOL.md").is_file()
                    else "") + ")")
      else:
        code += " (clean)"
    elif timed == 0 and all(r.get("device") for r in runs):
      code = ("not recorded; an uncommitted version: the records have `device` but no `seconds`, and every "
              "committed version writes both (commit 2bdf189 added them together)")
    else:
      code = "not recorded (before runs recorded their commit)"
    rows.append([folder, f"{len(runs)}", "; ".join(devices), code])
  lines.append(reporting.markdown_table(["folder", "runs", "device", "code"], rows))
  check = _load(results / "rf_readings" / "rerun_check.json")
  if check:
    same = [r for r in check["runs"] if r["accuracies_identical"] and r["params_identical"]]
    names = ", ".join(f"`{'/'.join(pathlib.Path(r['run']).parts[-4:])}`" for r in check["runs"])
    lines += ["", f"Dirty-flagged runs re-trained from a clean checkout of their commit "
              f"(`python -m experiments.rerun_check`, `rf_readings/rerun_check.json`): {len(same)} of "
              f"{len(check['runs'])} bit-identical in accuracy per epoch and final parameters ({names})."
              + (" Since CPU runs here are deterministic, what made those trees dirty did not change what was "
                 "trained." if len(same) == len(check["runs"]) else " NOT ALL IDENTICAL: the dirty runs are suspect.")]
  return "\n".join(lines)


def _verdict(diff: dict, p_key: str = "p_holm", alpha: float = 0.05) -> str:
  ci = f"{_pts(diff['mean'])} points, 95% CI [{_pts(diff['ci95'][0])}, {_pts(diff['ci95'][1])}]"
  p = diff.get(p_key, diff["p"])
  if p == p and p < alpha:
    return ("**beats** clipped STE" if diff["mean"] > 0 else "is **worse than** clipped STE") + f" ({ci}, p = {p:.2g})"
  return f"does not differ measurably from clipped STE ({ci}, p = {p:.2g})"


def _readings(results: pathlib.Path) -> str:
  lines = ["## Does RF-DNN beat STE, and under which reading?", ""]
  a = _load(results / "rf_readings" / "analysis.json")
  det = _load(results / "rf_readings" / "determinism.json")
  if not a or not a.get("test_complete"):
    return "\n".join(lines + ["The readings study (`rf_readings/`) has not finished; see its `PROTOCOL.md`.", ""])
  arms = a["arms"]
  n = len(arms["clipped_ste"]["per_seed"])
  same = det and all(v["params_identical"] for v in det.values())
  lines += [
      "From `rf_readings/` (protocol in `rf_readings/PROTOCOL.md`, full tables in `rf_readings/README.md`): "
      f"binarized LeNet-5 on full Fashion-MNIST, 6 epochs, each arm's learning rate chosen on 5,000 held-out "
      f"training images, then {n} seeds per arm on the test set. "
      + ("Two identical CPU runs gave bit-identical parameters, so seeds pair: every difference below is "
         "paired by seed. " if same else "Identical runs were NOT bit-identical: the paired analysis is suspect. ")
      + "Primary endpoint: the difference to clipped STE, Holm-adjusted over the six comparisons.", ""]
  names = {"random_null": "the null control (a random direction of the Hessian reading's correction size)",
           "dorefa": "DoReFa", "rfdnn": "RF-DNN as first shipped (rank-1, tau auto, alpha = 1, gate open)",
           "rfdnn_tau1": "RF-DNN with the paper's constant tau = 1 (rank-1, weak inverse)",
           "rfdnn_hessian": "RF-DNN with Eq. 14's Hessian metric diag(1 - t^2) (weak inverse, tau = 1/std(w))",
           "rfdnn_hessian_matched": "the Hessian reading rescaled to STE's step norm"}
  rows = []
  for arm, v in arms.items():
    c = v["vs_control"]
    d = v["diagnostics"]
    corr = f"{np.mean([x['correction_mean'] for x in d.values()]):.2g}" if d else "0"
    rows.append([arm, f"x{a['chosen_multiplier'][arm]:g}", _pct(v["mean"]), _pct(v["std_of_seeds"]), corr,
                 "0" if c is None else f"{_pts(c['mean'])} [{_pts(c['ci95'][0])}, {_pts(c['ci95'][1])}]",
                 "" if c is None else f"{c['p_holm']:.2g}", "" if c is None else f"{c['wins']}/{c['n']}"])
  lines.append(reporting.markdown_table(
      ["arm", "lr (x 0.05)", "test accuracy %", "std of seeds", "mean correction |u - d|/|d|",
       "minus clipped STE (95% CI)", "p (Holm)", "wins"], rows))
  for arm, v in arms.items():
    if v["vs_control"] is not None:
      lines.append(f"* {names.get(arm, arm)} {_verdict(v['vs_control'])}.")
  lines.append("")
  verdicts = a["vs_null"]
  beat = [k for k, v in verdicts.items() if v["beats_null"]]
  lines += ["**Against the null control:** " + "; ".join(
      f"{k} {_pts(v['mean'])} points ({v['wins']}/{v['n']} seeds, p = {v['p']:.2g})" for k, v in verdicts.items())
      + ". " + (f"Beat the null: {', '.join(beat)}." if beat else
                "No reading beats a random perturbation of the same size, so by the protocol the regulariser-ratio "
                "and gate follow-ups were not run."), ""]
  spread = ", ".join(f"{k} {_pct(v['std_of_seeds'])}" + (
      f" (ratio {v['spread_vs_control']['ratio']:.2f}, p = {v['spread_vs_control']['p']:.2g})"
      if v.get("spread_vs_control") else "") for k, v in arms.items())
  lines += [f"**Stability** (the paper reads a smaller spread as evidence of a damped perturbation): the standard "
            f"deviation of the {n} seed statistics, in points, with its ratio to clipped STE's and the "
            f"Pitman-Morgan test of equal paired variances: {spread}.", ""]
  if a["followups"]:
    rows = [[k, _pct(v["mean"]), f"{_pts(v['vs_reading']['mean'])} (p = {v['vs_reading']['p']:.2g})",
             f"{_pts(v['vs_control']['mean'])} (p = {v['vs_control']['p']:.2g})"] for k, v in a["followups"].items()]
    lines += ["Follow-ups (6 seeds, paired):", "",
              reporting.markdown_table(["run", "accuracy %", "minus its reading", "minus clipped STE"], rows)]
  return "\n".join(lines)


def _gpu_studies(results: pathlib.Path) -> str:
  lines = ["## The earlier GPU studies", ""]
  fashion, bits, cifar = (_load(results / f / "results.json") for f in ("study_fashion", "study_bits", "study_cifar"))
  if not (fashion and bits and cifar):
    return "\n".join(lines + ["Missing data.", ""])
  dup = {}
  for method in ("clipped_ste", "rfdnn"):
    a = [r["last_epochs"]["mean"] for r in fashion[method]["runs"]]
    b = [r["last_epochs"]["mean"] for r in bits[f"{method}_w1"]["runs"]]
    k = min(len(a), len(b))
    dup[method] = np.abs(np.asarray(a[:k]) - np.asarray(b[:k]))
  floor = max(float(v.max()) for v in dup.values())
  lines += [
      "`study_fashion`, `study_bits` and `study_cifar` ran on a GPU with one learning rate for every method. "
      f"The same configuration and seed appear in `study_fashion` and `study_bits` (clipped STE and RF-DNN at 1 "
      f"bit, seeds 0-{len(dup['rfdnn']) - 1}): those identical runs differ by up to {_pct(floor)} points per seed "
      f"(clipped STE: {', '.join(_pct(x) for x in dup['clipped_ste'])}; RF-DNN: "
      f"{', '.join(_pct(x) for x in dup['rfdnn'])}). GPU runs are not deterministic here, so seeds do not pair "
      "and differences are reported unpaired, against that noise floor.", ""]
  ref = fashion["clipped_ste"]["across_seeds"]
  rows = []
  for method, r in fashion.items():
    s = r["across_seeds"]
    se = np.sqrt(np.var(s["per_seed"], ddof=1) / len(s["per_seed"]) + np.var(ref["per_seed"], ddof=1)
                 / len(ref["per_seed"]))
    rows.append([method, f"{_pct(s['mean'])} ± {_pct(s['std'])}", _pct(s["std_of_seed_means"]),
                 "0" if method == "clipped_ste" else f"{_pts(s['mean'] - ref['mean'])} ± {_pct(se)}"])
  lines += ["**Fashion-MNIST** (binarized LeNet-5, 6 epochs, cosine from 0.05, 5 seeds; the paper's statistic, "
            "pooled):", "", reporting.markdown_table(
                ["method", "accuracy %", "std of seed means", "minus clipped STE (unpaired, ± s.e.)"], rows)]
  lines += ["DoReFa's lead at this untuned rate is what the readings study re-examines with a tuned rate per method.",
            ""]
  rows = []
  for b in (1, 2, 4, 8):
    c, r = bits[f"clipped_ste_w{b}"]["across_seeds"], bits[f"rfdnn_w{b}"]["across_seeds"]
    rows.append([b, _pct(c["mean"]), _pct(r["mean"]), _pts(r["mean"] - c["mean"]),
                 f"{_pct(c['std_of_seed_means'])} / {_pct(r['std_of_seed_means'])}"])
  lines += ["**Bit widths** (Fig. 6(b) analogue, 3 seeds):", "", reporting.markdown_table(
      ["weight bits", "clipped STE %", "RF-DNN %", "difference", "std of seed means (STE / RF-DNN)"], rows)]
  steps = {r["steps"] for r in _runs(cifar)}
  rows = [[m, _pct(r["across_seeds"]["mean"]), ", ".join(_pct(x) for x in r["across_seeds"]["per_seed"])]
          for m, r in cifar.items()]
  rf, ste = (np.asarray(cifar[m]["across_seeds"]["per_seed"]) for m in ("rfdnn", "clipped_ste"))
  unpaired = statistics.paired_difference(rf, ste)  # the per-seed differences, shown; not a valid pairing here
  per_seed = np.asarray([r["across_seeds"]["per_seed"] for r in cifar.values()])
  worst = {int(np.argmin(row)) for row in per_seed}
  failing = (f"seed {worst.pop()} is the lowest for every method ({_pct(per_seed.min())}-"
             f"{_pct(per_seed[:, int(np.argmin(per_seed[0]))].max())}%)" if len(worst) == 1 else
             "the seeds' spread is as large as the methods'")
  lines += [f"**CIFAR-10 subset** (binarized ResNet-20, all layers, {', '.join(str(s) for s in sorted(steps))} "
            "steps = 30 epochs of 36 steps, multistep from 0.1, 3 seeds):", "",
            reporting.markdown_table(["method", "accuracy % (last 5 epochs)", "per-seed means"], rows),
            f"RF-DNN's seed means are above clipped STE's on {unpaired['wins']} of {unpaired['n']} seeds (by "
            f"{', '.join(_pts(x) for x in unpaired['differences'])} points). With GPU runs that differ by up to "
            f"{_pct(floor)} points when repeated, and {failing}, three seeds cannot "
            "separate this from noise; the earlier paired t-test treated non-deterministic runs as pairs and is "
            "withdrawn.", ""]
  return "\n".join(lines)


def _alpha(results: pathlib.Path) -> str:
  lines = ["## The regulariser's weight and tau_scale (`study_alpha/`)", ""]
  study, diag = _load(results / "study_alpha" / "results.json"), _load(results / "study_alpha" / "diagnostics.json")
  if not study or not diag or "alpha_1" not in study:
    return "\n".join(lines + ["Not regenerated with its alpha = 1 control yet.", ""])
  rows = []
  for label, r in study.items():
    per_layer = [v for k, layers in diag.items() if k.split("/")[0] == label for v in layers.values()]
    rng = lambda key: f"{min(x[key] for x in per_layer):.2g}-{max(x[key] for x in per_layer):.2g}"  # noqa: E731
    rows.append([label, f"{_pct(r['across_seeds']['mean'])} ± {_pct(r['across_seeds']['std'])}",
                 _pts(r["across_seeds"]["mean"] - study["alpha_1"]["across_seeds"]["mean"]), rng("s_mean"),
                 rng("correction_mean"), rng("regularizer_mean"), rng("gate_mean")])
  seeds = study["alpha_1"]["across_seeds"]["seeds"]
  lines += [f"Binarized LeNet-5, the Fashion-MNIST budget above, {seeds} seeds, on the CPU; alpha = 1 is this "
            "part's own control (same machine and commit). Ranges over layers and seeds of the per-run means.", "",
            reporting.markdown_table(["variant", "accuracy %", "minus alpha = 1", "mean s", "mean correction",
                                      "mean |alpha grad N|/|d|", "gate open"], rows),
            "The gate is open on every step in every variant because epsilon is infinite: a setting, not a finding.",
            ""]
  return "\n".join(lines)


def _metric(results: pathlib.Path) -> str:
  lines = ["## Does the metric perturbation decay exponentially? (`study_metric/`)", ""]
  labels = ("rfdnn_cosine", "clipped_ste_cosine", "rfdnn_constant", "clipped_ste_constant")
  series = {k: _load(results / "study_metric" / f"{k}_metric.json") for k in labels}
  if not all(series.values()):
    return "\n".join(lines + ["The per-checkpoint series are not committed yet (re-run the part).", ""])
  rows = []
  for label, s in series.items():
    steps = np.asarray(s["steps"])
    for layer, v in s["layers"].items():
      speed = np.asarray([float(x) for x in v["step"]])
      at = lambda step, speed=speed: f"{speed[int(np.argmin(np.abs(steps - step)))]:.2g}"  # noqa: E731
      f = v["fit_to_final"]
      rows.append([label, layer, f"{float(v['to_initial'][-1]):.3g}", at(50), at(500), at(1500), at(int(steps[-1])),
                   f"{float(f['rate']):.2e}", f"{float(f['r2']):.2f}"])
  last = int(series["rfdnn_cosine"]["steps"][-1])
  lines += ["Binarized LeNet-5, one seed, a checkpoint every 50 steps, the rank-1 metric g = I - t t^T of each "
            "quantized layer (tau auto), RF-DNN as first shipped and clipped STE, each with the cosine schedule and "
            "a constant rate. |g(T) - g(0)|: the metric's total change; speed: |g(t) - g(t')| / (t - t') between "
            f"checkpoints near the given step; the fit: C exp(-rate t) to |g(t) - g(T)|.", "",
            reporting.markdown_table(["run", "layer", "|g(T) - g(0)|", "speed @50", "@500", "@1500", f"@{last}",
                                      "fitted rate / step", "R^2"], rows),
            "The per-checkpoint series are in `study_metric/*_metric.json`, the plots beside them.", ""]
  return "\n".join(lines)


def _coarse(results: pathlib.Path) -> str:
  lines = ["## Coarse gradients (`coarse_gradient/`)", ""]
  m = _load(results / "coarse_gradient" / "metrics.json")
  if not m:
    return "\n".join(lines + ["Missing data.", ""])
  e = m["e"]
  lr = e["setup"]["lr"]
  parts = []
  for key in ("1bit|clipped_relu", "2bit|clipped_relu"):
    r = e["runs"][key]
    parts.append(f"{r['bits']}-bit: reaches 100% training accuracy at some step on {r['seeds_reaching_100pct']}/"
                 f"{r['seeds']} seeds and ends there on {r['seeds_at_100pct_at_end']}/{r['seeds']}")
  others = {k: e["runs"][k]["seeds_at_100pct_at_end"] for k in e["runs"] if "clipped" not in k}
  lines += ["See `coarse_gradient/README.md`: Yin et al.'s claims (a)-(c) are reproduced with closed-form "
            "population gradients; the multi-level (d) and multi-class (e) versions are our own designs. In (e), at "
            f"the main learning rate {lr}, the clipped-ReLU STE {'; '.join(parts)}; the identity and ReLU STEs end at "
            f"100% on {', '.join(f'{k} {v}/5' for k, v in others.items())} seeds. That is the best of the three, "
            "not perfect classification on every seed; the step-size check in `coarse_gradient/README.md` shows the "
            "counts move with the learning rate.", ""]
  return "\n".join(lines)


def _main_job(results: pathlib.Path) -> str:
  """The main job's per-seed statistics at each commit in ``main_job/<n>_<commit>_<what>/``, in the order n."""
  folders = sorted((results / "main_job").glob("*/results.json"), key=lambda p: int(p.parent.name.split("_")[0]))
  if not folders:
    return ""
  lines = ["## The main job across the restructuring (`main_job/`)", "",
           "`python -m experiments.compare` (binarized LeNet-5 on Fashion-MNIST, clipped STE and RF-DNN, seeds 0 and "
           "1, 8 epochs) at each commit; per-seed statistic (mean test accuracy of the last 3 epochs, %).", ""]
  rows = []
  for path in folders:
    study = _load(path)
    commits = sorted({(r.get("source") or {}).get("commit", "")[:10] for r in _runs(study)})
    dirty = any((r.get("source") or {}).get("dirty") for r in _runs(study))
    rows.append([path.parent.name, ", ".join(commits) + (" (dirty)" if dirty else "")] +
                [", ".join(_pct(x) for x in study[m]["across_seeds"]["per_seed"]) for m in sorted(study)])
  methods = sorted(_load(folders[0]))
  lines.append(reporting.markdown_table(["run", "code"] + methods, rows))
  return "\n".join(lines) + "\n"


def _pruning(results: pathlib.Path) -> str:
  """The pruning study's endpoints (``pruning/analysis.json``), one line per part and comparison."""
  a = _load(results / "pruning" / "analysis.json")
  lines = ["## Does AP help iterative magnitude pruning here? (`pruning/`)", ""]
  if not a:
    return "\n".join(lines + ["The pruning study has not reported yet; see `pruning/PROTOCOL.md`.", ""])
  lines += ["From `pruning/` (protocol `pruning/PROTOCOL.md`, tables and plots `pruning/README.md`): each cycle "
            "removes 20% of the alive inner-layer weights and rewinds to the initialisation; `ap` takes the last 2% "
            "by AP, `ap_random` at random among the negative weights (AP's null control). Test accuracy, mean over "
            "the pruned cycles, paired by seed (CPU runs are deterministic).", ""]
  rows = []
  for part, res in a.items():
    cycles = res["arms"]["imp"]["cycles"] if "imp" in res["arms"] else []
    last = f"{100 * cycles[-1]['remaining']:.1f}" if cycles else ""
    for key in ("ap_minus_imp", "ap_random_minus_imp", "ap_minus_ap_random"):
      d = res.get(key)
      if not d:
        continue
      m = d["mean_over_pruned_cycles"]
      rows.append([f"{res['title']}", key.replace("_minus_", " − "), f"{len(d['seeds'])}", last,
                   f"{_pts(m['mean'])} ({', '.join(_pts(x) for x in m['differences'])})",
                   f"{m['wins']}/{m['n']}", f"{m['p_sign_flip']:.2g}"])
    for arm, v in res["arms"].items():
      t = v["dnr_trend"]["dnr_train"]
      rows.append([f"{res['title']}", f"DNR trend, {arm}", f"{t['runs']}", last,
                   f"dynamic DNR falls with pruning in {t['falls_with_pruning']}/{t['runs']} runs", "", ""])
  lines.append(reporting.markdown_table(
      ["part", "comparison", "seeds", "remaining % at the end", "difference, points (per seed)", "ahead",
       "sign-flip p"], rows))
  return "\n".join(lines) + "\n"


def render(results: pathlib.Path) -> str:
  head = ["# Results", "",
          "Generated by `python -m experiments.results_readme` from the raw data committed in each folder; do not "
          "edit by hand. Each folder is produced by one command; runs resume where they stopped and a finished "
          "seed is not trained again.", "",
          reporting.markdown_table(["folder", "command", "what"], FOLDERS),
          "The paper's own tables are presets (`python -m experiments.reproduce --table 1..4`, `--table 6b` for "
          "Fig. 6(b)); they need full CIFAR/ImageNet and an accelerator, and were not run here.", ""]
  sections = [_where(results), _readings(results), _gpu_studies(results), _alpha(results), _metric(results),
              _pruning(results), _coarse(results), _main_job(results)]
  return "\n".join(head) + "\n" + "\n".join(sections)


def main(argv=None) -> int:
  parser = cli.parser(__doc__)
  parser.add_argument("--results", default="results")
  parser.add_argument("--check", action="store_true", help="fail if the committed README differs from the data")
  args = parser.parse_args(argv)
  results = pathlib.Path(args.results)
  text = render(results)
  path = results / "README.md"
  if args.check:
    if not path.is_file() or path.read_text() != text:
      print(f"{path} is not what the committed data gives: run python -m experiments.results_readme", file=sys.stderr)
      return 1
    return 0
  path.write_text(text)
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
