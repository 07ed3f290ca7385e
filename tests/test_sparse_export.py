"""Pruned (sparse) and sparse-binary networks: the quantized forward, the packed export, serving, the summary.

The rule under test (``ricci_jax.layers.quantize_tensor``): a kernel weight that is exactly 0 is pruned and its
quantized value is exactly 0 (a pruned binary kernel is ternary). The references here are independent of the
library: NumPy matmuls and loops, NumPy packing of bits, hand counts. Inputs are small integers where a float
result is compared bit for bit: integer products summed below 2^24 are exact in float32 in any order.
"""

from __future__ import annotations

import json
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from packed_raw import read_members, write_members

import ricci_jax as rj
from ricci_jax import export, inference, layers, models
from ricci_jax import nnx as rjn
from ricci_jax.models import QuantRule, inspect
from ricci_jax.nnx.zoo import LeNet5, load_linen_variables

W1 = rj.TensorQuant(bits=1, estimator="clipped_ste")


def _pruned(shape, seed, share=0.5):
  """A random normal kernel with exactly round(share * size) entries set to 0 (at random positions)."""
  rng = np.random.default_rng(seed)
  w = rng.normal(size=shape).astype(np.float32)
  flat = w.reshape(-1)
  flat[rng.permutation(flat.size)[:round(share * flat.size)]] = 0.0
  return w


def _ternary(w):
  """sign(w) * 1[w != 0], in NumPy."""
  return (np.sign(w) * (w != 0)).astype(np.float32)


def _integers(shape, seed):
  return np.random.default_rng(seed).integers(-3, 4, size=shape).astype(np.float32)


def _conv_valid(x, k):
  """NHWC x HWIO 'VALID' convolution (cross-correlation, as lax), by loops in NumPy."""
  b, h, w, _ = x.shape
  kh, kw, _, o = k.shape
  out = np.zeros((b, h - kh + 1, w - kw + 1, o), np.float64)
  for i in range(h - kh + 1):
    for j in range(w - kw + 1):
      out[:, i, j, :] = np.einsum("bhwc,hwco->bo", x[:, i:i + kh, j:j + kw, :], k)
  return out.astype(np.float32)


# ----------------------------------------------------------------------------
# The quantized forward.
# ----------------------------------------------------------------------------


def test_a_pruned_binary_linen_dense_is_the_float_layer_on_the_ternary_kernel():
  w, b = _pruned((12, 5), 0), np.random.default_rng(1).normal(size=5).astype(np.float32)
  assert np.sum(w == 0) == 30
  x = _integers((4, 12), 2)
  layer = layers.QuantDense(5, rj.QuantConfig(weight=W1))
  got = np.asarray(layer.apply({"params": {"kernel": w, "bias": b}}, x))
  np.testing.assert_array_equal(got, (x @ _ternary(w)).astype(np.float32) + b)
  # the rule is the point: with sign(0) = +1 (what the quantizer alone does) the result would differ
  assert not np.array_equal(got, x @ np.where(w >= 0, 1.0, -1.0).astype(np.float32) + b)


def test_a_pruned_binary_linen_conv_is_the_float_conv_on_the_ternary_kernel():
  w = _pruned((3, 3, 4, 6), 3)
  x = _integers((2, 7, 7, 4), 4)
  layer = layers.QuantConv(6, (3, 3), rj.QuantConfig(weight=W1), padding="VALID", use_bias=False)
  got = np.asarray(layer.apply({"params": {"kernel": w}}, x))
  np.testing.assert_array_equal(got, _conv_valid(x, _ternary(w)))
  float_conv = nn.Conv(6, (3, 3), padding="VALID", use_bias=False)
  np.testing.assert_array_equal(got, np.asarray(float_conv.apply({"params": {"kernel": _ternary(w)}}, x)))


def test_a_pruned_binary_nnx_linear_is_the_float_layer_on_the_ternary_kernel():
  class One(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(12, 5, rngs=rngs)

    def __call__(self, x):
      return self.dense(x)

  model = rjn.quantize(One(nnx.Rngs(0)), QuantRule(layers="all", weight=W1))
  w = _pruned((12, 5), 5)
  model.dense.kernel[...] = jnp.asarray(w)
  x = _integers((3, 12), 6)
  b = np.asarray(model.dense.bias[...])
  np.testing.assert_array_equal(np.asarray(model(x)), x @ _ternary(w) + b)


@pytest.mark.parametrize("scale", ["none", "tensor", "channel"])
def test_pruned_weights_quantize_to_zero_and_get_no_gradient(scale):
  w = _pruned((10, 4), 7) * 0.5  # most |w| <= 1: the clipped STE passes their gradient
  x = np.random.default_rng(8).normal(size=(6, 10)).astype(np.float32)
  g = np.random.default_rng(9).normal(size=(6, 4)).astype(np.float32)
  spec = rj.TensorQuant(bits=1, estimator="clipped_ste", scale=scale)
  layer = layers.QuantDense(4, rj.QuantConfig(weight=spec), use_bias=False)
  loss = lambda k: jnp.sum(layer.apply({"params": {"kernel": k}}, x) * g)  # noqa: E731
  grad = np.asarray(jax.grad(loss)(jnp.asarray(w)))
  pruned = w == 0
  assert np.all(grad[pruned] == 0.0) and np.all(grad[~pruned & (np.abs(w) < 1)] != 0.0)
  if scale == "none":  # dL/dW = x^T g * 1[|w| <= 1] where kept (RF-DNN's clipped STE), 0 where pruned
    np.testing.assert_allclose(grad, (x.T @ g) * (np.abs(w) <= 1) * ~pruned, rtol=1e-5, atol=1e-6)
  q = np.asarray(layers.quantize_tensor(jnp.asarray(w), spec, (0,)))
  assert np.all(q[pruned] == 0.0) and np.all(q[~pruned] != 0.0)


def test_the_rule_is_for_kernels_only():
  spec = rj.TensorQuant(bits=1)
  zeros = jnp.zeros((3, 4))
  np.testing.assert_array_equal(layers.quantize_tensor(zeros, spec, (1,), operand="act"), np.ones((3, 4)))
  np.testing.assert_array_equal(layers.quantize_tensor(zeros, spec, (0,)), np.zeros((3, 4)))
  with pytest.raises(ValueError, match="operand must be one of"):
    layers.quantize_tensor(zeros, spec, (0,), operand="bias")
  # a binarized input that is exactly 0 (after a ReLU) still computes as +1 in a W1A1 layer
  layer = layers.QuantDense(2, rj.QuantConfig(weight=spec, act=spec), use_bias=False)
  k = np.array([[1.0, -1.0], [0.5, 0.0], [-2.0, 3.0]], np.float32)
  got = layer.apply({"params": {"kernel": k}}, np.zeros((1, 3), np.float32))
  np.testing.assert_array_equal(got, [[1 + 1 - 1, -1 + 0 + 1]])


# ----------------------------------------------------------------------------
# Export: mask and codes, bit for bit.
# ----------------------------------------------------------------------------


def _eq38_codes(w, bits):
  """RF-DNN Eq. 38 level indices round[(2^k - 1)(w / (2 max|w|) + 1/2)], in NumPy (ties to even, as jnp.round)."""
  n = 2**bits - 1
  return np.rint(n * (w.astype(np.float64) / (2 * np.max(np.abs(w))) + 0.5)).astype(np.int64)


def _little_endian_words(values, bits):
  """k-bit values packed 8 / k to a byte, value j at bit j * k, in NumPy (bits dividing 8)."""
  per = 8 // bits
  padded = np.zeros(-(-values.size // per) * per, np.int64)
  padded[:values.size] = values
  return np.sum(padded.reshape(-1, per) << (np.arange(per) * bits), axis=1).astype(np.uint8)


@pytest.mark.parametrize("bits", [1, 2])
def test_a_pruned_kernel_stores_its_mask_and_the_kept_codes_and_round_trips_bit_for_bit(bits, tmp_path):
  w = _pruned((3, 3, 5, 7), 10 + bits, share=0.6)
  spec = rj.TensorQuant(bits=bits, estimator="ste")
  tensor = export.pack_kernel(w, spec)
  kept = (w != 0).reshape(-1)
  assert tensor.pruned == int(np.sum(~kept)) == round(0.6 * w.size)
  # the stored arrays, computed independently: mask bits (1 = kept) and the kept weights' codes, in C order
  np.testing.assert_array_equal(tensor.arrays["mask"], np.packbits(kept, bitorder="little"))
  codes = (w.reshape(-1)[kept] >= 0).astype(np.int64) if bits == 1 else _eq38_codes(w, bits).reshape(-1)[kept]
  np.testing.assert_array_equal(tensor.arrays["words"], _little_endian_words(codes, bits))
  mask_bytes, code_bytes = -(-w.size // 8), -(-int(kept.sum()) * bits // 8)
  assert tensor.nbytes == mask_bytes + code_bytes == export.packed_nbytes(w.shape, spec, pruned=tensor.pruned)
  # unpacking gives the training forward's kernel, bit for bit, also through the file
  want = np.asarray(jax.jit(lambda k: layers.quantize_tensor(k, spec, (0, 1, 2)))(w))
  expected = _ternary(w) if bits == 1 else np.where(w != 0, 2 / 3 * _eq38_codes(w, 2) - 1, 0.0)
  np.testing.assert_allclose(want, expected, rtol=0, atol=1e-7)
  assert np.all((want == 0) == (w == 0))
  got = np.asarray(jax.jit(lambda a: export.dequantize(tensor, a))(tensor.arrays))
  assert got.tobytes() == want.tobytes()
  packed = export.Packed(model={}, input_shape=(1,), tensors={"params/conv/kernel": tensor})
  export.save(packed, tmp_path / "k.npz")
  loaded = export.load(tmp_path / "k.npz").tensors["params/conv/kernel"]
  assert loaded.pruned == tensor.pruned and loaded.arrays.keys() == tensor.arrays.keys()
  assert np.asarray(export.unpack(tmp_path / "k.npz")["params"]["conv"]["kernel"]).tobytes() == want.tobytes()


def test_sizes_mask_included_and_when_pruning_makes_a_kernel_smaller():
  """n mask bits + k bits per kept weight, against k n: smaller only when the pruned share exceeds 1 / k."""
  shape = (64, 32)  # 2048 weights
  for bits, share, smaller in ((1, 0.5, False), (2, 0.5, False), (2, 0.75, True), (4, 0.5, True)):
    w = _pruned(shape, bits, share)
    tensor = export.pack_kernel(w, rj.TensorQuant(bits=bits, scale="tensor"))
    dense = export.pack_kernel(np.where(w == 0, 1e-3, w), rj.TensorQuant(bits=bits, scale="tensor"))
    assert "mask" not in dense.arrays and dense.pruned == 0
    kept = 2048 - tensor.pruned
    assert tensor.nbytes == 2048 // 8 + -(-kept * bits // 8) + 4  # mask, codes, the mean|W| scale
    assert dense.nbytes == 2048 * bits // 8 + 4
    assert (tensor.nbytes < dense.nbytes) == smaller


def test_an_unpruned_kernel_is_stored_as_before():
  w = np.random.default_rng(0).normal(size=(20, 6)).astype(np.float32)
  tensor = export.pack_kernel(w, W1)
  assert set(tensor.arrays) == {"words"} and tensor.pruned == 0
  np.testing.assert_array_equal(tensor.arrays["words"], np.packbits((w >= 0).reshape(-1), bitorder="little"))


def test_ridge_with_pruned_weights_packs_inexactly_with_zeros_kept():
  spec = rj.TensorQuant(bits=2, method="ridge", estimator="ste", ridge_block_size=None)
  w = _pruned((24, 6), 20, share=0.3)
  tensor = export.pack_kernel(w, spec, exact=False)
  want = np.asarray(layers.quantize_tensor(jnp.asarray(w), spec, (0,)))
  got = np.asarray(export.dequantize(tensor))
  assert np.all(got[w == 0] == 0) and np.all(want[w == 0] == 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_a_pruned_file_is_checked_on_load(tmp_path):
  w = _pruned((10, 5), 30)  # 50 weights, 25 pruned: a 7-byte mask with 6 unused bits
  packed = export.Packed(model={}, input_shape=(1,), tensors={"params/d/kernel": export.pack_kernel(w, W1)})
  export.save(packed, tmp_path / "p.npz")
  header, data = read_members(tmp_path / "p.npz")
  entry = header["tensors"]["params/d/kernel"]
  assert header["version"] == export.VERSION and entry["pruned"] == 25
  names = [a[0] for a in entry["arrays"]]
  assert names == ["words", "mask"]
  _, _, _, offset, nbytes = entry["arrays"][1]
  stray = bytearray(data)
  stray[offset + nbytes - 1] |= 0x80  # bit 55 of the mask: past its 50 values
  stray = bytes(stray)
  write_members(tmp_path / "stray.npz", {**header, "data": {"nbytes": len(stray), "crc32": zlib.crc32(stray)}}, stray)
  with pytest.raises(export.PackedFileError, match=r"\(mask\): bits are set outside the packed values"):
    export.load(tmp_path / "stray.npz")
  flipped = bytearray(data)
  flipped[offset] ^= 0x01  # one weight more or less kept than the header says
  flipped = bytes(flipped)
  write_members(tmp_path / "flip.npz", {**header, "data": {"nbytes": len(flipped), "crc32": zlib.crc32(flipped)}}, flipped)
  with pytest.raises(export.PackedFileError, match=r"the mask keeps 2[46] weights, the header says 25"):
    export.load(tmp_path / "flip.npz")
  header["tensors"]["params/d/kernel"] = {**entry, "pruned": 51}
  write_members(tmp_path / "many.npz", header, data)
  with pytest.raises(export.PackedFileError, match="cannot have 51 pruned weights"):
    export.load(tmp_path / "many.npz")


# ----------------------------------------------------------------------------
# A pruned binarized LeNet-5: packed, served, summarised.
# ----------------------------------------------------------------------------

INNER = ("conv1", "dense1", "dense2")


def _prune_inner(variables, seed=0):
  """Half of every inner kernel set to 0 (exactly floor(size / 2) entries); returns the variables and counts."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.array, variables["params"])
  counts = {}
  for name in INNER:
    flat = params[name]["kernel"].reshape(-1)
    flat[rng.permutation(flat.size)[:flat.size // 2]] = 0.0
    counts[name] = flat.size // 2
  return {**variables, "params": params}, counts


def _calibrated(model, variables, x):
  _, updates = model.clone(norm_momentum=0.0).apply(variables, x, train=True, mutable=["batch_stats"])
  return {**variables, "batch_stats": jax.device_get(updates["batch_stats"])}


@pytest.mark.parametrize("which", ["w1", "w1a1_xnor"])
def test_a_pruned_binarized_lenet5_serves_the_training_logits_bit_for_bit(tmp_path, which):
  if which == "w1":
    model = models.create("lenet5", num_classes=10, quant=QuantRule(weight=rj.TensorQuant(bits=1)))
  else:  # W1A1 without a scale: the inner layers run as XOR-popcount on the ternary kernels
    rule = QuantRule(weight=rj.TensorQuant(bits=1), act=rj.TensorQuant(bits=1, estimator="ste"))
    model = models.create("lenet5", num_classes=10, quant=rule, order="conv_relu_bn")
  x = np.random.default_rng(1).normal(size=(32, 28, 28, 1)).astype(np.float32)
  variables, counts = _prune_inner(inspect.random_variables(model, (28, 28, 1)))
  variables = _calibrated(model, variables, x)
  want = np.asarray(jax.jit(lambda v, x: model.apply(v, x, train=False))(inference.device_variables(variables), x))
  assert np.min(np.std(want, axis=0)) > 1e-3
  packed = export.pack(variables, model)
  assert {k: t.pruned for k, t in packed.quantized().items()} == {f"params/{n}/kernel": c for n, c in counts.items()}
  export.save(packed, tmp_path / "lenet.npz")
  for xnor in (False, True):
    for mode in inference.UNPACK_MODES:
      predictor = inference.Predictor(tmp_path / "lenet.npz", unpack=mode, xnor=xnor)
      assert sorted(predictor.xnor_layers) == (sorted(INNER) if xnor and which == "w1a1_xnor" else [])
      assert sorted(predictor.arrays["xnor_mask"]) == sorted(predictor.xnor_layers)
      np.testing.assert_array_equal(np.asarray(predictor(x)), want, err_msg=f"xnor={xnor} {mode}")
  # the pruned positions matter: computed as sign(0) = +1 (a tiny positive weight) the logits differ
  plus = {**variables, "params": {k: ({**v, "kernel": np.where(v["kernel"] == 0, 1e-6, v["kernel"]).astype(np.float32)}
                                      if k in INNER else v) for k, v in variables["params"].items()}}
  assert not np.array_equal(np.asarray(model.apply(inference.device_variables(plus), x, train=False)), want)


def test_the_xnor_layer_on_a_ternary_kernel_is_the_float_layer():
  """xnor_apply with the mask against NumPy on +-1 inputs: dense and a padded, strided conv."""
  rng = np.random.default_rng(3)
  dense = inference.XnorLayer("dense", 37, inference.xnor_word_bits(37))
  w = _pruned((37, 9), 4)
  tensor = export.pack_kernel(w, W1)
  x = np.where(rng.normal(size=(5, 37)) >= 0, 1.0, -1.0).astype(np.float32)
  got = inference.xnor_apply(dense, jnp.asarray(x), jnp.asarray(inference.xnor_kernel_words(tensor, dense)),
                             mask=jnp.asarray(inference.xnor_kernel_mask(tensor, dense)))
  np.testing.assert_array_equal(np.asarray(got), x @ _ternary(w))
  conv = inference.XnorLayer("conv", 20, inference.xnor_word_bits(20), (3, 3), (2, 2), ((1, 1), (1, 1)))
  k = _pruned((3, 3, 20, 4), 5)
  tensor = export.pack_kernel(k, W1)
  x = np.where(rng.normal(size=(2, 9, 9, 20)) >= 0, 1.0, -1.0).astype(np.float32)
  got = inference.xnor_apply(conv, jnp.asarray(x), jnp.asarray(inference.xnor_kernel_words(tensor, conv)),
                             mask=jnp.asarray(inference.xnor_kernel_mask(tensor, conv)))
  want = _conv_valid(np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), _ternary(k))[:, ::2, ::2, :]
  np.testing.assert_array_equal(np.asarray(got), want)
  assert inference.xnor_kernel_mask(export.pack_kernel(k + 5.0, W1), conv) is None  # unpruned: no mask


def test_the_summary_counts_pruned_weights_macs_and_memory_by_hand():
  model = models.create("lenet5", num_classes=10, quant=QuantRule(weight=rj.TensorQuant(bits=1)))
  dense_vars = inspect.random_variables(model, (28, 28, 1))
  variables, counts = _prune_inner(dense_vars)
  assert counts == {"conv1": 1200, "dense1": 24000, "dense2": 5040}  # half of 5*5*6*16, 400*120, 120*84
  s = rj.summary(model, variables)
  rows = {r.name: r for r in s.rows}
  assert {n: r.pruned for n, r in rows.items() if r.pruned} == counts
  assert rows["conv1"].sparsity == rows["dense1"].sparsity == 0.5 and rows["head"].pruned == 0
  # a pruned weight costs no MAC: each conv1 weight is applied at 10 x 10 positions, a dense weight once
  assert {n: r.macs_saved for n, r in rows.items() if r.macs_saved} == {
      "conv1": 1200 * 100, "dense1": 24000, "dense2": 5040}
  assert rows["conv1"].macs == 10 * 10 * 16 * 150  # the dense count is kept
  # memory: a mask bit per weight plus a sign bit per kept weight, vs a sign bit per weight
  assert (rows["conv1"].packed_bytes, rows["conv1"].dense_packed_bytes) == (2400 // 8 + 1200 // 8, 2400 // 8)
  assert (rows["dense1"].packed_bytes, rows["dense1"].dense_packed_bytes) == (48000 // 8 + 24000 // 8, 48000 // 8)
  t = s.totals()
  assert t["pruned"] == 30240 and t["prunable_params"] == 150 + 2400 + 48000 + 10080 + 840
  assert t["macs_saved"] == 120000 + 24000 + 5040 and t["macs_after_pruning"] == t["macs"] - t["macs_saved"]
  assert t["pruning_bytes_saved"] == -(1200 // 8 + 24000 // 8 + 5040 // 8) and t["pruning_counted"]  # the masks
  packed = export.pack(variables, model)
  assert s.packed_bytes + s.stats_bytes == packed.nbytes and packed.pruned == 30240
  json.dumps(s.to_dict())
  assert s.to_dict()["layers"][2]["pruned"] == 1200
  text = s.text()
  assert "pruned weights:           30,240 of 61,470 in conv / dense kernels (49.19%)" in text
  assert "3,780 B more" in text and "MACs after pruning:" in text
  # unpruned: no pruning section, the same table as without weights
  unpruned = rj.summary(model, dense_vars)
  assert unpruned.pruned == 0 and "Pruned weights" not in unpruned.text()
  assert unpruned.text() == rj.summary(model).text() and not rj.summary(model).pruning_counted


def test_a_pruned_nnx_lenet5_summarises_packs_and_serves_exactly(tmp_path):
  rule = QuantRule(weight=rj.TensorQuant(bits=1, scale="tensor"))
  linen = models.create("lenet5", num_classes=10, quant=rule, order="conv_relu_bn")
  variables, counts = _prune_inner(inspect.random_variables(linen, (28, 28, 1), seed=2))
  model = rjn.quantize(load_linen_variables(LeNet5(order="conv_relu_bn", rngs=nnx.Rngs(0)), variables), rule)
  assert rj.summary(model) == rj.summary(linen, variables)
  assert {r.name: r.pruned for r in rj.summary(model).rows if r.pruned} == counts
  x = jax.random.normal(jax.random.key(1), (16, 28, 28, 1))
  model.eval()
  want = np.asarray(nnx.jit(lambda m, v: m(v))(model, x))
  packed = export.pack(None, model)
  assert packed.pruned == sum(counts.values())
  export.save(packed, tmp_path / "nnx.npz")
  for mode in inference.UNPACK_MODES:
    np.testing.assert_array_equal(np.asarray(inference.Predictor(tmp_path / "nnx.npz", unpack=mode)(x)), want)
