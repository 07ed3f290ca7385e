"""results/README.md is what the committed raw data gives, number for number."""

import pathlib

from experiments import results_readme

RESULTS = pathlib.Path(__file__).resolve().parents[1] / "results"


def test_the_committed_results_readme_is_generated_from_the_committed_data():
  assert results_readme.main(["--results", str(RESULTS), "--check"]) == 0, (
      "results/README.md differs from what results/*.json give: run python -m experiments.results_readme")


def test_statements_the_old_readme_got_wrong_come_out_of_the_data():
  text = results_readme.render(RESULTS)
  assert "1080 steps = 30 epochs of 36 steps" in text  # not 1,110
  assert "ends there on 3/5" in text and "ends there on 4/5" in text  # not "perfect on every seed"
  assert "differ by up to 0.88 points per seed" in text  # identical GPU runs: the noise floor
  assert "`--table 6b`" in text and "--figure 6b" not in text
  assert "the records have `device` but no `seconds`" in text  # the GPU runs' code was never committed
