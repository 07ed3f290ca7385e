"""Pruning in the training program: cycles, masks kept through every optimizer, rewinding, exact resume,
the dead-neuron rates, bad input before training."""

import json
import pathlib

import jax
import numpy as np
import pytest

from experiments.configs import presets
from ricci_jax import train
from ricci_jax.train import cycles, loop

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.skipif(
    not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _config(method="clipped_ste", **kw):
  c = presets.fashion_mnist(method, model="lenet5", epochs=1)
  c.dataset.train_limit = 512
  c.dataset.test_limit = 256
  c.batch_size = 64  # 8 steps a cycle
  c.progress = False
  c.plots = False
  c.log_every_steps = 4
  c.checkpoint_every_steps = 3
  c.pruning.cycles = 3
  for k, v in kw.items():
    train.schema.apply_overrides(c, [f"{k}={v}"])
  return c


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


PRUNABLE = ("['conv1']['kernel']", "['dense1']['kernel']", "['dense2']['kernel']")  # inner: not conv_init, head


@pytest.mark.parametrize("method,rewind", [("rfdnn", "init"), ("clipped_ste", "none")])
def test_cycles_prune_a_fifth_each_keep_pruned_weights_at_zero_and_cycle_0_is_the_dense_run(tmp_path, method,
                                                                                           rewind):
  config = _config(method, **{"pruning.ap_share": 0.02, "pruning.rewind": rewind, "dnr.every_steps": 2,
                              "dnr.test": True, "plots": True})
  summary = train.train_pruned(config, tmp_path / "pruned")
  rows = summary["cycles"]
  alive = 5 * 5 * 6 * 16 + 400 * 120 + 120 * 84  # the three inner kernels, counted by hand
  assert [r["alive"] for r in rows] == [alive, round(0.8 * alive), round(0.8 * round(0.8 * alive)),
                                        round(0.8 * round(0.8 * round(0.8 * alive)))]
  for r in rows[1:]:  # AP removes its 2% of the alive weights before the cycle, the host the rest
    before = rows[r["cycle"] - 1]["alive"]
    assert r["ap_removed"] == r["ap_budget"] == round(0.02 * before)
    assert r["host_removed"] + r["ap_removed"] == before - r["alive"]
  for r in rows:
    state = train.load_checkpoint(tmp_path / "pruned" / f"cycle_{r['cycle']:02d}")
    params = _flat(state["params"])
    zeros = sum(int(np.sum(params[k] == 0)) for k in PRUNABLE)
    assert zeros == alive - r["alive"], r["cycle"]  # every pruned weight is exactly 0 after the cycle's training
    others = [k for k in params if k not in PRUNABLE]
    assert all(np.all(params[k] != 0) for k in others if k.endswith("['kernel']"))  # first and last: dense
    if r["cycle"]:
      masks = _flat(state["masks"])
      assert all(np.array_equal(params[k] == 0, ~masks[k]) for k in PRUNABLE)
    assert 0 < r["dnr_train"] < 1 and 0 < r["dnr_test"] < 1
  lines = (tmp_path / "pruned" / "cycles.jsonl").read_text().splitlines()
  assert [json.loads(x)["cycle"] for x in lines] == [0, 1, 2, 3]
  assert (tmp_path / "pruned" / "pruning.png").stat().st_size > 10_000
  assert (tmp_path / "pruned" / "cycle_02" / "dnr.png").stat().st_size > 10_000
  records = [json.loads(x) for x in (tmp_path / "pruned" / "cycle_02" / "dnr.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["mode"] == "train"] == [2, 4, 6, 8]
  assert records[-1]["mode"] == "eval" and records[-1]["sparsity"] == pytest.approx(rows[2]["sparsity"])
  assert sorted(records[0]["dnr"]) == ["global", "relu1", "relu_dense1", "relu_dense2", "relu_init"]
  if rewind != "init":  # one dense reference is enough
    return
  dense = loop.train(_config(method, **{"pruning.cycles": 0}), tmp_path / "dense")
  reference = _flat(train.load_checkpoint(tmp_path / "dense")["params"])
  cycle0 = _flat(train.load_checkpoint(tmp_path / "pruned" / "cycle_00")["params"])
  assert all(np.array_equal(reference[k], cycle0[k]) for k in reference)
  assert dense["final_test_accuracy"] == rows[0]["final_test_accuracy"]


def test_lottery_ticket_rewinding_starts_each_cycle_from_the_masked_initialisation(tmp_path):
  config = _config(**{"pruning.cycles": 1, "keep_checkpoints": 20})
  train.train_pruned(config, tmp_path)
  init = _flat(train.load_checkpoint(tmp_path / "cycle_00", step=0)["params"])
  start = train.load_checkpoint(tmp_path / "cycle_01", step=0)
  masks = _flat(start["masks"])
  for key, value in _flat(start["params"]).items():
    np.testing.assert_array_equal(value, np.where(masks[key], init[key], 0))


def test_late_rewinding_starts_each_cycle_at_the_rewind_step_with_its_weights(tmp_path):
  config = _config(**{"pruning.cycles": 1, "pruning.rewind": "early", "pruning.rewind_step": 3,
                      "keep_checkpoints": 20, "checkpoint_every_steps": 1})
  summary = train.train_pruned(config, tmp_path)
  assert summary["steps"] == 8  # the cycle trains the dense run's steps 3..8
  at3 = _flat(train.load_checkpoint(tmp_path / "cycle_00", step=3)["params"])
  start = train.load_checkpoint(tmp_path / "cycle_01", step=3)
  assert int(start["step"]) == 3
  masks = _flat(start["masks"])
  for key, value in _flat(start["params"]).items():
    np.testing.assert_array_equal(value, np.where(masks[key], at3[key], 0))


def test_a_run_killed_in_cycle_2_resumes_in_cycle_2_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
  config = _config("rfdnn", **{"pruning.ap_share": 0.02})
  train.train_pruned(config, tmp_path / "full")
  real_train, calls = loop.train, []

  def killed_in_cycle_2(cfg, workdir, start=None):
    calls.append(pathlib.Path(workdir).name)
    if pathlib.Path(workdir).name == "cycle_02":
      cfg = cfg.copy_and_resolve_references()
      cfg.stop_after_steps = 5  # mid-cycle, between checkpoints
      real_train(cfg, workdir, start=start)
      raise KeyboardInterrupt
    return real_train(cfg, workdir, start=start)

  monkeypatch.setattr(loop, "train", killed_in_cycle_2)
  with pytest.raises(KeyboardInterrupt):
    train.train_pruned(config, tmp_path / "resumed")
  monkeypatch.setattr(loop, "train", lambda *a, **k: (calls.append(pathlib.Path(a[1]).name), real_train(*a, **k))[1])
  train.train_pruned(config, tmp_path / "resumed")
  assert calls == ["cycle_00", "cycle_01", "cycle_02", "cycle_02", "cycle_03"]  # finished cycles not retrained
  for cycle in ("cycle_02", "cycle_03"):
    a = _flat(train.load_checkpoint(tmp_path / "full" / cycle)["params"])
    b = _flat(train.load_checkpoint(tmp_path / "resumed" / cycle)["params"])
    assert all(np.array_equal(a[k], b[k]) for k in a), cycle


@pytest.mark.parametrize("overrides,message", [
    ({"pruning.cycles": 0, "pruning.target_sparsity": 1.0},
     r"pruning.target_sparsity = 1.0 is out of range: allowed a number in \[0, 1\) or None"),
    ({"pruning.ap_share": 0.3}, "an AP share larger than the cycle's rate"),
    ({"pruning.rewind": "early", "pruning.rewind_step": 8}, r"pruning: .*rewind_step.*\(1 epochs of 8 steps\)"),
    ({"pruning.exclude": ("conv1", "dense1", "dense2")}, "selects no"),
    ({"pruning.nm": "3:7"}, r"pruning.nm: .*divisible by M; leaf 'conv1/kernel' has length 6"),
    ({"pruning.nm": "4:2"}, "0 < N < M"),
    ({"pruning.rate": 1.0}, r"pruning.rate = 1.0 is out of range: allowed a number in \(0, 1\)"),
])
def test_bad_pruning_configs_fail_before_training(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.train_pruned(_config(**overrides), tmp_path)
  assert not (tmp_path / "cycle_00" / "checkpoints").exists()


def test_the_cycle_table_and_train_seeds_route_pruned_configs(tmp_path):
  config = _config(**{"pruning.cycles": 1, "seeds": (0, 1)})
  summary = train.train_seeds(config, tmp_path)
  assert [len(run["cycles"]) for run in summary["runs"]] == [2, 2]
  table = cycles.cycle_table(summary["runs"][0]["cycles"])
  assert table.splitlines()[2].startswith("| 0 | 100.0 | 0 | 0 |")
  assert table.splitlines()[3].startswith("| 1 | 80.0 |")
