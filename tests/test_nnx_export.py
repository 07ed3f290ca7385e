"""Flax NNX models through the rest of the library: summary, packed export and serving (issue 13)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ricci_jax as rj
from nnx_state import OtherCNN, randomize
from ricci_jax import export, inference, models
from ricci_jax import nnx as rjn
from ricci_jax.nnx.zoo import LeNet5, load_linen_variables

W1A1 = rj.QuantRule(weight=rj.TensorQuant(bits=1, estimator="reste", scale="tensor"),
                    act=rj.TensorQuant(bits=1, estimator="reste"))
W2 = rj.QuantRule(layers="all", weight=rj.TensorQuant(bits=2, scale="channel"),
                  overrides=(("head", None),))


class SmallCNN(nnx.Module):
  """A user's own model: not in the zoo, a list of layers, a bias, a dropout, a BatchNorm."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(1, 8, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.blocks = nnx.List([nnx.Conv(8, 8, (3, 3), strides=(2, 2), rngs=rngs),
                            nnx.Conv(8, 16, (3, 3), rngs=rngs)])
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = self.bn(nnx.relu(self.stem(x)))
    for conv in self.blocks:
      x = nnx.relu(conv(x))
    return self.head(self.drop(x.mean((1, 2))))


def _lenet(seed=0, rule=W1A1):
  linen = models.create("lenet5", num_classes=10, quant=rule, order="conv_relu_bn")
  variables = models.inspect.random_variables(linen, (28, 28, 1), seed=seed)
  model = load_linen_variables(LeNet5(order="conv_relu_bn", rngs=nnx.Rngs(0)), variables)
  return rjn.quantize(model, rule), linen, variables


def _eval_logits(model, x):
  model.eval()
  # jitted, as served (op by op, XLA rounds BatchNorm's arithmetic differently in the last bit)
  want = np.asarray(nnx.jit(lambda m, v: m(v))(model, x))
  model.train()
  assert np.all(np.isfinite(want)) and np.min(np.std(want, axis=0)) > 1e-3  # logits vary with the input
  return want


def _served(packed, tmp_path, x, **kwargs):
  path = tmp_path / "model.npz"
  export.save(packed, path)
  return {mode: np.asarray(inference.Predictor(path, unpack=mode, **kwargs)(x)) for mode in inference.UNPACK_MODES}


# ----------------------------------------------------------------------------
# Summary.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [W1A1, W2], ids=["w1a1", "w2_channel"])
def test_the_summary_of_an_nnx_lenet5_is_the_linen_summary_of_the_same_weights(rule):
  model, linen, variables = _lenet(rule=rule)
  got = rj.summary(model, nnx.state(model))
  want = rj.summary(linen, variables)
  assert got == want
  assert got.to_dict() == want.to_dict() and str(got) == str(want)
  assert rj.summary(model) == want  # the model's own state


def test_the_summary_of_a_users_cnn_matches_hand_counts():
  model = rjn.quantize(SmallCNN(nnx.Rngs(0)), rj.QuantRule(weight=rj.TensorQuant(bits=1, scale="channel")))
  s = rj.summary(model, input_shape=(8, 8, 1))
  assert [r.name for r in s.rows] == ["stem", "bn", "blocks/0", "blocks/1", "head"]
  assert [r.type for r in s.rows] == ["conv 3x3", "batchnorm", "conv 3x3 /2", "conv 3x3", "dense"]
  assert [r.weight is not None for r in s.rows] == [False, False, True, True, False]
  # blocks/0: 3*3*8*8 kernel at 1 bit (72 bytes) + 8 channel scales + 8 biases, float32
  b0 = s.rows[2]
  assert (b0.params, b0.kernel_params, b0.packed_bytes) == (584, 576, 72 + 4 * 8 + 4 * 8)
  assert (b0.macs, b0.mac_precision) == (4 * 4 * 576, "float")  # 8x8 -> 4x4 (SAME, stride 2)
  b1 = s.rows[3]
  assert (b1.params, b1.packed_bytes, b1.macs) == (1168, 144 + 64 + 64, 4 * 4 * 1152)
  assert s.params == 80 + 16 + 584 + 1168 + 170
  assert (s.stats_count, s.stats_bytes, s.model, s.dtype) == (16, 64, "SmallCNN", "float32")


# ----------------------------------------------------------------------------
# Pack, save, load, serve: exactly the NNX model's eval-mode logits.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", [W1A1, W2], ids=["w1a1", "w2_channel"])
def test_a_quantized_nnx_lenet5_serves_its_eval_logits_exactly(tmp_path, rule):
  model, linen, variables = _lenet(seed=3, rule=rule)
  x = jax.random.normal(jax.random.key(1), (16, 28, 28, 1))
  want = _eval_logits(model, x)
  packed = export.pack(nnx.state(model), model)
  assert packed.model["framework"] == "nnx" and packed.model["init"]["order"] == "conv_relu_bn"
  # the same tensors as the Linen twin's packed file
  linen_packed = export.pack(variables, linen)
  assert packed.tensors.keys() == linen_packed.tensors.keys()
  for key, t in linen_packed.tensors.items():
    assert packed.tensors[key].kind == t.kind, key
    for name, a in t.arrays.items():
      np.testing.assert_array_equal(packed.tensors[key].arrays[name], a, err_msg=key)
  for mode, got in _served(packed, tmp_path, x).items():  # rebuilt from the file alone
    np.testing.assert_array_equal(got, want, err_msg=mode)
  rebuilt = export.load(tmp_path / "model.npz").build_model()
  assert type(rebuilt) is LeNet5 and rjn.quant_plan(rebuilt) == rjn.quant_plan(model)


def test_a_users_nnx_cnn_serves_exactly_with_its_model_passed_again(tmp_path):
  rule = rj.QuantRule(weight=rj.TensorQuant(bits=1, scale="channel"), act=rj.TensorQuant(bits=2, method="uniform"))
  model = randomize(rjn.quantize(SmallCNN(nnx.Rngs(0)), rule), seed=7)
  x = jax.random.normal(jax.random.key(2), (8, 8, 8, 1))
  want = _eval_logits(model, x)
  packed = export.pack(nnx.to_pure_dict(nnx.state(model)), model, input_shape=(8, 8, 1))  # a nested dict too
  packed_plan = rjn.quant_plan(model)
  assert packed.model["init"] is None and packed.model["class"].endswith("SmallCNN")
  # a fresh float instance (other weights) or the trained model itself: the file supplies the weights
  for given in (SmallCNN(nnx.Rngs(9)), model):
    for mode, got in _served(packed, tmp_path, x, model=given).items():
      np.testing.assert_array_equal(got, want, err_msg=mode)
  assert rjn.quant_plan(model) == packed_plan and not model.bn.use_running_average  # the model is untouched
  with pytest.raises(export.PackedFileError, match=r"user's NNX model .*SmallCNN.*pass model="):
    inference.Predictor(tmp_path / "model.npz")


# ----------------------------------------------------------------------------
# Bad input.
# ----------------------------------------------------------------------------


def test_a_float_nnx_model_is_refused_by_pack_and_summarised_as_float():
  model = LeNet5(rngs=nnx.Rngs(0))
  with pytest.raises(export.ExportError, match=r"float NNX model: quantize it with ricci_jax.nnx.quantize"):
    export.pack(nnx.state(model), model)
  assert rj.summary(model).quantized_params == 0


def test_a_state_that_does_not_fit_the_model_is_refused():
  model, _, _ = _lenet()
  state = nnx.to_pure_dict(nnx.state(model))
  wrong = flax.traverse_util.flatten_dict(state)
  wrong[("dense1", "kernel")] = np.zeros((4, 4), np.float32)
  del wrong[("bn1", "mean")]
  wrong[("extra", "kernel")] = np.zeros(3, np.float32)
  wrong = flax.traverse_util.unflatten_dict(wrong)
  with pytest.raises(export.ExportError, match=r"dense1/kernel has shape \(4, 4\).*") as e:
    export.pack(wrong, model)
  assert "batch_stats missing [bn1/mean]" in str(e.value) and "not in the model [extra/kernel]" in str(e.value)
  with pytest.raises(export.ExportError, match=r"dense1/kernel has shape"):
    rj.summary(model, wrong)
  with pytest.raises(export.ExportError, match=r"not in the model"):  # another model's state
    export.pack(nnx.state(OtherCNN(nnx.Rngs(0))), model)
  with pytest.raises(export.ExportError, match=r"batch_stats missing"):  # pack needs the statistics
    export.pack(nnx.state(model, nnx.Param), model)
  with pytest.raises(export.ExportError, match=r"not a model of ricci_jax.nnx.zoo: pass input_shape"):
    export.pack(None, rjn.quantize(OtherCNN(nnx.Rngs(0)), rj.QuantRule(layers="all", weight=rj.TensorQuant(bits=1))))


def test_serving_with_a_model_that_is_not_the_packed_one_is_refused(tmp_path):
  rule = rj.QuantRule(layers="all", weight=rj.TensorQuant(bits=1))
  model = rjn.quantize(SmallCNN(nnx.Rngs(0)), rule)
  export.save(export.pack(None, model, input_shape=(8, 8, 1)), tmp_path / "m.npz")
  with pytest.raises(export.PackedFileError, match=r"the packed model is a .*SmallCNN, model= is a .*Other"):
    inference.Predictor(tmp_path / "m.npz", model=OtherCNN(nnx.Rngs(0)))
  other_rule = rjn.quantize(SmallCNN(nnx.Rngs(0)), rj.QuantRule(layers="all", weight=rj.TensorQuant(bits=2)))
  with pytest.raises(export.PackedFileError, match=r"quantized otherwise than the packed model"):
    inference.Predictor(tmp_path / "m.npz", model=other_rule)


def test_a_variable_type_the_file_does_not_store_is_named():
  class Counter(nnx.Variable):
    pass

  model = rjn.quantize(OtherCNN(nnx.Rngs(0)), rj.QuantRule(layers="all", weight=rj.TensorQuant(bits=1)))
  model.seen = Counter(jnp.zeros(()))
  with pytest.raises(export.ExportError, match=r"seen \(Counter\).*stored are nnx.Param and nnx.BatchStat"):
    export.pack(None, model, input_shape=(8, 8, 1))
