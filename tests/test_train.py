"""The training program end to end: real and mock data, resume, devices, bad input."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments.configs import presets
from ricci_jax import train
from ricci_jax.models import inspect as rj_inspect

REPO = pathlib.Path(__file__).resolve().parents[1]
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _small(method="rfdnn", model="mlp", **kw):
  c = presets.fashion_mnist(method, model=model, epochs=2)
  c.dataset.train_limit = 2048
  c.dataset.test_limit = 1000
  c.batch_size = 64
  c.progress = False
  c.plots = False
  c.log_every_steps = 8
  c.checkpoint_every_steps = 10
  for k, v in kw.items():
    train.schema.apply_overrides(c, [f"{k}={v}"])
  return c


@needs_fashion
@pytest.mark.parametrize("method", ["clipped_ste", "rfdnn"])
def test_trains_well_above_chance_on_real_fashion_mnist(tmp_path, method):
  config = _small(method, model="lenet5", plots=True)
  summary = train.train(config, tmp_path)
  assert summary["final_test_accuracy"] > 0.6  # chance is 0.1
  assert summary["nonfinite_steps"] == 0
  assert summary["quantized_layers"] == ["conv1/kernel", "dense1/kernel", "dense2/kernel"]
  metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert metrics[-1]["step"] == 64 and "images_per_second" in metrics[-1]
  evals = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
  assert [e["epoch"] for e in evals] == [1, 2] and evals[-1]["examples"] == 1000
  assert (tmp_path / "training.png").stat().st_size > 10_000
  if method == "rfdnn":
    diags = [json.loads(x) for x in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
    layer = diags[-1]["layers"]["conv1/kernel"]
    assert 0 < layer["s"] < 1 and layer["dominant"] == 1.0
    assert layer["epsilon"] == "inf" and layer["gate_open_fraction"] == 1.0  # a setting: this gate cannot close
    assert (tmp_path / "diagnostics.png").stat().st_size > 10_000
    assert "ricci/residual_mean" in metrics[-1]


@needs_fashion
def test_resume_ends_with_exactly_the_parameters_of_an_uninterrupted_run(tmp_path):
  config = _small("rfdnn")  # rf_sgd: the optimizer state carries the metric history too
  train.train(config, tmp_path / "whole")
  interrupted = _small("rfdnn", stop_after_steps=23)  # mid-epoch, between checkpoints
  first = train.train(interrupted, tmp_path / "parts")
  assert first["interrupted"] and first["steps"] == 23
  # the input pipeline's Grain iterator state is in the checkpoint, at the model's step
  saved = train.load_checkpoint(tmp_path / "parts")
  assert int(saved["step"]) == 23 and saved["data_iterator"] == {"next_index": 23}
  assert train.load_checkpoint(tmp_path / "parts", 20)["data_iterator"] == {"next_index": 20}
  resumed = train.train(_small("rfdnn"), tmp_path / "parts")
  assert resumed["steps"] == 64 and not resumed["interrupted"]
  a, b = train.load_checkpoint(tmp_path / "whole"), train.load_checkpoint(tmp_path / "parts")
  assert int(a["step"]) == int(b["step"]) == 64
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(a["opt_state"]), jax.tree.leaves(b["opt_state"])):
    np.testing.assert_array_equal(x, y)
  # the metrics files hold each step once
  steps = [json.loads(x)["step"] for x in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps))


@needs_fashion
def test_train_seeds_does_not_retrain_a_finished_seed_even_without_its_checkpoints(tmp_path):
  config = _small("clipped_ste")
  config.seeds = [0, 1]
  first = train.train_seeds(config, tmp_path)
  shutil.rmtree(tmp_path / "seed_1" / "checkpoints")
  stamp = (tmp_path / "seed_1" / "metrics.jsonl").stat().st_mtime_ns
  again = train.train_seeds(config, tmp_path)
  assert again["runs"] == json.loads(json.dumps(first["runs"]))
  assert (tmp_path / "seed_1" / "metrics.jsonl").stat().st_mtime_ns == stamp  # not trained again
  other = _small("clipped_ste", epochs=1)
  other.seeds = [0, 1]
  stamp0 = (tmp_path / "seed_0" / "metrics.jsonl").stat().st_mtime_ns
  with pytest.raises(train.RunMismatchError, match=r"seed_0' holds a run with another config \(epochs: 2 -> 1\)"):
    train.train_seeds(other, tmp_path)  # another config in the same folders: refused, nothing touched
  assert (tmp_path / "seed_0" / "metrics.jsonl").stat().st_mtime_ns == stamp0


def test_mock_cifar10_resnet20_runs_through_the_tfds_pipeline(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = presets.cifar_paper("cifar10", "resnet20", method="rfdnn")
  overrides = ["dataset.source=tfds", "dataset.holdout_validation=False", "epochs=1", "batch_size=8",
               "progress=False", "plots=False", "log_every_steps=2", "rfdnn.fraction=0.5"]
  train.schema.apply_overrides(config, overrides)
  with tfds.testing.mock_data(num_examples=24):
    summary = train.train(config, tmp_path)
  assert summary["steps"] == 3 and summary["epochs_done"] == 1
  assert summary["quantized_layers"][0] == "conv_init/kernel"  # the paper's "all layers"
  assert np.isfinite(summary["final_test_accuracy"])


@needs_fashion
def test_nonfinite_losses_are_skipped_then_stop_the_run_with_a_checkpoint(tmp_path):
  config = _small("clipped_ste", **{"optimizer.learning_rate": 1e30, "max_consecutive_nonfinite": 3,
                                     "log_every_steps": 1, "optimizer.schedule": "constant"})
  with pytest.raises(train.NonFiniteLossError, match="3 consecutive steps were not finite"):
    train.train(config, tmp_path)
  state = train.load_checkpoint(tmp_path)
  assert int(state["nonfinite_total"]) >= 3 and int(state["nonfinite_streak"]) >= 3


@pytest.mark.parametrize("override,match", [
    ("epoch=3", "unknown config key 'epoch'; did you mean 'epochs'"),
    ("model.nam=mlp", "unknown config key 'model.nam'; did you mean 'model.name'"),
    ("model.name=resnet21", "unknown model 'resnet21'; valid: .*resnet20"),
    ("quant.estimator=straight", "unknown estimator 'straight'; valid: ste, clipped_ste"),
    ("optimizer.name=lion", "unknown optimizer 'lion'"),
    ("quant.weight_bits=17", r"bits must be an integer in \[1, 16\]"),
    ("rfdnn.shifts=(1, 1, 1, -1)", "k1 != k2"),
    ("rfdnn.fraction=0", r"rfdnn.fraction = 0.0 is out of range: allowed a number in \(0, 1\]"),
    ("batch_size=0", r"batch_size = 0 is out of range: allowed an integer in \[1, inf\)"),
    ("epochs=2.5", r"epochs = '2.5' is not an integer in \[1, inf\)"),
    ("rfdnn.metric=fisher", "unknown metric 'fisher'; valid: rank1, hessian_diagonal"),
    ("rfdnn.block=rows", "rfdnn.block: unknown block 'rows'; valid: layer, out_channel, kernel"),
    ("rfdnn.tau=median", "rfdnn.tau must be a positive number or one of auto, std"),
    ("rfdnn.tau=-1", "tau must be a positive number"),
    ("rfdnn.approx=diagonal", "tau='auto' keeps the rank-1 metric"),
    ("rfdnn.rho=-0.5", r"rfdnn.rho = -0.5 is out of range: allowed a number in \[0, inf\) or None"),
    ("rfdnn.epsilon_relative=-2.0", r"rfdnn.epsilon_relative = -2.0 is out of range: allowed a number in \(0, inf\)"),
    ("rfdnn.median_window=0", r"rfdnn.median_window = 0 is out of range: allowed an integer in \[1, inf\)"),
    ("rfdnn.control=shuffle", "unknown RF-DNN control 'shuffle'; valid: none, match_norm, random_direction"),
])
def test_bad_config_is_rejected_before_training(tmp_path, override, match):
  config = _small()
  with pytest.raises(ValueError, match=match):
    train.schema.apply_overrides(config, [override])
    train.schema.validate(config, tmp_path)


def test_batch_size_must_split_over_the_devices(tmp_path):
  config = _small(batch_size=64)
  with pytest.raises(ValueError, match="must split evenly over 1 host.*3 device"):
    train.schema.validate(config, tmp_path, device_count=3)


def test_unwritable_output_directory_is_rejected(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match="cannot be written"):
    train.schema.validate(_small(), blocker / "run")


def test_cli_rejects_an_unknown_key_with_the_closest_valid_ones(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/fashion_mnist.py:rfdnn",
       "--workdir", str(tmp_path), "--config.epoch=3"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip() == "error: unknown config key 'epoch'; did you mean 'epochs'?"


def test_cli_rejects_an_unknown_method():
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/fashion_mnist.py:nope"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and "unknown method 'nope'; valid methods:" in proc.stderr


@needs_fashion
def test_two_devices_give_the_result_of_one(tmp_path):
  """jit over a mesh of two forced CPU devices against one device (several processes: test_multihost.py)."""
  script = REPO / "tests" / "multidevice_train.py"
  for devices in ("1", "2"):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / devices)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert f"devices={devices}" in proc.stdout
  ref, other = train.load_checkpoint(tmp_path / "1"), train.load_checkpoint(tmp_path / "2")
  for x, y in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(other["params"])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  for x, y in zip(jax.tree.leaves(ref["batch_stats"]), jax.tree.leaves(other["batch_stats"])):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_a_block_that_does_not_divide_a_kernel_fails_before_training(tmp_path):
  config = _small("rfdnn", model="lenet5", **{"rfdnn.block": "7"})
  with pytest.raises(ValueError, match=r"conv1.*block=7 does not divide a kernel of shape \(5, 5, 6, 16\)"):
    train.train(config, tmp_path)
  assert not (tmp_path / "checkpoints").exists()


def _program_and_batch(config):
  import jax.numpy as jnp  # noqa: PLC0415

  from ricci_jax import layers  # noqa: PLC0415

  model = train.build_model(config, 10)
  x = jnp.zeros((1, 28, 28, 1))
  variables = model.init(jax.random.key(config.seed), x, train=False)
  mask = layers.quantized_kernel_mask(variables["params"], rj_inspect.quantized_kernels(model, x, train=False))
  program, state = train.build_program(config, model, variables, mask, steps_per_epoch=10)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8),
           "label": rng.integers(0, 10, 64).astype(np.int32), "mask": np.ones(64, bool)}
  return model, mask, program, state, batch


def test_the_programs_rfdnn_step_is_a_hand_written_rf_sgd_step():
  import functools  # noqa: PLC0415

  import jax.numpy as jnp  # noqa: PLC0415
  import optax  # noqa: PLC0415

  import ricci_jax as rj  # noqa: PLC0415
  from ricci_jax import data  # noqa: PLC0415

  config = _small("rfdnn_hessian", model="lenet5", **{"dataset.augment": "none", "rfdnn.rho": 0.5})
  model, mask, program, state, batch = _program_and_batch(config)
  new_state, _ = jax.jit(functools.partial(train.train_step, program))(state, batch)

  params = state.params
  images = data.preprocess("fashion_mnist", jnp.asarray(batch["image"]))
  labels = jnp.asarray(batch["label"])

  def loss(p, imgs, lab):
    logits, _ = model.apply({"params": p, "batch_stats": state.batch_stats, "quant": state.quant}, imgs,
                            train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, lab).mean()

  grads = jax.grad(loss)(params, images, labels)
  sub_images, sub_labels = np.asarray(images)[::8], labels[::8]  # rfdnn.fraction = 1/8, strided
  moved = [np.roll(sub_images, 1, axis=1), np.roll(sub_images, -1, axis=1),  # k1 = +1, k2 = -1 (rows)
           np.roll(sub_images, 1, axis=2), np.roll(sub_images, -1, axis=2)]  # j1 = +1, j2 = -1 (columns)
  per_shift = [jax.grad(loss)(params, jnp.asarray(m), sub_labels) for m in moved]
  translated = jax.tree.map(lambda *g: jnp.stack(g), *per_shift)

  def by_hand(shifted):
    tx = rj.rf_sgd(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, quantized=mask, tau="std",
                   tau_scale=1.0, metric="hessian_diagonal", rho=0.5, control_seed=config.seed)
    updates, _ = tx.update(grads, tx.init(params), params, translated_grads=shifted)
    return optax.apply_updates(params, updates)

  want = by_hand(translated)
  for got, ref in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-7)
  # the translated gradients matter: with zeros in their place the step is measurably different
  zero = by_hand(jax.tree.map(jnp.zeros_like, translated))
  kernel = lambda p: np.asarray(p["dense1"]["kernel"])  # noqa: E731
  gap = np.abs(kernel(zero) - kernel(want)).max()
  assert gap > 100 * np.abs(kernel(new_state.params) - kernel(want)).max() and gap > 1e-6


@needs_fashion
def test_a_gate_that_closes_freezes_the_quantized_kernels(tmp_path):
  config = _small("rfdnn", model="lenet5", stop_after_steps=6, log_every_steps=2, **{
      "rfdnn.epsilon": 1e-30, "optimizer.weight_decay": 0.0})
  train.train(config, tmp_path)
  first, last = train.load_checkpoint(tmp_path, 0), train.load_checkpoint(tmp_path)
  assert int(last["step"]) == 6
  for name in ("conv1", "dense1", "dense2"):
    np.testing.assert_array_equal(first["params"][name]["kernel"], last["params"][name]["kernel"])
  assert not np.array_equal(first["params"]["head"]["kernel"], last["params"]["head"]["kernel"])
  diags = [json.loads(x) for x in (tmp_path / "diagnostics.jsonl").read_text().splitlines()]
  for record in diags:
    for layer in record["layers"].values():
      assert layer["gate"] == 0.0 and layer["gate_open_fraction"] == 0.0 and layer["residual"] > 1e-30


@needs_fashion
def test_runs_record_the_commit_and_whether_the_tree_was_dirty(tmp_path):
  summary = train.train(_small("clipped_ste", stop_after_steps=2), tmp_path)
  head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
  assert summary["source"]["commit"] == head and isinstance(summary["source"]["dirty"], bool)
  assert json.loads((tmp_path / "results.json").read_text())["source"] == summary["source"]


def test_validation_of_one_output_folder_by_many_processes_at_once(tmp_path):
  """The processes of a multi-process run validate the same folder at the same time; their write probes must
  not delete each other's (a shared probe name failed a restarted two-process run)."""
  import concurrent.futures  # noqa: PLC0415

  script = ("import sys\nfrom experiments.configs import presets\nfrom ricci_jax import train\n"
            "c = presets.fashion_mnist('clipped_ste', model='mlp', epochs=1)\n"
            "for _ in range(200):\n  train.schema.validate(c, sys.argv[1])\n")
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    procs = list(pool.map(lambda _: subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], cwd=REPO,
                                                   capture_output=True, text=True, timeout=300), range(4)))
  for p in procs:
    assert p.returncode == 0, p.stderr[-2000:]
  assert not list((tmp_path / "run").glob(".write_probe*"))


def test_a_step_that_would_make_the_state_non_finite_is_not_taken_and_says_where():
  import functools  # noqa: PLC0415

  # a healthy RF-DNN step: its state holds NaN (the median window's empty slots) and inf (the gate bound) by design
  config = _small("rfdnn", model="lenet5", **{"rfdnn.epsilon_relative": 2.0})
  _, _, program, state, batch = _program_and_batch(config)
  assert any(not np.all(np.isfinite(x)) for x in jax.tree.leaves(state.opt_state))
  new_state, metrics = jax.jit(functools.partial(train.train_step, program))(state, batch)
  assert bool(metrics["finite"]) and int(metrics["nonfinite_at"]) == -1 and int(new_state.nonfinite_total) == 0
  # a learning rate that overflows float32: loss and gradients are finite, the new latent weights are not
  config = _small("clipped_ste", model="lenet5", **{"optimizer.learning_rate": 1e39, "optimizer.schedule": "constant"})
  _, _, program, state, batch = _program_and_batch(config)
  new_state, metrics = jax.jit(functools.partial(train.train_step, program))(state, batch)
  assert np.isfinite(float(metrics["loss"])) and not bool(metrics["finite"])
  names = train.steps.guarded_names(state)
  assert names[0] == "loss" and names[1].startswith("gradient of params/")
  assert names[int(metrics["nonfinite_at"])].startswith("params/")
  for old, new in zip(jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)):
    np.testing.assert_array_equal(old, new)  # the step was not taken
  assert int(new_state.step) == 1 and int(new_state.nonfinite_total) == 1 and int(new_state.nonfinite_streak) == 1
