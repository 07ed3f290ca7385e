"""A model's quantization, size and cost, layer by layer: :func:`summary`.

For every layer that owns parameters, in the order the forward pass calls
them: its type, how its kernel (W) and input (A) are quantized (bits, method,
estimator, scale mode), its parameter count, their memory in float32 and as
:func:`ricci_jax.export.pack` stores them, and its multiply-accumulates per
example. Then the totals: parameters (quantized and float), BatchNorm running
statistics, the memory of both, the compression ratio against float32, and the
MACs split by precision.

**MAC precision** (larq's convention): a layer's MACs are *binary* when both
its kernel and its input are 1-bit (XNOR-popcount hardware territory),
*k-bit* when both are quantized and one has more bits, and *float* otherwise,
including a quantized kernel on a float input (W1A32: the multiplies become
sign flips, but the additions stay float).

**Packed memory** is what the packed file's payload holds for the layer: the
bytes of every stored array (:func:`ricci_jax.export.packed_nbytes`), not the
file's header. Ridge kernels are counted as ``pack(..., exact=False)`` stores
them (exact packing refuses them).

**Pruned weights** (latent weights exactly 0, which quantize to exactly 0:
:func:`ricci_jax.layers.quantize_tensor`) are counted when the summary has
the weights (``params`` for a Linen model; an NNX model's own state or the
one given): per conv / dense kernel, ``pruned`` and ``sparsity``. A pruned
weight costs no MAC, so ``macs_saved`` is the pruned weights times the
positions each kernel weight is applied at (``prod(output.shape[1:-1])``; 1
for a dense layer). Memory: a pruned quantized kernel is packed as a mask of
one bit per weight plus the codes of its kept weights
(:mod:`ricci_jax.export.tensors`), which ``packed_bytes`` counts;
``dense_packed_bytes`` is what the same kernel takes unpruned, so the saving
is their difference (negative for a binary kernel: the mask bit costs what a
pruned sign saved). A float kernel is stored as it is, zeros included. The
MAC counts (``macs``) stay those of the dense layer. (Sparse-network
accounting as in Han et al., "Deep Compression", ICLR 2016.)

MACs are counted from the model, not from a table: the forward pass is traced
abstractly (:func:`ricci_jax.models.inspect.trace`: ``jax.eval_shape``, no
computation) with every module call recorded, and a layer's MACs are its
output elements times its kernel's fan-in (``prod(kernel.shape[:-1])``; right
for grouped and depthwise convs). Which layers are quantized, and how, comes
from the same trace (the model's own ``model.quant`` rule).

Example::

    print(rj.summary(model, variables["params"]))                   # the model's own rule
    print(rj.summary(train.build_model(config, 10)))                # the training program's model
    table = rj.summary(model.clone(quant=rule), params); table.to_dict()  # JSON-able
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import nnx

from ricci_jax import export, models
from ricci_jax.quant_config import QuantConfig, TensorQuant
from ricci_jax.models import inspect, serialization
from ricci_jax.nnx import describe, zoo
from ricci_jax.nnx.trace import trace
from ricci_jax.summary_table import format_summary

MAC_PRECISIONS = ("binary", "k-bit", "float")
"""The MAC classes, see the module docstring."""


@dataclasses.dataclass(frozen=True)
class LayerSummary:
  """One row: a module that owns parameters.

  Attributes:
    name: its path (``/``-joined).
    type: ``conv 3x3``, ``conv 3x3 /2`` (stride 2), ``dense``, ``batchnorm``, ...
    weight: its kernel's quantizer (``None``: float or no kernel).
    act: its input's quantizer (``None``: float or not a conv / dense).
    params: parameter count.
    kernel_params: of which in its kernel (0 without one).
    float32_bytes: the parameters' bytes in float32.
    packed_bytes: the bytes :func:`ricci_jax.export.pack` stores for them.
    macs: multiply-accumulates per example (0 for a layer without a kernel),
      pruned weights included.
    mac_precision: one of :data:`MAC_PRECISIONS`, or ``None`` without MACs.
    pruned: exact zeros in its conv / dense kernel (0 when not counted).
    sparsity: ``pruned / kernel_params`` (0.0 without a kernel).
    macs_saved: of ``macs``, those of the pruned weights.
    dense_packed_bytes: ``packed_bytes`` as if nothing were pruned (no mask,
      every weight's code).
  """

  name: str
  type: str
  weight: TensorQuant | None
  act: TensorQuant | None
  params: int
  kernel_params: int
  float32_bytes: int
  packed_bytes: int
  macs: int
  mac_precision: str | None
  pruned: int = 0
  sparsity: float = 0.0
  macs_saved: int = 0
  dense_packed_bytes: int = 0

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "weight": serialization.tensor_quant_to_json(self.weight),
            "act": serialization.tensor_quant_to_json(self.act)}


@dataclasses.dataclass(frozen=True)
class Summary:
  """A model's summary; ``str(summary)`` is the table.

  Attributes:
    model: the model's name (``resnet20``) or class.
    input_shape: one example's shape.
    dtype: the compute dtype (kernels are quantized in it).
    rows: one per module that owns parameters, in call order.
    stats_count: BatchNorm running statistics (values).
    stats_bytes: their bytes (float32, stored as they are in both).
    pruning_counted: whether the weights were read, so ``pruned`` is a count
      (a Linen model summarised without ``params``: not, and it is 0).
  """

  model: str
  input_shape: tuple[int, ...]
  dtype: str
  rows: tuple[LayerSummary, ...]
  stats_count: int
  stats_bytes: int
  pruning_counted: bool = False

  @property
  def params(self) -> int:
    return sum(r.params for r in self.rows)

  @property
  def quantized_params(self) -> int:
    """Parameters in quantized kernels."""
    return sum(r.kernel_params for r in self.rows if r.weight is not None)

  @property
  def float32_bytes(self) -> int:
    return sum(r.float32_bytes for r in self.rows)

  @property
  def packed_bytes(self) -> int:
    return sum(r.packed_bytes for r in self.rows)

  @property
  def macs(self) -> dict[str, int]:
    """MACs per example by precision (every key of :data:`MAC_PRECISIONS`)."""
    out = dict.fromkeys(MAC_PRECISIONS, 0)
    for r in self.rows:
      if r.mac_precision is not None:
        out[r.mac_precision] += r.macs
    return out

  @property
  def prunable_params(self) -> int:
    """Weights in conv / dense kernels (those a pruned count is taken of)."""
    return sum(r.kernel_params for r in self.rows if r.mac_precision is not None)

  @property
  def pruned(self) -> int:
    return sum(r.pruned for r in self.rows)

  @property
  def macs_saved(self) -> int:
    return sum(r.macs_saved for r in self.rows)

  @property
  def dense_packed_bytes(self) -> int:
    return sum(r.dense_packed_bytes for r in self.rows)

  def pruning(self) -> dict[str, Any]:
    """The pruning totals (JSON-able; also in :meth:`totals`)."""
    return {
        "pruning_counted": self.pruning_counted, "pruned": self.pruned, "prunable_params": self.prunable_params,
        "sparsity": round(self.pruned / self.prunable_params, 6) if self.prunable_params else 0.0,
        "macs_saved": self.macs_saved, "macs_after_pruning": sum(self.macs.values()) - self.macs_saved,
        "dense_packed_bytes": self.dense_packed_bytes,
        "pruning_bytes_saved": self.dense_packed_bytes - self.packed_bytes,
    }

  def totals(self) -> dict[str, Any]:
    """The totals as a JSON-able dict (what the training program saves with its results)."""
    with_stats_f32 = self.float32_bytes + self.stats_bytes
    with_stats_packed = self.packed_bytes + self.stats_bytes
    return {
        "params": self.params, "quantized_params": self.quantized_params,
        "float_params": self.params - self.quantized_params,
        "float32_bytes": self.float32_bytes, "packed_bytes": self.packed_bytes,
        "compression": _ratio(self.float32_bytes, self.packed_bytes),
        "batch_stats": self.stats_count, "batch_stats_bytes": self.stats_bytes,
        "float32_bytes_with_stats": with_stats_f32, "packed_bytes_with_stats": with_stats_packed,
        "compression_with_stats": _ratio(with_stats_f32, with_stats_packed),
        "macs": sum(self.macs.values()), "macs_by_precision": self.macs, **self.pruning(),
    }

  def to_dict(self) -> dict[str, Any]:
    return {"model": self.model, "input_shape": list(self.input_shape), "dtype": self.dtype,
            "layers": [r.to_dict() for r in self.rows], "totals": self.totals()}

  def text(self) -> str:
    """The table and the totals, as printed."""
    return format_summary(self)

  def __str__(self) -> str:
    return self.text()


def _ratio(a: int, b: int) -> float:
  return round(a / b, 2) if b else float("inf")


# ----------------------------------------------------------------------------
# The rows.
# ----------------------------------------------------------------------------


def _pair(value: Any, n: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * n
  if isinstance(value, int):
    return (value,) * n
  return tuple(int(v) for v in value)


def _type(mod: Any, kernel_shape: tuple[int, ...] | None) -> str:
  if isinstance(mod, (nn.Conv, nnx.Conv)):
    window = kernel_shape[:-2]
    label = "conv " + "x".join(str(k) for k in window)
    strides = _pair(mod.strides, len(window))
    if any(s != 1 for s in strides):
      label += " /" + "x".join(str(s) for s in strides) if len(set(strides)) > 1 else f" /{strides[0]}"
    if mod.feature_group_count > 1:
      label = ("dw" if kernel_shape[-2] == 1 else f"g{mod.feature_group_count} ") + label
    return label
  if isinstance(mod, (nn.Dense, nnx.Linear)):
    return "dense"
  if isinstance(mod, (nn.BatchNorm, nnx.BatchNorm)):
    return "batchnorm"
  return type(mod).__name__.lower() if mod is not None else "?"


def mac_precision(config: QuantConfig | None) -> str:
  """The MAC class of a conv / dense layer with ``config`` (see the module docstring)."""
  w = config.weight.bits if config is not None and config.weight is not None else None
  a = config.act.bits if config is not None and config.act is not None else None
  if w is None or a is None:
    return "float"
  return "binary" if max(w, a) == 1 else "k-bit"


def summary(model: Any, params: Any = None, *, batch_stats: Any = None,
            input_shape: tuple[int, ...] | None = None) -> Summary:
  """Per-layer quantization, parameters, memory (float32 and packed) and MACs of a model.

  Args:
    model: the model (e.g. from :func:`ricci_jax.models.create`, or the
      training program's ``ricci_jax.train.build_model(config, num_classes)``),
      quantized as its own ``model.quant`` rule says (another rule:
      ``model.clone(quant=rule)``). Or a Flax NNX model, float or quantized
      by :func:`ricci_jax.nnx.quantize` (its installed configs decide).
    params: its parameters (checked against the model: shapes must match), a
      variables dict or a training checkpoint; ``None`` counts from the
      model's abstract shapes. For an NNX model: a state for it
      (``nnx.state(model)`` or a nested dict), only checked.
    batch_stats: BatchNorm statistics, if not in ``params`` (only checked;
      their count comes from the model).
    input_shape: one example's shape, for a model outside the zoo.

  Returns:
    A :class:`Summary`; ``print`` it for the table.

  Raises:
    ricci_jax.export.ExportError: not a model, parameters that do not match
      the model, or a model outside the zoo without ``input_shape``.
  """
  if isinstance(model, nnx.Module):
    return nnx_summary(model, params, input_shape=input_shape)
  if not isinstance(model, nn.Module):
    raise export.ExportError(
        f"summary(model, params) takes the model (a flax.linen.Module or flax.nnx.Module), got {type(model).__name__}; for the "
        "training program's config, build its model first: ricci_jax.train.build_model(config, num_classes)")
  try:
    shape = models.input_shape_for(model, input_shape)
  except ValueError as e:  # a model outside the zoo
    raise export.ExportError(str(e)) from None
  values = None
  if params is not None:
    try:
      params, batch_stats = inspect.split_variables(params, batch_stats)
      inspect.check_variables(model, shape, params, batch_stats, require_stats=False)
    except inspect.VariablesError as e:
      raise export.ExportError(str(e)) from None
    values = concrete_values(inspect.flatten(params))
  abstract = inspect.abstract_variables(model, shape)
  flat_params = inspect.flatten(abstract.get("params"))
  stats = list(inspect.flatten(abstract.get("batch_stats")).values())
  calls = inspect.trace(model, inspect.example_input(shape), train=False).calls
  dtype = inspect.compute_dtype(model)
  return Summary(
      model=models.name_of(model) or type(model).__name__, input_shape=tuple(shape), dtype=dtype.name,
      rows=_rows(flat_params, calls, lambda owner: dtype, values), stats_count=sum(math.prod(s.shape) for s in stats),
      stats_bytes=sum(math.prod(s.shape) * s.dtype.itemsize for s in stats), pruning_counted=values is not None)


def concrete_values(flat: dict[str, Any]) -> dict[str, np.ndarray] | None:
  """``flat`` as NumPy arrays, or ``None`` if a leaf is abstract (``jax.eval_shape``'s: nothing to count)."""
  if any(isinstance(v, jax.ShapeDtypeStruct) or not hasattr(v, "__array__") for v in flat.values()):
    return None
  return {k: np.asarray(jax.device_get(v)) for k, v in flat.items()}


def nnx_summary(model: nnx.Module, state: Any = None, *, input_shape: tuple[int, ...] | None = None) -> Summary:
  """:func:`summary` of a Flax NNX model: rows read from one eval-mode trace (:mod:`ricci_jax.nnx.describe`).

  The rows are those of the same model written in Linen: every module that
  owns ``nnx.Param`` s, by path, in call order; its config is the one
  :func:`ricci_jax.nnx.quantize` installed; a quantized kernel's packed size
  is counted in the dtype its op computes it in. The summary's dtype is the
  logits'.

  Raises:
    ricci_jax.export.ExportError: a state that does not fit the model, or no
      ``input_shape`` for a model outside the NNX zoo.
  """
  shape = tuple(int(d) for d in input_shape) if input_shape is not None else zoo.input_shape(model)
  if shape is None:
    raise export.ExportError(f"{type(model).__name__} is not a model of ricci_jax.nnx.zoo: pass "
                             "input_shape=(H, W, C)")
  try:
    values = describe.variables(model, state, require_stats=False)["params"]  # the model's own if None
    abstract = describe.abstract_variables(model)
  except describe.StateError as e:
    raise export.ExportError(str(e)) from None
  calls = trace(model, jax.ShapeDtypeStruct((1, *shape), np.float32), eval_mode=True)
  layers = describe.layers(calls)
  stats = list(abstract["batch_stats"].values())
  out = calls[""].output if "" in calls else None
  return Summary(
      model=zoo.name_of(model) or type(model).__name__, input_shape=shape,
      dtype=np.dtype(out.dtype).name if out is not None else "float32",
      rows=_rows(abstract["params"], layers, lambda owner: layers[owner].kernel_dtype, values),
      stats_count=sum(math.prod(s.shape) for s in stats),
      stats_bytes=sum(math.prod(s.shape) * s.dtype.itemsize for s in stats), pruning_counted=True)


def _rows(flat_params: dict[str, Any], calls: Any, kernel_dtype: Any,
          values: dict[str, np.ndarray] | None = None) -> tuple[LayerSummary, ...]:
  """One row per module owning parameters, in call order.

  ``calls``: by path, with ``module``, ``config``, ``is_layer`` and
  ``output_shape`` (a Linen :class:`~ricci_jax.models.inspect.Call` or an NNX
  :class:`~ricci_jax.nnx.describe.Layer`); ``kernel_dtype(owner)``: the dtype
  a quantized kernel is computed in; ``values``: the parameters by path, to
  count pruned weights (``None``: not counted).
  """
  owners: dict[str, list[str]] = {}
  for path in flat_params:
    owner, _, leaf = path.rpartition("/")
    owners.setdefault(owner, []).append(leaf)
  order = {p: i for i, p in enumerate(calls)}
  rows = []
  for owner in sorted(owners, key=lambda p: (order.get(p, len(order)), p)):
    leaves = {leaf: tuple(flat_params[f"{owner}/{leaf}"].shape) for leaf in owners[owner]}
    itemsize = {leaf: flat_params[f"{owner}/{leaf}"].dtype.itemsize for leaf in owners[owner]}
    call = calls.get(owner)
    config_ = call.config if call is not None else None
    weight = config_.weight if config_ is not None else None
    kernel = leaves.get("kernel")
    macs, precision, uses, pruned = 0, None, 0, 0
    if kernel is not None and call is not None and call.is_layer and call.output_shape is not None:
      macs = math.prod(call.output_shape[1:]) * math.prod(kernel[:-1])
      precision = mac_precision(config_)
      uses = math.prod(call.output_shape[1:-1])  # positions each kernel weight is applied at
      if values is not None:  # zeros as the forward sees them: a quantized kernel in its compute dtype
        value = values[f"{owner}/kernel"]
        pruned = int(np.sum(value.astype(kernel_dtype(owner)) == 0 if weight is not None else value == 0))
    packed = dense = 0
    for leaf, leaf_shape in leaves.items():
      spec = weight if leaf == "kernel" else None
      if spec is None:
        packed += math.prod(leaf_shape) * itemsize[leaf]
        dense += math.prod(leaf_shape) * itemsize[leaf]
      else:
        packed += export.packed_nbytes(leaf_shape, spec, kernel_dtype(owner), pruned=pruned)
        dense += export.packed_nbytes(leaf_shape, spec, kernel_dtype(owner))
    count = sum(math.prod(s) for s in leaves.values())
    kernel_params = math.prod(kernel) if kernel is not None else 0
    rows.append(LayerSummary(
        name=owner, type=_type(call.module if call is not None else None, kernel), weight=weight,
        act=config_.act if config_ is not None else None, params=count,
        kernel_params=kernel_params, float32_bytes=4 * count,
        packed_bytes=packed, macs=macs, mac_precision=precision, pruned=pruned,
        sparsity=round(pruned / kernel_params, 6) if kernel_params else 0.0, macs_saved=pruned * uses,
        dense_packed_bytes=dense))
  return tuple(rows)
