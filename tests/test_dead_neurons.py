"""The dead neuron rate (ricci_jax.dead_neurons): hand counts, masking, accumulation, the zoo's ReLU sites.

The references are counted by hand (a tiny network with hand-set weights) or
in NumPy from outputs captured by Flax itself, never by the code under test.
"""

import json
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ricci_jax import dead_neurons as dn
from ricci_jax import models, reporting
from ricci_jax.nnx.zoo import CifarResNet, LeNet5, load_linen_variables


# ----------------------------------------------------------------------------
# A hand-built network: which unit is zero on which input is known by hand.
# ----------------------------------------------------------------------------


class Block(nn.Module):
  @nn.compact
  def __call__(self, h):
    return dn.relu(self, nn.Dense(2, name="d2")(h), "dense")


class Tiny(nn.Module):
  """x (B, 2 positions, 1 channel) -> per-position dense to 3 channels -> ReLU "conv" (B, 2, 3)
  -> flatten -> dense to 2 -> ReLU "block/dense" (a submodule's site) -> head."""

  @nn.compact
  def __call__(self, x, train):
    h = dn.relu(self, nn.Dense(3, name="d1")(x), "conv")
    h = Block(name="block")(h.reshape(h.shape[0], -1))
    return nn.Dense(1, name="head")(h)


TINY_VARIABLES = {"params": {
    # channel 0: x (positive iff x > 0); channel 1: -x (iff x < 0); channel 2: -1 (always dead)
    "d1": {"kernel": jnp.array([[1.0, -1.0, 0.0]]), "bias": jnp.array([0.0, 0.0, -1.0])},
    # unit 0: sum of all six (> 0 for every example below); unit 1: bias -100 (always dead)
    "block": {"d2": {"kernel": jnp.stack([jnp.ones(6), jnp.zeros(6)], axis=1), "bias": jnp.array([0.0, -100.0])}},
    "head": {"kernel": jnp.ones((2, 1)), "bias": jnp.zeros(1)},
}}
# e0 = (1, 2): channel 0 > 0 at both positions; e1 = (-1, 3): ch1 at position 0, ch0 at position 1;
# e2 = (-2, -1): channel 1 at both positions.
TINY_X = jnp.array([[1.0, 2.0], [-1.0, 3.0], [-2.0, -1.0]])[:, :, None]


def test_hand_built_network_counts_and_rates_equal_the_hand_count():
  counts = dn.relu_activity(Tiny(), TINY_VARIABLES, TINY_X, train=False)
  assert sorted(counts.positive) == ["block/dense", "conv"]
  # per position, per channel: examples with a positive output (by hand from the comment above)
  np.testing.assert_array_equal(counts.positive["conv"], [[1, 2, 0], [2, 1, 0]])
  np.testing.assert_array_equal(counts.channel_positive["conv"], [2, 2, 0])
  np.testing.assert_array_equal(counts.positive["block/dense"], [3, 0])
  np.testing.assert_array_equal(counts.channel_positive["block/dense"], [3, 0])
  assert int(counts.examples) == 3

  s = dn.summarize(counts)
  conv, dense, glob = s["sites"]["conv"], s["sites"]["block/dense"], s["global"]
  # conv: 6 positives of 6 units x 3 examples; units never > 0: (ch2, both positions) = 2 of 6;
  # channels: ch0 on e0 and e1, ch1 on e1 and e2, ch2 never: 4 of 3 x 3; dead channels 1 of 3
  assert conv == pytest.approx({"dnr": 12 / 18, "dead_units": 2 / 6, "channel_dnr": 5 / 9,
                                "dead_channels": 1 / 3, "units": 6, "channels": 3})
  assert dense == pytest.approx({"dnr": 3 / 6, "dead_units": 1 / 2, "channel_dnr": 3 / 6,
                                 "dead_channels": 1 / 2, "units": 2, "channels": 2})
  # global, unit-weighted: 9 positives of 8 units x 3; channels: 7 of 5 x 3
  assert glob == pytest.approx({"dnr": 15 / 24, "dead_units": 3 / 8, "channel_dnr": 8 / 15,
                                "dead_channels": 2 / 5, "units": 8, "channels": 5,
                                "dnr_mean_over_sites": (12 / 18 + 3 / 6) / 2, "sites": 2})
  assert s["examples"] == 3
  json.dumps(s)  # plain Python numbers

  record = dn.dnr_record(s, step=7, sparsity=0.5)
  assert record["step"] == 7 and record["sparsity"] == 0.5 and record["mode"] == "train"
  assert record["dnr"] == pytest.approx({"global": 15 / 24, "conv": 12 / 18, "block/dense": 0.5})
  assert record["dead_units"]["conv"] == pytest.approx(1 / 3)
  json.dumps(record)


def test_padded_examples_do_not_count():
  mask = jnp.array([True, False, True])  # e1 is padding
  counts = dn.relu_activity(Tiny(), TINY_VARIABLES, TINY_X, train=False, mask=mask)
  np.testing.assert_array_equal(counts.positive["conv"], [[1, 1, 0], [1, 1, 0]])  # e0 and e2 only
  np.testing.assert_array_equal(counts.channel_positive["conv"], [1, 1, 0])
  np.testing.assert_array_equal(counts.positive["block/dense"], [2, 0])
  assert int(counts.examples) == 2
  kept = dn.relu_activity(Tiny(), TINY_VARIABLES, TINY_X[jnp.array([0, 2])], train=False)
  jax.tree.map(np.testing.assert_array_equal, counts, kept)
  assert dn.summarize(counts) == dn.summarize(kept)


def test_accumulating_two_batches_equals_one_pass_over_their_union():
  model = models.create("lenet5", num_classes=10)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 28, 28, 1)), jnp.float32)
  variables = _fill(model, x)
  measure = jax.jit(lambda x: dn.relu_activity(model, variables, x, train=False))
  first, second = measure(x[:2]), measure(x[2:])
  total = dn.init_counts(jax.eval_shape(measure, x[:2]))
  assert int(total.examples) == 0 and not any(np.any(v) for v in jax.tree.leaves(total))
  total = jax.jit(dn.add_counts)(dn.add_counts(total, first), second)
  union = measure(x)
  jax.tree.map(np.testing.assert_array_equal, total, union)
  assert dn.summarize(total) == dn.summarize(union)
  with pytest.raises(ValueError, match="different ReLU sites"):
    dn.add_counts(total, dn.relu_activity(Tiny(), TINY_VARIABLES, TINY_X, train=False))
  empty = dn.summarize(dn.init_counts(union))
  assert empty["examples"] == 0 and np.isnan(empty["global"]["dnr"])


def test_lenet5_counts_equal_numpy_counts_of_the_bn_outputs_flax_captures():
  """In conv_bn_relu every LeNet-5 ReLU reads one BN's output: > 0 after the ReLU iff > 0 before."""
  model = models.create("lenet5", num_classes=10)
  x = jnp.asarray(np.random.default_rng(1).normal(size=(4, 28, 28, 1)), jnp.float32)
  variables = _fill(model, x)
  _, state = model.apply(variables, x, train=True, mutable=["batch_stats", "intermediates"],
                         capture_intermediates=True)
  counts = dn.relu_activity(model, variables, x, train=True)
  for bn, site in (("bn_init", "relu_init"), ("bn1", "relu1"), ("bn_dense1", "relu_dense1"),
                   ("bn_dense2", "relu_dense2")):
    out = np.asarray(state["intermediates"][bn]["__call__"][0])
    np.testing.assert_array_equal(counts.positive[site], (out > 0).sum(0))
    per_channel = (out > 0).reshape(out.shape[0], -1, out.shape[-1]).any(1).sum(0)
    np.testing.assert_array_equal(counts.channel_positive[site], per_channel)


# ----------------------------------------------------------------------------
# The zoo's ReLU sites, and that recording changes nothing.
# ----------------------------------------------------------------------------


def _fill(model, x, seed=0):  # NNX models are built abstract (nnx.eval_shape) and loaded from these
  """params and batch_stats from NumPy (He-normal kernels, BN running mean 0.1 / var 2, scale 1.5)."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = path[-1].key
    if name == "kernel":
      return jnp.asarray(rng.normal(size=s.shape) * np.sqrt(2.0 / np.prod(s.shape[:-1])), s.dtype)
    value = {"scale": 1.5, "var": 2.0, "mean": 0.1, "bias": 0.05}.get(name, 0.0)
    return jnp.full(s.shape, value, s.dtype)

  return jax.tree_util.tree_map_with_path(leaf, {k: shapes[k] for k in ("params", "batch_stats")})


RESNET20_SITES = ["relu_init"] + [f"stage{s}_block{b}_relu{r}" for s in (1, 2, 3) for b in range(3)
                                  for r in ("1", "_add")]

ZOO = [  # (name, create kwargs, input shape, number of ReLU sites)
    ("lenet5", {}, (28, 28, 1), 4),
    ("mlp", {}, (28, 28, 1), 2),
    ("resnet20", {}, (32, 32, 3), 19),
    ("resnet20", {"order": "conv_relu_bn"}, (32, 32, 3), 19),
    ("resnet20", {"bireal": True}, (32, 32, 3), 19),
    ("vgg_small", {}, (16, 16, 3), 6),
    ("mobilenet_v1", {"alpha": 0.25}, (32, 32, 3), 27),
    ("resnet18", {"width": 4}, (32, 32, 3), 17),
    ("resnet50", {"width": 4}, (32, 32, 3), 49),
]


def test_zoo_site_names():
  x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
  lenet = models.create("lenet5", num_classes=10)
  sites = jax.eval_shape(lambda x: dn.relu_activity(lenet, _fill(lenet, x), x, train=True), x).positive
  assert sorted(sites) == sorted(["relu_init", "relu1", "relu_dense1", "relu_dense2"])
  assert sites["relu_init"].shape == (28, 28, 6) and sites["relu_dense2"].shape == (84,)
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  for kwargs, names in (({}, RESNET20_SITES),
                        ({"order": "conv_relu_bn"}, [n.replace("relu_add", "relu2") for n in RESNET20_SITES]),
                        ({"bireal": True}, [n.replace("relu1", "relu1_add") for n in RESNET20_SITES])):
    net = models.create("resnet20", num_classes=10, **kwargs)
    sites = jax.eval_shape(lambda x, net=net: dn.relu_activity(net, _fill(net, x), x, train=False), x).positive
    assert len(names) == 19 and sorted(sites) == sorted(names), kwargs
    assert sites[names[-1]].shape == (8, 8, 64)  # the last block's last ReLU


@pytest.mark.parametrize("name,kwargs,shape,n_sites", ZOO)
def test_zoo_logits_are_bit_identical_with_and_without_recording(name, kwargs, shape, n_sites):
  model = models.create(name, num_classes=10, **kwargs)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, *shape)), jnp.float32)
  variables = _fill(model, x)
  assert set(jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)) == {
      "params", "batch_stats"}  # init records nothing
  plain = model.apply(variables, x, train=False)
  recorded, state = model.apply(variables, x, train=False, mutable=[dn.RELU_COLLECTION])
  np.testing.assert_array_equal(plain, recorded)
  assert len(state[dn.RELU_COLLECTION]) == n_sites
  plain, stats = model.apply(variables, x, train=True, mutable=["batch_stats"])
  recorded, state = model.apply(variables, x, train=True, mutable=[dn.RELU_COLLECTION, "batch_stats"])
  np.testing.assert_array_equal(plain, recorded)
  jax.tree.map(np.testing.assert_array_equal, stats["batch_stats"], state["batch_stats"])
  assert len(state[dn.RELU_COLLECTION]) == n_sites


def test_jit_of_relu_activity():
  model = models.create("lenet5", num_classes=10)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 28, 28, 1)), jnp.float32)
  variables = _fill(model, x)
  mask = jnp.array([True, True, False, True])
  jitted = jax.jit(dn.relu_activity, static_argnames=("model", "train"))
  for train in (False, True):
    jax.tree.map(np.testing.assert_array_equal, jitted(model, variables, x, train=train, mask=mask),
                 dn.relu_activity(model, variables, x, train=train, mask=mask))


# ----------------------------------------------------------------------------
# NNX: the same sites and counts as Linen; nothing stays in the model.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["conv_bn_relu", "conv_relu_bn"])
def test_nnx_lenet5_counts_equal_the_linen_counts(order):
  linen = models.create("lenet5", num_classes=10, order=order)
  x = jnp.asarray(np.random.default_rng(4).normal(size=(4, 28, 28, 1)), jnp.float32)
  variables = _fill(linen, x)
  model = load_linen_variables(nnx.eval_shape(lambda: LeNet5(order=order, rngs=nnx.Rngs(0))), variables)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  mask = jnp.array([True, False, True, True])
  for train in (True, False):
    model.train() if train else model.eval()
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # no deprecated sow outside nnx.capture
      got = dn.nnx_relu_activity(model, x, mask)
    want = dn.relu_activity(linen, variables, x, train=train, mask=mask)
    assert sorted(got.positive) == sorted(["relu_init", "relu1", "relu_dense1", "relu_dense2"])
    jax.tree.map(np.testing.assert_array_equal, got, want)
  # train mode set for the copy only (and under nnx.jit); the model keeps its batch statistics and
  # holds no recorded output
  model.eval()
  jitted = nnx.jit(lambda m, x, mask: dn.nnx_relu_activity(m, x, mask, train=True))
  jax.tree.map(np.testing.assert_array_equal, jitted(model, x, mask),
               dn.relu_activity(linen, variables, x, train=True, mask=mask))
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  jax.tree.map(np.testing.assert_array_equal, before, after)
  assert not nnx.state(model, nnx.Intermediate)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    model(x)  # an ordinary forward pass records nothing (and does not warn)
  assert not nnx.state(model, nnx.Intermediate)


def test_nnx_resnet20_counts_equal_the_linen_counts():
  linen = models.create("resnet20", num_classes=10, width=4)
  x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 16, 16, 3)), jnp.float32)
  variables = _fill(linen, x)
  model = load_linen_variables(nnx.eval_shape(lambda: CifarResNet(width=4, rngs=nnx.Rngs(0))), variables)
  got = dn.nnx_relu_activity(model, x, train=True)
  assert sorted(got.positive) == sorted(RESNET20_SITES)
  jax.tree.map(np.testing.assert_array_equal, got, dn.relu_activity(linen, variables, x, train=True))


def test_nnx_without_capture_pops_the_recorded_outputs(monkeypatch):
  """flax < 0.12 has no nnx.capture: the outputs are sown into the copy and popped from it."""
  linen = models.create("lenet5", num_classes=10)
  x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 28, 28, 1)), jnp.float32)
  variables = _fill(linen, x)
  model = load_linen_variables(nnx.eval_shape(lambda: LeNet5(rngs=nnx.Rngs(0))), variables)
  want = dn.nnx_relu_activity(model, x, train=False)
  monkeypatch.delattr(nnx, "capture")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # flax 0.12 deprecates sow outside capture
    got = dn.nnx_relu_activity(model, x, train=False)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert not nnx.state(model, nnx.Intermediate)


# ----------------------------------------------------------------------------
# Errors, and the plot.
# ----------------------------------------------------------------------------


def test_a_site_name_used_twice_or_named_global_raises():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return dn.relu(self, dn.relu(self, x, "a"), "a")

  class Global(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      return dn.relu(self, x, "global")

  x = jnp.ones((2, 3))
  with pytest.raises(ValueError, match="recorded 2 times"):
    dn.relu_activity(Twice(), {}, x, train=False)
  with pytest.raises(ValueError, match="may not be named 'global'"):
    dn.relu_activity(Global(), {}, x, train=False)
  with pytest.raises(ValueError, match="batch axis"):
    dn.relu_activity(Tiny(), TINY_VARIABLES, TINY_X, train=False, mask=jnp.ones(2, bool))
  with pytest.raises(TypeError, match="linen or flax.nnx"):
    dn.relu(object(), x, "a")


def test_plot_writes_a_png(tmp_path):
  records = []
  for i, sparsity in enumerate([0.0, 0.0, 0.2, 0.2, 0.36]):
    s = dn.summarize(dn.relu_activity(Tiny(), TINY_VARIABLES, TINY_X * (i + 1), train=False))
    records.append(dn.dnr_record(s, step=100 * i, sparsity=sparsity))
    records.append(dn.dnr_record(s, step=100 * i, sparsity=sparsity, mode="eval"))
  records = json.loads(json.dumps(records))  # as read back from a JSONL file
  for name, rs in (("with_sparsity.png", records),
                   ("steps_only.png", [{k: v for k, v in r.items() if k != "sparsity"} for r in records])):
    reporting.plot_dead_neurons(rs, tmp_path / name, title="tiny")
    assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  reporting.plot_dead_neurons([], tmp_path / "none.png")
  assert not (tmp_path / "none.png").exists()
