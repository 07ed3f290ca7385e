"""Flax NNX models: quantized in place by a rule, trained with RF-DNN (ricci_jax.nnx)."""

import os
import pathlib
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import ricci_jax as rj
from ricci_jax import models
from ricci_jax import nnx as rjn
from ricci_jax.nnx.zoo import CifarResNet, LeNet5, load_linen_variables

W1 = rj.TensorQuant(bits=1)  # sign forward, clipped STE backward (|w| <= clip)
W1A1 = rj.QuantRule(layers="all", weight=W1, act=rj.TensorQuant(bits=1))


class Net(nnx.Module):
  """Defined in one order (head first), called in another."""

  def __init__(self, rngs):
    self.head = nnx.Linear(16, 10, rngs=rngs)
    self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.conv2 = nnx.Conv(4, 8, (3, 3), rngs=rngs)
    self.blocks = nnx.List([nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 16, rngs=rngs)])

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv1(x)))
    x = nnx.relu(self.conv2(x)).mean((1, 2))
    for layer in self.blocks:
      x = nnx.relu(layer(x))
    return self.head(x)


class One(nnx.Module):
  def __init__(self, layer):
    self.layer = layer

  def __call__(self, x):
    return self.layer(x)


def _flat(tree):
  return {"/".join(map(str, k)): np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree).items()}


# ----------------------------------------------------------------------------
# One quantized layer against the formulas (NumPy).
# ----------------------------------------------------------------------------


def test_linear_forward_is_sign_w_and_backward_is_the_clipped_ste_of_the_float_gradient():
  layer = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
  w = np.asarray(jax.random.normal(jax.random.key(1), (5, 3))) * 1.2  # some |w| > 1
  b = np.asarray(jax.random.normal(jax.random.key(2), (3,)))
  layer.kernel[...], layer.bias[...] = jnp.asarray(w), jnp.asarray(b)
  model = rjn.quantize(One(layer), rj.QuantRule(layers="all", weight=W1))
  x = np.asarray(jax.random.normal(jax.random.key(3), (4, 5)))
  sign_w = np.where(w >= 0, 1.0, -1.0)
  np.testing.assert_allclose(model(jnp.asarray(x)), x @ sign_w + b, rtol=1e-6, atol=1e-6)
  # L = sum(y * c): dL/dW_q = x^T c, then the clipped STE mask 1[|w| <= 1]
  c = np.asarray(jax.random.normal(jax.random.key(4), (4, 3)))
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x)) * c))(model)
  np.testing.assert_allclose(grads["layer"]["kernel"][...], (x.T @ c) * (np.abs(w) <= 1.0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(grads["layer"]["bias"][...], c.sum(0), rtol=1e-5, atol=1e-6)
  # a traced hyperparameter value is what the backward uses
  rjn.set_hparams(model, clip=0.5)
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x)) * c))(model)
  np.testing.assert_allclose(grads["layer"]["kernel"][...], (x.T @ c) * (np.abs(w) <= 0.5), rtol=1e-5, atol=1e-6)


def test_linear_with_quantized_input_is_sign_x_times_sign_w():
  layer = nnx.Linear(6, 2, use_bias=False, rngs=nnx.Rngs(0))
  model = rjn.quantize(One(layer), W1A1)
  w = np.asarray(layer.kernel[...])
  x = np.asarray(jax.random.normal(jax.random.key(3), (3, 6)))
  want = np.where(x >= 0, 1.0, -1.0) @ np.where(w >= 0, 1.0, -1.0)
  np.testing.assert_array_equal(model(jnp.asarray(x)), want)


def test_conv_forward_and_backward_against_the_float_conv_at_sign_w():
  conv = nnx.Conv(3, 4, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=nnx.Rngs(0))
  w = np.asarray(conv.kernel[...]) * 4.0  # spread |w| across 1
  conv.kernel[...] = jnp.asarray(w)
  float_conv = nnx.clone(conv)
  model = rjn.quantize(One(conv), rj.QuantRule(layers="all", weight=W1))
  x = jax.random.normal(jax.random.key(3), (2, 9, 9, 3))
  c = jax.random.normal(jax.random.key(4), (2, 5, 5, 4))
  sign_w = np.where(w >= 0, 1.0, -1.0).astype(np.float32)
  float_conv.kernel[...] = jnp.asarray(sign_w)
  np.testing.assert_allclose(model(x), float_conv(x), rtol=1e-6, atol=1e-6)
  g_float = nnx.grad(lambda m: jnp.sum(m(x) * c))(float_conv)["kernel"][...]  # dL/dW_q at W_q = sign(W)
  g = nnx.grad(lambda m: jnp.sum(m(x) * c))(model)["layer"]["kernel"][...]
  assert np.abs(w).max() > 1 and np.abs(w).min() < 1
  np.testing.assert_allclose(g, np.asarray(g_float) * (np.abs(w) <= 1.0), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------
# The rule selects exactly the layers it names.
# ----------------------------------------------------------------------------


def test_inner_is_all_but_the_first_and_last_in_call_order_with_inputs_else_definition_order():
  x = jnp.ones((2, 8, 8, 1))
  rule = rj.QuantRule(weight=W1)
  by_call = rjn.plan(Net(nnx.Rngs(0)), rule, x)
  assert list(by_call) == ["conv1", "conv2", "blocks/0", "blocks/1", "head"]
  assert [p for p, c in by_call.items() if c is not None] == ["conv2", "blocks/0", "blocks/1"]
  by_definition = rjn.plan(Net(nnx.Rngs(0)), rule)
  assert list(by_definition) == ["head", "conv1", "conv2", "blocks/0", "blocks/1"]
  assert [p for p, c in by_definition.items() if c is not None] == ["conv1", "conv2", "blocks/0"]
  model = rjn.quantize(Net(nnx.Rngs(0)), rule, x)
  assert {p for p, c in rjn.quant_plan(model).items() if c is not None} == {"conv2", "blocks/0", "blocks/1"}
  mask = _flat(rjn.kernel_mask(model))
  assert {k for k, v in mask.items() if v} == {"conv2/kernel", "blocks/0/kernel", "blocks/1/kernel"}
  assert set(mask) == set(_flat(nnx.state(model, nnx.Param)))


def test_all_none_and_overrides():
  x = jnp.ones((2, 8, 8, 1))
  assert all(c is not None for c in rjn.plan(Net(nnx.Rngs(0)), rj.QuantRule(layers="all", weight=W1), x).values())
  rule = rj.QuantRule(layers="none", weight=W1, overrides={r"blocks/\d+": rj.QuantConfig(weight=W1)})
  assert [p for p, c in rjn.plan(Net(nnx.Rngs(0)), rule, x).items() if c] == ["blocks/0", "blocks/1"]
  rule = rj.QuantRule(layers="all", weight=W1, overrides={"head": None, "conv.*": rj.QuantConfig(act=W1)})
  got = rjn.plan(Net(nnx.Rngs(0)), rule, x)
  assert got["head"] is None and got["conv1"].weight is None and got["conv1"].act == W1
  assert got["blocks/0"].weight == W1


def test_quantizing_keeps_the_param_state_and_a_float_checkpoint_loads():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 1))
  trained = Net(nnx.Rngs(7))
  model = rjn.quantize(Net(nnx.Rngs(0)), rj.QuantRule(weight=W1), x)
  assert jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(model, nnx.Param))) == \
      jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(trained, nnx.Param)))
  nnx.update(model, nnx.state(trained, nnx.Param))
  ref = rjn.quantize(nnx.clone(trained), rj.QuantRule(weight=W1), x)
  np.testing.assert_array_equal(model(x), ref(x))
  assert set(_flat(nnx.state(model, rjn.QuantHparam))) == {
      "conv2/conv_general_dilated/weight/clip", "blocks/0/dot_general/weight/clip",
      "blocks/1/dot_general/weight/clip"}


# ----------------------------------------------------------------------------
# NNX LeNet-5 = Linen LeNet-5 with the same weights.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,quantized", [("lenet5", False), ("lenet5", True), ("resnet20", True)])
def test_nnx_zoo_models_equal_the_linen_zoo_models(name, quantized):
  rule = rj.QuantRule(weight=rj.TensorQuant(bits=1, estimator="reste", scale="tensor")) if quantized else None
  linen = models.create(name, num_classes=10, quant=rule)
  n = 8 if name == "lenet5" else 2
  x = jax.random.normal(jax.random.key(0), (n, *models.input_shape(name)))
  y = jnp.arange(n) % 10
  variables = linen.init(jax.random.key(1), x, train=False)
  model = LeNet5(rngs=nnx.Rngs(0)) if name == "lenet5" else CifarResNet(20, rngs=nnx.Rngs(0))
  load_linen_variables(model, variables)
  if quantized:
    rjn.quantize(model, rule, x)
    linen_plan = {p for p, c in models.layer_plan(linen, x, train=False).items() if c}
    assert {p for p, c in rjn.quant_plan(model).items() if c} == linen_plan
  model.eval()
  np.testing.assert_array_equal(model(x), linen.apply(variables, x, train=False))

  def linen_loss(params):
    logits, upd = linen.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (logits, upd)

  (l_ref, (logits_ref, upd)), g_ref = jax.value_and_grad(linen_loss, has_aux=True)(variables["params"])
  model.train()

  def nnx_loss(m):
    logits = m(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  (l, logits), g = nnx.value_and_grad(nnx_loss, has_aux=True)(model)
  np.testing.assert_array_equal(logits, logits_ref)
  assert float(l) == float(l_ref)
  got, want = _flat(g), _flat(g_ref)
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  stats = _flat(nnx.state(model, nnx.BatchStat))
  for k, v in _flat(upd["batch_stats"]).items():
    np.testing.assert_allclose(stats[k], v, rtol=1e-6, atol=1e-7, err_msg=k)


# ----------------------------------------------------------------------------
# Training: nnx.Optimizer = the functional optax step; no recompilation.
# ----------------------------------------------------------------------------


def _loss(m, batch):
  return optax.softmax_cross_entropy_with_integer_labels(m(batch["image"]), batch["label"]).mean()


def _batch(seed=1):
  return {"image": jax.random.normal(jax.random.key(seed), (16, 8, 8, 1)), "label": jnp.arange(16) % 10}


def test_nnx_optimizer_step_with_rf_sgd_equals_the_functional_optax_step():
  x = _batch()["image"]
  model = rjn.quantize(Net(nnx.Rngs(0)), rj.QuantRule(weight=W1), x)
  model.eval()  # running statistics: the loss is a function of the params only
  twin = nnx.clone(model)
  tx = rj.rf_sgd(0.05, quantized=rjn.kernel_mask(model))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  f, params = rjn.param_loss(twin, _loss)
  params = nnx.as_pure(params)
  opt_state = tx.init(params)
  for step in range(3):
    batch = _batch(step)
    grads = nnx.grad(_loss)(model, batch)
    optimizer.update(model, grads, translated_grads=rjn.translated_grads(model, _loss, batch))

    g = jax.grad(f)(params, batch)
    shifted = rj.translated_grads(f, params, batch)
    updates, opt_state = tx.update(g, opt_state, params, translated_grads=shifted)
    params = optax.apply_updates(params, updates)
  got, want = _flat(nnx.state(model, nnx.Param)), _flat(params)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
  assert any(not np.array_equal(got[k], _flat(nnx.state(twin, nnx.Param))[k]) for k in want)


def test_scale_by_lne_through_split_and_merge_in_jit_and_a_schedule_never_recompiles():
  x = _batch()["image"]
  model = rjn.quantize(Net(nnx.Rngs(0)), rj.QuantRule(weight=rj.TensorQuant(bits=1, estimator="reste")), x)
  graphdef, params, hparams, rest = nnx.split(model, nnx.Param, rjn.QuantHparam, ...)
  mask = rjn.kernel_mask(model)
  tx = optax.partition({"lne": optax.chain(rj.scale_by_lne(), optax.sgd(0.05)), "sgd": optax.sgd(0.05)},
                       jax.tree.map(lambda m: "lne" if m else "sgd", mask))
  opt_state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, hparams, rest, opt_state, batch, o):
    traces.append(1)

    def loss(p):
      m = nnx.merge(graphdef, p, hparams, rest, copy=True)  # fresh variables at this trace level
      rjn.set_hparams(m, o=o)  # a scheduled hyperparameter, traced
      out = _loss(m, batch)
      return out, nnx.state(m, nnx.BatchStat)

    (value, stats), g = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  before = _flat(params)
  for i, o in enumerate([1.0, 3.0, 10.0]):
    params, opt_state, value = step(params, hparams, rest, opt_state, _batch(i), jnp.float32(o))
    assert np.isfinite(float(value))
  rjn.set_hparams(model, t=0.5)  # changing the hparams state itself: still data
  _, hparams, _ = nnx.split(model, rjn.QuantHparam, ...)
  step(params, hparams, rest, opt_state, _batch(5), jnp.float32(2.0))
  assert len(traces) == 1
  assert any(not np.array_equal(before[k], v) for k, v in _flat(params).items())


def test_a_schedule_through_nnx_jit_never_recompiles():
  model = rjn.quantize(Net(nnx.Rngs(0)), rj.QuantRule(weight=rj.TensorQuant(bits=1, estimator="reste")))
  optimizer = nnx.Optimizer(model, optax.sgd(0.01), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, optimizer, batch, o):
    traces.append(1)
    rjn.set_hparams(model, o=o)
    grads = nnx.grad(_loss)(model, batch)
    optimizer.update(model, grads)

  for i, o in enumerate([1.0, 2.0, 4.0]):
    step(model, optimizer, _batch(i), jnp.float32(o))
  assert len(traces) == 1
  assert {float(v) for k, v in _flat(nnx.state(model, rjn.QuantHparam)).items() if k.endswith("/o")} == {4.0}


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def test_a_rule_that_selects_nothing_lists_the_layer_paths():
  two = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"quantizes no layer.*layers/0, layers/1"):
    rjn.quantize(two, rj.QuantRule(weight=W1))  # inner of two layers: none
  with pytest.raises(ValueError, match=r"\['dense9'\] match no layer.*conv1, conv2, blocks/0"):
    rjn.quantize(Net(nnx.Rngs(0)), rj.QuantRule(weight=W1, overrides={"dense9": None}))


def test_a_selected_layer_we_cannot_quantize_is_named_with_the_supported_types():
  class Mixed(nnx.Module):
    def __init__(self, rngs):
      self.first = nnx.Linear(3, 4, rngs=rngs)
      self.general = nnx.LinearGeneral(4, (2, 2), rngs=rngs)
      self.last = nnx.Linear(4, 2, rngs=rngs)

  with pytest.raises(ValueError, match=r"'general', an nnx.LinearGeneral.*nnx.Linear, nnx.Conv"):
    rjn.quantize(Mixed(nnx.Rngs(0)), rj.QuantRule(weight=W1))
  model = rjn.quantize(Mixed(nnx.Rngs(0)), rj.QuantRule(layers="all", weight=W1, overrides={"general": None}))
  assert rjn.quant_plan(model)["first"] is not None


def test_quantizing_twice_and_other_bad_calls_are_refused():
  model = rjn.quantize(Net(nnx.Rngs(0)), rj.QuantRule(weight=W1))
  with pytest.raises(ValueError, match="already quantized"):
    rjn.quantize(model, rj.QuantRule(weight=W1))
  with pytest.raises(ValueError, match="QuantRule"):
    rjn.quantize(Net(nnx.Rngs(0)), rj.QuantConfig(weight=W1))
  with pytest.raises(ValueError, match="NNX module"):
    rjn.quantize(models.create("lenet5", num_classes=10), rj.QuantRule(weight=W1))
  with pytest.raises(ValueError, match=r"no quantized operand has hyperparameter\(s\) \['o'\]; present: \['clip'\]"):
    rjn.set_hparams(model, o=1.0)


# ----------------------------------------------------------------------------
# The example program, in small mode.
# ----------------------------------------------------------------------------


def test_the_nnx_example_runs_in_small_mode(capsys):
  from experiments import nnx_example
  default = pathlib.Path(os.environ.get("RICCI_JAX_DATA_DIR", "/usr/share/datasets")) / "fashion-mnist"
  if not (default / "train-images-idx3-ubyte.gz").exists():
    pytest.skip("Fashion-MNIST files not found")
  result = nnx_example.main(["--small", "--data-dir", str(default)])
  out = capsys.readouterr().out
  assert "'conv1': 'float'" in out and "'conv2': '1-bit'" in out and "'out': 'float'" in out
  assert np.isfinite(result["loss"]) and 0.0 <= result["test_accuracy"] <= 1.0
  assert result["served_exactly"] and "served logits equal the model's bit for bit: True" in out


# ----------------------------------------------------------------------------
# nnx.Einsum (a simple one) and a masked nnx.Conv.
# ----------------------------------------------------------------------------


class _WithEinsum(nnx.Module):
  def __init__(self, rngs, equation="bd,df->bf"):
    self.first = nnx.Linear(8, 12, rngs=rngs)
    self.mix = nnx.Einsum(equation, (12, 16), (16,), rngs=rngs)
    self.last = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, x):
    return self.last(nnx.relu(self.mix(nnx.relu(self.first(x)))))


def test_a_quantized_einsum_is_the_float_einsum_at_sign_w_with_the_clipped_ste_gradient():
  model = rjn.quantize(_WithEinsum(nnx.Rngs(0)), rj.QuantRule(weight=W1), jnp.zeros((1, 8)))
  assert {p: c is not None for p, c in rjn.quant_plan(model).items()} == {"first": False, "mix": True, "last": False}
  assert {k for k, v in _flat(rjn.kernel_mask(model)).items() if v} == {"mix/kernel"}
  h = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
  k = np.asarray(model.mix.kernel[...], np.float64)
  c = np.random.default_rng(1).normal(size=(5, 16))
  want = h.astype(np.float64) @ np.where(k >= 0, 1.0, -1.0) + np.asarray(model.mix.bias[...], np.float64)
  np.testing.assert_allclose(model.mix(jnp.asarray(h)), want, rtol=1e-5, atol=1e-5)
  grads = nnx.grad(lambda m: jnp.sum(m.mix(jnp.asarray(h)) * c))(model)
  # dL/dW_q = h^T c, passed where |w| <= 1 (the clipped STE)
  np.testing.assert_allclose(grads["mix"]["kernel"][...], (h.T @ c) * (np.abs(k) <= 1), rtol=1e-5, atol=1e-5)
  # summarised (MACs: 12 x 16 per example) and served from a packed file bit for bit
  table = rj.summary(model, nnx.state(model), input_shape=(8,))
  assert table.totals()["macs"] == 8 * 12 + 12 * 16 + 16 * 3
  x = jax.random.normal(jax.random.key(2), (4, 8))
  path = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"einsum_{os.getpid()}.npz"
  try:
    rj.export.save(rj.export.pack(nnx.state(model), model, input_shape=(8,)), path)
    served = rj.inference.Predictor(path, model=_WithEinsum(nnx.Rngs(5)))(x)
  finally:
    path.unlink(missing_ok=True)
  np.testing.assert_array_equal(served, model(x))


@pytest.mark.parametrize("equation,problem", [
    ("...d,df->...f", "ellipsis"), ("bd,dd->bd", "repeated"),
    ("bd,df->bg", "no operand has")])
def test_an_einsum_that_is_not_simple_is_refused_naming_it(equation, problem):
  class Odd(nnx.Module):
    def __init__(self, rngs):
      self.first = nnx.Linear(8, 12, rngs=rngs)
      self.mix = nnx.Einsum(equation, (12, 16) if equation != "bd,dd->bd" else (12, 12), rngs=rngs)
      self.last = nnx.Linear(16, 3, rngs=rngs)

  with pytest.raises(ValueError, match=rf"'mix': einsum {re.escape(repr(equation))} is not simple.*{problem}"):
    rjn.quantize(Odd(nnx.Rngs(0)), rj.QuantRule(weight=W1))
  kept = rjn.quantize(Odd(nnx.Rngs(0)), rj.QuantRule(layers="all", weight=W1, overrides={"mix": None}))
  assert rjn.quant_plan(kept)["mix"] is None


def test_a_masked_conv_is_quantized_with_its_masked_weights_at_zero():
  mask = np.ones((3, 3, 2, 4), np.float32)
  mask[1, 1] = 0.0  # the centre tap of every filter pruned
  conv = nnx.Conv(2, 4, (3, 3), mask=jnp.asarray(mask), use_bias=False, rngs=nnx.Rngs(0))
  model = rjn.quantize(One(conv), rj.QuantRule(layers="all", weight=W1))
  x = np.random.default_rng(0).normal(size=(2, 5, 5, 2)).astype(np.float32)
  w = np.asarray(conv.kernel[...], np.float64)
  ternary = np.where(w >= 0, 1.0, -1.0) * mask
  want = jax.lax.conv_general_dilated(jnp.asarray(x, jnp.float64) if jax.config.jax_enable_x64 else jnp.asarray(x),
                                      jnp.asarray(ternary, jnp.float32), (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(model(jnp.asarray(x)), want, rtol=1e-5, atol=1e-5)
