"""The readings study: its decisions and tables on synthetic records, and its whole pipeline in quick mode."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import rf_readings

REPO = pathlib.Path(__file__).resolve().parents[1]
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


def _record(stage, arm, seed, statistic, lr_multiplier=1.0, variant=""):
  return {"stage": stage, "arm": arm, "variant": variant, "lr_multiplier": lr_multiplier, "seed": seed,
          "statistic": statistic, "accuracy_per_epoch": [statistic - 0.01, statistic, statistic + 0.01],
          "last_epochs": 3, "flip_rate_per_epoch": [1e-3, 5e-4], "seconds": 10.0,
          "latent": {"dense/kernel": {"rms": 0.1, "share_beyond_clip": 0.0}},
          "diagnostics": {}, "device": "cpu", "source": {"commit": "abc", "dirty": False}}


def _study(plan, effects, noise=0.002, seed=0):
  """Synthetic tune and test records: arm a's statistic is 0.85 + effects[a] + noise per seed."""
  rng = np.random.default_rng(seed)
  records = []
  for arm in plan.arms:
    for m in plan.lr_multipliers:
      for s in plan.tune_seeds:  # the best rate is x2 for every arm, except a tie for random_null
        bonus = 0.0 if arm == "random_null" else 0.01 * (m == 2.0)
        records.append(_record("tune", arm, s, 0.8 + bonus, m))
  seed_luck = rng.normal(0, 0.01, len(plan.test_seeds))
  for arm in plan.arms:
    for i, s in enumerate(plan.test_seeds):
      records.append(_record("test", arm, s, 0.85 + effects.get(arm, 0.0) + seed_luck[i] + rng.normal(0, noise)))
  return records


def test_learning_rate_choice_takes_the_best_mean_and_the_smaller_rate_on_a_tie():
  plan = rf_readings.Plan(quick=False)
  chosen = rf_readings.chosen_multipliers(_study(plan, {}), plan)
  assert chosen["clipped_ste"] == 2.0 and chosen["random_null"] == 0.5
  incomplete = [r for r in _study(plan, {}) if not (r["arm"] == "dorefa" and r["seed"] == 101)]
  with pytest.raises(ValueError, match="tuning of 'dorefa' at lr x0.5 is incomplete"):
    rf_readings.chosen_multipliers(incomplete, plan)


def test_a_reading_beats_the_null_only_with_a_clear_paired_advantage():
  plan = rf_readings.Plan(quick=False)
  records = _study(plan, {"rfdnn_hessian": 0.01, "rfdnn_tau1": 0.0005})
  verdicts = rf_readings.readings_beating_the_null(records, plan)
  assert verdicts["rfdnn_hessian"]["beats_null"] and verdicts["rfdnn_hessian"]["wins"] == 10
  assert not verdicts["rfdnn_tau1"]["beats_null"]
  assert not verdicts["rfdnn"]["beats_null"]


def test_analysis_pairs_by_seed_and_holm_adjusts_the_primary_comparisons():
  plan = rf_readings.Plan(quick=False)
  records = _study(plan, {"dorefa": 0.012, "rfdnn_hessian": -0.004})
  a = rf_readings.analyse(records, plan)
  arms = a["arms"]
  assert arms["clipped_ste"]["vs_control"] is None
  control = np.array([r["statistic"] for r in records if r["stage"] == "test" and r["arm"] == "clipped_ste"])
  dorefa = np.array([r["statistic"] for r in records if r["stage"] == "test" and r["arm"] == "dorefa"])
  np.testing.assert_allclose(arms["dorefa"]["vs_control"]["mean"], np.mean(dorefa - control))
  raw = sorted((v["vs_control"]["p"], k) for k, v in arms.items() if v["vs_control"])
  assert arms[raw[0][1]]["vs_control"]["p_holm"] == pytest.approx(min(1.0, 6 * raw[0][0]))
  assert all(v["vs_control"]["p_holm"] >= v["vs_control"]["p"] for v in arms.values() if v["vs_control"])
  # the seed's own luck (0.01) is much larger than the arms' noise (0.002): pairing removes it
  assert arms["dorefa"]["vs_control"]["std"] < 0.5 * arms["dorefa"]["std_of_seeds"]
  text = rf_readings.render(records, plan, None, "python -m experiments.rf_readings")
  assert f"| dorefa | x2 | {100 * dorefa.mean():.2f} |" in text
  assert "None ran: no reading beat the null control" in text


def test_the_edge_check_compares_the_exploratory_rate_with_the_chosen_one_and_changes_no_choice():
  plan = rf_readings.Plan(quick=False)
  records = _study(plan, {})
  assert rf_readings.edge_check(records, plan) is None  # not run
  for arm in plan.arms:
    for s in plan.tune_seeds:
      records.append(_record("tune", arm, s, 0.83 if arm == "dorefa" else 0.80, rf_readings.EDGE_MULTIPLIER))
  edge = rf_readings.edge_check(records, plan)
  assert edge["dorefa"]["edge_better"] and not edge["clipped_ste"]["edge_better"]
  assert edge["dorefa"]["edge_mean"] == pytest.approx(0.83) and edge["dorefa"]["chosen_mean"] == pytest.approx(0.81)
  assert rf_readings.chosen_multipliers(records, plan)["dorefa"] == 2.0  # the protocol's grid decides
  assert "Better at x4: dorefa" in rf_readings.render(records, plan, None, "cmd")


def test_the_report_says_when_the_test_stage_is_unfinished():
  plan = rf_readings.Plan(quick=False)
  records = [r for r in _study(plan, {}) if r["stage"] == "tune"]
  text = rf_readings.render(records, plan, None, "cmd")
  assert "The test stage has not finished." in text and "| rfdnn_hessian |" in text


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_the_whole_pipeline_in_quick_mode(tmp_path):
  work, out = tmp_path / "runs", tmp_path / "out"
  result = subprocess.run([sys.executable, "-m", "experiments.rf_readings", "--quick", "--workdir", str(work),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  text = (out / "README.md").read_text()
  assert "Quick mode" in text and "parameters bit-identical, optimizer state bit-identical" in text
  records = json.loads((out / "runs.json").read_text())
  stages = [r["stage"] for r in records]
  assert stages.count("tune") == 6 + 3 and stages.count("test") == 6 and stages.count("followup") == 2  # + edge
  assert "## Exploratory: was the learning-rate grid wide enough?" in text
  for r in records:
    assert r["source"]["commit"] and r["device"] and len(r["accuracy_per_epoch"]) == 1
    assert r["flip_rate_per_epoch"][0] > 0
  null = [r for r in records if r["arm"] == "random_null" and r["stage"] == "test"][0]
  reading = [r for r in records if r["arm"] == "rfdnn_hessian" and r["stage"] == "test" and r["seed"] == null["seed"]]
  for layer, d in null["diagnostics"].items():  # the null's perturbation has the reading's correction size
    assert d["correction_mean"] == pytest.approx(reading[0]["diagnostics"][layer]["correction_mean"], rel=0.05)
  assert (out / "test_accuracy.png").stat().st_size > 10_000
  # the report is regenerated from runs.json alone
  again = subprocess.run([sys.executable, "-m", "experiments.rf_readings", "--quick", "--stage", "report",
                          "--workdir", str(tmp_path / "absent"), "--out", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
  assert again.returncode == 0 and (out / "README.md").read_text() == text


def test_the_report_names_dirty_runs_and_what_differed():
  plan = rf_readings.Plan(quick=False)
  records = [r for r in _study(plan, {}) if r["stage"] == "tune"]
  assert "clean trees" in rf_readings.render(records, plan, None, "cmd")
  records[0]["source"] = {"commit": "abc", "dirty": True, "changes": ["?? results/x.json", " M ricci_jax/lne.py"]}
  records[1]["source"] = {"commit": "abc", "dirty": True}  # recorded before the changes were
  text = rf_readings.render(records, plan, None, "cmd")
  assert "clean trees" not in text
  assert f"2 of {len(records)} runs were made from a DIRTY tree" in text
  assert "`?? results/x.json`" in text and "` M ricci_jax/lne.py`" in text
  assert "1 of them predate the record of which paths differed" in text


def test_the_report_says_follow_ups_are_pending_when_a_reading_beat_the_null():
  plan = rf_readings.Plan(quick=False)
  text = rf_readings.render(_study(plan, {"rfdnn_hessian": 0.01}), plan, None, "cmd")
  assert "Not finished: rfdnn_hessian beat the null" in text and "None ran" not in text
  text = rf_readings.render(_study(plan, {}), plan, None, "cmd")
  assert "None ran: no reading beat the null control" in text
