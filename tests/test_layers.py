"""Quantized Flax layers: identity when off, the estimator's gradient when on."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ricci_jax as rj
from ricci_jax import layers

W1 = rj.QuantConfig(weight=rj.TensorQuant(bits=1, estimator="clipped_ste"))


def _init(module, x):
  return module.init(jax.random.key(0), x)


@pytest.mark.parametrize("quant", [None, rj.QuantConfig()])
def test_config_off_is_the_plain_flax_layer(quant):
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  conv = rj.QuantConv(5, (3, 3), quant=quant)
  plain = nn.Conv(5, (3, 3))
  assert type(conv) is nn.Conv and conv == plain
  v = _init(plain, x)
  np.testing.assert_array_equal(conv.apply(v, x), plain.apply(v, x))
  dense = rj.QuantDense(7, quant=quant)
  assert type(dense) is nn.Dense and dense == nn.Dense(7)


def test_quantized_model_has_the_float_models_parameter_tree():
  x = jnp.ones((2, 6))
  q = _init(rj.QuantDense(3, quant=W1), x)
  f = _init(nn.Dense(3), x)
  assert jax.tree.structure(q["params"]) == jax.tree.structure(f["params"])


def test_dense_forward_uses_the_quantized_kernel():
  x = jax.random.normal(jax.random.key(2), (4, 6))
  layer = rj.QuantDense(3, quant=W1)
  v = _init(layer, x)
  k, b = v["params"]["kernel"], v["params"]["bias"]
  np.testing.assert_allclose(layer.apply(v, x), x @ jnp.where(k >= 0, 1.0, -1.0) + b, rtol=1e-5)


SPECS = [
    rj.TensorQuant(bits=1, estimator="clipped_ste", hparams={"clip": 0.05}),
    rj.TensorQuant(bits=1, estimator="reste", hparams={"o": 2.0}),
    rj.TensorQuant(bits=1, estimator="approx_sign"),
    rj.TensorQuant(bits=3, estimator="ede", hparams={"t": 30.0}),
    rj.TensorQuant(bits=1, estimator="dorefa"),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.estimator}{s.bits}")
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_latent_gradient_is_the_estimator_applied_to_the_quantized_kernel_gradient(spec, kind):
  """dL/dW (quantized layer) == mu'(W) * dL/dQ (float layer evaluated at Q(W))."""
  key = jax.random.key(3)
  if kind == "dense":
    x = jax.random.normal(key, (5, 12))
    qlayer, flayer = rj.QuantDense(4, quant=rj.QuantConfig(weight=spec)), nn.Dense(4)
  else:
    x = jax.random.normal(key, (2, 6, 6, 3))
    qlayer, flayer = rj.QuantConv(4, (3, 3), quant=rj.QuantConfig(weight=spec)), nn.Conv(4, (3, 3))
  params = _init(qlayer, x)["params"]
  # spread the latent weights so clipping estimators see both sides
  params = {**params, "kernel": params["kernel"] * 4.0}
  target = jax.random.normal(jax.random.key(4), qlayer.apply({"params": params}, x).shape)

  def loss(layer, p):
    return jnp.sum((layer.apply({"params": p}, x) - target) ** 2)

  g_latent = jax.grad(lambda p: loss(qlayer, p))(params)["kernel"]
  w = params["kernel"]
  wq = layers.quantize_tensor(w, spec, contraction_axes=tuple(range(w.ndim - 1)))
  g_q = jax.grad(lambda p: loss(flayer, p))({**params, "kernel": wq})["kernel"]
  mu = rj.ESTIMATORS[spec.estimator](w, **spec.hparams_dict)
  np.testing.assert_allclose(g_latent, mu * g_q, rtol=2e-5, atol=1e-6)
  assert np.any(np.asarray(mu) != 1.0) or spec.estimator == "ste"


def test_scale_modes_in_a_layer():
  x = jax.random.normal(jax.random.key(5), (3, 8))
  for mode in ("tensor", "channel"):
    layer = rj.QuantDense(4, use_bias=False, quant=rj.QuantConfig(weight=rj.TensorQuant(scale=mode)))
    v = _init(layer, x)
    k = np.asarray(v["params"]["kernel"])
    scale = np.mean(np.abs(k)) if mode == "tensor" else np.mean(np.abs(k), axis=0, keepdims=True)
    np.testing.assert_allclose(layer.apply(v, x), np.asarray(x) @ (np.where(k >= 0, 1, -1) * scale), rtol=1e-5)


def test_activation_quantization_staircase():
  x = jax.random.normal(jax.random.key(6), (3, 8))
  cfg = rj.QuantConfig(act=rj.TensorQuant(bits=2, method="staircase", estimator="clipped_relu"))
  layer = rj.QuantDense(4, quant=cfg)
  v = _init(layer, x)
  xq = rj.staircase_relu(x, 2)
  np.testing.assert_allclose(layer.apply(v, x), nn.Dense(4).apply(v, xq), rtol=1e-6)
  # the input gradient is the coarse STE's
  gx = jax.grad(lambda x: jnp.sum(layer.apply(v, x)))(x)
  upper = 3 * 0.6511
  mask = ((x > 0) & (x <= upper)).astype(jnp.float32)
  np.testing.assert_allclose(gx, mask * jnp.sum(v["params"]["kernel"], axis=1), rtol=1e-5)


def test_ridge_weights_in_a_conv_layer():
  x = jax.random.normal(jax.random.key(7), (2, 5, 5, 32))
  spec = rj.TensorQuant(bits=2, method="ridge", ridge_block_size=96)  # contraction 3*3*32 = 288
  layer = rj.QuantConv(4, (3, 3), quant=rj.QuantConfig(weight=spec))
  v = _init(layer, x)
  k = v["params"]["kernel"]
  kq = rj.ridge_dequantize(k, 2, axis=(0, 1, 2), block_size=96)
  np.testing.assert_allclose(layer.apply(v, x), nn.Conv(4, (3, 3)).apply({"params": {**v["params"], "kernel": kq}}, x),
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_layer_keeps_its_dtype():
  x = jax.random.normal(jax.random.key(8), (2, 8, 8, 3)).astype(jnp.bfloat16)
  layer = rj.QuantConv(4, (3, 3), quant=W1, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  v = _init(layer, x)
  y = layer.apply(v, x)
  assert y.dtype == jnp.bfloat16
  g = jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x).astype(jnp.float32)))(v["params"])
  assert g["kernel"].dtype == jnp.bfloat16


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), name="first")(x)  # float
    x = rj.QuantConv(4, (3, 3), quant=rj.QuantConfig(weight=rj.TensorQuant(estimator="reste")), name="mid")(x)
    x = x.reshape(x.shape[0], -1)
    x = rj.QuantDense(6, quant=W1, name="hidden")(x)
    return nn.Dense(2, name="last")(x)  # float


def test_quantized_kernels_and_mask():
  x = jnp.ones((1, 6, 6, 3))
  net = _Net()
  found = rj.quantized_kernels(net, x)
  assert set(found) == {("mid", "kernel"), ("hidden", "kernel")}
  assert found[("mid", "kernel")].weight.estimator == "reste"
  params = net.init(jax.random.key(0), x)["params"]
  mask = layers.quantized_kernel_mask(params, found)
  assert mask["mid"]["kernel"] and mask["hidden"]["kernel"]
  assert not mask["first"]["kernel"] and not mask["mid"]["bias"] and not mask["last"]["kernel"]
  with pytest.raises(ValueError, match="not found"):
    layers.quantized_kernel_mask(params, [("nope", "kernel")])


def test_quant_collection_hyperparameters_change_the_gradient_without_recompiling():
  x = jax.random.normal(jax.random.key(9), (2, 6, 6, 3))
  net = _Net()
  variables = net.init(jax.random.key(0), x)
  assert float(variables["quant"]["mid"]["QuantConvGeneralDilated_0"]["weight"]["o"]) == 3.0
  traces = []

  @jax.jit
  def grads(params, quant, o):
    traces.append(None)
    quant = rj.set_quant_hparams(quant, operand="weight", o=o)
    return jax.grad(lambda p: jnp.sum(net.apply({"params": p, "quant": quant}, x) ** 2))(params)

  g1 = grads(variables["params"], variables["quant"], jnp.float32(1.0))
  g3 = grads(variables["params"], variables["quant"], jnp.float32(3.0))
  assert len(traces) == 1
  assert not np.allclose(g1["mid"]["kernel"], g3["mid"]["kernel"])
  # without the collection, the config's initial values (o = 3) are used
  g_default = jax.grad(lambda p: jnp.sum(net.apply({"params": p}, x) ** 2))(variables["params"])
  np.testing.assert_allclose(g_default["mid"]["kernel"], g3["mid"]["kernel"], rtol=1e-5)


def test_set_quant_hparams_rejects_unknown_names():
  variables = _Net().init(jax.random.key(0), jnp.ones((1, 6, 6, 3)))
  with pytest.raises(ValueError, match=r"present: \['clip', 'm', 'o', 't'\]"):
    rj.set_quant_hparams(variables["quant"], beta=2.0)
  with pytest.raises(ValueError, match="operand must be"):
    rj.set_quant_hparams(variables["quant"], operand="kernel", o=1.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=0), r"integer in \[1, 16\]"),
    (dict(bits=2.5), r"integer in \[1, 16\]"),
    (dict(method="log"), "valid methods"),
    (dict(estimator="nope"), "valid estimators"),
    (dict(scale="row"), "valid modes"),
    (dict(estimator="clipped_ste", hparams={"clip": -1.0}), "clip must be >= 0"),
    (dict(estimator="reste", hparams={"o": 0.5}), "o must be >= 1"),
    (dict(estimator="reste", hparams={"beta": 1.0}), "unknown hyperparameter"),
    (dict(method="staircase", estimator="reste"), "coarse STE"),
    (dict(method="staircase", estimator="relu", bits=3), "set alpha"),
    (dict(sparsity="2:4"), "ridge"),
    (dict(method="ridge", ridge_lambda=-1.0), "ridge_lambda"),
])
def test_bad_configs_raise_before_any_work(kwargs, match):
  with pytest.raises(ValueError, match=match):
    rj.TensorQuant(**kwargs)


def test_staircase_is_rejected_for_weights():
  with pytest.raises(ValueError, match="activations"):
    rj.QuantConfig(weight=rj.TensorQuant(method="staircase", estimator="relu", bits=2))


def test_configs_are_hashable_and_normalise_hparams():
  a = rj.TensorQuant(estimator="reste", hparams={"o": 2, "t": 1.5})
  b = rj.TensorQuant(estimator="reste", hparams=(("t", 1.5), ("o", 2.0)))
  assert a == b and hash(a) == hash(b)
  assert a.hparams_dict == {"o": 2.0, "t": 1.5}


# ---------------------------------------------------------------------------
# A NaN latent weight is not pruned and never becomes a code.
# ---------------------------------------------------------------------------

NAN_SPECS = [  # (bits, method, scale, the output columns the NaN at kernel[2, 1] reaches)
    (1, "uniform", "none", [1]), (1, "uniform", "channel", [1]), (1, "uniform", "tensor", [0, 1, 2, 3]),
    (3, "uniform", "none", [0, 1, 2, 3]), (2, "uniform", "channel", [0, 1, 2, 3]),
    (1, "dorefa", "none", [0, 1, 2, 3]), (2, "ridge", "none", [1]),
]


@pytest.mark.parametrize("bits,method,scale,cols", NAN_SPECS, ids=lambda v: str(v))
def test_a_nan_latent_weight_makes_the_outputs_it_reaches_nan(bits, method, scale, cols):
  """Sign: the NaN's output column; Eq. 38, DoReFa and the tensor scale: every column (one max or
  mean|W| over the kernel); the channel scale and ridge (blocks per output column): its column."""
  rng = np.random.default_rng(0)
  k = rng.normal(size=(6, 4)).astype(np.float32)
  k[2, 1], k[4, 3] = np.nan, 0.0  # a corrupted weight and a pruned one
  x = rng.uniform(0.5, 1.5, (5, 6)).astype(np.float32) * rng.choice([-1, 1], (5, 6))
  spec = rj.TensorQuant(bits=bits, method=method, estimator="ste", scale=scale, ridge_block_size=None)
  layer = rj.QuantDense(4, quant=rj.QuantConfig(weight=spec))
  params = {"kernel": jnp.asarray(k), "bias": jnp.zeros(4)}
  y = np.asarray(layer.apply({"params": params}, jnp.asarray(x)))
  nan_cols = np.zeros(4, bool)
  nan_cols[cols] = True
  np.testing.assert_array_equal(np.isnan(y), np.broadcast_to(nan_cols, y.shape))
  q = np.asarray(layers.quantize_tensor(jnp.asarray(k), spec, (0,)))
  assert np.isnan(q[2, 1]) and q[4, 3] == 0.0  # a NaN is not 0: not pruned; the pruned weight stays 0
  if bits == 1 and method == "uniform":  # the healthy columns: x sign(W) (times mean|W| per column)
    s = np.where(k == 0, 0.0, np.where(k >= 0, 1.0, -1.0))
    if scale == "channel":
      s = s * np.mean(np.abs(k), axis=0, keepdims=True)
    np.testing.assert_allclose(y[:, ~nan_cols], (x.astype(np.float64) @ s)[:, ~nan_cols], rtol=1e-5)
  target = jnp.zeros_like(jnp.asarray(y))
  loss = lambda p: jnp.sum((layer.apply({"params": p}, jnp.asarray(x)) - target) ** 2)  # noqa: E731
  assert np.isnan(float(loss(params)))
  g = jax.grad(loss)(params)
  assert g["kernel"].shape == k.shape


def test_a_nan_in_a_conv_kernel_makes_its_output_channel_nan():
  x = jax.random.normal(jax.random.key(9), (2, 6, 6, 3))
  layer = rj.QuantConv(4, (3, 3), quant=W1)
  v = _init(layer, x)
  k = v["params"]["kernel"]
  y_clean = np.asarray(layer.apply(v, x))
  y = np.asarray(layer.apply({"params": {**v["params"], "kernel": k.at[0, 2, 1, 3].set(jnp.nan)}}, x))
  assert np.all(np.isnan(y[..., 3]))  # every window meets the NaN (NaN times a padded 0 is NaN)
  np.testing.assert_array_equal(y[..., :3], y_clean[..., :3])
