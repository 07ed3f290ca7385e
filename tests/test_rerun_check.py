"""experiments.rerun_check: a finished run re-trained from its config.json by a clean checkout is bit-identical;
a checkout at another commit, or a dirty one, is refused."""

import json
import pathlib
import subprocess
import sys

import pytest

from experiments import rerun_check
from ricci_jax import reporting

REPO = pathlib.Path(__file__).resolve().parents[1]
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


def test_a_checkout_at_another_commit_is_refused(tmp_path):
  run = tmp_path / "run"
  run.mkdir()
  (run / "results.json").write_text(json.dumps({"source": {"commit": "0" * 40, "dirty": False}}))
  with pytest.raises(ValueError, match="must be a clean checkout of the run's commit 0000"):
    rerun_check.check(run, REPO)


@pytest.mark.skipif(not FASHION.is_dir(), reason="no Fashion-MNIST")
@pytest.mark.skipif(bool(reporting.source_version(REPO)["dirty"]), reason="needs a clean checkout (CI's clone is)")
def test_a_clean_run_reruns_bit_for_bit(tmp_path):
  run = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/fashion_mnist.py:rfdnn",
       "--workdir", str(run), "dataset.train_limit=256", "dataset.test_limit=128", "epochs=2", "batch_size=64",
       "progress=False", "plots=False"], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = rerun_check.check(run, REPO)
  assert out["accuracies_identical"] and out["params_identical"], out
  assert len(out["accuracy_per_epoch"]) == 2
