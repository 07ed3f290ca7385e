"""The dead neuron rate (DNR) of a ReLU network: which ReLU outputs are exactly 0, per site and overall.

Why: Liu, Ghosh, Tan and Motani ("AP: Selective Activation for
De-sparsifying Pruned Neural Networks", arXiv 2212.06145; TMLR 2023,
OpenReview ``EGQSpkUDdD``) report in their abstracts that the more a ReLU
network is pruned, the smaller its *dynamic dead neuron rate* becomes during
and after training, and their AP method lowers it further. Only the abstracts
and the opening of the paper could be read: **the paper's exact formula was
not retrievable** (nor whether it defines a static rate), and the released
code (``Martin1937/Activate-While-Pruning``) computes no DNR. What this module
measures is therefore **our definition** (the project's AP notes, §4.2: our
design, not the paper's):

* a *unit* ``u`` is one element of a ReLU output: one (h, w, c) site of a
  conv feature map, one feature of a dense layer. ``U`` is the set of units
  of a ReLU *site* (one ReLU call of the network) or of all sites;
* **per-input DNR**: ``DNR(x) = (1/|U|) sum_u 1[relu_u(x) == 0]``, the share of
  ReLU outputs that are exactly 0 (pre-activation <= 0);
* **dynamic DNR**: the mean of ``DNR(x)`` over the training batches, measured
  in **train mode** (BatchNorm on batch statistics) on the batches **as the
  optimizer sees them** (augmented). "Dynamic" because which units are zero
  depends on the input and moves with the weights;
* **post-training DNR**: the same mean over the test set in **eval mode**
  (BatchNorm on its running statistics);
* **static DNR** (``dead_units``): the share of units that are 0 for *every*
  counted example, i.e. permanently dead on that reference set;
* **channel DNR** (``channel_dnr``): a conv channel's ReLU output is first
  averaged over its spatial sites, and the channel counts as dead on an input
  when that average is 0, i.e. when the whole feature map is 0 (a channel is
  the conv analogue of a dense neuron). For dense sites it equals the DNR.
  (Averaging the per-unit zero indicator over space and then over channels
  would merely repeat the DNR, so this is the reading of §4.2's "averages
  over spatial sites first" that carries information.)
* Reporting is per site and **global, unit-weighted** over all sites (the
  plain mean over sites is given beside it).

How: every ReLU of the model zoo (Linen and NNX) goes through :func:`relu`,
which computes ``jax.nn.relu`` and records its output under the site's name.
In Linen this is ``Module.sow`` into the collection :data:`RELU_COLLECTION`,
which does nothing unless that collection is mutable, so ordinary forward
passes are the same computation (bit-identical logits, no extra outputs). In
NNX it is ``Module.sow`` of a :class:`ReluOutput`, done only while
:func:`nnx_relu_activity` runs the model (on a copy, inside ``nnx.capture``),
so the model is never left holding them. A user's own model makes a ReLU
count by writing ``y = dead_neurons.relu(self, x, "my_site")`` where it had
``nn.relu(x)`` (Linen, inside ``@nn.compact`` or ``setup``-defined methods)
or ``nnx.relu(x)`` (NNX); the site names must be unique within the model.

:func:`relu_activity` / :func:`nnx_relu_activity` count, per site and unit,
the examples of a batch whose output is > 0 (a :class:`DeadNeuronCounts`);
:func:`add_counts` accumulates batches and :func:`summarize` turns the total
into the JSON-able rates. All but :func:`summarize` and :func:`dnr_record`
are pure and jit-able.

**Cost**: one extra forward pass of the model on each measured batch (in
train mode without its backward pass, its optimizer update or any change to
the batch statistics), plus a comparison with 0 and a sum over the batch of
every ReLU output. For binarized LeNet-5 at batch 128 on a 2-core CPU that is
0.50x a jitted training step (``benchmarks/dead_neurons_cost.py``, results in
``benchmarks/README.md``): measuring every K steps adds about 0.5 / K of the
training time.
"""

from __future__ import annotations

import contextvars
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array

RELU_COLLECTION = "relu"
"""The Linen collection (and what NNX's :class:`ReluOutput` stands for) holding the recorded ReLU outputs."""

GLOBAL = "global"
"""The key of the all-sites entry in :func:`dnr_record`'s ``"dnr"``; no site may be named so."""

_RECORDING = contextvars.ContextVar("ricci_jax_dead_neurons_recording", default=False)


class ReluOutput(nnx.Intermediate):
  """The NNX variable type of a recorded ReLU output (a subclass, so user intermediates stay apart)."""


def relu(module: Any, x: Array, site: str) -> Array:
  """``jax.nn.relu(x)``, recorded as the ReLU site ``site`` of ``module`` (a Linen or NNX module).

  The one call a model makes for its ReLU to count in the DNR (use it where
  ``nn.relu(x)`` / ``nnx.relu(x)`` was). Linen: ``module.sow`` into
  :data:`RELU_COLLECTION`, skipped while the model is initializing (so
  ``init`` returns the same variables) and a no-op when the collection is not
  mutable. NNX: ``module.sow(ReluOutput, ...)``, only while
  :func:`nnx_relu_activity` is running; otherwise nothing is stored.
  """
  y = jax.nn.relu(x)
  if isinstance(module, nn.Module):
    if not module.is_initializing():
      module.sow(RELU_COLLECTION, site, y)
  elif isinstance(module, nnx.Module):
    if _RECORDING.get():
      module.sow(ReluOutput, site, y)
  else:
    raise TypeError(f"relu records into a flax.linen or flax.nnx Module, got {type(module).__name__}")
  return y


class DeadNeuronCounts(NamedTuple):
  """Counts of positive ReLU outputs over the examples seen (a pytree; add with :func:`add_counts`).

  Attributes:
    positive: per site, int32 of the unit shape (the ReLU output's shape
      without the batch axis: (H, W, C) or (C,)): the number of counted
      examples on which the unit was > 0.
    channel_positive: per site, int32 (C,): the number of counted examples on
      which the channel's output was > 0 somewhere (its spatial mean > 0).
    examples: int32 scalar, the number of examples counted.
  """

  positive: dict[str, Array]
  channel_positive: dict[str, Array]
  examples: Array


def counts_from_outputs(outputs: Mapping[str, Array], mask: Array) -> DeadNeuronCounts:
  """The :class:`DeadNeuronCounts` of one batch from its ReLU outputs ``{site: (batch, ...)}``.

  ``mask`` (batch,): the examples that count (non-zero / True); padded
  examples of a ragged last batch get 0 and count nowhere.
  """
  mask = jnp.asarray(mask)
  if mask.ndim != 1:
    raise ValueError(f"mask must have shape (batch,), got {mask.shape}")
  weight = (mask != 0).astype(jnp.int32)
  positive, channel_positive = {}, {}
  for site, y in outputs.items():
    if site == GLOBAL:
      raise ValueError(f"a ReLU site may not be named {GLOBAL!r} (the key of the all-sites entry)")
    if y.ndim < 2 or y.shape[0] != mask.shape[0]:
      raise ValueError(f"site {site!r}: output shape {y.shape} does not have the batch axis of the mask "
                       f"{mask.shape}")
    active = (y > 0).astype(jnp.int32)
    w = weight.reshape((-1,) + (1,) * (y.ndim - 1))
    positive[site] = jnp.sum(active * w, axis=0, dtype=jnp.int32)
    channel = jnp.max(active, axis=tuple(range(1, y.ndim - 1))) if y.ndim > 2 else active
    channel_positive[site] = jnp.sum(channel * weight[:, None], axis=0, dtype=jnp.int32)
  return DeadNeuronCounts(positive, channel_positive, jnp.sum(weight, dtype=jnp.int32))


def sown_outputs(tree: Mapping[str, Any]) -> dict[str, Array]:
  """``{site: output}`` from a sown tree (Linen collection or NNX pure dict), nested paths joined by ``/``.

  Each site must have been recorded once per forward pass (``sow`` keeps a
  tuple of its values); a site recorded twice is a name used twice, which
  would count examples twice, and raises.
  """
  out: dict[str, Array] = {}

  def walk(node, path):
    for key, value in node.items():
      name = f"{path}/{key}" if path else str(key)
      if isinstance(value, Mapping):
        walk(value, name)
      elif isinstance(value, (tuple, list)):
        if len(value) != 1:
          raise ValueError(f"ReLU site {name!r} was recorded {len(value)} times in one forward pass: "
                           "give every ReLU site its own name")
        out[name] = value[0]
      else:
        out[name] = value

  walk(tree, "")
  return out


def _batch_mask(x: Any, mask: Array | None) -> Array:
  if mask is not None:
    return mask
  return jnp.ones((jax.tree.leaves(x)[0].shape[0],), bool)


def relu_activity(model: nn.Module, variables: Mapping[str, Any], x: Any, *, train: bool,
                  mask: Array | None = None, rngs: Any = None) -> DeadNeuronCounts:
  """Per ReLU site of a Linen ``model``, the number of (counted) examples of ``x`` on which each unit is > 0.

  Runs ``model.apply(variables, x, train=train)`` once with
  :data:`RELU_COLLECTION` mutable (and ``batch_stats`` when ``train``: the
  batch statistics it computes are discarded, so measuring changes nothing).
  ``train=True`` on the augmented training batches is our dynamic DNR,
  ``train=False`` on the test set the post-training DNR (module docstring).
  ``mask`` (batch,) marks the examples that count; ``rngs`` go to ``apply``
  (dropout). Pure and jit-able with ``model`` and ``train`` static.
  """
  variables = {k: v for k, v in variables.items() if k != RELU_COLLECTION}
  mutable = [RELU_COLLECTION] + (["batch_stats"] if train else [])
  _, state = model.apply(variables, x, train=train, mutable=mutable, rngs=rngs)
  return counts_from_outputs(sown_outputs(state.get(RELU_COLLECTION, {})), _batch_mask(x, mask))


def nnx_relu_activity(model: nnx.Module, x: Any, mask: Array | None = None, *,
                      train: bool | None = None) -> DeadNeuronCounts:
  """:func:`relu_activity` for an NNX ``model`` whose ReLUs go through :func:`relu`.

  Runs a copy of ``model`` (``nnx.clone``) on ``x``, so neither its batch
  statistics, its rng state nor the recorded outputs stay in ``model``. The
  mode is the model's own (``model.train()`` / ``model.eval()``) unless
  ``train`` sets it for the copy. Site names are the NNX paths joined by
  ``/``; the NNX zoo's equal the Linen zoo's. Jit-able under ``nnx.jit``.
  """
  copy = nnx.clone(model)
  if train is not None:
    if train:
      copy.train()
    else:
      copy.eval()
  token = _RECORDING.set(True)
  try:
    if hasattr(nnx, "capture"):  # flax >= 0.12: sow outside nnx.capture is deprecated
      _, sown = nnx.capture(copy, ReluOutput)(x)
    else:
      copy(x)
      sown = nnx.pop(copy, ReluOutput)
  finally:
    _RECORDING.reset(token)
  return counts_from_outputs(sown_outputs(nnx.to_pure_dict(sown)), _batch_mask(x, mask))


def init_counts(like: DeadNeuronCounts) -> DeadNeuronCounts:
  """Zero counts with the sites and shapes of ``like`` (counts, or ``jax.eval_shape`` of a measurement)."""
  return jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.int32), like)


def add_counts(total: DeadNeuronCounts, batch: DeadNeuronCounts) -> DeadNeuronCounts:
  """``total + batch``, site by site (the same sites required): counts over the union of the examples."""
  if set(total.positive) != set(batch.positive):
    raise ValueError(f"the counts have different ReLU sites: {sorted(set(total.positive) ^ set(batch.positive))}")
  return jax.tree.map(jnp.add, total, batch)


def _rates(positive: np.ndarray, channel_positive: np.ndarray, n: int) -> dict[str, float]:
  units, channels = positive.size, channel_positive.size
  nan = float("nan")
  return {
      "dnr": 1.0 - float(positive.sum()) / (units * n) if n else nan,
      "dead_units": float(np.mean(positive == 0)) if n else nan,
      "channel_dnr": 1.0 - float(channel_positive.sum()) / (channels * n) if n else nan,
      "dead_channels": float(np.mean(channel_positive == 0)) if n else nan,
      "units": int(units),
      "channels": int(channels),
  }


def summarize(counts: DeadNeuronCounts) -> dict[str, Any]:
  """The rates of ``counts`` as Python numbers (JSON-able; NaN when no example was counted).

  Returns ``{"examples": n, "sites": {site: rates}, "global": rates}`` with
  ``rates`` = ``dnr`` (share of (unit, example) pairs whose output is 0, i.e.
  1 - positives / (units x examples)), ``dead_units`` (share of units never
  > 0 on the counted examples: the static DNR), ``channel_dnr`` (the same as
  ``dnr`` with a channel's spatial mean as the unit; the mean over the
  site's channels), ``dead_channels``, ``units``, ``channels``. ``global``
  weighs the sites by their units (channels for the channel rates) and adds
  ``dnr_mean_over_sites``, the plain mean of the sites' ``dnr``.
  """
  counts = jax.device_get(counts)
  n = int(counts.examples)
  sites = {s: _rates(np.asarray(counts.positive[s]), np.asarray(counts.channel_positive[s]), n)
           for s in counts.positive}
  if sites:
    everything = _rates(np.concatenate([np.ravel(counts.positive[s]) for s in sites]),
                        np.concatenate([np.ravel(counts.channel_positive[s]) for s in sites]), n)
    everything["dnr_mean_over_sites"] = float(np.mean([r["dnr"] for r in sites.values()]))
  else:
    everything = {"dnr": float("nan"), "dead_units": float("nan"), "channel_dnr": float("nan"),
                  "dead_channels": float("nan"), "units": 0, "channels": 0, "dnr_mean_over_sites": float("nan")}
  everything["sites"] = len(sites)
  return {"examples": n, "sites": sites, GLOBAL: everything}


def dnr_record(summary: Mapping[str, Any], step: int, *, sparsity: float | None = None,
               mode: str = "train") -> dict[str, Any]:
  """One line of a DNR log, the input of :func:`ricci_jax.reporting.plot_dead_neurons`.

  ``{"step": step, "mode": mode, "sparsity": sparsity (only when given),
  "examples": n, "dnr": {"global": ..., site: ...}, "dead_units": {"global":
  ..., site: ...}, "channel_dnr": {"global": ..., site: ...}}`` from a
  :func:`summarize` result. ``mode``: ``"train"`` (dynamic DNR) or
  ``"eval"`` (post-training DNR); ``sparsity``: the share of prunable weights
  that are zero, in [0, 1].
  """
  record: dict[str, Any] = {"step": int(step), "mode": mode}
  if sparsity is not None:
    record["sparsity"] = float(sparsity)
  record["examples"] = int(summary["examples"])
  for key in ("dnr", "dead_units", "channel_dnr"):
    record[key] = {GLOBAL: summary[GLOBAL][key], **{s: r[key] for s, r in summary["sites"].items()}}
  return record
