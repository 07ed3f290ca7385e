"""Bit-packed export: exact kernels, real sizes, the file format and its bad inputs."""

import io
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from packed_raw import read_members, write_members

import ricci_jax as rj
from experiments.configs import presets
from ricci_jax import export, layers, models, train
from ricci_jax.models import QuantRule, inspect

W1 = rj.TensorQuant(bits=1, estimator="clipped_ste")




# ----------------------------------------------------------------------------
# Words and kernels
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", range(1, 17))
def test_indices_round_trip_through_words(bits):
  rng = np.random.default_rng(bits)
  values = rng.integers(0, 2**bits, size=1001)
  words = export.pack_indices(values, bits)
  dtype, per = export.word_layout(bits)
  assert words.dtype == dtype and words.shape == (-(-1001 // per),)
  assert per == (8 // bits if 8 % bits == 0 else 32 // bits)
  np.testing.assert_array_equal(np.asarray(export.unpack_indices(words, bits, 1001)), values)


def test_one_bit_weights_are_eight_to_a_byte():
  bits = np.random.default_rng(0).integers(0, 2, size=77)
  np.testing.assert_array_equal(export.pack_indices(bits, 1), np.packbits(bits.astype(np.uint8), bitorder="little"))


def test_an_index_too_large_for_its_bits_is_refused():
  with pytest.raises(export.ExportError, match="does not fit in 2 bits"):
    export.pack_indices(np.array([0, 4]), 2)


KERNEL_SPECS = [
    (1, "uniform", "none"), (1, "uniform", "tensor"), (1, "uniform", "channel"), (2, "uniform", "none"),
    (3, "uniform", "channel"), (4, "uniform", "tensor"), (5, "uniform", "none"), (8, "uniform", "channel"),
    (16, "uniform", "none"), (1, "dorefa", "none"), (2, "dorefa", "tensor"), (3, "dorefa", "channel"),
]


@pytest.mark.parametrize("bits,method,scale", KERNEL_SPECS)
def test_a_packed_kernel_is_the_training_forwards_bit_for_bit(bits, method, scale):
  shape = (3, 3, 8, 12) if bits % 2 else (40, 12)  # a conv and a dense kernel
  spec = rj.TensorQuant(bits=bits, method=method, estimator="ste", scale=scale)
  w = np.random.default_rng(bits).normal(size=shape).astype(np.float32)
  tensor = export.pack_kernel(w, spec)
  axes = tuple(range(len(shape) - 1))
  want = np.asarray(jax.jit(lambda x: layers.quantize_tensor(x, spec, axes))(w))
  got = np.asarray(jax.jit(lambda a: export.dequantize(tensor, a))(tensor.arrays))
  np.testing.assert_array_equal(got, want)
  assert got.tobytes() == want.tobytes()  # also the signs of zeros
  size = int(np.prod(shape))
  dtype, per = export.word_layout(bits)
  scale_bytes = {"none": 0, "tensor": 4, "channel": 4 * shape[-1]}[scale]
  assert tensor.arrays["words"].dtype == dtype
  assert tensor.nbytes == -(-size // per) * dtype.itemsize + scale_bytes == export.packed_nbytes(shape, spec)
  assert tensor.exact


def test_ridge_is_refused_exactly_and_packed_close_when_asked():
  spec = rj.TensorQuant(bits=2, method="ridge", estimator="ste", ridge_block_size=24, scale="tensor")
  w = np.random.default_rng(0).normal(size=(72, 10)).astype(np.float32)
  with pytest.raises(export.ExportError, match="ridge-quantized kernel cannot be packed exactly.*exact=False"):
    export.pack_kernel(w, spec)
  tensor = export.pack_kernel(w, spec, exact=False)
  assert not tensor.exact and set(tensor.arrays) == {"words", "slope", "mean_q", "mean_x", "scale"}
  assert tensor.nbytes == export.packed_nbytes((72, 10), spec) == 720 * 2 // 8 + 3 * 10 * 3 * 4 + 4
  want = layers.quantize_tensor(jnp.asarray(w), spec, (0,))
  np.testing.assert_allclose(export.dequantize(tensor), want, rtol=1e-5, atol=1e-6)
  linear_sparse = rj.TensorQuant(bits=2, method="ridge", estimator="ste", ridge_affine=False, sparsity="2:4",
                                 ridge_block_size=24)
  with pytest.raises(export.ExportError, match="off the half-integer grid"):
    export.pack_kernel(w, linear_sparse, exact=False)


# ----------------------------------------------------------------------------
# Whole models and sizes
# ----------------------------------------------------------------------------


def _mixed_mlp():
  rule = QuantRule(
      weight=rj.TensorQuant(bits=2, estimator="ste", scale="channel"),
      act=rj.TensorQuant(bits=4, method="staircase", estimator="clipped_relu"),
      overrides={"dense2": rj.QuantConfig(weight=rj.TensorQuant(bits=1, method="dorefa", estimator="ste"))})
  return models.create("mlp", num_classes=10, quant=rule, hidden=(48, 40, 24), order="conv_relu_bn")


def test_pack_stores_quantized_kernels_packed_and_the_rest_as_it_is(tmp_path):
  model = _mixed_mlp()
  variables = inspect.random_variables(model, (28, 28, 1))
  packed = export.pack(variables, model)
  kinds = {k: t.kind for k, t in packed.tensors.items() if k.endswith("kernel")}
  assert kinds == {"params/dense_init/kernel": "float", "params/dense1/kernel": "levels",
                   "params/dense2/kernel": "levels", "params/head/kernel": "float"}
  assert packed.tensors["params/dense1/kernel"].spec.bits == 2
  assert packed.tensors["params/dense2/kernel"].spec.method == "dorefa"
  np.testing.assert_array_equal(packed.tensors["batch_stats/bn1/var"].arrays["value"],
                                variables["batch_stats"]["bn1"]["var"])
  assert packed.exact and packed.nbytes == rj.summary(model).packed_bytes + 4 * sum(
      v.size for v in jax.tree.leaves(variables["batch_stats"]))
  # round trip through the file
  path = tmp_path / "mlp.npz"
  size = export.save(packed, path)
  assert size == path.stat().st_size
  loaded = export.load(path)
  assert loaded.model == packed.model and loaded.input_shape == (28, 28, 1)
  assert list(loaded.tensors) == list(packed.tensors)
  for key, tensor in packed.tensors.items():
    other = loaded.tensors[key]
    assert (other.kind, other.shape, other.dtype, other.spec) == (tensor.kind, tensor.shape, tensor.dtype, tensor.spec)
    for name, array in tensor.arrays.items():
      assert other.arrays[name].dtype == array.dtype
      np.testing.assert_array_equal(other.arrays[name], array)
  rebuilt = loaded.build_model()
  assert type(rebuilt) is type(model) and rebuilt.quant == model.quant and rebuilt.hidden == (48, 40, 24)
  # unpack: the forward's kernels, not the latent ones
  unpacked = export.unpack(path)
  spec = model.quant.weight
  want = layers.quantize_tensor(jnp.asarray(variables["params"]["dense1"]["kernel"]), spec, (0,))
  np.testing.assert_array_equal(unpacked["params"]["dense1"]["kernel"], want)
  np.testing.assert_array_equal(unpacked["params"]["head"]["bias"], variables["params"]["head"]["bias"])


def test_a_binarized_resnet20_packs_to_its_real_bit_width():
  """Binary inner kernels, float first and last layers and BatchNorm: 1/22 of float32 with the statistics."""
  model = models.create("resnet20", num_classes=10, quant=QuantRule(layers="inner", weight=W1))
  variables = inspect.random_variables(model, (32, 32, 3))
  packed = export.pack(variables, model)
  binary = 267_264  # inner conv weights
  floats = 432 + 650 + 1_376  # conv_init, head, BN scale and bias
  stats = 1_376
  assert packed.nbytes_of("params") == binary // 8 + 4 * floats == 43_240
  assert packed.nbytes == 43_240 + 4 * stats
  assert all(t.arrays["words"].dtype == np.uint8 for t in packed.quantized().values())
  assert len(packed.quantized()) == 18
  buffer = io.BytesIO()
  np.savez(buffer, **{f"a{i}": np.asarray(v) for i, v in enumerate(jax.tree.leaves(variables))})
  float_file = len(buffer.getvalue())
  assert packed.float32_nbytes() == 4 * (269_722 + stats)
  assert packed.float32_nbytes("params") / packed.nbytes_of("params") > 24.9
  assert float_file / packed.nbytes > 22.2


# ----------------------------------------------------------------------------
# The model, and mismatches
# ----------------------------------------------------------------------------


def test_pack_takes_the_model_and_its_rule():
  """The training program's model is built by train.build_model; a float model packs as its quantized twin."""
  config = presets.fashion_mnist("clipped_ste", model="lenet5")
  model = train.build_model(config, num_classes=10)
  assert model.quant == QuantRule(layers="inner", weight=W1)
  variables = inspect.random_variables(model, (28, 28, 1))
  packed = export.pack(variables, model)
  twin = export.pack(variables, models.create("lenet5", num_classes=10).clone(quant=model.quant))
  assert packed.model == twin.model and list(packed.tensors) == list(twin.tensors)
  assert [k for k in packed.quantized()] == ["params/conv1/kernel", "params/dense1/kernel", "params/dense2/kernel"]
  with pytest.raises(export.ExportError, match=r"takes the model .* got ConfigDict.*train.build_model"):
    export.pack(variables, config)
  with pytest.raises(export.ExportError, match="got QuantRule"):
    export.pack(variables, model.quant)


def test_params_that_do_not_match_the_model_are_refused():
  model = train.build_model(presets.fashion_mnist("clipped_ste", model="lenet5"), num_classes=10)
  mlp = models.create("mlp", num_classes=10, quant=QuantRule(weight=W1))
  with pytest.raises(export.ExportError, match=r"do not match the model \(LeNet5.*params missing \[.*conv1/kernel"):
    export.pack(inspect.random_variables(mlp, (28, 28, 1)), model)
  wide = inspect.random_variables(models.create("lenet5", num_classes=12), (28, 28, 1))
  with pytest.raises(export.ExportError,
                     match=r"wrong shapes: \[head/bias \(12,\) \(expected \(10,\)\), head/kernel \(84, 12\)"):
    export.pack(wide, model)
  lenet = inspect.random_variables(model, (28, 28, 1))
  with pytest.raises(export.ExportError, match="BatchNorm statistics .* none were given"):
    export.pack(lenet["params"], model)
  extra = {**lenet, "params": {**lenet["params"], "dense9": {"kernel": np.zeros((2, 2), np.float32)}}}
  with pytest.raises(export.ExportError, match=r"params not in the model \[dense9/kernel\]"):
    export.pack(extra, model)
  ints = {**lenet, "params": {**lenet["params"], "head": {"kernel": np.zeros((84, 10), np.int32),
                                                          "bias": lenet["params"]["head"]["bias"]}}}
  with pytest.raises(export.ExportError, match="head/kernel has dtype int32"):
    export.pack(ints, model)
  with pytest.raises(export.ExportError, match="batch_stats given twice"):
    export.pack(lenet, model, batch_stats=lenet["batch_stats"])
  packed = export.pack(lenet["params"], model, batch_stats=lenet["batch_stats"])  # the separate form works
  assert packed.tensors["params/conv1/kernel"].kind == "levels"


@pytest.mark.parametrize("layer,bad", [("dense1", np.nan), ("dense2", np.nan), ("dense2", np.inf)])
def test_a_quantized_kernel_with_a_nan_or_inf_latent_weight_is_refused(layer, bad):
  """A corrupted kernel is refused by name, in one line: sign(+inf) = +1 would otherwise be stored as a valid bit."""
  model = _mixed_mlp()  # dense1: 2 bits, channel scale; dense2: 1-bit DoReFa (tanh(inf) = 1)
  variables = jax.tree.map(np.array, inspect.random_variables(model, (28, 28, 1)))
  variables["params"][layer]["kernel"][3, 5] = bad
  with pytest.raises(export.ExportError) as info:
    export.pack(variables, model)
  message = str(info.value)
  assert message.startswith(f"{layer}/kernel: 1 of ") and "NaN or inf" in message and "\n" not in message


def test_a_kernel_is_checked_for_infinities_in_its_compute_dtype():
  k = np.array([[1.0, -2.0, 3.0], [1e5, 1.0, 2.0]], np.float32)  # 1e5 is inf in float16
  assert export.pack_kernel(k, W1, jnp.float32).exact
  with pytest.raises(export.ExportError, match=r"^kernel: 1 of 6 latent weights are NaN or inf \(in float16\)"):
    export.pack_kernel(k, W1, jnp.float16)


# ----------------------------------------------------------------------------
# Bad files
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
  model = models.create("mlp", num_classes=10, quant=QuantRule(weight=rj.TensorQuant(bits=3)), hidden=(21, 16))
  path = tmp_path_factory.mktemp("packed") / "mlp.npz"
  export.save(export.pack(inspect.random_variables(model, (28, 28, 1)), model), path)
  return path


def test_a_truncated_file_is_refused(packed_file, tmp_path):
  raw = packed_file.read_bytes()
  for keep in (len(raw) - 1, len(raw) // 2, 10):
    cut = tmp_path / f"cut{keep}.npz"
    cut.write_bytes(raw[:keep])
    with pytest.raises(export.PackedFileError, match="not a complete packed model.*truncated"):
      export.load(cut)
  with pytest.raises(export.PackedFileError, match="truncated"):
    export.unpack(cut)
  with pytest.raises(export.PackedFileError, match="truncated"):
    rj.inference.Predictor(cut)


def test_a_file_of_another_version_is_refused(packed_file, tmp_path):
  header, data = read_members(packed_file)
  write_members(tmp_path / "v2.npz", {**header, "version": 2}, data)
  with pytest.raises(export.PackedFileError, match="format version 2; this ricci_jax reads version 1 only"):
    export.load(tmp_path / "v2.npz")
  write_members(tmp_path / "other.npz", {**header, "format": "something.else"}, data)
  with pytest.raises(export.PackedFileError, match="is not a ricci_jax.packed file"):
    export.load(tmp_path / "other.npz")


def test_short_or_corrupted_data_is_refused(packed_file, tmp_path):
  header, data = read_members(packed_file)
  write_members(tmp_path / "short.npz", header, data[:-3])
  with pytest.raises(export.PackedFileError, match=f"holds {len(data) - 3} bytes but the header says {len(data)}"):
    export.load(tmp_path / "short.npz")
  flipped = bytearray(data)
  flipped[5] ^= 0xFF
  write_members(tmp_path / "flipped.npz", header, bytes(flipped))
  with pytest.raises(export.PackedFileError, match="CRC-32 does not match"):
    export.load(tmp_path / "flipped.npz")
  longer = data + b"\0\0\0\0"
  write_members(tmp_path / "long.npz", {**header, "data": {"nbytes": len(longer), "crc32": zlib.crc32(longer)}}, longer)
  with pytest.raises(export.PackedFileError, match="4 bytes of data belong to no array"):
    export.load(tmp_path / "long.npz")


@pytest.mark.parametrize("bit", [30, 20])
def test_stray_bits_outside_the_packed_values_are_refused(packed_file, tmp_path, bit):
  """Bit 30 is unused in every word of 3-bit values (10 to a uint32); bit 20 is past the last value."""
  header, data = read_members(packed_file)
  entry = header["tensors"]["params/dense1/kernel"]  # 21 x 16 = 336 3-bit values: 34 words, the last holds 6
  name, _, shape, offset, nbytes = entry["arrays"][0]
  assert name == "words" and shape == [34] and nbytes == 136
  raw = bytearray(data)
  last = offset + nbytes - 4
  raw[last:last + 4] = (int.from_bytes(raw[last:last + 4], "little") | 1 << bit).to_bytes(4, "little")
  raw = bytes(raw)
  write_members(tmp_path / "stray.npz", {**header, "data": {"nbytes": len(raw), "crc32": zlib.crc32(raw)}}, raw)
  with pytest.raises(export.PackedFileError, match="bits are set outside the packed values"):
    export.load(tmp_path / "stray.npz")


def test_other_files_are_refused(tmp_path):
  np.savez(tmp_path / "weights.npz", kernel=np.zeros(3))
  with pytest.raises(export.PackedFileError, match=r"not a packed model: it holds \['kernel'\]"):
    export.load(tmp_path / "weights.npz")
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(export.PackedFileError, match="not a complete packed model"):
    export.load(tmp_path / "notes.txt")
  with pytest.raises(export.PackedFileError, match="cannot read"):
    export.load(tmp_path / "missing.npz")
