"""XOR-popcount serving of Flax NNX models: W1A1 layers from the packed bits, logits bit for bit.

The references are the models' own jitted eval-mode forward passes (``nnx.jit`` of ``model(x)`` after
``model.eval()``) and hand-written layer descriptions; nothing here is computed by the serving code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ricci_jax as rj
from nnx_state import randomize
from ricci_jax import export, inference
from ricci_jax import nnx as rjn
from ricci_jax.nnx.zoo import LeNet5
from ricci_jax.xnor import XnorLayer

W1A1 = rj.QuantRule(layers="inner", weight=rj.TensorQuant(bits=1), act=rj.TensorQuant(bits=1))


class ScaledLinear(nnx.Linear):
  """A user's layer that overrides ``__call__``: what it computes is its own, so it is never XOR-popcount."""

  def __call__(self, x):
    return 0.5 * super().__call__(x)


class BinaryCNN(nnx.Module):
  """A user's own CNN: eligible and ineligible convs and dense layers, in a list and outside one."""

  def __init__(self, rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), rngs=rngs)  # first: float
    self.blocks = nnx.List([
        nnx.Conv(8, 12, (3, 3), strides=(2, 2), padding=1, rngs=rngs),  # XOR-popcount, a bias
        nnx.Conv(12, 20, (2, 3), padding="VALID", use_bias=False, rngs=rngs),  # XOR-popcount
        nnx.Conv(20, 16, (3, 3), padding="SAME", rngs=rngs),  # no: SAME pads depend on the input size
        nnx.Conv(16, 16, (3, 3), padding=((2, 2), (2, 2)), kernel_dilation=2, rngs=rngs),  # no: dilated
    ])
    self.bn = nnx.BatchNorm(16, rngs=rngs)
    self.mid = nnx.Linear(16, 40, rngs=rngs)  # XOR-popcount, a bias
    self.scaled = ScaledLinear(40, 24, rngs=rngs)  # no: its own __call__
    self.wide = nnx.Linear(24, 24, rngs=rngs)  # no: a weight scale (override)
    self.head = nnx.Linear(24, 10, rngs=rngs)  # last: float

  def __call__(self, x):
    x = self.stem(x)
    for conv in self.blocks:
      x = conv(x)
    x = self.bn(x).mean((1, 2))
    return self.head(self.wide(self.scaled(self.mid(x))))


CNN_RULE = rj.QuantRule(
    layers="inner", weight=rj.TensorQuant(bits=1), act=rj.TensorQuant(bits=1),
    overrides=(("wide", rj.QuantConfig(weight=rj.TensorQuant(bits=1, scale="channel"),
                                       act=rj.TensorQuant(bits=1))),))

LENET_LAYERS = {
    "conv1": XnorLayer("conv", 6, 8, (5, 5), (1, 1), ((0, 0), (0, 0)), False),
    "dense1": XnorLayer("dense", 400, 32),
    "dense2": XnorLayer("dense", 120, 32),
}
CNN_LAYERS = {
    "blocks/0": XnorLayer("conv", 8, 8, (3, 3), (2, 2), ((1, 1), (1, 1)), True),
    "blocks/1": XnorLayer("conv", 12, 16, (2, 3), (1, 1), ((0, 0), (0, 0)), False),
    "mid": XnorLayer("dense", 16, 16, bias=True),
}


def _prune(model, paths, seed):
  """Half of each named kernel set exactly to 0; returns the counts."""
  rng = np.random.default_rng(seed)
  counts = {}
  for path in paths:
    layer = model
    for part in path.split("/"):
      layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
    flat = np.array(layer.kernel[...]).reshape(-1)
    flat[rng.permutation(flat.size)[:flat.size // 2]] = 0.0
    layer.kernel[...] = jnp.asarray(flat.reshape(layer.kernel.shape))
    counts[path] = flat.size // 2
  return counts


def _eval_logits(model, x):
  model.eval()
  want = np.asarray(nnx.jit(lambda m, v: m(v))(model, x))
  model.train()
  assert np.all(np.isfinite(want)) and np.min(np.std(want, axis=0)) > 1e-3  # logits vary with the input
  return want


def _lenet(seed):
  return rjn.quantize(randomize(LeNet5(order="conv_relu_bn", rngs=nnx.Rngs(0)), seed), W1A1)


def _assert_xnor_served(path, x, want, layers, masked=(), **kwargs):
  """With xnor=True exactly ``layers`` (``masked``: those with a pruned kernel's mask) and ``want``; xnor=False too."""
  calls = (nnx.Linear.__call__, nnx.Conv.__call__)
  for mode in inference.UNPACK_MODES:
    predictor = inference.Predictor(path, unpack=mode, xnor=True, **kwargs)
    assert predictor.xnor_layers == layers
    np.testing.assert_array_equal(np.asarray(predictor(x)), want, err_msg=mode)
    # the packed words are resident for those layers, not their kernels
    assert sorted(predictor.arrays["xnor"]) == sorted(layers)
    assert not {f"params/{p}/kernel" for p in layers} & set(predictor.arrays["tensors"])
    assert sorted(predictor.arrays["xnor_mask"]) == sorted(masked)
    for p, layer in layers.items():
      words = predictor.arrays["xnor"][p]
      assert words.dtype == {8: jnp.uint8, 16: jnp.uint16, 32: jnp.uint32}[layer.word_bits]
      assert words.shape[-1] == -(-layer.fan_in // layer.word_bits)
    assert "popcnt" in predictor.compiled(x).as_text()
  assert (nnx.Linear.__call__, nnx.Conv.__call__) == calls  # the classes are left as they were
  plain = inference.Predictor(path, xnor=False, **kwargs)
  assert plain.xnor_layers == {} and plain.arrays["xnor"] == {}
  assert "popcnt" not in plain.compiled(x).as_text()
  np.testing.assert_array_equal(np.asarray(plain(x)), want)
  if jax.default_backend() == "cpu":  # xnor=None: on for CPU
    assert inference.Predictor(path, **kwargs).xnor_layers == layers


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_a_w1a1_nnx_lenet5_serves_its_eval_logits_bit_for_bit_with_xor_popcount(tmp_path, pruned):
  model = _lenet(seed=4)
  counts = _prune(model, LENET_LAYERS, seed=1) if pruned else {}
  x = jax.random.normal(jax.random.key(3), (16, 28, 28, 1))
  want = _eval_logits(model, x)
  packed = export.pack(nnx.state(model), model)
  assert {k: t.pruned for k, t in packed.quantized().items() if t.pruned} == {
      f"params/{p}/kernel": c for p, c in counts.items()}
  export.save(packed, tmp_path / "lenet.npz")
  _assert_xnor_served(tmp_path / "lenet.npz", x, want, LENET_LAYERS, masked=counts)
  assert not model.bn1.use_running_average  # the training model is untouched


def test_the_pruned_positions_matter(tmp_path):
  """Served as +1 (a tiny positive latent weight) instead of 0, the pruned LeNet-5's logits differ."""
  model = _lenet(seed=4)
  _prune(model, LENET_LAYERS, seed=1)
  x = jax.random.normal(jax.random.key(3), (16, 28, 28, 1))
  want = _eval_logits(model, x)
  for path in LENET_LAYERS:
    kernel = getattr(model, path).kernel
    kernel[...] = jnp.where(kernel[...] == 0, 1e-6, kernel[...])
  export.save(export.pack(nnx.state(model), model), tmp_path / "plus.npz")
  assert not np.array_equal(np.asarray(inference.Predictor(tmp_path / "plus.npz", xnor=True)(x)), want)


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_a_users_w1a1_nnx_cnn_serves_bit_for_bit_with_xor_popcount(tmp_path, pruned):
  model = randomize(rjn.quantize(BinaryCNN(nnx.Rngs(0)), CNN_RULE), seed=8)
  counts = _prune(model, ["blocks/0", "mid"], seed=2) if pruned else {}
  x = jax.random.normal(jax.random.key(5), (8, 12, 12, 3))
  want = _eval_logits(model, x)
  export.save(export.pack(None, model, input_shape=(12, 12, 3)), tmp_path / "cnn.npz")
  _assert_xnor_served(tmp_path / "cnn.npz", x, want, CNN_LAYERS, masked=counts, model=BinaryCNN(nnx.Rngs(9)))


def test_an_nnx_model_without_w1a1_layers_serves_with_xnor_true_and_none_computed(tmp_path):
  rule = rj.QuantRule(layers="all", weight=rj.TensorQuant(bits=1, scale="tensor"), act=rj.TensorQuant(bits=1))
  model = randomize(rjn.quantize(BinaryCNN(nnx.Rngs(0)), rule), seed=3)
  x = jax.random.normal(jax.random.key(6), (4, 12, 12, 3))
  want = _eval_logits(model, x)
  export.save(export.pack(None, model, input_shape=(12, 12, 3)), tmp_path / "scaled.npz")
  predictor = inference.Predictor(tmp_path / "scaled.npz", xnor=True, model=BinaryCNN(nnx.Rngs(1)))
  assert predictor.xnor_layers == {}
  np.testing.assert_array_equal(np.asarray(predictor(x)), want)
