"""Orbax checkpoints of a run: the whole :class:`~ricci_jax.train.steps.TrainState`, a JSON ``meta`` and
the input pipeline's position (``data_iterator``: the training iterator's Grain ``get_state()``).

The pipeline's position is saved with the model of the same step, so a resumed run reads exactly the
batch an uninterrupted run would have read next, and a position that does not belong to the model is
refused on restore (:meth:`ricci_jax.data.Dataset.iterator` checks it against the model's step). That
state is the same on every process, so it is one JSON item like ``meta``. In a multi-process run every process calls :func:`save` and Orbax writes
each array and each JSON item once.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp

DATA_ITERATOR = "data_iterator"
"""The checkpoint item holding the training input pipeline's Grain iterator state."""


def manager(workdir: str | pathlib.Path, keep: int | None = None) -> ocp.CheckpointManager:
  """The checkpoint manager of ``workdir/checkpoints`` (created if missing), keeping the last ``keep``."""
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager((pathlib.Path(workdir) / "checkpoints").absolute(), options=options)


def save(mgr: ocp.CheckpointManager, state: Any, meta: dict, data_iterator: dict | None = None):
  """Saves ``state`` at its step with ``meta`` (and the input pipeline's state) and waits until written.

  A step already saved is kept. ``data_iterator``: the training iterator's ``get_state()`` at the
  same step.
  """
  step = int(state.step)
  if mgr.latest_step() == step:
    return
  items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
  if data_iterator is not None:
    items[DATA_ITERATOR] = ocp.args.JsonSave(data_iterator)
  mgr.save(step, args=ocp.args.Composite(**items))
  mgr.wait_until_finished()


def restore(mgr: ocp.CheckpointManager, like: Any, step: int | None = None) -> tuple[Any, dict, dict | None]:
  """The state (with the structure of ``like``), meta and input pipeline state of ``step`` (default: the latest).

  The pipeline state is None in a checkpoint saved without one.
  """
  step = mgr.latest_step() if step is None else step
  items = {"state": ocp.args.StandardRestore(like), "meta": ocp.args.JsonRestore()}
  saved_data = _has_item(mgr, step, DATA_ITERATOR)
  if saved_data:
    items[DATA_ITERATOR] = ocp.args.JsonRestore()
  restored = mgr.restore(step, args=ocp.args.Composite(**items))
  return restored["state"], restored["meta"], restored[DATA_ITERATOR] if saved_data else None


def _has_item(mgr: ocp.CheckpointManager, step: int, name: str) -> bool:
  # the item's folder in the step's checkpoint (asking the manager for item metadata without registered
  # handlers logs a warning per item)
  return (pathlib.Path(mgr.directory) / str(step) / name).is_dir()


def load_checkpoint(workdir: str | pathlib.Path, step: int | None = None) -> dict:
  """The saved state of a run as nested dicts of NumPy arrays (latest step by default).

  Keys: ``step``, ``params``, ``batch_stats``, ``opt_state``, ``quant``,
  ``nonfinite_total``, ``nonfinite_streak``; plus ``meta`` (steps per epoch,
  run name, the evaluations so far) and ``data_iterator`` (the input
  pipeline's state; None if the checkpoint has none).
  """
  path = (pathlib.Path(workdir) / "checkpoints").absolute()  # newer orbax refuses relative paths
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoints in {str(path)!r}")
  with ocp.CheckpointManager(path) as mgr:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoints in {str(path)!r}")
    items = {"state": ocp.args.StandardRestore(), "meta": ocp.args.JsonRestore()}
    saved_data = _has_item(mgr, step, DATA_ITERATOR)
    if saved_data:
      items[DATA_ITERATOR] = ocp.args.JsonRestore()
    restored = mgr.restore(step, args=ocp.args.Composite(**items))
  return {**jax.device_get(restored["state"]), "meta": restored["meta"],
          DATA_ITERATOR: restored[DATA_ITERATOR] if saved_data else None}
