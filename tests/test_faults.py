"""Fault injection on the training program, end to end on real Fashion-MNIST: a damaged checkpoint, a
kill -9 while a checkpoint is written, SIGINT and SIGTERM. Each resume ends bit-identical to an
uninterrupted run (CPU runs are deterministic) or is refused in one line, with nothing overwritten.

Checkpoint-level fault injection (every kind of file a step holds, flipped and truncated) is in
tests/test_checkpoints.py.
"""

import logging
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import presets
from ricci_jax import reporting, train

REPO = pathlib.Path(__file__).resolve().parents[1]
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
pytestmark = [pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed"), pytest.mark.slow]

# RF-DNN's LeNet-5 (its optimizer state carries the metric history), 3 epochs of 16 steps: long enough
# (a few seconds) for a signal to land mid-run.
RUN = ["--config", "experiments/configs/fashion_mnist.py:rfdnn", "dataset.train_limit=1024", "dataset.test_limit=256",
       "epochs=3", "batch_size=64", "progress=False", "plots=False"]
TOTAL_STEPS = 48


def _config(**overrides):
  config = presets.fashion_mnist("rfdnn")
  train.schema.apply_overrides(config, [*RUN[2:], *(f"{k}={v}" for k, v in overrides.items())])
  return config


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run's final checkpoint (in this process)."""
  workdir = tmp_path_factory.mktemp("reference")
  summary = train.train(_config(), workdir)
  assert summary["steps"] == TOTAL_STEPS and not summary["interrupted"]
  return train.load_checkpoint(workdir)


def _assert_same_run(workdir, reference):
  got = train.load_checkpoint(workdir)
  assert int(got["step"]) == TOTAL_STEPS
  for part in ("params", "batch_stats", "opt_state", "nonfinite_total"):
    assert jax.tree.structure(got[part]) == jax.tree.structure(reference[part])
    for a, b in zip(jax.tree.leaves(got[part]), jax.tree.leaves(reference[part])):
      np.testing.assert_array_equal(a, b)
  assert got["meta"]["evals"] == reference["meta"]["evals"]  # every epoch's test result too


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}


def _start(workdir, *extra) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "experiments.train", *RUN, "--workdir", str(workdir), *extra],
                          cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout=600) -> tuple[int, str, str]:
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _wait_for_lines(path: pathlib.Path, n: int, proc: subprocess.Popen, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if path.is_file() and len(path.read_text().splitlines()) >= n:
      return
    assert proc.poll() is None, f"the run ended before its step {n}: {proc.communicate()[1][-2000:]}"
    time.sleep(0.01)
  raise TimeoutError(f"{path} did not reach {n} lines")


def _tmp_folders(workdir):
  return [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]


def test_sigint_then_sigterm_mid_run_checkpoint_and_the_same_command_resumes_exactly(tmp_path, reference):
  workdir = tmp_path / "run"
  for signum, after_lines, code in ((signal.SIGINT, 3, 130), (signal.SIGTERM, 24, 143)):
    proc = _start(workdir, "log_every_steps=1")
    _wait_for_lines(workdir / "metrics.jsonl", after_lines, proc)
    proc.send_signal(signum)
    rc, _, err = _finish(proc)
    step = int(train.load_checkpoint(workdir)["step"])
    assert rc == code and err.strip() == f"interrupted at step {step}; the same command resumes", err
    assert after_lines <= step < TOTAL_STEPS and not _tmp_folders(workdir)
  rc, out, err = _finish(_start(workdir, "log_every_steps=1"))
  assert rc == 0, err[-2000:]
  assert f"resuming {workdir} from step {step} of {TOTAL_STEPS}" in out
  _assert_same_run(workdir, reference)
  resumes = reporting.read_jsonl(workdir / "resumes.jsonl")
  assert [r["total_steps"] for r in resumes] == [TOTAL_STEPS] * 2 and resumes[-1]["step"] == step


def test_a_kill_9_while_a_checkpoint_is_written_resumes_exactly(tmp_path, reference):
  workdir = tmp_path / "run"
  for _ in range(5):  # until the kill lands inside a save (a temporary folder left behind)
    proc = _start(workdir, "checkpoint_every_steps=1", "keep_checkpoints=3")
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
      if (workdir / "checkpoints").is_dir() and _tmp_folders(workdir):
        proc.send_signal(signal.SIGKILL)
        break
    rc, _, err = _finish(proc)
    assert rc == -signal.SIGKILL, f"the run ended before it was killed: {err[-2000:]}"
    if _tmp_folders(workdir):
      break
  else:
    pytest.fail("five kills all landed between two saves")
  rc, _, err = _finish(_start(workdir, "checkpoint_every_steps=1", "keep_checkpoints=3"))
  assert rc == 0, err[-2000:]
  assert not _tmp_folders(workdir)
  _assert_same_run(workdir, reference)


def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_ends_exactly(tmp_path, reference, caplog):
  workdir = tmp_path / "run"
  first = train.train(_config(stop_after_steps=26, checkpoint_every_steps=4), workdir)  # steps 24 and 26 kept
  assert first["interrupted"] and sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [24, 26]
  data = max((workdir / "checkpoints" / "26").rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
  blob = bytearray(data.read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  data.write_bytes(bytes(blob))
  with caplog.at_level(logging.WARNING, logger="ricci_jax"):
    train.train(_config(checkpoint_every_steps=4), workdir)
  assert any("checkpoint step 26" in r.getMessage() and "resuming from step 24" in r.getMessage()
             for r in caplog.records)
  assert reporting.read_jsonl(workdir / "resumes.jsonl")[0]["step"] == 24
  _assert_same_run(workdir, reference)


def test_no_intact_checkpoint_is_one_line_and_nothing_is_overwritten(tmp_path):
  workdir = tmp_path / "run"
  train.train(_config(stop_after_steps=6, checkpoint_every_steps=4), workdir)  # steps 4 and 6 kept
  for step in ("4", "6"):
    data = max((workdir / "checkpoints" / step).rglob("ocdbt.process_0/d/*"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[:100])
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  rc, out, err = _finish(_start(workdir))
  assert rc == 1 and out == ""
  assert err.count("\n") == 1 and err.startswith("error: no intact checkpoint to resume from: checkpoint step 6")
  assert "Traceback" not in err
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before
