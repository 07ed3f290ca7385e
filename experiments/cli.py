"""What every command-line program of ``experiments/`` shares: its parser, config files and overrides, and
how it ends.

A program's ``__main__`` is ``sys.exit(cli.run(main))``. Then

* a user's mistake (a bad config value, a missing data folder, a folder holding another run, a bad
  packed file, ...) ends with one line on stderr, ``error: ...``, and exit status 2; a run that could
  not go on (too many non-finite steps, no intact checkpoint to resume from) with one line and status 1.
  ``--debug`` (or ``RICCI_JAX_DEBUG=1``) shows the traceback instead, and the warnings other libraries
  log through absl (TFDS probing a folder that holds no dataset, Orbax's notices), which are otherwise
  hidden;
* SIGINT (Ctrl-C) and SIGTERM (Slurm, preemptible clouds) let the running step finish, write a checkpoint
  and end with ``interrupted at step N; the same command resumes`` and status 130 / 143
  (:func:`ricci_jax.train.interrupts.stop_on_signals`); a second Ctrl-C stops at once.

Tracebacks are for bugs: anything else propagates as usual.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import pathlib
import sys
from collections.abc import Callable, Sequence

import ml_collections

DEBUG_ENV = "RICCI_JAX_DEBUG"
USAGE, FAILED = 2, 1  # exit statuses: a user's mistake; a run that could not go on


def parser(description: str | None, **kwargs) -> argparse.ArgumentParser:
  """An argument parser showing ``description`` as written, with ``--debug``; its usage line names the
  program as it is run (``python -m experiments.train``)."""
  spec = getattr(sys.modules["__main__"], "__spec__", None)
  if spec is not None and "prog" not in kwargs:
    kwargs["prog"] = f"python -m {spec.name}"
  out = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                                **kwargs)
  out.add_argument("--debug", action="store_true",
                   help=f"show the traceback of an error instead of its one line (also: {DEBUG_ENV}=1)")
  return out


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path.py`` or ``path.py:arg`` by calling its ``get_config(arg)``.

  Raises:
    ValueError: no such file, no ``get_config``, or the file's code failed (the error in one line).
  """
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ValueError(f"config file {path!r} not found")
  module_spec = importlib.util.spec_from_file_location(f"_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise ValueError(f"config file {path!r} has no get_config() function")
    return module.get_config(arg) if arg else module.get_config()
  except (TypeError, KeyError, AttributeError, ImportError, SyntaxError) as e:  # the file's own mistakes
    raise ValueError(f"config file {spec!r}: {type(e).__name__}: {e}") from e


def command_line_overrides(parser: argparse.ArgumentParser, rest: Sequence[str]) -> list[str]:
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


def _without_closed_loops(hook):
  """``hook`` but silent on 'Event loop is closed': after Orbax gives up reading a damaged step, TensorStore's
  callbacks still reach its closed event loop and each prints a traceback that is not an error of ours."""
  def unraisable(info):
    if not (isinstance(info.exc_value, RuntimeError) and str(info.exc_value) == "Event loop is closed"):
      hook(info)
  return unraisable


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
  """Runs ``main(argv)`` within :func:`~ricci_jax.train.interrupts.stop_on_signals`; returns the exit status.

  The errors a user can cause become one line on stderr (see the module docstring); ``main`` returning
  anything but an int (None, a result) counts as success.
  """
  from ricci_jax.train import CheckpointError, NonFiniteLossError, interrupts  # noqa: PLC0415 - after the
  # program's own settings (the export's errors, RunMismatchError and the schema's are ValueErrors)

  argv = list(sys.argv[1:] if argv is None else argv)
  debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
  if not debug:  # a program may set process-wide logging; our own warnings go through "ricci_jax.*"
    logging.getLogger("absl").setLevel(logging.ERROR)
    sys.unraisablehook = _without_closed_loops(sys.unraisablehook)
  try:
    with interrupts.stop_on_signals():
      status = main(argv)
  except interrupts.Interrupted as e:
    print(e, file=sys.stderr, flush=True)
    return e.exit_code
  except KeyboardInterrupt:
    if debug:
      raise
    print("interrupted (a second Ctrl-C): stopped without a final checkpoint; the same command resumes from "
          "the last one", file=sys.stderr)
    return 130
  except (ValueError, OSError) as e:
    if debug:
      raise
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return USAGE
  except (CheckpointError, NonFiniteLossError) as e:
    if debug:
      raise
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return FAILED
  return status if isinstance(status, int) else 0
