"""An NNX model seen through Linen's functional interface: ``init`` and ``apply`` over a variables dict.

The training program (:mod:`ricci_jax.train`), its checkpoints, ``init_from``
and every step function are written against the functional convention most
JAX training code uses: a variables dict ``{"params", "batch_stats",
"quant"}`` passed to ``apply(variables, x, train=..., mutable=[...])``.
:class:`Functional` gives an NNX model that interface, so the same program
trains a Linen or an NNX model and nothing downstream has two code paths.
Flax's own ``nnx.bridge.to_linen`` wraps an NNX module in a Linen module
instead; it passes ``train`` on to the module's ``__call__`` (NNX models
switch mode with ``model.train()`` / ``model.eval()``) and names a custom
variable type's collection after the type, so it fits neither the zoo nor
our ``"quant"`` collection.

The variable types map to collections one to one:

* ``nnx.Param`` -> ``"params"``,
* ``nnx.BatchStat`` -> ``"batch_stats"``,
* :class:`ricci_jax.nnx.QuantHparam` -> ``"quant"`` (estimator
  hyperparameters; :func:`ricci_jax.layers.set_quant_hparams` sets them by
  name, as for Linen, so a schedule stays a traced value).

Each collection is the variables' pure dict (``nnx.to_pure_dict``): nested
dicts keyed by the model's attribute names, which for the NNX zoo
(:mod:`ricci_jax.nnx.zoo`) are the Linen zoo's layer names, so a Linen run's
parameters initialise an NNX run (``init_from``) and back. A model with any
other kind of variable (an ``nnx.Rngs`` stream for dropout, say) is refused:
``apply`` would have nowhere to keep it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from flax import nnx

from ricci_jax.nnx.ops import QuantHparam
from ricci_jax.nnx.quantize import quant_plan

COLLECTIONS = {"params": nnx.Param, "batch_stats": nnx.BatchStat, "quant": QuantHparam}
"""The variables dict's collections and the NNX variable type each holds."""


class Functional:
  """``init`` / ``apply`` of the NNX model that ``build(rngs)`` returns (built, and quantized, as for training).

  Args:
    build: ``build(rngs) -> nnx.Module``; called once abstractly here (no
      computation) for the graph, and by :meth:`init` for the initial values.

  Attributes:
    graphdef: the model's static structure (its layers, their quantizing
      ops and configs); the variables dict carries everything else.
  """

  def __init__(self, build: Callable[[nnx.Rngs], nnx.Module]):
    self.build = build
    abstract = nnx.eval_shape(lambda: build(nnx.Rngs(0)))
    graphdef, *states, rest = nnx.split(abstract, *COLLECTIONS.values(), ...)
    leftover = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(rest)]
    if leftover:
      raise ValueError(
          f"{type(abstract).__name__} has variables that are not parameters, batch statistics or quantizer "
          f"hyperparameters ({', '.join(leftover[:5])}); the functional view keeps only "
          f"{', '.join(t.__name__ for t in COLLECTIONS.values())}")
    self.graphdef = graphdef
    self._templates = dict(zip(COLLECTIONS, states))
    self.model_class = type(abstract)

  def __repr__(self) -> str:
    return f"Functional({self.model_class.__name__})"

  def init(self, rngs: jax.Array, *args: Any, train: bool = False) -> dict[str, Any]:
    """The initial variables dict of a model built with ``nnx.Rngs(rngs)``.

    ``args`` (example inputs) and ``train`` are accepted for Linen's
    signature and not needed: an NNX model's shapes are fixed when it is built.
    """
    del args, train
    model = self.build(nnx.Rngs(rngs))
    return self.variables(model)

  def variables(self, model: nnx.Module) -> dict[str, Any]:
    """``model``'s variables dict (a collection the model does not have is ``{}``)."""
    return {name: nnx.to_pure_dict(nnx.state(model, kind)) for name, kind in COLLECTIONS.items()}

  def module(self, variables: Mapping[str, Any]) -> nnx.Module:
    """A model with these variables (a fresh object each call: the caller may change it)."""
    states = []
    for name, template in self._templates.items():
      state = jax.tree.map(lambda v: v, template)  # a copy: replace_by_pure_dict writes in place
      if jax.tree.leaves(template):
        nnx.replace_by_pure_dict(state, variables.get(name, {}))
      states.append(state)
    return nnx.merge(self.graphdef, *states)

  def apply(self, variables: Mapping[str, Any], *args: Any, train: bool = False,
            mutable: bool | str | Sequence[str] = False) -> Any:
    """The model's output, as Linen's ``apply``: with ``mutable``, ``(output, {"batch_stats": ...})``.

    ``train=True`` computes with batch statistics and updates the running
    ones (``model.train()``); ``train=False`` uses the running ones
    (``model.eval()``). Only ``"batch_stats"`` can be mutable.
    """
    names = [mutable] if isinstance(mutable, str) else list(mutable or [])
    unknown = sorted(set(names) - {"batch_stats"})
    if unknown:
      raise ValueError(f"an NNX model's apply can update only 'batch_stats', got mutable={unknown}")
    model = self.module(variables)
    if train:
      model.train()
    else:
      model.eval()
    out = model(*args)
    if not names:
      return out
    return out, {"batch_stats": nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))}

  def quantized_kernels(self) -> dict[tuple[str, ...], Any]:
    """The path in ``params`` of every quantized kernel with its :class:`ricci_jax.QuantConfig`.

    As :func:`ricci_jax.models.inspect.quantized_kernels` gives for a Linen
    model: from the quantizing ops installed in the graph.
    """
    model = nnx.merge(self.graphdef, *self._templates.values())
    return {tuple(path.split("/")) + ("kernel",): config for path, config in quant_plan(model).items()
            if config is not None and config.weight is not None}
