"""Pruning: masks, scores, exact-count selection, N:M, AP, cycles, rewinding, an optax transform.

The pure core of iterative pruning with Activate-while-Pruning (AP; Liu,
Ghosh, Tan & Motani, TMLR 2023, arXiv 2212.06145), for any host method and
any optax optimizer. Nothing here trains: the caller trains, calls
:func:`prune_cycle` once per cycle (host side, outside jit), rewinds, and
trains again with ``optax.chain(tx, keep_pruned())``. docs/pruning.md gives
the definitions and every choice the AP notes leave to us.

Example::

    from ricci_jax import pruning

    layers = pruning.layer_paths(model, jnp.zeros((1, 28, 28, 1)), train=False)
    prunable = pruning.PruneRule().prunable(params, layers)       # inner conv / dense kernels
    masks = pruning.init_masks(params)
    schedule = pruning.PruningSchedule(cycles=10, rate=0.2, ap_share=0.02)
    tx = optax.chain(rj.rf_sgd(0.1, quantized=kernels), pruning.keep_pruned())
    theta0 = start = params
    params = train(params, tx, masks)                  # the dense training; update(..., masks=masks)
    for cycle in range(1, schedule.cycles + 1):
      masks, stats = pruning.prune_cycle(schedule, cycle, masks, params, start, prunable, key)
      start = params = pruning.rewind(params, theta0, masks)   # schedule.rewind == "init"
      params = train(params, tx, masks)                # a fresh optimizer state each cycle

=========================  ==================================================
``rules``                  :class:`PruneRule`, :func:`layer_paths`,
                           :func:`nnx_layer_paths`: which leaves are prunable
``masks``                  :func:`init_masks`, :func:`apply_masks`,
                           :func:`sparsity`, :func:`count_alive`
``scores``                 :func:`magnitude_scores`, :func:`lamp_scores`,
                           :func:`random_scores`
``select``                 :func:`prune_lowest`, :func:`prune_fraction`
``nm``                     :func:`nm_masks`, :func:`nm_sparsity_mask`
``ap``                     :func:`ap_prune`
``schedule``               :class:`PruningSchedule`, :func:`prune_cycle`
``rewind``                 :func:`rewind`, :func:`reinit`
``transform``              :func:`keep_pruned`, :func:`mask_gradients`
=========================  ==================================================

No module of this package imports the rest of ``ricci_jax`` at import time:
:mod:`ricci_jax.quantizers` imports :mod:`ricci_jax.pruning.nm`, so the
package loads before the models (whose traces :func:`layer_paths` reads
lazily).
"""

from ricci_jax.pruning.ap import AP_CANDIDATES, AP_SCORES, ap_prune
from ricci_jax.pruning.masks import apply_masks, count_alive, init_masks, sparsity
from ricci_jax.pruning.nm import nm_masks, nm_sparsity_mask
from ricci_jax.pruning.rewind import reinit, rewind
from ricci_jax.pruning.rules import LAYER_SCOPES, OFFICIAL_AP_RULE, PruneRule, layer_paths, nnx_layer_paths
from ricci_jax.pruning.schedule import REWINDS, PruningSchedule, check_sparsity, prune_cycle
from ricci_jax.pruning.scores import SCORES, lamp_scores, magnitude_scores, random_scores
from ricci_jax.pruning.select import SCOPES, prune_fraction, prune_lowest, rounded_count, split_count
from ricci_jax.pruning.transform import keep_pruned, mask_gradients

__all__ = [
    "AP_CANDIDATES",
    "AP_SCORES",
    "LAYER_SCOPES",
    "OFFICIAL_AP_RULE",
    "PruneRule",
    "PruningSchedule",
    "REWINDS",
    "SCOPES",
    "SCORES",
    "ap_prune",
    "apply_masks",
    "check_sparsity",
    "count_alive",
    "init_masks",
    "keep_pruned",
    "lamp_scores",
    "layer_paths",
    "magnitude_scores",
    "mask_gradients",
    "nm_masks",
    "nm_sparsity_mask",
    "nnx_layer_paths",
    "prune_cycle",
    "prune_fraction",
    "prune_lowest",
    "random_scores",
    "reinit",
    "rewind",
    "rounded_count",
    "sparsity",
    "split_count",
]
