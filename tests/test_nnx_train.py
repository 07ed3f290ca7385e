"""The training program trains the NNX zoo (``model.api="nnx"``) exactly as it trains the Linen zoo."""

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.configs import presets
from ricci_jax import layers, train
from ricci_jax.models import inspect as rj_inspect
from ricci_jax.nnx.functional import Functional

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


def _config(method="rfdnn", model="lenet5", **kw):
  c = presets.fashion_mnist(method, model=model, epochs=2)
  c.dataset.train_limit = 512
  c.dataset.test_limit = 256
  c.batch_size = 64
  c.progress = False
  c.plots = False
  c.log_every_steps = 4
  c.checkpoint_every_steps = 3
  for k, v in kw.items():
    train.schema.apply_overrides(c, [f"{k}={v}"])
  return c


def _steps(config, model, variables, mask, batches):
  program, state = train.build_program(config, model, variables, mask, steps_per_epoch=10)
  step = jax.jit(functools.partial(train.train_step, program))
  for batch in batches:
    state, _ = step(state, batch)
  return state


@pytest.mark.parametrize("model_name,shape", [("lenet5", (28, 28, 1)), ("resnet20", (32, 32, 3))])
def test_the_program_takes_the_same_steps_for_the_nnx_and_the_linen_zoo_model(model_name, shape):
  """Three RF-DNN steps (translated gradients, BN statistics, the Ricci-flow state) from the same weights."""
  dataset = "fashion_mnist" if model_name == "lenet5" else "cifar10"
  config = _config("rfdnn", model=model_name, **{"dataset.name": dataset})
  linen = train.build_model(config, 10)
  config_nnx = _config("rfdnn", model=model_name, **{"dataset.name": dataset, "model.api": "nnx"})
  view = train.build_model(config_nnx, 10)
  assert isinstance(view, Functional)
  x = jnp.zeros((1,) + shape)
  variables = linen.init(jax.random.key(0), x, train=False)
  kernels = rj_inspect.quantized_kernels(linen, x, train=False)
  assert view.quantized_kernels().keys() == kernels.keys()  # the same layers quantized, by the same rule
  mask = layers.quantized_kernel_mask(variables["params"], kernels)
  # the Linen variables fit the NNX model's collections leaf for leaf (same names and shapes)
  nnx_vars = view.init(jax.random.key(1), x)
  same = lambda a, b: jax.tree.map(lambda u, v: u.shape == v.shape, a, b)  # noqa: E731
  assert all(jax.tree.leaves(same(variables["params"], nnx_vars["params"])))
  assert all(jax.tree.leaves(same(variables["batch_stats"], nnx_vars["batch_stats"])))
  rng = np.random.default_rng(0)
  batches = [{"image": jnp.asarray(rng.integers(0, 256, (8,) + shape), jnp.uint8),
              "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32), "mask": jnp.ones(8, bool)}
             for _ in range(3)]
  a = _steps(config, linen, variables, mask, batches)
  b = _steps(config_nnx, view, {**nnx_vars, "params": variables["params"],
                                "batch_stats": variables["batch_stats"]}, mask, batches)
  for name in ("params", "batch_stats"):
    for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(getattr(a, name)),
                            jax.tree.leaves(getattr(b, name))):
      np.testing.assert_allclose(u, v, rtol=2e-5, atol=2e-6, err_msg=f"{name} {jax.tree_util.keystr(path)}")
  # and the weights moved: the comparison is not of two initial states
  moved = [float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a.params),
                                                           jax.tree.leaves(variables["params"]))]
  assert max(moved) > 1e-3


@needs_fashion
def test_an_nnx_run_trains_resumes_exactly_and_reports(tmp_path):
  config = _config("rfdnn", **{"model.api": "nnx"})  # 8 steps an epoch, 16 in all
  full = train.train(config, tmp_path / "full")
  assert full["quantized_layers"] == ["conv1/kernel", "dense1/kernel", "dense2/kernel"]
  assert full["final_test_accuracy"] > 0.3  # chance is 0.1
  totals = full["model_summary"]  # the summary read the NNX model: LeNet-5's counts
  assert (totals["params"], totals["quantized_params"], totals["batch_stats"]) == (61932, 60480, 452)
  train.train(_config("rfdnn", **{"model.api": "nnx", "stop_after_steps": 11}), tmp_path / "resumed")
  resumed = train.train(config, tmp_path / "resumed")
  assert resumed["steps"] == full["steps"] == 16
  ref, other = train.load_checkpoint(tmp_path / "full"), train.load_checkpoint(tmp_path / "resumed")
  for u, v in zip(jax.tree.leaves(ref["params"]), jax.tree.leaves(other["params"])):
    np.testing.assert_array_equal(u, v)
  evals = [json.loads(x) for x in (tmp_path / "resumed" / "eval.jsonl").read_text().splitlines()]
  assert [e["epoch"] for e in evals] == [1, 2]


def test_bad_nnx_configs_fail_before_training(tmp_path):
  with pytest.raises(ValueError, match=r"unknown NNX zoo model 'vgg_small'; valid: lenet5, resnet20"):
    train.train(_config(model="vgg_small", **{"model.api": "nnx"}), tmp_path)
  with pytest.raises(ValueError, match=r"unknown model API 'haiku'; valid: linen, nnx"):
    train.train(_config(**{"model.api": "haiku"}), tmp_path)
  with pytest.raises(ValueError, match="no Bi-Real shortcuts"):
    train.train(_config(model="resnet20", **{"model.api": "nnx", "model.bireal": True,
                                              "dataset.name": "cifar10"}), tmp_path)
  assert not (tmp_path / "checkpoints").exists()


class _WithDropout(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 2, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)

  def __call__(self, x):
    return self.drop(self.dense(x))


def test_the_functional_view_refuses_what_it_cannot_carry():
  with pytest.raises(ValueError, match="not parameters, batch statistics or quantizer hyperparameters"):
    Functional(_WithDropout)
  view = train.build_model(_config(**{"model.api": "nnx"}), 10)
  variables = view.init(jax.random.key(0))
  with pytest.raises(ValueError, match="can update only 'batch_stats'"):
    view.apply(variables, jnp.zeros((1, 28, 28, 1)), train=True, mutable=["params"])
  # eval mode reads the running statistics and changes nothing; train mode returns new ones
  x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
  out, new = view.apply(variables, x, train=True, mutable=["batch_stats"])
  changed = [not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(new["batch_stats"]),
                                                       jax.tree.leaves(variables["batch_stats"]))]
  assert any(changed) and out.shape == (4, 10)
  np.testing.assert_array_equal(view.apply(variables, x), view.apply(variables, x))


def test_rf_dnn_diagnostics_are_read_from_an_nnx_optimizer_after_a_jitted_step():
  """nnx.jit hands an nnx.Optimizer's NamedTuple states back as variables around mappings."""
  import optax  # noqa: PLC0415

  import ricci_jax as rj  # noqa: PLC0415
  from ricci_jax import diagnostics  # noqa: PLC0415
  from ricci_jax import nnx as rjn  # noqa: PLC0415
  from ricci_jax.nnx.zoo import LeNet5  # noqa: PLC0415

  model = rjn.quantize(LeNet5(rngs=nnx.Rngs(0)), rj.QuantRule(weight=rj.TensorQuant(bits=1)))
  tx = rj.rf_sgd(0.1, quantized=rjn.kernel_mask(model))
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), nnx.state(model, nnx.Param))
  shifted = jax.tree.map(lambda g: jnp.stack([g * (1 + 0.1 * i) for i in range(4)]), grads)

  @nnx.jit
  def step(optimizer, model, grads, shifted):
    optimizer.update(model, grads, translated_grads=nnx.as_pure(shifted))

  step(optimizer, model, grads, shifted)
  grads, shifted = nnx.as_pure(grads), nnx.as_pure(shifted)
  got = diagnostics.layer_diagnostics(optimizer.opt_state)
  _, state = tx.update(grads, tx.init(params), params, translated_grads=shifted)
  want = diagnostics.layer_diagnostics(state)
  assert sorted(got) == sorted(want) == ["conv1/kernel", "dense1/kernel", "dense2/kernel"]
  for name in want:
    for field in ("tau", "s", "correction", "residual"):
      np.testing.assert_allclose(getattr(got[name], field), getattr(want[name], field), rtol=1e-6)
  assert float(want["conv1/kernel"].residual) > 0 and optax is not None


def test_dead_neuron_counts_of_a_quantized_nnx_model_equal_the_linen_models():
  """nnx.capture adds a bookkeeping entry to every module, the quantizing ops' hyperparameter dicts included."""
  import ricci_jax as rj  # noqa: PLC0415
  from ricci_jax import dead_neurons, models  # noqa: PLC0415
  from ricci_jax import nnx as rjn  # noqa: PLC0415
  from ricci_jax.nnx.zoo import LeNet5, load_linen_variables  # noqa: PLC0415

  rule = rj.QuantRule(weight=rj.TensorQuant(bits=1))
  linen = models.create("lenet5", num_classes=10, quant=rule)
  x = jax.random.normal(jax.random.key(0), (6, 28, 28, 1))
  variables = linen.init(jax.random.key(1), x, train=False)
  model = load_linen_variables(rjn.quantize(LeNet5(rngs=nnx.Rngs(2)), rule), variables)
  mask = jnp.array([True] * 5 + [False])
  want = dead_neurons.relu_activity(linen, variables, x, train=True, mask=mask)
  got = dead_neurons.nnx_relu_activity(model, x, mask, train=True)
  assert sorted(got.positive) == ["relu1", "relu_dense1", "relu_dense2", "relu_init"]
  for site in want.positive:
    np.testing.assert_array_equal(got.positive[site], want.positive[site])
  assert int(got.examples) == 5
  rjn.set_hparams(model, clip=2.0)  # still sets the hyperparameters after a capture
  assert float(model.dense1.dot_general.weight["clip"][...]) == 2.0


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed")
def test_an_nnx_model_is_pruned_by_the_training_program(tmp_path):
  config = _config("rfdnn", **{"model.api": "nnx", "pruning.cycles": 1, "pruning.ap_share": 0.02,
                               "dnr.every_steps": 4, "dnr.test": True, "epochs": 1})
  summary = train.train_pruned(config, tmp_path)
  assert [r["alive"] for r in summary["cycles"]] == [60480, 48384]
  state = train.load_checkpoint(tmp_path / "cycle_01")
  zeros = sum(int(np.sum(np.asarray(state["params"][k]["kernel"]) == 0)) for k in ("conv1", "dense1", "dense2"))
  assert zeros == 60480 - 48384
  assert 0 < summary["cycles"][1]["dnr_test"] < 1
