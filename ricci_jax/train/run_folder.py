"""A run's folder: its identity (``config.json``, written once), what a resume may change, and loading it back.

A finished run must mean what its config says. So the config a run was created with is written to
``config.json`` when the run starts and never overwritten, and every later invocation on the same folder
is compared with it before any work (:func:`check_resume`):

* keys that change nothing the run computes (:data:`~ricci_jax.train.schema.OPERATIONAL_KEYS`: the
  progress bar, plots, how often logs and checkpoints are written, ...) may differ freely;
* keys that change only what is measured or how long the run lasts
  (:data:`~ricci_jax.train.schema.RESUMABLE_KEYS`, e.g. extending ``epochs``) may differ when the
  invocation names them in ``allow_changes``; the change is then appended to ``resumes.jsonl`` with the
  step it took effect at, and the run's config is ``config.json`` with those changes applied
  (:func:`effective_config`);
* any other difference (method, estimator, learning rate, data, model, seed, ...) is refused in one line
  that lists each differing key, old -> new, and the ways out.

Every resume is recorded in ``resumes.jsonl`` (step, total steps, allowed changes, the code's commit), so
a run that spans several invocations says so. :func:`load_run` gives a finished run's config, model and
variables back, e.g. to export it.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import ml_collections

from ricci_jax import data as data_lib
from ricci_jax import reporting
from ricci_jax.train import builders, checkpoints, schema

CONFIG_FILE = "config.json"
RESUMES_FILE = "resumes.jsonl"


class RunMismatchError(ValueError):
  """The config differs from the one the run in the folder was created with."""


def _flat(config: ml_collections.ConfigDict | Mapping) -> dict[str, Any]:
  """Dotted key -> JSON value (tuples as lists, inf as inf), for comparing configs across JSON."""
  data = json.loads(config.to_json_best_effort()) if isinstance(config, ml_collections.ConfigDict) else config
  out = {}
  for key, value in data.items():
    if isinstance(value, Mapping):
      out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
    else:
      out[key] = value
  return out


def effective_config(workdir: str | pathlib.Path) -> dict[str, Any] | None:
  """The run's config as dotted keys: ``config.json`` with the allowed changes of ``resumes.jsonl``; None if no run."""
  workdir = pathlib.Path(workdir)
  if not (workdir / CONFIG_FILE).is_file():
    return None
  flat = _flat(json.loads((workdir / CONFIG_FILE).read_text()))
  for record in reporting.read_jsonl(workdir / RESUMES_FILE):
    flat.update({k: new for k, (_, new) in record.get("changes", {}).items()})
  return flat


def _differences(saved: Mapping[str, Any], config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """Identity keys whose value differs: key -> (saved, new). A key the saved config lacks (added to the
  schema since) counts as its default; a key the schema no longer has is ignored."""
  new = _flat(config)
  defaults = _flat(schema.default_config())
  keys = set(new) | {k for k in saved if k.startswith("quant.hparams.")}
  out = {}
  for key in sorted(keys - schema.OPERATIONAL_KEYS):
    old = saved.get(key, defaults.get(key))
    if old != new.get(key):
      out[key] = (old, new.get(key))
  return out


def check_resume(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, tuple[Any, Any]] | None:
  """Compares ``config`` with the run in ``workdir`` before any work.

  Returns:
    None when the folder holds no run (a fresh start), else the allowed changes, key -> (old, new)
    (empty when nothing that matters changed).

  Raises:
    RunMismatchError: one line listing the differing keys (old -> new) and the ways out; or the folder
      holds checkpoints but no ``config.json``; or ``resume=False`` and the folder holds a run.
  """
  workdir = pathlib.Path(workdir)
  saved = effective_config(workdir)
  if saved is None:
    if any((workdir / "checkpoints").glob("[0-9]*")):
      raise RunMismatchError(f"{str(workdir)!r} holds checkpoints but no {CONFIG_FILE}, so its run cannot be "
                             "checked against this config; use another --workdir")
    return None
  if not config.resume:
    raise RunMismatchError(f"{str(workdir)!r} already holds a run and resume=False; use another --workdir "
                           "or delete the folder")
  diffs = _differences(saved, config)
  refused = {k: v for k, v in diffs.items() if k not in config.allow_changes}
  if refused:
    listed = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in refused.items())
    resumable = sorted(set(refused) & schema.RESUMABLE_KEYS)
    hint = f", or resume with allow_changes={','.join(resumable)} to record the change" if resumable else ""
    raise RunMismatchError(f"{str(workdir)!r} holds a run with another config ({listed}); use another "
                           f"--workdir{hint}")
  return diffs


def create(config: ml_collections.ConfigDict, workdir: str | pathlib.Path):
  """Writes the run's ``config.json`` (once: an existing one is never overwritten)."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if path.exists():
    return
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(config.to_json_best_effort(indent=2))
  tmp.replace(path)  # whole or absent, whenever the program is killed


def record_resume(workdir: str | pathlib.Path, step: int, total_steps: int, changes: Mapping[str, tuple]):
  """Appends one resume to ``resumes.jsonl``: where it started, the allowed changes, the code's commit."""
  reporting.JsonlWriter(pathlib.Path(workdir) / RESUMES_FILE).write({
      "step": step, "total_steps": total_steps, "changes": {k: list(v) for k, v in changes.items()},
      "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "source": reporting.source_version()})


class Run(NamedTuple):
  """A run loaded back from its folder (:func:`load_run`)."""

  config: ml_collections.ConfigDict
  model: Any  # the Linen model, or for model.api="nnx" the Functional view of the NNX one
  variables: dict  # params, batch_stats, quant (NumPy arrays)


def resolve_run_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  """The folder of the run ``workdir`` names: itself, or for a pruning run its last cycle.

  Raises:
    FileNotFoundError: no run there; or several seeds (name one: ``workdir/seed_0``).
  """
  workdir = pathlib.Path(workdir)
  if (workdir / "checkpoints").is_dir():
    return workdir
  cycles = sorted(p for p in workdir.glob("cycle_*") if (p / "checkpoints").is_dir())
  if cycles:
    return cycles[-1]
  seeds = sorted(p.name for p in workdir.glob("seed_*") if p.is_dir())
  if seeds:
    raise FileNotFoundError(f"{str(workdir)!r} holds several seeds ({', '.join(seeds)}); pass one of them")
  raise FileNotFoundError(f"{str(workdir)!r} holds no run (no checkpoints/ there); pass a run's --workdir")


def load_run(workdir: str | pathlib.Path) -> Run:
  """The config, model and variables of the run in ``workdir`` (its latest, verified checkpoint).

  For a pruning run, its last cycle. The model is rebuilt from the run's own config (with the number
  of classes of its dataset), so ``model.apply(variables, x, train=False)`` is the run's model.

  Example::

      config, model, variables = ricci_jax.train.load_run("runs/fm")
      packed = ricci_jax.export.pack(variables, model)
  """
  run = resolve_run_dir(workdir)
  saved = effective_config(run)
  if saved is None:
    raise FileNotFoundError(f"{str(run)!r} has no {CONFIG_FILE}; it was not written by the training program")
  config = config_from_flat(saved)
  state = checkpoints.load_checkpoint(run)
  model = builders.build_model(config, data_lib.get_spec(config.dataset.name).num_classes)
  variables = {"params": state["params"], "batch_stats": state.get("batch_stats", {}),
               "quant": state.get("quant", {})}
  return Run(config, model, variables)


def config_from_flat(flat: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """The training config with the dotted keys of ``flat`` set (JSON lists as tuples); unknown keys skipped."""
  config = schema.default_config()
  known = set(schema.flatten_keys(config))
  for key, value in flat.items():
    if key not in known and not key.startswith("quant.hparams."):
      continue  # a key this version of the schema no longer has
    *sections, leaf = key.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config
