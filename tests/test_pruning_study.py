"""The pruning study end to end in its quick mode: runs, report, statistics, plots."""

import json
import pathlib

import pytest

from experiments import pruning_study

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_the_quick_study_runs_and_reports(tmp_path):
  args = ["--quick", "--workdir", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--parts",
          "lenet_binary", "--seeds", "0,1"]
  assert pruning_study.main(args) == 0
  runs = json.loads((tmp_path / "out" / "runs.json").read_text())
  assert sorted((r["arm"], r["seed"]) for r in runs) == [("ap", 0), ("ap", 1), ("imp", 0), ("imp", 1)]
  assert all(len(r["cycles"]) == 3 and len(r["sources"]) == 3 for r in runs)
  analysis = json.loads((tmp_path / "out" / "analysis.json").read_text())["lenet_binary"]
  imp = {r["seed"]: r["cycles"] for r in runs if r["arm"] == "imp"}
  ap = {r["seed"]: r["cycles"] for r in runs if r["arm"] == "ap"}
  # the primary endpoint, recomputed by hand from the raw rows
  want = [sum(ap[s][k]["final_test_accuracy"] - imp[s][k]["final_test_accuracy"] for k in (1, 2)) / 2 for s in (0, 1)]
  got = analysis["ap_minus_imp"]["mean_over_pruned_cycles"]["differences"]
  assert got == pytest.approx(want)
  assert imp[0][0]["final_test_accuracy"] == ap[0][0]["final_test_accuracy"]  # cycle 0: the same dense run
  assert [r["ap_removed"] > 0 for r in ap[0]] == [False, True, True]
  assert (tmp_path / "out" / "lenet_binary.png").stat().st_size > 10_000
  text = (tmp_path / "out" / "README.md").read_text()
  assert "ap − imp" in text and "DNR against sparsity" in text
  # the summary row: the hand-computed endpoint and the final accuracies from the raw rows
  row = next(line for line in text.splitlines() if line.startswith("| `lenet_binary` |"))
  cells = [c.strip() for c in row.strip("|").split("|")]
  assert cells[1] == "2"
  imp_end = 100 * (imp[0][-1]["final_test_accuracy"] + imp[1][-1]["final_test_accuracy"]) / 2
  assert float(cells[4]) == pytest.approx(imp_end, abs=0.006)  # printed with 2 decimals
  assert float(cells[6].split()[0]) == pytest.approx(100 * sum(want) / 2, abs=0.006)


def test_bad_arguments_are_refused():
  with pytest.raises(SystemExit):
    pruning_study.main(["--parts", "nope"])
  with pytest.raises(SystemExit):
    pruning_study.main(["--shard", "2/2"])
