"""Serving packed models: exactly the training model's eval-mode logits, on real and mock data."""

import pathlib

import flax.linen as nn
import jax
import numpy as np
import pytest

import ricci_jax as rj
from experiments.configs import presets
from ricci_jax import data, export, inference, models, train
from ricci_jax.models import QuantRule, inspect

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")




def _calibrated(model, variables, images):
  """BatchNorm running statistics set to those of ``images`` (a trained model's are calibrated too)."""
  _, updates = model.clone(norm_momentum=0.0).apply(
      variables, images, train=True, mutable=["batch_stats"])
  return {**variables, "batch_stats": jax.device_get(updates["batch_stats"])}


def _training_forward(model):
  """The training model's eval-mode logits: the reference every packed variant must equal."""
  return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def _assert_served_exactly(packed, model, variables, images, tmp_path, modes=("on_the_fly",), xnor=None):
  """The packed model, through its file, gives exactly the training model's eval logits."""
  path = tmp_path / "model.npz"
  export.save(packed, path)
  want = np.asarray(_training_forward(model)(inference.device_variables(variables), images))
  assert np.all(np.isfinite(want)) and np.min(np.std(want, axis=0)) > 1e-3  # logits vary with the input
  for mode in modes:
    predictor = inference.Predictor(path, unpack=mode)
    if xnor is not None:
      assert sorted(predictor.xnor_layers) == sorted(xnor)
    np.testing.assert_array_equal(np.asarray(predictor(images)), want, err_msg=mode)
  return want


def _fashion_images(n):
  ds = data.load("fashion_mnist", "test", batch_size=n, limit=n, source="files")
  batch = next(iter(ds.epoch(0)))
  return data.preprocess("fashion_mnist", batch["image"]), batch["label"]


@needs_fashion
def test_a_lenet5_trained_by_the_training_program_serves_exactly_on_real_fashion_mnist(tmp_path):
  """ReSTE (mean|W| scale, scheduled o): trained for a few steps, checkpointed, packed from the checkpoint."""
  config = presets.fashion_mnist("reste", model="lenet5", epochs=1)
  train.schema.apply_overrides(config, [
      "dataset.train_limit=512", "dataset.test_limit=128", "batch_size=64", "progress=False", "plots=False",
      "log_every_steps=4"])
  train.train(config, tmp_path / "run")
  checkpoint = train.load_checkpoint(tmp_path / "run")
  model = train.build_model(config, num_classes=10)
  packed = export.pack(checkpoint, model)  # params and batch_stats from the checkpoint
  assert [k for k in packed.quantized()] == ["params/conv1/kernel", "params/dense1/kernel", "params/dense2/kernel"]
  assert all(t.spec.scale == "tensor" and "scale" in t.arrays for t in packed.quantized().values())
  images, labels = _fashion_images(128)
  logits = _assert_served_exactly(packed, model, checkpoint, images, tmp_path)
  assert np.mean(np.argmax(logits, -1) == labels) > 0.3  # trained: chance is 0.1


@needs_fashion
@pytest.mark.parametrize("name,rule,kwargs", [
    ("w1a1_channel", QuantRule(weight=rj.TensorQuant(bits=1, estimator="reste", scale="channel"),
                               act=rj.TensorQuant(bits=1, estimator="reste")), {"order": "conv_relu_bn"}),
    ("w2a4_staircase_dorefa", QuantRule(
        layers="all", weight=rj.TensorQuant(bits=2, method="dorefa", estimator="ste", scale="tensor"),
        act=rj.TensorQuant(bits=4, method="staircase", estimator="clipped_relu"),
        first=rj.QuantConfig(weight=rj.TensorQuant(bits=3, scale="channel"))), {}),
])
def test_quantized_activations_and_every_kernel_format_serve_exactly(tmp_path, name, rule, kwargs):
  model = models.create("mlp", num_classes=10, quant=rule, hidden=(64, 48), **kwargs)
  variables = inspect.random_variables(model, (28, 28, 1))
  images, _ = _fashion_images(64)
  _assert_served_exactly(export.pack(variables, model), model, variables, images, tmp_path,
                         modes=("on_the_fly", "once"))


@needs_fashion
def test_xor_popcount_layers_serve_exactly_on_real_fashion_mnist(tmp_path):
  """W1A1 without a scale: LeNet-5's conv1 (5x5, no padding) and dense layers run as XOR-popcount."""
  rule = QuantRule(weight=rj.TensorQuant(bits=1), act=rj.TensorQuant(bits=1, estimator="ste"))
  model = models.create("lenet5", num_classes=10, quant=rule, order="conv_relu_bn")
  images, _ = _fashion_images(64)
  variables = _calibrated(model, inspect.random_variables(model, (28, 28, 1)), images)
  packed = export.pack(variables, model)
  _assert_served_exactly(packed, model, variables, images, tmp_path, modes=("on_the_fly", "once"),
                         xnor=["conv1", "dense1", "dense2"])
  plain = inference.Predictor(packed, xnor=False)
  assert plain.xnor_layers == {}
  np.testing.assert_array_equal(plain(images), inference.Predictor(packed)(images))


def test_ridge_packed_inexactly_serves_close(tmp_path):
  rule = QuantRule(weight=rj.TensorQuant(bits=2, method="ridge", estimator="ste", ridge_block_size=None))
  model = models.create("mlp", num_classes=10, quant=rule, hidden=(32, 24))
  variables = inspect.random_variables(model, (28, 28, 1))
  with pytest.raises(export.ExportError, match="cannot be packed exactly"):
    export.pack(variables, model)
  packed = export.pack(variables, model, exact=False)
  export.save(packed, tmp_path / "ridge.npz")
  assert not export.load(tmp_path / "ridge.npz").exact
  x = np.random.default_rng(0).normal(size=(8, 28, 28, 1)).astype(np.float32)
  want = _training_forward(model)(inference.device_variables(variables), x)
  np.testing.assert_allclose(inference.Predictor(tmp_path / "ridge.npz")(x), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("which", ["paper_config", "reste_w1a1", "xnor_w1a1"])
def test_a_binarized_resnet_serves_exactly_on_mock_cifar10(tmp_path, which):
  tfds = pytest.importorskip("tensorflow_datasets")
  xnor = None
  if which == "paper_config":  # the training program's config: every layer's weights binarized
    config = presets.cifar_paper("cifar10", "resnet20", method="rfdnn")
    model = train.build_model(config, num_classes=10)
  elif which == "reste_w1a1":  # ReSTE's resnet20_1w1a: inner layers W1A1 with the mean|W| scale
    rule = QuantRule(weight=rj.TensorQuant(bits=1, estimator="reste", scale="tensor"),
                     act=rj.TensorQuant(bits=1, estimator="reste"))
    model = models.create("resnet20", num_classes=10, quant=rule, order="conv_relu_bn")
  else:  # W1A1 without a scale: XOR-popcount convs, strided and padded (ResNet-8: one block per stage)
    rule = QuantRule(weight=rj.TensorQuant(bits=1), act=rj.TensorQuant(bits=1))
    model = models.CifarResNet(depth=8, quant=rule, order="conv_relu_bn")
    xnor = [f"stage{s}_block0_conv{c}" for s in (1, 2, 3) for c in (1, 2)]
  with tfds.testing.mock_data(num_examples=16):
    batch = next(iter(data.load("cifar10", "test", batch_size=16, source="tfds").epoch(0)))
  images = data.preprocess("cifar10", batch["image"])
  variables = _calibrated(model, inspect.random_variables(model, (32, 32, 3)), images)
  packed = export.pack(variables, model)
  assert len(packed.quantized()) == {"paper_config": 20, "reste_w1a1": 18, "xnor_w1a1": 6}[which]
  _assert_served_exactly(packed, model, variables, images, tmp_path, xnor=xnor)


def test_the_serving_model_quantizes_inputs_only():
  rule = QuantRule(weight=rj.TensorQuant(bits=1), act=rj.TensorQuant(bits=1))
  model = models.create("resnet20", num_classes=10, quant=rule, order="conv_relu_bn")
  serving = inference.serving_model(model, (32, 32, 3))
  x = inspect.example_input((32, 32, 3))
  assert rj.quantized_kernels(serving, x, train=False) == {}
  plan = models.layer_plan(serving, x, train=False)
  assert plan["conv_init"] is None and plan["head"] is None
  assert plan["stage1_block0_conv1"] == rj.QuantConfig(act=rule.act)


def test_a_model_without_a_rule_cannot_be_served():
  class Plain(nn.Module):  # no quant attribute
    @nn.compact
    def __call__(self, x, train):
      return nn.Dense(3)(x)

  with pytest.raises(export.ExportError, match="has no 'quant' rule attribute"):
    inference.serving_rule(Plain(), (2,))
