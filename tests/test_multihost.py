"""The training program on two processes (jax.distributed on 127.0.0.1, gloo collectives, one CPU device
each) against one process with two devices: same parameters bit for bit, disjoint halves of every batch,
files written once, and an exact resume after both processes are killed."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = pathlib.Path(__file__).parent
REPO = HERE.parent
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
BATCH, STEPS_PER_EPOCH, EPOCHS = 64, 8, 2
RUN = ["--config", "experiments/configs/fashion_mnist.py:rfdnn", f"dataset.train_limit={BATCH * STEPS_PER_EPOCH}",
       "dataset.test_limit=256", f"epochs={EPOCHS}", f"batch_size={BATCH}", "progress=False", "plots=False",
       "checkpoint_every_steps=4", "log_every_steps=100"]

pytestmark = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  return {**env, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "PYTHONPATH": os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])}  # this checkout's code


def _one_process(workdir, record):
  proc = subprocess.run([sys.executable, str(HERE / "multihost_worker.py"), str(record), "0", "--", *RUN,
                         "--workdir", str(workdir)], env=_env(2), cwd=REPO, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]


def _two_processes(workdir, records, kill_at=0) -> list[subprocess.CompletedProcess]:
  port = _free_port()
  procs = [subprocess.Popen([sys.executable, str(HERE / "multihost_worker.py"), str(records[i]), str(kill_at), "--",
                             *RUN, "--workdir", str(workdir), "--distributed", "--coordinator",
                             f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                            env=_env(1), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  out = []
  for p in procs:
    try:
      stdout, stderr = p.communicate(timeout=600)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
  return out


def _params(workdir):
  from ricci_jax import train  # noqa: PLC0415
  saved = train.load_checkpoint(workdir)
  return saved["step"], {k: np.asarray(v) for k, v in _flat(saved["params"]).items()}


def _flat(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def _records(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _checkpoint_layout(workdir):
  """Relative paths of every checkpoint's files, content-addressed names (under d/) collapsed."""
  root = pathlib.Path(workdir) / "checkpoints"
  return sorted({str(p.relative_to(root).parent if p.parent.name == "d" else p.relative_to(root))
                 for p in root.rglob("*") if p.is_file()})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  work = tmp_path_factory.mktemp("one_process")
  _one_process(work / "run", work / "rows.jsonl")
  return work


def test_two_processes_train_like_one_process_with_two_devices(reference, tmp_path):
  records = [tmp_path / f"rows_{i}.jsonl" for i in range(2)]
  procs = _two_processes(tmp_path / "run", records)
  for p in procs:
    assert p.returncode == 0, p.stderr[-3000:]
  step, params = _params(tmp_path / "run")
  ref_step, ref_params = _params(reference / "run")
  assert step == ref_step == EPOCHS * STEPS_PER_EPOCH
  assert params.keys() == ref_params.keys()
  for k in params:  # bit for bit: the same global batch, the same collectives' sums on a CPU
    np.testing.assert_array_equal(params[k], ref_params[k], err_msg=k)

  # each process read only its own half of every batch; together, the one-process batch
  ref_rows = {(r["split"], r["epoch"], r["step"]): r["rows"] for r in _records(reference / "rows.jsonl")}
  mine = [{(r["split"], r["epoch"], r["step"]): r for r in _records(path)} for path in records]
  assert mine[0].keys() == mine[1].keys() == ref_rows.keys()
  for key, rows in ref_rows.items():
    a, b = mine[0][key], mine[1][key]
    assert a["host_rows"] == b["host_rows"] == BATCH // 2, key
    assert not set(a["rows"]) & set(b["rows"]), key
    assert a["rows"] + b["rows"] == rows, key

  # files written once: the first process logs, both agree on the result, checkpoints as one process's
  evals = _records(tmp_path / "run" / "eval.jsonl")
  assert [r["step"] for r in evals] == [r["step"] for r in _records(reference / "run" / "eval.jsonl")]
  assert [r["accuracy"] for r in evals] == [r["accuracy"] for r in _records(reference / "run" / "eval.jsonl")]
  assert len(_records(tmp_path / "run" / "metrics.jsonl")) == len(_records(reference / "run" / "metrics.jsonl"))
  assert _checkpoint_layout(tmp_path / "run") == _checkpoint_layout(reference / "run")
  lines = [p.stdout.strip().splitlines()[-1] for p in procs]
  assert lines[0] == lines[1] and "test accuracy over the last" in lines[0]


def test_killing_both_processes_and_restarting_resumes_exactly(reference, tmp_path):
  records = [tmp_path / f"rows_{i}.jsonl" for i in range(2)]
  killed = _two_processes(tmp_path / "run", records, kill_at=11)  # after the checkpoint of step 8
  # each kills itself at step 11; a peer that loses its partner first may instead exit through the coordinator
  codes = [p.returncode for p in killed]
  assert -signal.SIGKILL in codes and all(c != 0 for c in codes), (codes, [p.stderr[-2000:] for p in killed])
  assert not (tmp_path / "run" / "results.json").exists()
  resumed = _two_processes(tmp_path / "run", [tmp_path / f"rows_resumed_{i}.jsonl" for i in range(2)])
  for p in resumed:
    assert p.returncode == 0, p.stderr[-3000:]
  first = [r for r in _records(tmp_path / "rows_resumed_0.jsonl") if r["split"] == "train"][0]
  assert (first["epoch"], first["step"]) == (1, 0)  # the checkpoint of step 8 = the start of epoch 1
  step, params = _params(tmp_path / "run")
  _, ref_params = _params(reference / "run")
  assert step == EPOCHS * STEPS_PER_EPOCH
  for k in params:
    np.testing.assert_array_equal(params[k], ref_params[k], err_msg=k)
  evals = _records(tmp_path / "run" / "eval.jsonl")
  assert [r["accuracy"] for r in evals] == [r["accuracy"] for r in _records(reference / "run" / "eval.jsonl")]
  assert [r["step"] for r in _records(tmp_path / "run" / "metrics.jsonl")] == [
      r["step"] for r in _records(reference / "run" / "metrics.jsonl")]
