"""The benchmark table in benchmarks/README.md is the one benchmarks.report builds from the saved JSON."""

import json
import shutil

import pytest

from benchmarks import report


def test_readme_table_is_generated_from_the_saved_results():
  text = report.README.read_text()
  table = text.split(report.BEGIN, 1)[1].split(report.END, 1)[0]
  assert table.strip() == report.table().strip(), "run `python -m benchmarks.report` and commit the README"


def test_every_saved_result_has_rows_and_every_row_names_its_file():
  rows = report.table().splitlines()[2:]
  files = {name for name, _ in report.SECTIONS if (report.RESULTS / name).is_file()}
  assert files, "no benchmark results are committed"
  for name in files:
    assert any(row.rstrip(" |").endswith(name) for row in rows), name
  assert all(row.count("|") == 6 for row in rows if row.startswith("|")), "a cell holds a '|'"


def test_missing_results_are_listed_and_missing_markers_fail(tmp_path, monkeypatch):
  results = tmp_path / "results"
  results.mkdir()
  shutil.copy(report.RESULTS / "ricci_transform.json", results)
  monkeypatch.setattr(report, "RESULTS", results)
  text = report.table()
  assert "RF-DNN step / our STE step" in text and "Not run yet: train_step_vs_pytorch.json" in text
  readme = tmp_path / "README.md"
  readme.write_text("no markers here\n")
  with pytest.raises(ValueError, match="no benchmark table markers"):
    report.write(readme)
  readme.write_text(f"head\n{report.BEGIN}\nold\n{report.END}\ntail\n")
  report.write(readme)
  out = readme.read_text()
  assert out.startswith("head\n") and out.endswith("tail\n") and "old" not in out
  assert json.loads((results / "ricci_transform.json").read_text())["batch_size"] == 128
