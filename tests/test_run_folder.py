"""A run's identity: config.json written once, a resume with another config refused before any work
(one line, old -> new), an allowed change recorded, and a run loaded back from its folder."""

import functools
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest

from experiments import cli
from experiments import train as train_program
from experiments.configs import presets
from ricci_jax import data, reporting, train
from ricci_jax.train import run_folder

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
TINY = ["dataset.train_limit=512", "dataset.test_limit=256", "batch_size=64", "model.name=mlp", "progress=False",
        "plots=False", "checkpoint_every_steps=4"]


def _config(method="clipped_ste", *overrides):
  config = presets.fashion_mnist(method, epochs=1)
  train.schema.apply_overrides(config, [*TINY, *overrides])
  return config


@pytest.mark.parametrize("method,overrides,listed", [
    ("rfdnn", [], r"optimizer.name: 'sgd' -> 'rf_sgd'"),  # another method
    ("clipped_ste", ["quant.estimator=reste"], r"quant.estimator: 'clipped_ste' -> 'reste'"),
    ("clipped_ste", ["optimizer.learning_rate=0.1"], r"optimizer.learning_rate: 0.05 -> 0.1"),
    ("clipped_ste", ["epochs=3"], r"epochs: 1 -> 3\); use another --workdir, or resume with allow_changes=epochs"),
    ("clipped_ste", ["seed=1", "dataset.name=mnist"], r"dataset.name: 'fashion_mnist' -> 'mnist', seed: 0 -> 1"),
])
def test_another_config_on_a_run_folder_is_refused_in_one_line(tmp_path, method, overrides, listed):
  run_folder.create(_config(), tmp_path)
  with pytest.raises(train.RunMismatchError, match=f"holds a run with another config \\({listed}") as e:
    run_folder.check_resume(_config(method, *overrides), tmp_path)
  assert "\n" not in str(e.value)


def test_what_may_differ_on_resume(tmp_path):
  assert run_folder.check_resume(_config(), tmp_path) is None  # no run yet
  run_folder.create(_config(), tmp_path)
  written = (tmp_path / "config.json").read_text()
  operational = ["progress=True", "plots=True", "log_every_steps=7", "checkpoint_every_steps=9", "keep_checkpoints=5",
                 "stop_after_steps=3", "name=renamed", "seeds=(0, 1)"]
  assert run_folder.check_resume(_config("clipped_ste", *operational), tmp_path) == {}
  allowed = _config("clipped_ste", "epochs=3", "last_epochs=2", "allow_changes=epochs,last_epochs")
  assert run_folder.check_resume(allowed, tmp_path) == {"epochs": (1, 3), "last_epochs": (3, 2)}
  run_folder.create(allowed, tmp_path)
  assert (tmp_path / "config.json").read_text() == written  # never overwritten
  with pytest.raises(ValueError, match=r"allow_changes: optimizer.learning_rate cannot change in a resumed run"):
    train.schema.validate(_config("clipped_ste", "allow_changes=optimizer.learning_rate"), tmp_path)
  with pytest.raises(train.RunMismatchError, match="already holds a run and resume=False"):
    run_folder.check_resume(_config("clipped_ste", "resume=False"), tmp_path)


def test_checkpoints_without_a_config_are_not_taken_for_a_run(tmp_path):
  (tmp_path / "checkpoints" / "4").mkdir(parents=True)
  with pytest.raises(train.RunMismatchError, match="holds checkpoints but no config.json"):
    run_folder.check_resume(_config(), tmp_path)


def test_a_key_added_to_the_schema_since_reads_as_its_default(tmp_path):
  config = _config()
  saved = json.loads(config.to_json_best_effort())
  del saved["dnr"], saved["allow_changes"]  # a run from before these keys existed
  (tmp_path / "config.json").write_text(json.dumps(saved))
  assert run_folder.check_resume(config, tmp_path) == {}
  with pytest.raises(train.RunMismatchError, match=r"dnr.every_steps: 0 -> 5"):
    run_folder.check_resume(_config("clipped_ste", "dnr.every_steps=5"), tmp_path)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A finished one-epoch run (8 steps) and its summary."""
  workdir = tmp_path_factory.mktemp("finished")
  return workdir, train.train(_config(), workdir)


@needs_fashion
def test_a_run_loads_back_from_its_folder(finished):
  workdir, summary = finished
  config, model, variables = train.load_run(workdir)
  assert config.to_json_best_effort() == _config().to_json_best_effort()
  saved = train.load_checkpoint(workdir)
  for a, b in zip(jax.tree.leaves(variables["params"]), jax.tree.leaves(saved["params"])):
    np.testing.assert_array_equal(a, b)
  apply = jax.jit(functools.partial(model.apply, train=False))
  test = data.load("fashion_mnist", "test", batch_size=64, drop_remainder=False, limit=256)
  correct = sum(int(np.sum((np.argmax(apply(variables, data.preprocess("fashion_mnist", b["image"])), -1)
                            == b["label"]) * b["mask"])) for b in test.epoch(0))
  assert correct / 256 == summary["final_test_accuracy"]  # the model the run evaluated
  with pytest.raises(FileNotFoundError, match="holds no run"):
    train.load_run(workdir / "checkpoints")


@needs_fashion
def test_an_allowed_longer_run_continues_and_is_recorded(tmp_path, finished, capsys):
  workdir = tmp_path / "run"
  shutil.copytree(finished[0], workdir)
  longer = train.train(_config("clipped_ste", "epochs=2", "allow_changes=epochs"), workdir)
  assert longer["steps"] == 16 and longer["epochs_done"] == 2
  assert f"resuming {workdir} from step 8 of 16; epochs: 1 -> 2" in capsys.readouterr().out
  record = reporting.read_jsonl(workdir / "resumes.jsonl")[-1]
  assert record["step"] == 8 and record["changes"] == {"epochs": [1, 2]} and record["source"]["commit"]
  assert json.loads((workdir / "config.json").read_text())["epochs"] == 1  # written once
  assert run_folder.effective_config(workdir)["epochs"] == 2
  again = train.train_seeds(_config("clipped_ste", "epochs=2"), workdir)  # the run's config now: nothing to do
  assert again["runs"][0]["steps"] == 16 and len(reporting.read_jsonl(workdir / "resumes.jsonl")) == 1
  with pytest.raises(train.RunMismatchError, match=r"epochs: 2 -> 1"):
    train.train_seeds(_config(), workdir)


@needs_fashion
def test_the_command_line_refuses_a_changed_method_and_keeps_the_runs_record(finished, capsys, monkeypatch):
  monkeypatch.setattr("ricci_jax.runtime.configure_cpu", lambda: None)  # JAX runs already in this process
  workdir, _ = finished
  before = {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
  argv = ["--config", "experiments/configs/fashion_mnist.py:rfdnn", "--workdir", str(workdir), "epochs=1", *TINY]
  assert cli.run(train_program.main, argv) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: '{workdir}' holds a run with another config (")
  assert "optimizer.name: 'sgd' -> 'rf_sgd'" in err
  assert {p: p.read_bytes() for p in workdir.rglob("*") if p.is_file()} == before


def test_load_run_names_what_is_missing(tmp_path):
  (tmp_path / "seed_0").mkdir()
  (tmp_path / "seed_1").mkdir()
  with pytest.raises(FileNotFoundError, match=r"holds several seeds \(seed_0, seed_1\); pass one of them"):
    train.load_run(tmp_path)
