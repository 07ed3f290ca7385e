"""The model summary: snapshot of the ResNet-20 tables, MACs from the model, config forms, consistency."""

import json
import os
import pathlib

import jax
import numpy as np
import pytest

import ricci_jax as rj
from experiments.configs import presets
from ricci_jax import export, models, train
from ricci_jax.models import QuantRule

SNAPSHOTS = pathlib.Path(__file__).resolve().parent / "snapshots"
UPDATE = os.environ.get("UPDATE_SNAPSHOTS") == "1"

W1_RESTE = rj.TensorQuant(bits=1, estimator="reste", scale="tensor")
A1_RESTE = rj.TensorQuant(bits=1, estimator="reste")


def _check_snapshot(name: str, text: str):
  path = SNAPSHOTS / name
  if UPDATE:
    path.parent.mkdir(exist_ok=True)
    path.write_text(text + "\n")
  assert path.is_file(), f"no snapshot {path}; run with UPDATE_SNAPSHOTS=1 to write it"
  assert text + "\n" == path.read_text(), f"the table differs from {path} (UPDATE_SNAPSHOTS=1 rewrites it)"


def test_snapshot_resnet20_w1a1_reste():
  """The ReSTE code's resnet20_1w1a: inner layers W1A1 with the mean|W| scale, BN after the ReLU."""
  rule = QuantRule(layers="inner", weight=W1_RESTE, act=A1_RESTE)
  model = models.create("resnet20", num_classes=10, quant=rule, order="conv_relu_bn")
  _check_snapshot("summary_resnet20_w1a1_reste.txt", rj.summary(model).text())


def test_snapshot_resnet20_the_training_programs_paper_config():
  """The RF-DNN CIFAR row: every layer's weights binarized, float activations."""
  config = presets.cifar_paper("cifar10", "resnet20", method="rfdnn")
  _check_snapshot("summary_resnet20_w1a32_rfdnn_all.txt", rj.summary(train.build_model(config, 10)).text())


def test_resnet20_totals_match_the_architecture():
  rule = QuantRule(layers="inner", weight=W1_RESTE, act=A1_RESTE)
  s = rj.summary(models.create("resnet20", num_classes=10, quant=rule, order="conv_relu_bn"))
  # MACs from the architecture: 3x3 convs at 32x32 (16 ch), 16x16 (32 ch), 8x8 (64 ch), and the head
  first = 32 * 32 * 16 * 27
  stage1 = 6 * 32 * 32 * 16 * 144
  stage2 = 16 * 16 * 32 * 144 + 5 * 16 * 16 * 32 * 288
  stage3 = 8 * 8 * 64 * 288 + 5 * 8 * 8 * 64 * 576
  head = 64 * 10
  assert s.macs == {"binary": stage1 + stage2 + stage3, "k-bit": 0, "float": first + head}
  assert s.params == 269_722 and s.quantized_params == 267_264
  assert s.stats_count == 1_376
  t = s.totals()
  assert t["packed_bytes"] == 267_264 // 8 + 18 * 4 + 4 * (269_722 - 267_264)  # bits, 18 scales, float params
  assert t["compression"] == round(t["float32_bytes"] / t["packed_bytes"], 2)
  json.dumps(s.to_dict())  # JSON-able


def test_lenet5_macs_and_precisions():
  rule = QuantRule(layers="inner", weight=rj.TensorQuant(bits=1), act=rj.TensorQuant(bits=2),
                   overrides={"dense2": rj.QuantConfig(weight=rj.TensorQuant(bits=1), act=rj.TensorQuant(bits=1))})
  s = rj.summary(models.create("lenet5", num_classes=10, quant=rule, order="conv_relu_bn"))
  rows = {r.name: r for r in s.rows}
  assert [r.name for r in s.rows] == ["conv_init", "bn_init", "conv1", "bn1", "dense1", "bn_dense1", "dense2",
                                      "bn_dense2", "head"]
  assert {n: (r.macs, r.mac_precision) for n, r in rows.items() if r.macs} == {
      "conv_init": (28 * 28 * 6 * 25, "float"), "conv1": (10 * 10 * 16 * 150, "k-bit"),
      "dense1": (400 * 120, "k-bit"), "dense2": (120 * 84, "binary"), "head": (84 * 10, "float")}
  assert rows["conv1"].type == "conv 5x5" and rows["bn1"].type == "batchnorm" and rows["head"].type == "dense"
  assert rows["head"].packed_bytes == rows["head"].float32_bytes == 4 * 850


def test_grouped_convs_are_counted_by_their_fan_in():
  s = rj.summary(models.create("mobilenet_v1", num_classes=1000))
  assert s.params == 4_231_976
  assert 568e6 < sum(s.macs.values()) < 570e6  # the paper's 569 M mult-adds
  dw = next(r for r in s.rows if r.name == "block2_dw")
  assert dw.type == "dwconv 3x3 /2" and dw.macs == 56 * 56 * 64 * 9


def test_packed_bytes_are_what_pack_stores():
  rule = QuantRule(layers="all", weight=rj.TensorQuant(bits=3, scale="channel"),
                   overrides={"dense1": rj.QuantConfig(weight=rj.TensorQuant(bits=1, scale="tensor"))})
  model = models.create("mlp", num_classes=10, quant=rule, hidden=(30, 20))
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False),
                             jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32))
  variables = jax.tree.map(lambda s: np.random.default_rng(0).normal(size=s.shape).astype(s.dtype), variables)
  s = rj.summary(model, variables)
  packed = export.pack(variables, model)
  for row in s.rows:
    stored = sum(t.nbytes for k, t in packed.tensors.items() if k.startswith(f"params/{row.name}/"))
    assert row.packed_bytes == stored, row.name
  assert s.packed_bytes + s.stats_bytes == packed.nbytes


def test_the_model_and_its_rule_decide_and_mismatches_are_refused():
  config = presets.fashion_mnist("reste", model="lenet5")
  built = train.build_model(config, 10)
  float_model = models.create("lenet5", num_classes=10)
  text = rj.summary(built).text()
  assert rj.summary(float_model.clone(quant=built.quant)).text() == text
  assert rj.summary(built, input_shape=(28, 28, 1)).text() == text
  assert "uniform/reste           -                       tensor" in text
  assert rj.summary(float_model).text() != text
  with pytest.raises(export.ExportError, match=r"takes the model .* got ConfigDict.*train.build_model"):
    rj.summary(config)
  mlp_params = jax.eval_shape(lambda x: models.create("mlp", num_classes=10).init(jax.random.key(0), x, train=False),
                              jax.ShapeDtypeStruct((1, 28, 28, 1), np.float32))["params"]
  with pytest.raises(export.ExportError, match="do not match the model"):
    rj.summary(built, mlp_params)
