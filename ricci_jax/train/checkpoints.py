"""Orbax checkpoints of a run, verified: the whole :class:`~ricci_jax.train.steps.TrainState`, a JSON
``meta``, the input pipeline's position (``data_iterator``: the training iterator's Grain ``get_state()``)
and a ``checksum`` of the three.

The pipeline's position is saved with the model of the same step, so a resumed run reads exactly the
batch an uninterrupted run would have read next, and a position that does not belong to the model is
refused on restore (:meth:`ricci_jax.data.Dataset.iterator` checks it against the model's step). That
state is the same on every process, so it is one JSON item like ``meta``. In a multi-process run every
process calls :func:`save` and Orbax writes each array and each JSON item once.

**Verification.** Orbax's files carry no checksum of their own, and a flipped byte in an array's data can
restore silently as another value. Every step therefore saves :func:`fingerprint` (SHA-256 over every
array's bytes, dtype and shape by its path, the meta and the iterator state) and every restore recomputes
it from what was read back: a step whose files were damaged, truncated or half-written restores to other
bytes, fails to parse, or fails to read, and is refused as a :class:`CheckpointError`. A restored state
with a non-finite value is refused too (a training step never saves one: :func:`ricci_jax.train.steps.train_step`
keeps the last finite state). :func:`restore_newest_intact` is what a resume uses: the newest step that
verifies, the damaged newer ones moved aside to ``damaged_checkpoints/`` with a one-line warning each.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ricci_jax.layers import path_names  # names, the same for a TrainState and a raw restore's dicts

DATA_ITERATOR = "data_iterator"
"""The checkpoint item holding the training input pipeline's Grain iterator state."""
CHECKSUM = "checksum"
"""The checkpoint item holding :func:`fingerprint` of the other three."""
DAMAGED_DIR = "damaged_checkpoints"
"""Where a resume moves the steps that failed verification (in the run's folder, beside ``checkpoints``)."""

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """A checkpoint step that cannot be trusted (unreadable, damaged or non-finite), or no intact step at all."""


def manager(workdir: str | pathlib.Path, keep: int | None = None) -> ocp.CheckpointManager:
  """The checkpoint manager of ``workdir/checkpoints`` (created if missing), keeping the last ``keep``.

  Temporary folders of a save that was killed midway (``*.orbax-checkpoint-tmp-*``) are removed.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, cleanup_tmp_directories=True)
  return ocp.CheckpointManager((pathlib.Path(workdir) / "checkpoints").absolute(), options=options)


def fingerprint(state: Any, meta: dict, data_iterator: dict | None) -> str:
  """SHA-256 (hex) of a checkpoint's content: every array (path, dtype, shape, bytes), the meta, the iterator.

  Independent of the container types (a :class:`~ricci_jax.train.steps.TrainState` and the nested dicts
  of a raw restore give the same value) and of the order of dict keys.
  """
  h = hashlib.sha256()
  leaves = sorted((path_names(p), np.asarray(v)) for p, v in jax.tree_util.tree_leaves_with_path(state))
  for names, a in leaves:
    h.update(json.dumps([names, a.dtype.str, a.shape]).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  h.update(json.dumps([meta, data_iterator], sort_keys=True).encode())
  return h.hexdigest()


def nonfinite_leaf(tree: Any, reference: Any = None) -> str | None:
  """The path (``params/dense1/kernel``) of the first leaf holding a NaN or an inf, else None.

  With ``reference`` (a tree of the same structure, e.g. the initial state) only the leaves that are
  finite throughout in the reference are checked: some optimizer state is non-finite by design (RF-DNN's
  gate bound epsilon = inf, the NaN slots of its median window).
  """
  refs = [None] * len(jax.tree.leaves(tree)) if reference is None else jax.tree.leaves(reference)
  for (path, v), r in zip(jax.tree_util.tree_leaves_with_path(tree), refs):
    a = np.asarray(v)
    if r is not None and not np.all(np.isfinite(np.asarray(r))):
      continue
    if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
      return "/".join(path_names(path))
  return None


def save(mgr: ocp.CheckpointManager, state: Any, meta: dict, data_iterator: dict | None = None):
  """Saves ``state`` at its step with ``meta``, the input pipeline's state and their checksum; waits until written.

  A step already saved is kept. ``state``: host arrays (``jax.device_get``); ``data_iterator``: the
  training iterator's ``get_state()`` at the same step.
  """
  step = int(state.step)
  if mgr.latest_step() == step:
    return
  items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta),
           CHECKSUM: ocp.args.JsonSave({"sha256": fingerprint(state, meta, data_iterator)})}
  if data_iterator is not None:
    items[DATA_ITERATOR] = ocp.args.JsonSave(data_iterator)
  mgr.save(step, args=ocp.args.Composite(**items))
  mgr.wait_until_finished()


def _has_item(directory: pathlib.Path, step: int, name: str) -> bool:
  # the item's folder in the step's checkpoint (asking the manager for item metadata without registered
  # handlers logs a warning per item)
  return (pathlib.Path(directory) / str(step) / name).is_dir()


def _read(mgr: ocp.CheckpointManager, step: int, like: Any = None) -> tuple[Any, dict, dict | None]:
  """The state, meta and iterator state of ``step``, verified (:class:`CheckpointError` if they do not verify).

  ``like``: the structure to restore into (and the reference of the non-finite check); None restores
  nested dicts and checks the params and batch statistics.
  """
  directory = pathlib.Path(mgr.directory)
  items = {"state": ocp.args.StandardRestore(like), "meta": ocp.args.JsonRestore()}
  saved_data = _has_item(directory, step, DATA_ITERATOR)
  if saved_data:
    items[DATA_ITERATOR] = ocp.args.JsonRestore()
  checked = _has_item(directory, step, CHECKSUM)
  if checked:
    items[CHECKSUM] = ocp.args.JsonRestore()
  where = f"checkpoint step {step} in {str(directory)!r}"
  try:
    restored = mgr.restore(step, args=ocp.args.Composite(**items))
    state, meta = restored["state"], restored["meta"]
    data = restored[DATA_ITERATOR] if saved_data else None
    want = restored[CHECKSUM]["sha256"] if checked else None
  except Exception as e:  # noqa: BLE001 - any failure to read a step means the step cannot be used
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise CheckpointError(f"{where} is unreadable ({type(e).__name__}: {first})") from e
  state = jax.device_get(state)
  if checked and fingerprint(state, meta, data) != want:
    raise CheckpointError(f"{where} is damaged: what it holds does not match the checksum saved with it")
  if not checked:
    log.warning("%s has no checksum (saved before checkpoints carried one): restored unverified", where)
  if like is None:
    bad = nonfinite_leaf({k: state.get(k) for k in ("params", "batch_stats")})
  else:
    bad = nonfinite_leaf(state, reference=like)
  if bad is not None:
    raise CheckpointError(f"{where} holds a non-finite value in {bad}")
  return state, meta, data


def restore(mgr: ocp.CheckpointManager, like: Any, step: int | None = None) -> tuple[Any, dict, dict | None]:
  """The state (with the structure of ``like``), meta and input pipeline state of ``step`` (default: the latest).

  The pipeline state is None in a checkpoint saved without one.

  Raises:
    CheckpointError: the step does not verify (unreadable, damaged, non-finite) or there is none.
  """
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"no checkpoint in {str(mgr.directory)!r}")
  return _read(mgr, step, like)


def restore_newest_intact(mgr: ocp.CheckpointManager, like: Any, *,
                          move_damaged: bool = True) -> tuple[Any, dict, dict | None] | None:
  """The newest step that verifies (as :func:`restore`), or None when there is no step at all.

  Each newer step that does not verify is named in a one-line warning and, with ``move_damaged`` (the
  process that writes the run's files), moved to ``<run>/damaged_checkpoints/<step>-<time>`` so that the
  resumed run can save that step again; nothing is deleted.

  Raises:
    CheckpointError: there are steps and none verifies; nothing was moved or changed.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  problems: list[CheckpointError] = []
  for step in steps:
    try:
      restored = restore(mgr, like, step)
    except CheckpointError as e:
      problems.append(e)
      continue
    for problem, bad in zip(problems, steps):
      moved = f" (moved to {_move_aside(pathlib.Path(mgr.directory), bad)})" if move_damaged else ""
      log.warning("%s; skipped%s, resuming from step %d", problem, moved, step)
    if problems:
      mgr.reload()
    return restored
  if problems:
    raise CheckpointError(f"no intact checkpoint to resume from: {'; '.join(map(str, problems))}. Nothing was "
                          f"changed; move {str(mgr.directory)!r} away to start the run afresh")
  return None


def _move_aside(directory: pathlib.Path, step: int) -> pathlib.Path:
  target = directory.parent / DAMAGED_DIR / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
  target.parent.mkdir(parents=True, exist_ok=True)
  (directory / str(step)).rename(target)
  return target


def load_checkpoint(workdir: str | pathlib.Path, step: int | None = None) -> dict:
  """The saved state of a run as nested dicts of NumPy arrays (latest step by default), verified.

  Keys: ``step``, ``params``, ``batch_stats``, ``opt_state``, ``quant``,
  ``nonfinite_total``, ``nonfinite_streak``; plus ``meta`` (steps per epoch,
  run name, the evaluations so far) and ``data_iterator`` (the input
  pipeline's state; None if the checkpoint has none).

  Raises:
    FileNotFoundError: no checkpoint in ``workdir``.
    CheckpointError: the step does not verify (unlike a resume, no older step is taken instead: the
      latest step of a finished run is its result).
  """
  path = (pathlib.Path(workdir) / "checkpoints").absolute()  # newer orbax refuses relative paths
  if not path.is_dir():
    raise FileNotFoundError(f"no checkpoints in {str(path)!r}")
  with ocp.CheckpointManager(path) as mgr:
    step = mgr.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoints in {str(path)!r}")
    state, meta, data = _read(mgr, step)
  return {**state, "meta": meta, DATA_ITERATOR: data}
