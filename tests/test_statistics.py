"""The statistics behind the results tables, against values computed by hand."""

import math

import numpy as np
import pytest

from ricci_jax import reporting, statistics


def test_last_epochs_statistic_by_hand():
  out = reporting.last_epochs_statistic([0.5, 0.1, 0.2, 0.3, 0.4], 3)
  assert out["epochs"] == 3 and out["values"] == [0.2, 0.3, 0.4]
  assert out["mean"] == pytest.approx(0.3)
  assert out["std"] == pytest.approx(math.sqrt((0.01 + 0 + 0.01) / 3))  # population std, as the paper's tables
  short = reporting.last_epochs_statistic([0.7], 3)
  assert short["epochs"] == 1 and short["mean"] == pytest.approx(0.7) and short["std"] == 0.0
  assert math.isnan(reporting.last_epochs_statistic([], 3)["mean"])


def test_across_seeds_pools_the_last_epochs_and_reports_the_spread_of_seed_means():
  runs = [reporting.last_epochs_statistic(v, 2) for v in ([0.0, 0.8, 0.9], [0.0, 0.6, 0.7])]
  out = reporting.across_seeds(runs)
  assert out["seeds"] == 2 and out["per_seed"] == pytest.approx([0.85, 0.65])
  assert out["mean"] == pytest.approx(0.75)  # pooled (0.8 + 0.9 + 0.6 + 0.7) / 4
  assert out["std"] == pytest.approx(math.sqrt((0.05**2 + 0.15**2 + 0.15**2 + 0.05**2) / 4))
  assert out["std_of_seed_means"] == pytest.approx(0.1)


def test_paired_difference_by_hand():
  a, b = [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 1.0, 3.0]  # differences 1, 1, 2, 1
  out = statistics.paired_difference(a, b)
  assert out["n"] == 4 and out["wins"] == 4 and out["differences"] == [1.0, 1.0, 2.0, 1.0]
  assert out["mean"] == pytest.approx(1.25)
  assert out["std"] == pytest.approx(0.5)  # sqrt((3 * 0.25^2 + 0.75^2) / 3)
  assert out["se"] == pytest.approx(0.25) and out["t"] == pytest.approx(5.0)
  # Student's t with 3 degrees of freedom has a closed-form CDF
  x = 5.0 / math.sqrt(3)
  cdf = 0.5 + (x / (1 + x * x) + math.atan(x)) / math.pi
  assert out["p"] == pytest.approx(2 * (1 - cdf), rel=1e-6)
  assert out["ci95"] == pytest.approx([1.25 - 3.182446305284263 * 0.25, 1.25 + 3.182446305284263 * 0.25])
  # of the 16 sign patterns of (1, 1, 2, 1), only all-plus and all-minus reach |mean| 1.25
  assert out["p_sign_flip"] == pytest.approx(2 / 16)


def test_sign_flip_counts_ties_and_symmetric_cases():
  assert statistics.sign_flip_pvalue([1.0, -1.0]) == pytest.approx(1.0)  # every pattern has |mean| >= 0
  assert statistics.sign_flip_pvalue([3.0, 1.0]) == pytest.approx(0.5)  # (3,1) and (-3,-1) of 4 reach 2
  with pytest.raises(ValueError, match="2\\^n patterns"):
    statistics.sign_flip_pvalue(np.ones(21))


def test_paired_difference_rejects_unpaired_input_and_handles_degenerate_spreads():
  with pytest.raises(ValueError, match="equal-length"):
    statistics.paired_difference([1.0, 2.0], [1.0])
  same = statistics.paired_difference([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
  assert same["mean"] == 0 and math.isnan(same["p"]) and same["p_sign_flip"] == 1.0
  shifted = statistics.paired_difference([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
  assert shifted["p"] == 0.0 and shifted["p_sign_flip"] == pytest.approx(2 / 8)


def test_holm_by_hand():
  # sorted: 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> running max 0.03, 0.06, 0.06
  out = statistics.holm({"a": 0.01, "b": 0.04, "c": 0.03})
  assert out == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
  capped = statistics.holm({"a": 0.5, "b": 0.6, "n": float("nan")})
  assert capped["a"] == pytest.approx(1.0) and capped["b"] == pytest.approx(1.0) and math.isnan(capped["n"])


def test_paired_variance_test_by_hand():
  a, b = [1.0, 3.0, 2.0, 6.0], [1.0, 2.0, 2.0, 3.0]
  # sums (2, 5, 4, 9), differences (0, 1, 0, 3): Pearson r by hand
  s, d = np.array([2.0, 5.0, 4.0, 9.0]), np.array([0.0, 1.0, 0.0, 3.0])
  r = np.sum((s - 5) * (d - 1)) / math.sqrt(np.sum((s - 5) ** 2) * np.sum((d - 1) ** 2))  # 12 / sqrt(26 * 6)
  out = statistics.paired_variance_test(a, b)
  assert out["r"] == pytest.approx(12 / math.sqrt(156)) and out["r"] == pytest.approx(r)
  t = r * math.sqrt(2 / (1 - r * r))
  assert out["t"] == pytest.approx(t)
  assert out["p"] == pytest.approx(2 * (1 - (0.5 + t / (2 * math.sqrt(2 + t * t)))))  # t with 2 d.o.f., closed form
  assert out["ratio"] == pytest.approx(np.std(a, ddof=1) / np.std(b, ddof=1))
  # var(a) - var(b) = cov(a + b, a - b): equal spreads give r = 0
  same = statistics.paired_variance_test([1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 3.0])
  assert same["r"] == pytest.approx(0.0, abs=1e-12) and same["ratio"] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="3 or more"):
    statistics.paired_variance_test([1.0, 2.0], [1.0, 2.0])


def test_source_version_records_the_commit_and_what_differs_from_it(tmp_path):
  import subprocess  # noqa: PLC0415

  def git(*args):
    subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

  git("init", "-q")
  (tmp_path / ".gitignore").write_text("runs/\n")
  (tmp_path / "code.py").write_text("x = 1\n")
  git("add", ".")
  git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "ignored.json").write_text("{}")  # ignored paths do not make a tree dirty
  assert reporting.source_version(tmp_path) == {"commit": head, "dirty": False, "changes": []}
  (tmp_path / "out.json").write_text("{}")
  (tmp_path / "code.py").write_text("x = 2\n")
  got = reporting.source_version(tmp_path)
  assert got["commit"] == head and got["dirty"] is True
  assert sorted(got["changes"]) == [" M code.py", "?? out.json"]
  assert len(reporting.source_version(tmp_path, max_changes=1)["changes"]) == 1
  assert reporting.source_version(tmp_path.parent / "nonexistent-dir") == {"commit": None, "dirty": None,
                                                                            "changes": []}
