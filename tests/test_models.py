"""The model zoo: architectures, parameter counts, quantization rules, Bi-Real, gradients."""

import warnings

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ricci_jax as rj
from ricci_jax import models
from ricci_jax.models import QuantRule

W1 = rj.TensorQuant(bits=1, estimator="clipped_ste")
A1 = rj.TensorQuant(bits=1, estimator="reste")
W1_RESTE = rj.TensorQuant(bits=1, estimator="reste", scale="tensor")


def _count(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _num_classes(name: str) -> int:
  return 1000 if models.input_shape(name)[0] == 224 else 10


def _abstract_vars(model, shape):
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _x(name: str, batch: int = 2, seed: int = 0):
  shape = (batch, *models.input_shape(name))
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _fill(shapes, seed=0):
  """Concrete variables for abstract ones, from numpy (no PRNG compilation: fast on CPU).

  Kernels He-normal, BN scale 1 / bias 0, running mean 0 / var 1, dense bias 0.
  """
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype)
    return jnp.ones(s.shape, s.dtype) if name in ("scale", "var") else jnp.zeros(s.shape, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _init(model, x, seed=0):
  """``params`` and ``batch_stats`` (no ``quant`` collection: the configs' initial values apply)."""
  shapes = _abstract_vars(model, x.shape)
  return _fill({k: shapes[k] for k in ("params", "batch_stats")}, seed)


def _apply(model, variables, x, train=False, **kwargs):
  return model.apply(variables, x, train=train, **kwargs)


def _kernel_names(tree) -> set[str]:
  return {path[0] for path in tree}


# ----------------------------------------------------------------------------
# Architectures
# ----------------------------------------------------------------------------


def _cifar_resnet_count(depth: int, num_classes: int = 10) -> int:
  """Conv kernels + BN (scale, bias) + head, from the architecture alone."""
  n = (depth - 2) // 6
  total = 3 * 3 * 3 * 16 + 2 * 16  # conv_init + bn_init
  cin = 16
  for c in (16, 32, 64):
    for _ in range(n):
      total += 9 * cin * c + 2 * c + 9 * c * c + 2 * c  # conv1, bn1, conv2, bn2
      cin = c
  return total + 64 * num_classes + num_classes


def test_cifar_resnet20_count_by_hand():
  assert _cifar_resnet_count(20) == 269_722
  assert _cifar_resnet_count(32) == 464_154


PARAM_COUNTS = {
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": _cifar_resnet_count(44),
    "resnet56": _cifar_resnet_count(56),
    "resnet110": _cifar_resnet_count(110),
    "resnet18": 11_689_512,  # torchvision
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "mobilenet_v1": 4_231_976,  # Keras, trainable
    "vgg_small": 4_660_106,
    "lenet5": 61_932,
    "mlp": 784 * 256 + 2 * 256 + 256 * 256 + 2 * 256 + 256 * 10 + 10,
}


@pytest.mark.parametrize("name", list(models.MODELS))
def test_parameter_count_and_output_shape(name):
  assert set(PARAM_COUNTS) == set(models.MODELS)
  nc = _num_classes(name)
  model = models.create(name, num_classes=nc)
  shape = (2, *models.input_shape(name))
  v = _abstract_vars(model, shape)
  assert set(v) == {"params", "batch_stats"}
  assert _count(v["params"]) == PARAM_COUNTS[name]
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), v, jax.ShapeDtypeStruct(shape, jnp.float32))
  assert out.shape == (2, nc) and out.dtype == jnp.float32


def test_input_shapes_and_names():
  assert models.input_shape("resnet20") == (32, 32, 3)
  assert models.input_shape("resnet50") == (224, 224, 3)
  assert models.input_shape("mlp") == (28, 28, 1)
  params = _abstract_vars(models.create("resnet20", num_classes=10), (1, 32, 32, 3))["params"]
  assert {"conv_init", "bn_init", "stage1_block0_conv1", "stage3_block2_bn2", "head"} <= set(params)
  assert params["stage2_block0_conv1"]["kernel"].shape == (3, 3, 16, 32)
  params = _abstract_vars(models.create("resnet18", num_classes=5), (1, 224, 224, 3))["params"]
  assert params["stage2_block0_downsample"]["kernel"].shape == (1, 1, 64, 128)
  assert params["head"]["kernel"].shape == (512, 5)


@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "lenet5", "mlp"])
def test_forward_train_and_eval(name):
  model = models.create(name, num_classes=7)
  x = _x(name)
  v = _init(model, x)
  y_eval = _apply(model, v, x)
  assert y_eval.shape == (2, 7) and np.all(np.isfinite(y_eval))
  # train mode updates batch_stats, so the collection must be mutable
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    model.apply(v, x, train=True)
  y_train, updates = _apply(model, v, x, train=True, mutable=["batch_stats"])
  assert set(updates) == {"batch_stats"}
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), v["batch_stats"], updates["batch_stats"])
  assert all(jax.tree.leaves(changed))
  assert not np.allclose(y_train, y_eval)  # batch statistics differ from the initial running ones


def test_bfloat16_compute_dtype():
  model = models.create("resnet20", num_classes=10, dtype=jnp.bfloat16,
                        quant=QuantRule(weight=W1_RESTE))
  x = _x("resnet20")
  v = _init(model, x)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(v["params"]))
  logits, updates = _apply(model, v, x, train=True, mutable=["batch_stats"])
  assert logits.dtype == jnp.bfloat16  # cast to float32 for the loss
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates["batch_stats"]))
  f32 = _apply(models.create("resnet20", num_classes=10, quant=QuantRule(weight=W1_RESTE)), v, x)
  np.testing.assert_allclose(np.asarray(_apply(model, v, x), np.float32), f32, rtol=0.1, atol=0.1)


def test_shortcut_option_a():
  x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
  y = models.shortcut_a(x, 6, 2)
  assert y.shape == (2, 2, 2, 6)
  np.testing.assert_array_equal(y[..., 1:4], x[:, ::2, ::2, :])
  assert not np.any(y[..., 0]) and not np.any(y[..., 4:])
  with pytest.raises(ValueError, match="cannot reduce"):
    models.shortcut_a(x, 2, 1)


def _reference_cifar_resnet(params, stats, x, order, bireal, eps=1e-5):
  """The CIFAR ResNet written out from the documented equations, on raw arrays."""

  def conv(name, y, stride=1):
    return jax.lax.conv_general_dilated(y, params[name]["kernel"], (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def bn(name, y):
    p, s = params[name], stats[name]
    return (y - s["mean"]) / jnp.sqrt(s["var"] + eps) * p["scale"] + p["bias"]

  relu = jax.nn.relu

  def unit(c, b, y, stride=1):  # before any residual add
    return bn(b, relu(conv(c, y, stride))) if order == "conv_relu_bn" else bn(b, conv(c, y, stride))

  def post(y):
    return relu(y) if order == "conv_bn_relu" else y

  y = unit("conv_init", "bn_init", x)
  y = y if order == "conv_relu_bn" else relu(y)
  for name in sorted(k[:-6] for k in params if k.endswith("_conv1") and k.startswith("stage")):
    stride = 2 if name.endswith("block0") and not name.startswith("stage1") else 1
    features = params[f"{name}_conv1"]["kernel"].shape[-1]
    sc = models.shortcut_a(y, features, stride)
    if bireal:
      h = post(unit(f"{name}_conv1", f"{name}_bn1", y, stride) + sc)
      y = post(unit(f"{name}_conv2", f"{name}_bn2", h) + h)
    else:
      h = unit(f"{name}_conv1", f"{name}_bn1", y, stride)
      h = h if order == "conv_relu_bn" else relu(h)
      y = post(unit(f"{name}_conv2", f"{name}_bn2", h) + sc)
  y = jnp.mean(y, axis=(1, 2))
  return y @ params["head"]["kernel"] + params["head"]["bias"]


def _randomize(tree, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.normal(size=a.shape), a.dtype), tree)


@pytest.mark.parametrize("bireal", [False, True])
@pytest.mark.parametrize("order", models.ORDERS)
def test_cifar_resnet_matches_the_documented_blocks(order, bireal):
  # depth 14 (n = 2), width 4: both stride-2 option-A shortcuts and identity blocks
  model = models.CifarResNet(depth=14, width=4, num_classes=3, order=order, bireal=bireal)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 3)), jnp.float32)
  v = _init(model, x)
  params = _randomize(v["params"], 2)
  rng = np.random.default_rng(3)
  stats = {k: {"mean": jnp.asarray(0.1 * rng.normal(size=s["mean"].shape), jnp.float32),
               "var": jnp.asarray(rng.uniform(0.5, 2.0, size=s["var"].shape), jnp.float32)}
           for k, s in v["batch_stats"].items()}
  got = _apply(model, {"params": params, "batch_stats": stats}, x)
  want = _reference_cifar_resnet(params, stats, x, order, bireal)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bireal_has_the_plain_parameter_tree():
  for name, shape in (("resnet20", (2, 32, 32, 3)), ("resnet18", (1, 224, 224, 3))):
    nc = _num_classes(name)
    plain = _abstract_vars(models.create(name, num_classes=nc), shape)
    bireal_model = models.create(name, num_classes=nc, bireal=True)
    bireal = _abstract_vars(bireal_model, shape)
    assert jax.tree.structure(plain) == jax.tree.structure(bireal)
    assert jax.tree.map(lambda a: a.shape, plain) == jax.tree.map(lambda a: a.shape, bireal)
    out = jax.eval_shape(lambda v, x: bireal_model.apply(v, x, train=False), bireal,
                         jax.ShapeDtypeStruct(shape, jnp.float32))
    assert out.shape == (shape[0], nc)
  x = _x("resnet20")
  v = _init(models.create("resnet20", num_classes=10), x)
  plain_y = _apply(models.create("resnet20", num_classes=10), v, x)
  bireal_y = _apply(models.create("resnet20", num_classes=10, bireal=True), v, x)
  assert bireal_y.shape == (2, 10) and not np.allclose(plain_y, bireal_y)


def test_orders_and_options_keep_or_extend_the_parameter_tree():
  shape = (1, 32, 32, 3)
  base = _abstract_vars(models.create("resnet20", num_classes=10), shape)
  other = _abstract_vars(models.create("resnet20", num_classes=10, order="conv_relu_bn"), shape)
  assert jax.tree.structure(base) == jax.tree.structure(other)
  headbn = _abstract_vars(models.create("resnet20", num_classes=10, head_norm=True), shape)
  assert _count(headbn["params"]) == 269_722 + 2 * 64 and "head_bn" in headbn["batch_stats"]
  option_b = _abstract_vars(models.create("resnet20", num_classes=10, shortcut="B"), shape)
  assert _count(option_b["params"]) == 269_722 + (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
  half = _abstract_vars(models.create("mobilenet_v1", num_classes=1000, alpha=0.5), (1, 224, 224, 3))
  assert half["params"]["block13_pw"]["kernel"].shape == (1, 1, 512, 512)
  mlp = _abstract_vars(models.create("mlp", num_classes=10, hidden=(100,)), (1, 28, 28, 1))
  assert _count(mlp["params"]) == 784 * 100 + 2 * 100 + 100 * 10 + 10


# ----------------------------------------------------------------------------
# Quantization rules
# ----------------------------------------------------------------------------


def _all_layers(model, shape):
  return set(models.layer_plan(model, jnp.zeros(shape), train=False))


FIRST = {"resnet20": "conv_init", "resnet18": "conv_init", "resnet50": "conv_init",
         "mobilenet_v1": "conv_init", "vgg_small": "conv_init", "lenet5": "conv_init",
         "mlp": "dense_init"}


@pytest.mark.parametrize("name", list(FIRST))
def test_rule_inner_all_none(name):
  shape = (1, *models.input_shape(name))
  nc = _num_classes(name)
  everything = _all_layers(models.create(name, num_classes=nc), shape)
  downsample = {n for n in everything if n.endswith("_downsample")}
  assert bool(downsample) == (name in ("resnet18", "resnet50"))
  inner = rj.quantized_kernels(models.create(name, num_classes=nc, quant=QuantRule(weight=W1)),
                               jnp.zeros(shape), train=False)
  assert _kernel_names(inner) == everything - {FIRST[name], "head"} - downsample
  assert all(path[1] == "kernel" and cfg.weight == W1 for path, cfg in inner.items())
  every = rj.quantized_kernels(models.create(name, num_classes=nc, quant=QuantRule("all", weight=W1)),
                               jnp.zeros(shape), train=False)
  assert _kernel_names(every) == everything
  for rule in (None, QuantRule("none", weight=W1, act=A1), QuantRule(weight=None)):
    model = models.create(name, num_classes=nc, quant=rule)
    assert rj.quantized_kernels(model, jnp.zeros(shape), train=False) == {}


def test_downsample_convs_are_configurable():
  shape = (1, 224, 224, 3)
  rule = QuantRule(weight=W1, downsample=rj.QuantConfig(weight=W1_RESTE))
  found = rj.quantized_kernels(models.create("resnet18", num_classes=10, quant=rule), jnp.zeros(shape),
                               train=False)
  ds = {n for n in _kernel_names(found) if n.endswith("_downsample")}
  assert ds == {"stage2_block0_downsample", "stage3_block0_downsample", "stage4_block0_downsample"}
  assert found[("stage2_block0_downsample", "kernel")].weight == W1_RESTE
  # "all" quantizes them, unless told otherwise
  rule = QuantRule("all", weight=W1, downsample=rj.QuantConfig())
  found = rj.quantized_kernels(models.create("resnet18", num_classes=10, quant=rule), jnp.zeros(shape),
                               train=False)
  assert not any(n.endswith("_downsample") for n in _kernel_names(found)) and ("conv_init", "kernel") in found


def test_first_layer_quantizes_the_image_only_under_all():
  x = jnp.zeros((1, 32, 32, 3))
  plan = models.layer_plan(models.create("resnet20", num_classes=10, order="conv_relu_bn",
                                         quant=QuantRule(weight=W1, act=A1)), x, train=False)
  assert plan["conv_init"] is None and plan["head"] is None
  assert plan["stage1_block0_conv1"] == rj.QuantConfig(weight=W1, act=A1)
  plan = models.layer_plan(models.create("resnet20", num_classes=10, order="conv_relu_bn",
                                         quant=QuantRule("all", weight=W1, act=A1)), x, train=False)
  assert plan["conv_init"].act == A1 and plan["head"].act == A1
  # explicit first / last configs win over `layers`
  rule = QuantRule(weight=W1, act=A1, first=rj.QuantConfig(weight=W1), last=rj.QuantConfig(weight=W1_RESTE))
  plan = models.layer_plan(models.create("resnet20", num_classes=10, order="conv_relu_bn", quant=rule),
                           x, train=False)
  assert plan["conv_init"] == rj.QuantConfig(weight=W1) and plan["head"].weight == W1_RESTE


def test_overrides_first_match_wins_and_unused_are_reported():
  rule = QuantRule(weight=W1, overrides=[
      (r"stage3_.*", None),
      (r"stage3_block0_conv1", rj.QuantConfig(weight=W1_RESTE)),  # shadowed by the first
      (r"head", rj.QuantConfig(weight=W1_RESTE)),
      (r"nothing_here", None),
  ])
  with pytest.warns(UserWarning, match=r"decide no layer of 'resnet20': \['stage3_block0_conv1', 'nothing_here'\]"):
    model = models.create("resnet20", num_classes=10, quant=rule)
  x = jnp.zeros((1, 32, 32, 3))
  assert models.unused_overrides(model, x, train=False) == ["stage3_block0_conv1", "nothing_here"]
  names = _kernel_names(rj.quantized_kernels(model, x, train=False))
  assert "head" in names and not any(n.startswith("stage3_") for n in names)
  assert "stage2_block2_conv2" in names and "conv_init" not in names
  assert QuantRule(overrides={"a": None}) == QuantRule(overrides=(("a", None),))
  assert hash(rule) == hash(QuantRule(weight=W1, overrides=rule.overrides))


@pytest.mark.parametrize("name", ["resnet20", "lenet5", "mlp"])
def test_quantized_and_float_models_share_parameters(name):
  x = _x(name)
  nc = 10
  float_model = models.create(name, num_classes=nc)
  v = _init(float_model, x)
  w1a1 = QuantRule("all", weight=W1_RESTE, act=A1)
  qv = _abstract_vars(models.create(name, num_classes=nc, quant=w1a1, order="conv_relu_bn"), x.shape)
  assert jax.tree.structure(v["params"]) == jax.tree.structure(qv["params"])
  assert jax.tree.structure(v["batch_stats"]) == jax.tree.structure(qv["batch_stats"])
  # the float checkpoint runs in the quantized model; "none" is the float model exactly
  assert np.all(np.isfinite(_apply(models.create(name, num_classes=nc, quant=QuantRule(weight=W1)), v, x)))
  none = models.create(name, num_classes=nc, quant=QuantRule("none", weight=W1, act=A1))
  np.testing.assert_array_equal(_apply(none, v, x), _apply(float_model, v, x))


@pytest.mark.parametrize("scale", ["none", "tensor"])
def test_binarized_forward_uses_sign_weights(scale):
  x = _x("resnet20")
  rule = QuantRule(weight=rj.TensorQuant(bits=1, estimator="reste", scale=scale))
  qmodel = models.create("resnet20", num_classes=10, quant=rule)
  float_model = models.create("resnet20", num_classes=10)
  v = _init(float_model, x)
  kernels = rj.quantized_kernels(qmodel, x, train=False)
  assert len(kernels) == 18
  params = dict(v["params"])
  for layer, _ in kernels:
    k = params[layer]["kernel"]
    s = jnp.mean(jnp.abs(k)) if scale == "tensor" else 1.0
    params[layer] = {**params[layer], "kernel": jnp.where(k >= 0, 1.0, -1.0) * s}
  got = _apply(qmodel, v, x)
  want = _apply(float_model, {**v, "params": params}, x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert not np.allclose(got, _apply(float_model, v, x))


def test_w1a1_resnet20_reste_gradient_step():
  rule = QuantRule(weight=W1_RESTE, act=A1)
  model = models.create("resnet20", num_classes=10, quant=rule, order="conv_relu_bn")
  x = _x("resnet20", batch=4)
  labels = jnp.array([0, 1, 2, 3])
  v = jax.jit(lambda x: model.init(jax.random.key(0, impl="unsafe_rbg"), x, train=False))(x)
  assert set(v) == {"params", "batch_stats", "quant"}

  @jax.jit
  def step(params, batch_stats, quant, o):
    quant = rj.set_quant_hparams(quant, o=o)

    def loss(p):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats, "quant": quant}, x,
                                    train=True, mutable=["batch_stats"])
      onehot = jax.nn.one_hot(labels, 10)
      return -jnp.mean(jnp.sum(onehot * jax.nn.log_softmax(logits), -1)), updates

    (value, updates), grads = jax.value_and_grad(loss, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return value, grads, params, updates["batch_stats"]

  value, grads, params, stats = step(v["params"], v["batch_stats"], v["quant"], jnp.float32(2.0))
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  for layer, _ in rj.quantized_kernels(model, x, train=False):
    assert np.any(grads[layer]["kernel"] != 0), layer
  value2, *_ = step(params, stats, v["quant"], jnp.float32(2.0))
  assert np.isfinite(value2)


def test_sign_of_relu_warning():
  x = jnp.zeros((1, 28, 28, 1))
  w1a1 = QuantRule(weight=W1, act=A1)
  with pytest.warns(UserWarning, match="conv_relu_bn"):
    models.layer_plan(models.create("lenet5", num_classes=10, quant=w1a1), x, train=False)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    models.layer_plan(models.create("lenet5", num_classes=10, quant=w1a1, order="conv_relu_bn"), x,
                      train=False)
    staircase = rj.TensorQuant(bits=2, method="staircase", estimator="clipped_relu")
    models.layer_plan(models.create("lenet5", num_classes=10, quant=QuantRule(weight=W1, act=staircase)),
                      x, train=False)


# ----------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------


def test_unknown_model():
  with pytest.raises(ValueError, match="unknown model 'resnet21'; valid models: resnet20, resnet32"):
    models.create("resnet21", num_classes=10)
  with pytest.raises(ValueError, match="valid models"):
    models.input_shape("alexnet")


@pytest.mark.parametrize("kwargs,match", [
    (dict(layers="inner_only"), "unknown QuantRule.layers 'inner_only'; allowed: inner, all, none"),
    (dict(weight=rj.TensorQuant(method="staircase", estimator="relu", bits=2)), "activations"),
    (dict(first=W1), "QuantRule.first must be a QuantConfig"),
    (dict(overrides=[("(", None)]), "bad regular expression"),
    (dict(overrides=[("a", W1)]), "must be a QuantConfig"),
    (dict(overrides=3), "mapping or a sequence"),
])
def test_bad_rules(kwargs, match):
  with pytest.raises(ValueError, match=match):
    QuantRule(**kwargs)


@pytest.mark.parametrize("name,kwargs,match", [
    ("resnet20", dict(order="bn_first"), "unknown order 'bn_first'; allowed: conv_bn_relu, conv_relu_bn"),
    ("resnet20", dict(depth=21), "'resnet20' fixes depth=20; build CifarResNet"),
    ("resnet20", dict(widht=8), r"has no attribute\(s\) \['widht'\]"),
    ("resnet50", dict(bireal=True), "BasicBlock"),
    ("resnet20", dict(shortcut="C"), "unknown shortcut"),
    ("mlp", dict(hidden=(0,)), "positive"),
    ("mobilenet_v1", dict(alpha=0.0), "alpha"),
])
def test_bad_model_arguments(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    model = models.create(name, num_classes=10, **kwargs)
    _abstract_vars(model, (1, *models.input_shape(name)))


def test_bad_factory_arguments():
  with pytest.raises(ValueError, match="num_classes"):
    models.create("resnet20", num_classes=0)
  with pytest.raises(ValueError, match="QuantRule or None"):
    models.create("resnet20", num_classes=10, quant=rj.QuantConfig(weight=W1))
  with pytest.raises(ValueError, match="6n \\+ 2"):
    _abstract_vars(models.CifarResNet(depth=21), (1, 32, 32, 3))
  with pytest.raises(ValueError, match="unknown layer role"):
    QuantRule().config_for("x", "middle")


def test_models_are_hashable_flax_modules():
  a = models.create("resnet20", num_classes=10, quant=QuantRule(weight=W1))
  b = models.create("resnet20", num_classes=10, quant=QuantRule(weight=W1))
  assert isinstance(a, nn.Module) and a == b and hash(a.quant) == hash(b.quant)
  assert rj.models is models
