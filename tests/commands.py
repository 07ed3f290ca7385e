"""Checks of the command lines the documentation shows (``python -m experiments.X ...``), for test_cli and
test_readme: the program exists, every config file it names exists, every option is one of its own, every
``key=value`` override is a real key with a valid value. Nothing is run."""

import importlib
import pathlib
import re
import shlex

import pytest

from ricci_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]
PLACEHOLDER = re.compile(r"[\[\]<>$]|\.\.\.")  # a synopsis's [key=value ...], <name>, $I


def help_text(module: str, capsys) -> str:
  """What ``python -m module --help`` prints (its ``main(["--help"])``, in this process)."""
  with pytest.raises(SystemExit) as e:
    importlib.import_module(module).main(["--help"])
  assert e.value.code == 0
  return capsys.readouterr().out


def examples(text: str) -> list[list[str]]:
  """The ``python -m experiments.X ...`` command lines of a text (continuations joined, comments cut), as
  ``[module, *arguments]``."""
  joined = re.sub(r"\\\n\s*", " ", text)
  return [shlex.split(line.split(" #")[0].split("python -m ", 1)[1]) for line in joined.splitlines()
          if "python -m experiments." in line]


def check(example: list[str], capsys):
  """Fails unless every part of ``[module, *arguments]`` exists (see the module docstring)."""
  module, *args = example
  importlib.import_module(module)
  options = None
  for arg in args:
    if PLACEHOLDER.search(arg):
      continue
    for path in re.findall(r"(experiments/configs/[\w/]+\.py)", arg):
      assert (REPO / path).is_file(), f"{' '.join(example)}: {path} does not exist"
    flag = arg.split("=")[0]
    if flag.startswith("--") and not flag.startswith("--config."):
      options = options or help_text(module, capsys)
      assert re.search(rf"(^|[\s\[,]){re.escape(flag)}\b", options), f"{' '.join(example)}: no option {flag}"
    is_override = "=" in arg and not arg.startswith("-") and module in ("experiments.train", "experiments.compare")
    if is_override or arg.startswith("--config."):
      train.schema.apply_overrides(train.schema.default_config(), [arg])  # a real key, a valid value
