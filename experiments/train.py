"""Train a discretized network from a config file.

    python -m experiments.train --config experiments/configs/<name>.py[:arg] [--workdir DIR] [key=value ...]

Overrides are dotted config keys, with or without a ``--config.`` prefix:

    python -m experiments.train --config experiments/configs/fashion_mnist_lenet5_w1a32_rfdnn.py \\
        --config.epochs=5 optimizer.learning_rate=0.05 seeds="(0, 1, 2)"

Everything is checked before training starts (unknown keys list the valid
ones). A run resumes from the latest checkpoint in its working directory. On
several hosts, set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (or run under a launcher jax.distributed detects) and pass
--distributed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import sys

import ml_collections


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path.py`` or ``path.py:arg`` by calling its ``get_config(arg)``."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ValueError(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"config file {path!r} has no get_config() function")
  return module.get_config(arg) if arg else module.get_config()


def command_line_overrides(parser: argparse.ArgumentParser, rest: list[str]) -> list[str]:
  """The ``key=value`` config overrides among the arguments ``parser`` left over.

  ``--config.key=value`` is accepted as ``key=value``; any other option is a
  parser error (argparse's message and exit status 2).
  """
  overrides = []
  for item in rest:
    if item.startswith("--config."):
      item = item[len("--config."):]
    elif item.startswith("-"):
      parser.error(f"unknown option {item.split('=')[0]!r}; config keys go as key=value or --config.key=value")
    overrides.append(item)
  return overrides


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
  parser.add_argument("--workdir", default=None, help="output directory (default runs/<config name>)")
  parser.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() first")
  args, rest = parser.parse_known_args(argv)
  return args, command_line_overrides(parser, rest)


def main(argv=None) -> int:
  args, overrides = parse(argv)
  from ricci_jax import train, train_config  # noqa: PLC0415 - after argument errors

  try:
    config = load_config_file(args.config)
    train_config.check_known_keys(config)
    train_config.apply_overrides(config, overrides)
    workdir = pathlib.Path(args.workdir or pathlib.Path("runs") / (config.name or pathlib.Path(args.config.split(":")[0]).stem))
    if args.distributed:
      import jax  # noqa: PLC0415
      jax.distributed.initialize()
    train_config.validate(config, workdir)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  summary = train.train_seeds(config, workdir)
  stats = summary["across_seeds"]
  print(json.dumps({"name": summary["name"], "across_seeds": stats}, indent=2))
  print(f"test accuracy over the last {config.last_epochs} epochs: "
        f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f} % ({stats['seeds']} seed(s)); outputs in {workdir}")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(main())
