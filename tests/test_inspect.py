"""The model tracer (ricci_jax.models.inspect) and the import structure around it."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ricci_jax as rj
from ricci_jax import layers, models
from ricci_jax.models import QuantRule, inspect

ROOT = pathlib.Path(__file__).resolve().parent.parent
W1 = rj.TensorQuant(bits=1, estimator="clipped_ste")


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), padding="VALID", name="first")(x)  # float: 6x6x3 -> 4x4x4
    x = rj.QuantConv(5, (3, 3), quant=rj.QuantConfig(weight=rj.TensorQuant(estimator="reste"), act=W1),
                     strides=(2, 2), name="mid")(x)  # 4x4x4 -> 2x2x5
    x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
    x = x.reshape(x.shape[0], -1)
    x = rj.QuantDense(6, quant=rj.QuantConfig(act=W1), name="act_only")(x)  # input quantized only
    x = rj.QuantDense(7, quant=rj.QuantConfig(weight=W1), name="hidden")(x)
    return nn.Dense(2, name="last")(x)


def test_the_trace_records_every_call_in_order_with_shapes_and_configs():
  x = jax.ShapeDtypeStruct((3, 6, 6, 3), jnp.float32)
  t = inspect.trace(_Net(), x, train=False)
  modules = [k for k, c in t.calls.items() if not isinstance(c.module, inspect.QUANT_OPS)]
  assert modules == ["", "first", "mid", "bn", "act_only", "hidden", "last"]
  assert list(t.layers()) == ["first", "mid", "act_only", "hidden", "last"]
  shapes = {k: (c.inputs[0].shape, c.output_shape) for k, c in t.calls.items() if k}
  assert shapes["first"] == ((3, 6, 6, 3), (3, 4, 4, 4))
  assert shapes["mid"] == ((3, 4, 4, 4), (3, 2, 2, 5))
  assert shapes["bn"] == ((3, 2, 2, 5), (3, 2, 2, 5))
  assert shapes["act_only"] == ((3, 20), (3, 6)) and shapes["last"] == ((3, 7), (3, 2))
  assert t.calls["mid"].inputs[0].dtype == jnp.float32
  plan = t.plan()
  assert plan["first"] is None and plan["last"] is None
  assert plan["mid"].weight.estimator == "reste" and plan["mid"].act == W1
  assert plan["act_only"] == rj.QuantConfig(act=W1) and plan["hidden"] == rj.QuantConfig(weight=W1)
  assert list(t.kernels()) == [("mid", "kernel"), ("hidden", "kernel")]  # act_only quantizes no kernel
  assert t.calls["bn"].config is None and not t.calls["bn"].is_layer


def test_the_public_tracers_agree_with_the_trace():
  x = jnp.zeros((1, 6, 6, 3))
  t = inspect.trace(_Net(), x, train=False)
  assert inspect.layer_plan(_Net(), x, train=False) == models.layer_plan(_Net(), x, train=False) == t.plan()
  assert rj.quantized_kernels(_Net(), x, train=False) == inspect.quantized_kernels(_Net(), x) == t.kernels()
  params = _Net().init(jax.random.key(0), x)["params"]
  mask = layers.quantized_kernel_mask(params, t.kernels())
  assert mask["mid"]["kernel"] and mask["hidden"]["kernel"] and not mask["act_only"]["kernel"]


def test_unused_overrides_are_the_patterns_no_layer_name_matches():
  rule = QuantRule(weight=W1, overrides={"dense1": rj.QuantConfig(), "nope": rj.QuantConfig()})
  with pytest.warns(UserWarning, match="nope"):
    model = models.create("lenet5", num_classes=10, quant=rule)
  assert inspect.unused_overrides(model, inspect.example_input((28, 28, 1)), train=False) == ["nope"]


def test_variables_are_checked_against_the_model():
  model = models.create("mlp", num_classes=10, hidden=(5,))
  shapes = inspect.abstract_variables(model, (28, 28, 1))
  assert shapes["params"]["dense_init"]["kernel"].shape == (784, 5)
  drawn = inspect.random_variables(model, (28, 28, 1))
  params, stats = inspect.split_variables(drawn)
  flat = inspect.check_variables(model, (28, 28, 1), params, stats)
  assert sorted(flat["params"]) == sorted(inspect.flatten(shapes["params"]))
  np.testing.assert_array_equal(flat["batch_stats"]["bn_init/var"], drawn["batch_stats"]["bn_init"]["var"])
  with pytest.raises(inspect.VariablesError, match=r"params missing \[dense_init/kernel\]"):
    inspect.check_variables(model, (28, 28, 1), {k: v for k, v in params.items() if k != "dense_init"}, stats)
  assert models.input_shape_for(model) == (28, 28, 1) and models.input_shape_for(_Net(), (6, 6, 3)) == (6, 6, 3)
  with pytest.raises(ValueError, match="pass input_shape"):
    models.input_shape_for(_Net())
  assert models.name_of(models.create("resnet20", num_classes=10)) == "resnet20" and models.name_of(_Net()) is None


# ----------------------------------------------------------------------------
# No import circle: the export side never loads the training program.
# ----------------------------------------------------------------------------

SERVING_SIDE = ("ricci_jax.export", "ricci_jax.summary", "ricci_jax.inference", "ricci_jax.models.inspect",
                "ricci_jax.models.serialization")


@pytest.mark.parametrize("module", SERVING_SIDE)
def test_importing_the_export_side_does_not_load_the_training_program(module):
  code = (f"import sys, json, {module}\n"
          "print(json.dumps(sorted(m for m in sys.modules if m in ('ricci_jax.train', 'ricci_jax.train_config'))))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def _module_imports() -> dict[str, set[str]]:
  """Module-level imports between ricci_jax modules (function-level imports are left out), by module."""
  files = {}
  for path in (ROOT / "ricci_jax").rglob("*.py"):
    parts = path.relative_to(ROOT).with_suffix("").parts
    files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
  graph = {}
  for name, path in files.items():
    edges = set()
    for node in ast.parse(path.read_text()).body:  # top level only
      if isinstance(node, ast.Import):
        edges |= {a.name for a in node.names if a.name in files}
      elif isinstance(node, ast.ImportFrom) and node.module in files:
        for a in node.names:
          edges.add(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module)
    graph[name] = edges - {name}
  return graph


def test_no_import_circle_through_the_export_side():
  graph = _module_imports()
  touched = [m for m in graph if m.startswith(("ricci_jax.export", "ricci_jax.models")) or m in (
      "ricci_jax.summary", "ricci_jax.inference", "ricci_jax.layers", "ricci_jax.quantizers")]
  for start in touched:
    stack, seen = [start], set()
    while stack:
      for nxt in graph.get(stack.pop(), ()):
        assert nxt != start, f"{start} imports itself through {sorted(seen)}"
        if nxt not in seen:
          seen.add(nxt)
          stack.append(nxt)
  for module in SERVING_SIDE:  # nor does anything it imports reach the training program
    stack, seen = [module], set()
    while stack:
      for nxt in graph.get(stack.pop(), ()):
        if nxt not in seen:
          seen.add(nxt)
          stack.append(nxt)
    assert not seen & {"ricci_jax.train", "ricci_jax.train_config"}, module
