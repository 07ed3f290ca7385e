"""The README runs as written: its ``python`` blocks, in order, in one fresh interpreter, from the run folder
its own training command makes (made tiny); and every ``python -m experiments...`` command it shows names
a program, config files, options and keys that exist."""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import commands
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
TINY = ["dataset.train_limit=512", "dataset.test_limit=256", "epochs=1", "batch_size=64", "progress=False",
        "plots=False"]


def _blocks(language: str) -> list[str]:
  return re.findall(rf"^ *```{language}\n(.*?)^ *```", README, re.S | re.M)


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  return {**env, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_every_python_block_runs_as_written_in_order(tmp_path):
  blocks = _blocks("python")
  assert len(blocks) >= 2 and all(block.strip() for block in blocks)
  (tmp_path / "experiments").symlink_to(REPO / "experiments")  # the commands run from a checkout
  command = next(line for block in _blocks("bash") for line in block.splitlines() if "--workdir runs/fm" in line)
  train = subprocess.run([sys.executable, *shlex.split(command)[1:], *TINY], cwd=tmp_path, env=_env(),
                         capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  proc = subprocess.run([sys.executable, "-c", "\n\n".join(blocks)], cwd=tmp_path, env=_env(), capture_output=True,
                        text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (tmp_path / "runs" / "fm" / "model.npz").is_file()


def test_every_command_it_shows_exists(capsys):
  shown = [example for block in _blocks("bash") for example in commands.examples(block)]
  shown += commands.examples(re.sub(r"`", "\n", README))  # commands inline in the text
  assert len(shown) >= 10
  for example in shown:
    commands.check(example, capsys)
