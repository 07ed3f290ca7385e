"""Bad input to serving and to the packed file (issue 20): each a one-line error that says what was wrong.

Inputs of another shape or dtype, a packed file served with a model that is not the packed one, and files
that are not complete packed models of this format version: every case raises a ``ValueError`` (a
``PackedFileError`` for files and models) whose message fits on one line and names what was expected, never a
traceback from inside Flax, NumPy or zipfile. Tiny models with random weights: nothing is trained.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nnx_state import OtherCNN
from packed_raw import read_members, write_members

import ricci_jax as rj
from ricci_jax import export, inference, models
from ricci_jax import nnx as rjn
from ricci_jax.models import QuantRule, inspect

W1A1 = QuantRule(weight=rj.TensorQuant(bits=1), act=rj.TensorQuant(bits=1, estimator="ste"))


def _raises(kind, match, call, *args, **kwargs):
  """``call`` raises ``kind`` matching ``match``, on one line; returns the message."""
  with pytest.raises(kind, match=match) as e:
    call(*args, **kwargs)
  message = str(e.value)
  assert "\n" not in message, message
  return message


def _jitted_eval(model):
  """The reference the Predictor equals: the training model's jitted eval-mode apply."""
  return jax.jit(functools.partial(model.apply, train=False))


@pytest.fixture(scope="module")
def linen(tmp_path_factory):
  """A W1A1 LeNet-5 (conv_relu_bn: BatchNorm after the binarized layers), packed and saved."""
  model = models.create("lenet5", num_classes=10, quant=W1A1, order="conv_relu_bn")
  variables = inference.device_variables(inspect.random_variables(model, (28, 28, 1), seed=1))
  path = tmp_path_factory.mktemp("linen") / "lenet.npz"
  export.save(export.pack(variables, model), path)
  return {"model": model, "variables": variables, "path": path, "predictor": inference.Predictor(path)}


class SmallCNN(nnx.Module):
  """A user's NNX model (small: the NNX zoo's LeNet-5 takes seconds to build eagerly)."""

  def __init__(self, rngs, features=4):
    self.conv = nnx.Conv(1, features, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(features, rngs=rngs)
    self.head = nnx.Linear(features, 10, rngs=rngs)

  def __call__(self, x):
    return self.head(self.bn(nnx.relu(self.conv(x))).mean((1, 2)))


NNX_RULE = QuantRule(layers="all", weight=rj.TensorQuant(bits=1), act=rj.TensorQuant(bits=1, estimator="ste"))


@pytest.fixture(scope="module")
def nnx_cnn(tmp_path_factory):
  model = rjn.quantize(SmallCNN(nnx.Rngs(0)), NNX_RULE)
  path = tmp_path_factory.mktemp("nnx") / "cnn.npz"
  export.save(export.pack(None, model, input_shape=(8, 8, 1)), path)
  return {"model": model, "path": path, "predictor": inference.Predictor(path, model=SmallCNN(nnx.Rngs(1)))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """A packed file of about a kilobyte: every byte of it can be flipped in a test."""
  model = models.create("mlp", num_classes=2, quant=QuantRule(layers="all", weight=rj.TensorQuant(bits=1)), hidden=(3,))
  path = tmp_path_factory.mktemp("tiny") / "tiny.npz"
  export.save(export.pack(inspect.random_variables(model, (2, 2, 1)), model, input_shape=(2, 2, 1)), path)
  return path


def _images(shape=(4, 28, 28, 1)):
  return np.random.default_rng(0).normal(size=shape).astype(np.float32)


# ----------------------------------------------------------------------------
# Inputs: a batch of the packed model's one-example shape, of a float dtype.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["linen", "nnx_cnn"])
@pytest.mark.parametrize("other", ["rgb", "no_channel_axis", "extra_axis", "flat", "single_example"])
def test_an_input_of_another_shape_is_refused_naming_the_packed_models_shape(request, which, other):
  predictor = request.getfixturevalue(which)["predictor"]
  h, w, c = predictor.input_shape
  shape = {"rgb": (4, h + 4, w + 4, 3), "no_channel_axis": (4, h, w), "extra_axis": (4, h, w, c, 1),
           "flat": (4, h * w * c), "single_example": (h, w, c)}[other]
  want = (rf"^Predictor expects images of shape \(N, {h}, {w}, {c}\) \(the packed model's input\), got "
          rf"\({', '.join(map(str, shape))}\)")
  message = _raises(ValueError, want, predictor, np.zeros(shape, np.float32))
  assert ("; a single example needs its batch axis: x[None]" in message) == (other == "single_example")
  _raises(ValueError, want, predictor.compiled, jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.mark.parametrize("dtype,raw", [(np.uint8, True), (np.int32, True), (bool, False)])
def test_an_integer_or_boolean_input_is_refused(linen, nnx_cnn, dtype, raw):
  """Raw uint8 pixels would be served as 0..255, not the normalised floats the model was trained on."""
  for fixture in (linen, nnx_cnn):
    predictor = fixture["predictor"]
    message = _raises(ValueError, rf"preprocessed images of a float dtype .*got {np.dtype(dtype).name}",
                      predictor, np.ones((2, *predictor.input_shape), dtype))
    assert ("raw pixels? preprocess them as in training: ricci_jax.data.preprocess" in message) == raw


def test_every_float_dtype_is_served_as_the_jitted_training_model_serves_it(linen):
  """float32 is what training feeds; other float widths are cast by the layers, in the Predictor as in training.

  The reference is the jitted apply (module docstring of ricci_jax.inference: an eager, op-by-op apply rounds
  BatchNorm differently in the last bits)."""
  forward = _jitted_eval(linen["model"])
  x = _images()
  for xd in (x, jnp.asarray(x, jnp.bfloat16), x.astype(np.float64)):  # float64 becomes float32 (x64 is off)
    np.testing.assert_array_equal(linen["predictor"](xd), forward(linen["variables"], xd), err_msg=str(xd.dtype))
  # a nested list is an array-like like any other (NumPy makes it float64)
  np.testing.assert_array_equal(linen["predictor"](x.tolist()), forward(linen["variables"], x))


def test_a_nan_input_is_the_callers_data_and_is_served_not_refused(linen):
  """Values are not checked (that would need a device sync): NaN goes where the training model takes it."""
  x = _images()
  x[0, 3, 4, 0] = np.nan
  x[1] = np.inf
  want = _jitted_eval(linen["model"])(linen["variables"], x)
  np.testing.assert_array_equal(linen["predictor"](x), want)  # NaN where the training model has NaN


# ----------------------------------------------------------------------------
# model=: the packed model, or none.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("other,match", [
    (lambda: models.create("lenet5", num_classes=12, quant=W1A1, order="conv_relu_bn"),
     r"model= is not the packed model: num_classes=12 \(packed: 10\); pass the model it was packed from"),
    (lambda: models.create("lenet5", num_classes=10, quant=W1A1),
     r"model= is not the packed model: order='[a-z_]+' \(packed: 'conv_relu_bn'\)"),
    (lambda: models.create("mlp", num_classes=10, quant=W1A1), r"the packed model is a LeNet5, model= is a MLP"),
    (lambda: models.create("resnet20", num_classes=10, quant=W1A1),
     r"the packed model is a LeNet5, model= is a CifarResNet"),
    (lambda: models.create("lenet5", num_classes=10, order="conv_relu_bn"), r"quant=None \(packed: a QuantRule\)"),
    (lambda: models.create("lenet5", num_classes=10, order="conv_relu_bn",
                           quant=QuantRule(weight=rj.TensorQuant(bits=2))),
     r"another quant rule \(differing in act, weight\)"),
    (lambda: "lenet5", r"model= must be the packed model, a flax.linen.Module \(LeNet5\), got a str"),
    (lambda: SmallCNN(nnx.Rngs(0)), r"model= is a Flax NNX module but the packed model is a Linen 'LeNet5'"),
])
def test_a_linen_file_served_with_another_model_is_refused(linen, other, match):
  _raises(export.PackedFileError, match, inference.Predictor, linen["path"], model=other())


def test_a_linen_file_served_with_its_own_model_passed_again_is_served(linen):
  x = _images()
  again = models.create("lenet5", num_classes=10, quant=W1A1, order="conv_relu_bn")
  np.testing.assert_array_equal(inference.Predictor(linen["path"], model=again)(x), linen["predictor"](x))


def test_an_nnx_file_served_with_another_model_is_refused(nnx_cnn):
  path = nnx_cnn["path"]
  _raises(export.PackedFileError, r"the packed model is a user's NNX model \(.*SmallCNN\), which a file cannot "
          r"rebuild .*: pass model=", inference.Predictor, path)
  _raises(export.PackedFileError, r"model= is a Flax Linen module \(LeNet5\) but the packed model is a Flax NNX "
          r".*SmallCNN; pass an instance of that NNX class", inference.Predictor, path,
          model=models.create("lenet5", num_classes=10, quant=W1A1))
  _raises(export.PackedFileError, r"the packed tensors do not fit the NNX model \(SmallCNN\): "
          r"\[batch_stats/bn/mean \(4,\) \(model: \(6,\)\)", inference.Predictor, path,
          model=SmallCNN(nnx.Rngs(0), features=6))
  _raises(export.PackedFileError, r"the packed model is a .*SmallCNN, model= is a .*Other", inference.Predictor, path,
          model=OtherCNN(nnx.Rngs(0)))
  two_bit = rjn.quantize(SmallCNN(nnx.Rngs(0)), QuantRule(layers="all", weight=rj.TensorQuant(bits=2)))
  _raises(export.PackedFileError, r"model= is quantized otherwise than the packed model at \[conv, head\]",
          inference.Predictor, path, model=two_bit)
  _raises(export.PackedFileError, r"model= must be the packed model's NNX module \(.*SmallCNN\), got str",
          inference.Predictor, path, model="SmallCNN")


# ----------------------------------------------------------------------------
# Files: not a packed model, truncated, corrupted, of another version, malformed.
# ----------------------------------------------------------------------------


def _refused_everywhere(path, match):
  """load, unpack and Predictor all refuse ``path`` with one line that names it."""
  for call in (export.load, export.unpack, inference.Predictor):
    message = _raises(export.PackedFileError, match, call, path)
    assert str(path) in message, message


def test_files_that_are_not_packed_models_are_refused(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  _refused_everywhere(tmp_path / "notes.txt", r"\(5 bytes\) is not a complete packed model: a packed file is a .npz "
                      r"\(zip\) archive, .* this one starts with b'hell'")
  (tmp_path / "empty.npz").write_bytes(b"")
  _refused_everywhere(tmp_path / "empty.npz", r"\(0 bytes\) is not a complete packed model.*starts with b''")
  np.save(tmp_path / "weights.npy", np.zeros(3))
  _refused_everywhere(tmp_path / "weights.npy", r"is a .npy array, not a complete packed model")
  np.savez(tmp_path / "weights.npz", kernel=np.zeros(3))
  _refused_everywhere(tmp_path / "weights.npz", r"is a .npz but not a packed model: it holds \['kernel'\]")
  _refused_everywhere(tmp_path, r"cannot read .*IsADirectoryError")
  _refused_everywhere(tmp_path / "missing.npz", r"cannot read .*FileNotFoundError")


def test_variables_instead_of_a_file_are_refused(linen):
  for call in (export.load, export.unpack, inference.Predictor):
    _raises(export.PackedFileError, r"a packed model is read from its file's path \(str or os.PathLike\), got a dict; "
            r"variables are packed first: ricci_jax.export.pack\(variables, model\)", call, linen["variables"])


def test_a_truncated_file_is_refused(tiny, tmp_path):
  raw = tiny.read_bytes()
  for keep in (len(raw) - 1, len(raw) - 200, len(raw) // 2, 10, 3):
    cut = tmp_path / f"cut{keep}.npz"
    cut.write_bytes(raw[:keep])
    _refused_everywhere(cut, rf"\({keep} bytes\) is not a complete packed model")


def test_every_flipped_byte_is_refused_on_one_line_naming_the_file_or_changes_nothing(tiny, tmp_path):
  """The zip container has a CRC-32 per member and the header one of the data; the bytes no check covers
  (the zip's timestamps, attributes, version fields) change nothing that is read."""
  raw = tiny.read_bytes()
  want = export.load(tiny)
  flipped, loaded = tmp_path / "flipped.npz", 0
  for i in range(len(raw)):
    damaged = bytearray(raw)
    damaged[i] ^= 0xFF
    flipped.write_bytes(bytes(damaged))
    try:
      got = export.load(flipped)
    except export.PackedFileError as e:
      assert "\n" not in str(e) and str(flipped) in str(e), (i, str(e))
      continue
    loaded += 1
    assert (got.model, got.input_shape, list(got.tensors)) == (want.model, want.input_shape, list(want.tensors)), i
    for key, tensor in want.tensors.items():
      for name, array in tensor.arrays.items():
        np.testing.assert_array_equal(got.tensors[key].arrays[name], array, err_msg=f"byte {i}: {key}/{name}")
  assert loaded < len(raw) // 4  # most bytes are checked


def test_a_checksum_mismatch_is_one_line_naming_the_file(tiny, tmp_path):
  header, data = read_members(tiny)
  flipped = bytearray(data)
  flipped[7] ^= 0x01
  write_members(tmp_path / "flipped.npz", header, bytes(flipped))  # a valid zip around data that is not the header's
  _refused_everywhere(tmp_path / "flipped.npz",
                      r"flipped.npz': the data's CRC-32 does not match the header's: the file is corrupted")
  raw = bytearray(tiny.read_bytes())
  raw[-300] ^= 0x01  # inside the zip: its own CRC-32 of the member
  (tmp_path / "zip.npz").write_bytes(bytes(raw))
  _refused_everywhere(tmp_path / "zip.npz", r"zip.npz' \(\d+ bytes\) is not a complete packed model: the .npz archive "
                      r"cannot be read \(zipfile.BadZipFile: Bad CRC-32 for file '(data|header).npy'\)")


def test_a_file_of_a_newer_or_unknown_format_version_says_what_reads_it(tiny, tmp_path):
  header, data = read_members(tiny)
  write_members(tmp_path / "v2.npz", {**header, "version": 2, "tensors": "a layout this version does not know"}, data)
  _refused_everywhere(tmp_path / "v2.npz", r"format version 2; this ricci_jax reads version 1 only. A newer ricci_jax "
                      r"wrote it: read it with that one \(or upgrade\)")
  write_members(tmp_path / "v0.npz", {**header, "version": "0"}, data)
  _refused_everywhere(tmp_path / "v0.npz", r"format version '0'; this ricci_jax reads version 1 only. Re-export it")


@pytest.mark.parametrize("edit,match", [
    (lambda h: {k: v for k, v in h.items() if k != "model"}, r"the header is malformed \(no 'model'\)"),
    (lambda h: {k: v for k, v in h.items() if k != "data"}, r"the header is malformed \(no 'data'\)"),
    (lambda h: {**h, "input_shape": [2, 0, 1]}, r"'input_shape' is \[2, 0, 1\], not a list of positive integers"),
    (lambda h: {**h, "data": {"nbytes": "many"}}, r"'data' is .*, not \{'nbytes': int, 'crc32': int\}"),
    (lambda h: {**h, "tensors": {**h["tensors"], "params/dense_init/kernel": {"kind": "levels"}}},
     r"the header is malformed \(KeyError: 'arrays'\)"),
    (lambda h: {**h, "tensors": {**h["tensors"], "params/dense_init/kernel": {
        **h["tensors"]["params/dense_init/kernel"], "shape": [4, 5]}}},
     r"params/dense_init/kernel: arrays .* do not fit a levels tensor of shape \(4, 5\)"),
])
def test_a_malformed_header_is_refused_naming_the_file(tiny, tmp_path, edit, match):
  header, data = read_members(tiny)
  write_members(tmp_path / "edited.npz", edit(header), data)
  _refused_everywhere(tmp_path / "edited.npz", match)


@pytest.mark.parametrize("edit,match", [
    (lambda m: {**m, "class": "Foo"}, r"the packed model's class 'Foo' is not a ricci_jax.models class"),
    (lambda m: {**m, "attrs": {**m["attrs"], "new_attr": 3}},
     r"does not build a MLP of this ricci_jax \(TypeError: .*unexpected keyword argument 'new_attr'\): the file was "
     r"written by another ricci_jax or edited"),
    (lambda m: {**m, "quant": {"weight": None}}, r"does not build a MLP of this ricci_jax \(KeyError: 'layers'\)"),
])
def test_a_description_this_ricci_jax_cannot_build_is_refused(tiny, tmp_path, edit, match):
  header, data = read_members(tiny)
  write_members(tmp_path / "described.npz", {**header, "model": edit(header["model"])}, data)
  _raises(export.PackedFileError, match, inference.Predictor, tmp_path / "described.npz")


def test_a_header_whose_tensors_do_not_fit_its_model_is_refused(linen, tmp_path):
  header, data = read_members(linen["path"])
  write_members(tmp_path / "rgb.npz", {**header, "input_shape": [32, 32, 3]}, data)
  _raises(export.PackedFileError, r"the packed tensors do not fit the model \(LeNet5\): \[params/conv_init/kernel "
          r"\(5, 5, 1, 6\) \(model: \(5, 5, 3, 6\)\)", inference.Predictor, tmp_path / "rgb.npz")
  write_members(tmp_path / "flat.npz", {**header, "input_shape": [784]}, data)
  _raises(export.PackedFileError, r"the model \(LeNet5\) cannot take the packed input shape \(784,\) \(",
          inference.Predictor, tmp_path / "flat.npz")
