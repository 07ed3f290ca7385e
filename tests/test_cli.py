"""The command-line programs: every user mistake ends in one line on stderr and a non-zero status (no
traceback unless --debug), and every example their --help gives exists and parses."""

import os
import pathlib
import re
import subprocess
import sys

import commands
import pytest

from experiments import cli
from experiments import export as export_program
from experiments import train as train_program
from ricci_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
TINY = ["dataset.train_limit=512", "dataset.test_limit=256", "epochs=1", "batch_size=64", "progress=False",
        "plots=False"]
PROGRAMS = ["train", "compare", "export", "study", "rf_readings", "pruning_study", "reproduce", "nnx_example",
            "metric_perturbation", "demo_estimators", "results_readme", "rerun_check", "coarse_gradient.run"]


@pytest.fixture(autouse=True)
def _no_cpu_settings(monkeypatch):
  monkeypatch.setattr("ricci_jax.runtime.configure_cpu", lambda: None)  # JAX runs already in this process


def _train(workdir, *args, config="experiments/configs/fashion_mnist.py:clipped_ste"):
  return ["--config", config, "--workdir", str(workdir), *TINY, *args]


def _one_error_line(capsys, status, main, argv) -> str:
  assert cli.run(main, argv) == status
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
  return err.strip()


def _read_only_folder(tmp_path) -> pathlib.Path:
  if os.geteuid() == 0:  # root writes through permissions; /sys is read-only for it too
    return pathlib.Path("/sys/ricci_jax_test_run")
  folder = tmp_path / "read_only"
  folder.mkdir(mode=0o500)
  return folder / "run"


@pytest.mark.parametrize("args,message", [
    (["optimizer.learning_rate=0"], r"optimizer.learning_rate = 0.0 is out of range: allowed a number in \(0, inf\)"),
    (["optimizer.learning_rate=-0.1"], r"optimizer.learning_rate = -0.1 is out of range"),
    (["optimizer.momentum=1.0"], r"optimizer.momentum = 1.0 is out of range: allowed a number in \[0, 1\)"),
    (["optimizer.weight_decay=-1"], r"optimizer.weight_decay = -1.0 is out of range: allowed a number in \[0, inf\)"),
    (["optimizer.learning_rate=fast"], r"optimizer.learning_rate = 'fast' is not a number in \(0, inf\)"),
    (["optimizer.learning_rte=0.1"], r"unknown config key 'optimizer.learning_rte'; did you mean 'optimizer.learning_rate'\?$"),
    (["learning_rate=0.1"], r"unknown config key 'learning_rate'; did you mean 'optimizer.learning_rate'\?$"),
    (["quant.hparams.clp=1.0"], r"quant.hparams: estimator 'clipped_ste' got unknown hyperparameter\(s\) \['clp'\]"),
    (["rfdnn.tau_scale=0"], r"rfdnn.tau_scale = 0.0 is out of range"),
    (["pruning.rate=1.5"], r"pruning.rate = 1.5 is out of range: allowed a number in \(0, 1\)"),
    (["dnr.every_steps=-1"], r"dnr.every_steps = -1 is out of range: allowed an integer in \[0, inf\)"),
    (["batch_size=0"], r"batch_size = 0 is out of range"),
    (["epochs=two"], r"epochs = 'two' is not an integer in \[1, inf\)"),
])
def test_a_bad_config_value_is_one_line(tmp_path, capsys, args, message):
  err = _one_error_line(capsys, 2, train_program.main, _train(tmp_path / "run", *args))
  assert re.search(message, err), err
  assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_bad_places_are_one_line(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  for data_dir in ("/nonexistent", empty):
    err = _one_error_line(capsys, 2, train_program.main, _train(tmp_path / "run", f"dataset.data_dir={data_dir}"))
    assert err.startswith(f"error: fashion_mnist (train) not found with source='auto'. Looked at: files: {data_dir}")
  a_file = tmp_path / "file"
  a_file.write_text("")
  err = _one_error_line(capsys, 2, train_program.main, _train(a_file))
  assert err == f"error: the output directory '{a_file}' is a file; pass a folder (--workdir)"
  read_only = _read_only_folder(tmp_path)
  err = _one_error_line(capsys, 2, train_program.main, _train(read_only))
  assert err.startswith(f"error: the output directory '{read_only}' cannot be written (")
  err = _one_error_line(capsys, 2, train_program.main, _train(tmp_path / "run", config="experiments/configs/nope.py"))
  assert err == "error: config file 'experiments/configs/nope.py' not found"
  broken = tmp_path / "broken.py"
  broken.write_text("from experiments.configs import presets\n\ndef get_config():\n"
                    "  c = presets.fashion_mnist('clipped_ste')\n  c.optimizer.learning_rate = '0.1'\n  return c\n")
  err = _one_error_line(capsys, 2, train_program.main, _train(tmp_path / "run", config=str(broken)))
  assert err.startswith(f"error: config file '{broken}': TypeError: ")


@needs_fashion
def test_too_many_non_finite_steps_are_one_line(tmp_path, capsys):
  err = _one_error_line(capsys, 1, train_program.main, _train(
      tmp_path / "run", "optimizer.learning_rate=1e30", "optimizer.schedule=constant", "max_consecutive_nonfinite=2",
      "log_every_steps=1"))
  assert re.match(r"error: stopped at step \d+: 2 consecutive steps were not finite \(the last in "
                  r"(loss|gradient of params/\S+|params/\S+|batch_stats/\S+|opt_state/\S+); \d+ in total\); the last "
                  r"good state is saved in '.*checkpoints'", err), err


@needs_fashion
def test_export_refuses_a_bad_or_mismatched_packed_file_in_one_line(tmp_path, capsys):
  assert cli.run(train_program.main, _train(tmp_path / "run")) == 0
  assert cli.run(export_program.main, ["pack", str(tmp_path / "run"), str(tmp_path / "model.npz")]) == 0
  capsys.readouterr()
  subset = os.environ.get("RICCI_JAX_CIFAR10_SUBSET", str(REPO.parent / "shared/data/cifar10-subset"))
  if pathlib.Path(subset, "test_batch").is_file():  # a Fashion-MNIST model given CIFAR-10 images
    err = _one_error_line(capsys, 2, export_program.main, ["evaluate", str(tmp_path / "model.npz"), "--dataset",
                                                           "cifar10", "--data-dir", subset, "--limit", "64"])
    assert err == ("error: Predictor expects images of shape (N, 28, 28, 1) (the packed model's input), got "
                   "(256, 32, 32, 3)")
  blob = bytearray((tmp_path / "model.npz").read_bytes())
  blob[len(blob) // 2] ^= 0xFF
  (tmp_path / "damaged.npz").write_bytes(bytes(blob))
  err = _one_error_line(capsys, 2, export_program.main, ["evaluate", str(tmp_path / "damaged.npz")])
  assert str(tmp_path / "damaged.npz") in err
  err = _one_error_line(capsys, 2, export_program.main, ["pack", str(tmp_path / "nothing"), str(tmp_path / "x.npz")])
  assert err == f"error: '{tmp_path / 'nothing'}' holds no run (no checkpoints/ there); pass a run's --workdir"


def test_debug_shows_the_traceback(tmp_path, capsys):
  with pytest.raises(ValueError, match="optimizer.momentum = 1.5 is out of range"):
    cli.run(train_program.main, [*_train(tmp_path / "run", "optimizer.momentum=1.5"), "--debug"])


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.train", *_train(tmp_path / "run", "optimizer.momentum=1.5")],
                        cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stdout == ""
  assert proc.stderr == "error: optimizer.momentum = 1.5 is out of range: allowed a number in [0, 1)\n"


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_example_in_help_exists(program, capsys):
  text = commands.help_text(f"experiments.{program}", capsys)
  assert "--debug" in text
  examples = commands.examples(text)
  assert examples, f"{program} --help shows no example"
  for example in examples:
    commands.check(example, capsys)
