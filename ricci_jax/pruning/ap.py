"""Activate-while-Pruning (AP): extra pruning of negative weights that moved least.

AP (Liu, Ghosh, Tan & Motani, "AP: Selective Activation for De-sparsifying
Pruned Networks", TMLR 2023, arXiv 2212.06145) is not a pruner of its own:
after a host method has pruned, it removes a further small share of the
weights, chosen among the surviving *negative* ones (in a ReLU network,
removing a negative weight on post-ReLU inputs can only raise a
pre-activation, so fewer units are dead; AP notes §5.3), those that changed
least during the cycle's training: score |w_end - w_start| (AP notes §5.1
step 6, §8.4 ``prune_by_percentile_ap``).

Differences from the official code, on purpose (AP notes §8.5, §9):

* exactly ``count`` weights go, ties broken by the lower flat index
  (:mod:`ricci_jax.pruning.select`); the code prunes every candidate whose
  score is <= the element at sorted index k, i.e. k + 1 or more (B8);
* with fewer candidates than ``count``, all candidates go and the number
  actually pruned is returned; the code indexes out of range (B8);
* each weight is counted once; the code's pools repeat the BN scales and the
  classifier (B7).

The switches are the ablations the notes list (§7.4): candidates negative or
any sign, score change / magnitude / random, global or per-leaf scope.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ricci_jax.pruning.paths import host_masks, host_values, leaf_paths, prunable_flags
from ricci_jax.pruning.scores import random_scores
from ricci_jax.pruning.select import check_count, check_scope, lowest

__all__ = ["AP_CANDIDATES", "AP_SCORES", "ap_prune"]

AP_CANDIDATES = ("negative", "any")
"""Which alive prunable weights AP may remove: w_end < 0 (the paper's and code's rule) or any."""

AP_SCORES = ("change", "magnitude", "random")
"""AP's ranking, lowest first: |w_end - w_start| (the code's), |w_end|, or uniform noise."""


def check_ap_options(candidates: str, score: str, scope: str) -> None:
  """A ValueError naming the allowed values when an AP option is unknown."""
  if candidates not in AP_CANDIDATES:
    raise ValueError(f"unknown AP candidates {candidates!r}; allowed: {', '.join(AP_CANDIDATES)}")
  if score not in AP_SCORES:
    raise ValueError(f"unknown AP score {score!r}; allowed: {', '.join(AP_SCORES)}")
  check_scope(scope, "AP scope")


def ap_prune(masks: Any, params_end: Any, params_start: Any, prunable: Any, count: int, *,
             candidates: str = "negative", score: str = "change", scope: str = "global",
             key: jax.Array | None = None) -> tuple[Any, int]:
  """AP's removal: up to ``count`` alive prunable candidates with the smallest score.

  Args:
    masks: the masks after the host's pruning (True = alive).
    params_end: the weights at the end of the cycle's training (w_T).
    params_start: the weights at the start of the cycle's training (the
      rewind point, the fresh draw, or the pre-retraining weights).
    prunable: a tree of Python bools (:meth:`ricci_jax.pruning.PruneRule.prunable`).
    count: AP's budget (the caller computes it, e.g. round(p_ap x alive
      before the host's pruning), :func:`ricci_jax.pruning.prune_cycle`).
    candidates: ``"negative"`` (w_end < 0) or ``"any"``.
    score: ``"change"`` |w_end - w_start|, ``"magnitude"`` |w_end| or
      ``"random"`` (needs ``key``).
    scope: ``"global"`` (one ranking, the code's) or ``"layer"``: the budget
      split over the prunable leaves in proportion to their *candidate*
      counts (largest remainder), so no leaf is asked for more candidates
      than it has.
    key: a PRNG key, for ``score="random"`` only.

  Returns:
    ``(new_masks, pruned)``: ``pruned`` = min(count, number of candidates),
    the number actually removed.
  """
  check_ap_options(candidates, score, scope)
  count = check_count(count, "AP count")
  if score == "random" and key is None:
    raise ValueError("ap_prune(score='random') needs a PRNG key (key=)")
  flags = prunable_flags(prunable, masks, "masks")
  current = host_masks(masks, masks, "masks")
  end = host_values(params_end, "params_end", masks, "masks")
  if score == "change":
    start = host_values(params_start, "params_start", masks, "masks")
    values = [np.abs(e - s) for e, s in zip(end, start)]
  elif score == "magnitude":
    values = [np.abs(e) for e in end]
  else:
    values = host_values(random_scores(params_end, key), "random scores", masks, "masks")
  names = leaf_paths(masks)
  sel = [i for i, f in enumerate(flags) if f]
  eligible = [(current[i] & (end[i] < 0) if candidates == "negative" else current[i]).ravel() for i in sel]
  pruned = min(count, int(sum(e.sum() for e in eligible)))
  removed = lowest([values[i].ravel() for i in sel], eligible, pruned, scope, [names[i] for i in sel])
  out = [jnp.asarray(m) for m in current]
  for i, r in zip(sel, removed):
    out[i] = jnp.asarray(current[i] & ~r.reshape(current[i].shape))
  return jax.tree.unflatten(jax.tree.structure(masks), out), pruned
