"""Verified checkpoints, by fault injection: a flipped byte or a truncation in every kind of file a step
holds restores the newest intact step bit for bit, or is refused in one line; nothing else is possible.

No training here: the state is a real one (the training program's RF-DNN state of an MLP, whose optimizer
state holds NaN and inf by design), saved as the training loop saves it. End-to-end resumes after faults
are in tests/test_faults.py.
"""

import logging
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs import presets
from ricci_jax import layers, train
from ricci_jax.models import inspect as rj_inspect
from ricci_jax.train import checkpoints

# After Orbax gives up on a damaged step, TensorStore's callbacks still reach its closed event loop
# ("Event loop is closed", reported as unraisable); the CLI silences them (experiments/cli.py).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

FILE_KINDS = {  # a step's files, by kind: the glob (under the step) of the files to damage
    "array data": "state/ocdbt.process_0/d/*",
    "array index": "state/d/*",
    "array manifest": "state/ocdbt.process_0/manifest.ocdbt",
    "state manifest": "state/manifest.ocdbt",
    "tree metadata": "state/_METADATA",
    "step metadata": "_CHECKPOINT_METADATA",
    "commit marker": "commit_success.txt",
    "meta": "meta/metadata",
    "iterator state": "data_iterator/metadata",
    "checksum": "checksum/metadata",
}


def _state(seed: int):
  config = presets.fashion_mnist("rfdnn", model="mlp", epochs=1)
  model = train.build_model(config, 10)
  x = jnp.zeros((1, 28, 28, 1))
  variables = model.init(jax.random.key(seed), x, train=False)
  mask = layers.quantized_kernel_mask(variables["params"], rj_inspect.quantized_kernels(model, x, train=False))
  _, state = train.build_program(config, model, variables, mask, steps_per_epoch=10)
  return jax.device_get(state)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A run folder with steps 3 and 7 saved, each with its meta and iterator state; the states saved."""
  root = tmp_path_factory.mktemp("saved")
  states = {3: _state(0).replace(step=np.int32(3)), 7: _state(1).replace(step=np.int32(7))}
  mgr = checkpoints.manager(root, keep=2)
  for step, state in states.items():
    checkpoints.save(mgr, state, {"name": "test", "evals": [{"step": step, "accuracy": 0.5}]},
                     {"next_index": step})
  mgr.close()
  return root, states


def _assert_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # NaN == NaN here: the same bits


def _damage(path: pathlib.Path, how: str):
  data = bytearray(path.read_bytes())
  if how == "flip":
    data[len(data) // 2] ^= 0xFF
  else:  # truncate
    data = data[:len(data) // 2]
  path.write_bytes(bytes(data))


def _copy(saved, tmp_path):
  root, states = saved
  shutil.copytree(root / "checkpoints", tmp_path / "checkpoints")
  return tmp_path, states


@pytest.mark.parametrize("how", ["flip", "truncate"])
@pytest.mark.parametrize("kind", FILE_KINDS)
def test_a_damaged_file_restores_the_newest_intact_step_or_the_same_bits(saved, tmp_path, caplog, kind, how):
  run, states = _copy(saved, tmp_path)
  files = sorted((run / "checkpoints" / "7").glob(FILE_KINDS[kind]), key=lambda p: -p.stat().st_size)
  assert files, f"no {kind} file in a step: the layout changed"
  _damage(files[0], how)
  like = _state(0)
  mgr = checkpoints.manager(run, keep=2)
  with caplog.at_level(logging.WARNING, logger="ricci_jax"):
    state, meta, data = checkpoints.restore_newest_intact(mgr, like)
  step = int(state.step)
  _assert_equal(state, states[step])  # whichever step it gives, it is exactly what was saved there
  assert meta["evals"][0]["step"] == step and data == {"next_index": step}
  if step == 3:  # step 7 was refused, named in one line, and moved aside (not deleted)
    warned = [r.getMessage() for r in caplog.records if "checkpoint step 7" in r.getMessage()]
    assert warned and all("\n" not in w for w in warned) and "resuming from step 3" in warned[0]
    assert not (run / "checkpoints" / "7").exists()
    assert len(list((run / checkpoints.DAMAGED_DIR).glob("7-*"))) == 1
    assert mgr.latest_step() == 3
  if kind in ("array data", "meta", "iterator state", "checksum"):
    assert step == 3, f"a damaged {kind} file was not detected"


def test_a_flipped_byte_in_the_array_data_is_what_the_checksum_catches(saved, tmp_path):
  """Without the checksum, Orbax restores the damaged step; its values are not the saved ones."""
  run, states = _copy(saved, tmp_path)
  data = max((run / "checkpoints" / "7").glob(FILE_KINDS["array data"]), key=lambda p: p.stat().st_size)
  _damage(data, "flip")
  mgr = checkpoints.manager(run, keep=2)
  with pytest.raises(checkpoints.CheckpointError, match=r"^checkpoint step 7 in .* is (damaged|unreadable)"):
    checkpoints.restore(mgr, _state(0), 7)


def test_no_intact_step_is_refused_in_one_line_and_nothing_is_moved(saved, tmp_path):
  run, _ = _copy(saved, tmp_path)
  for step in ("3", "7"):
    _damage(max((run / "checkpoints" / step).glob(FILE_KINDS["array data"]), key=lambda p: p.stat().st_size),
            "truncate")
  before = sorted(p.relative_to(run) for p in run.rglob("*"))
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.restore_newest_intact(checkpoints.manager(run, keep=2), _state(0))
  message = str(e.value)
  assert "\n" not in message and message.startswith("no intact checkpoint to resume from: checkpoint step 7")
  assert "checkpoint step 3" in message and "Nothing was changed" in message
  assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def test_a_non_finite_latent_weight_is_refused_but_the_optimizers_by_design_nan_and_inf_are_not(tmp_path):
  good = _state(0)
  history = [x for x in jax.tree.leaves(good.opt_state) if not np.all(np.isfinite(x))]
  assert history, "the RF-DNN state should hold NaN (median window) or inf (gate bound) by design"
  bad = good.replace(step=np.int32(1), params=jax.tree.map(np.array, good.params))  # writable copies
  kernel = bad.params["dense1"]["kernel"]
  kernel[0, 0] = np.nan
  mgr = checkpoints.manager(tmp_path, keep=3)
  checkpoints.save(mgr, good, {}, None)
  checkpoints.save(mgr, bad, {}, None)
  with pytest.raises(checkpoints.CheckpointError, match=r"step 1 .* holds a non-finite value in params/dense1/kernel$"):
    checkpoints.restore(mgr, good)
  with pytest.raises(checkpoints.CheckpointError, match="non-finite value in params/dense1/kernel"):
    train.load_checkpoint(tmp_path, 1)  # also without a structure to restore into
  state, _, _ = checkpoints.restore_newest_intact(mgr, good)
  assert int(state.step) == 0


def test_load_checkpoint_verifies_and_does_not_fall_back(saved, tmp_path):
  run, states = _copy(saved, tmp_path)
  loaded = train.load_checkpoint(run)
  assert int(loaded["step"]) == 7 and loaded["data_iterator"] == {"next_index": 7}
  np.testing.assert_array_equal(loaded["params"]["dense1"]["kernel"], states[7].params["dense1"]["kernel"])
  _damage(max((run / "checkpoints" / "7").glob(FILE_KINDS["array data"]), key=lambda p: p.stat().st_size), "flip")
  with pytest.raises(checkpoints.CheckpointError, match="checkpoint step 7"):
    train.load_checkpoint(run)  # the latest step of a finished run is its result: no silent older one


def test_the_fingerprint_ignores_containers_and_key_order_but_not_one_bit():
  state = _state(0)
  raw = {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state,
         "quant": state.quant, "nonfinite_total": state.nonfinite_total, "nonfinite_streak": state.nonfinite_streak}
  meta = {"a": 1, "b": [0.5, {"c": None}]}
  f = checkpoints.fingerprint(state, meta, {"next_index": 4})
  assert checkpoints.fingerprint(dict(reversed(raw.items())), dict(reversed(meta.items())), {"next_index": 4}) == f
  kernel = np.array(state.params["dense1"]["kernel"])
  kernel.view(np.uint32)[3, 5] ^= 1  # the lowest bit of one weight
  flipped = state.replace(params={**state.params, "dense1": {**state.params["dense1"], "kernel": kernel}})
  assert checkpoints.fingerprint(flipped, meta, {"next_index": 4}) != f
  assert checkpoints.fingerprint(state, meta, {"next_index": 5}) != f
  assert checkpoints.fingerprint(state, {**meta, "a": 2}, {"next_index": 4}) != f
