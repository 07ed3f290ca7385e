"""Orbax checkpoints of a run: the whole :class:`~ricci_jax.train.steps.TrainState` and a JSON ``meta``.

In a multi-process run every process calls :func:`save` and Orbax writes each array once.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp


def manager(workdir: str | pathlib.Path, keep: int | None = None) -> ocp.CheckpointManager:
  """The checkpoint manager of ``workdir/checkpoints`` (created if missing), keeping the last ``keep``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager((pathlib.Path(workdir) / "checkpoints").absolute(), options=options)


def save(mgr: ocp.CheckpointManager, state: Any, meta: dict):
  """Saves ``state`` at its step with ``meta`` and waits until written; a step already saved is kept."""
  step = int(state.step)
  if mgr.latest_step() == step:
    return
  mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
  mgr.wait_until_finished()


def restore(mgr: ocp.CheckpointManager, like: Any, step: int | None = None) -> tuple[Any, dict]:
  """The state (with the structure of ``like``) and meta of ``step`` (default: the latest)."""
  step = mgr.latest_step() if step is None else step
  restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(like),
                                                       meta=ocp.args.JsonRestore()))
  return restored["state"], restored["meta"]


def load_checkpoint(workdir: str | pathlib.Path, step: int | None = None) -> dict:
  """The saved state of a run as nested dicts of NumPy arrays (latest step by default).

  Keys: ``step``, ``params``, ``batch_stats``, ``opt_state``, ``quant``,
  ``nonfinite_total``, ``nonfinite_streak``; plus ``meta`` (steps per epoch,
  run name, the evaluations so far).
  """
  path = (pathlib.Path(workdir) / "checkpoints").absolute()  # newer orbax refuses relative paths
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoints in {str(path)!r}")
  with ocp.CheckpointManager(path) as mgr:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoints in {str(path)!r}")
    restored = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                         meta=ocp.args.JsonRestore()))
  return {**jax.device_get(restored["state"]), "meta": restored["meta"]}
