"""Iterative pruning: :class:`PruningSchedule` and one cycle, :func:`prune_cycle`.

A run trains the dense network, then repeats ``cycles`` times: prune a share
of the alive prunable weights (the host method, then AP), rewind, retrain.
This module decides the pruning of one cycle; training, rewinding
(:mod:`ricci_jax.pruning.rewind`) and the learning rate are the caller's,
driven by the schedule's fields.

Counts (our definitions, the AP notes leave them to us, §6 "How AP
composes", §9):

* alive_before = the alive prunable weights before the cycle's pruning;
* total = round(rate x alive_before), AP's budget = round(ap_share x
  alive_before), both rounded half up (:func:`ricci_jax.pruning.rounded_count`);
  AP's budget is counted **before** the host prunes, as in the official code
  (``int(len(pool) * percent_ap / 100)`` on the pre-pruning pool, notes §8.4);
* the host removes total - AP's budget, so host + AP = total exactly (the
  host's count is round((rate - ap_share) x alive_before) within one);
* AP removes its budget among the survivors; with fewer candidates it
  removes them all and the shortfall is reported (``ap_removed`` <
  ``ap_budget``), not made up by the host;
* before ``ap_start_cycle`` (or with ap_share = 0) the host removes the whole
  total.

So the remaining fraction after k cycles is (1 - rate)^k up to rounding:
:meth:`PruningSchedule.remaining`, 0.8^k for the official 20% (notes §5.1
grid: 80, 64, 51.2, 41.0, ...).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import jax

from ricci_jax.pruning.ap import ap_prune, check_ap_options
from ricci_jax.pruning.masks import count_alive, sparsity
from ricci_jax.pruning.nm import check_nm, nm_masks
from ricci_jax.pruning.scores import SCORES, lamp_scores, magnitude_scores, random_scores
from ricci_jax.pruning.select import check_scope, prune_lowest, rounded_count

__all__ = ["REWINDS", "PruningSchedule", "check_sparsity", "prune_cycle"]

REWINDS = ("init", "early", "none", "reinit")
"""What the survivors restart from after a prune: θ_0 (lottery ticket), θ_j at
``rewind_step`` (late rewinding), the trained weights, or a fresh draw."""


def check_sparsity(value: Any, name: str = "sparsity") -> float:
  """``value`` as a float, or a ValueError unless it is a sparsity in [0, 1)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
    raise ValueError(f"{name} must be a sparsity in [0, 1) (the pruned share; 1 would prune everything), "
                     f"got {value!r}")
  return float(value)


def _check_int(name: str, value: Any, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
    raise ValueError(f"PruningSchedule.{name} must be an integer >= {low}, got {value!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    raise ValueError(f"unknown PruningSchedule.{name} {value!r}; allowed: {', '.join(allowed)}")


@dataclasses.dataclass(frozen=True)
class PruningSchedule:
  """How many cycles, how much per cycle, by which score, with how much AP, and the rewind.

  Attributes:
    cycles: pruning cycles after the dense training (>= 1).
    rate: share of the alive prunable weights removed per cycle, in (0, 1)
      (host and AP together).
    method: the host score: ``"magnitude"`` (GMP / IMP), ``"lamp"`` or
      ``"random"`` (:mod:`ricci_jax.pruning.scores`).
    scope: the host's selection, ``"global"`` or ``"layer"``
      (:mod:`ricci_jax.pruning.select`; LAMP is meant to be global).
    ap_share: AP's share of the alive weights counted before the host prunes;
      part of ``rate`` (the host removes rate - ap_share), in [0, rate].
    ap_start_cycle: the first cycle (1-based) with AP; earlier cycles prune
      the whole rate by the host.
    ap_candidates, ap_score, ap_scope: AP's switches
      (:func:`ricci_jax.pruning.ap_prune`); the defaults are the official
      code's: negative weights, smallest |w_end - w_start|, one global ranking.
    rewind: ``"init"`` (lottery-ticket rewind to θ_0), ``"early"`` (late
      rewinding to the weights at step ``rewind_step`` of the dense training,
      Frankle et al. 2020), ``"none"`` (keep the trained weights: learning-rate
      rewinding with ``lr_rewind``, Renda et al. 2020, fine-tuning without) or
      ``"reinit"`` (a fresh draw each cycle, the official code's default).
    rewind_step: the step of the dense training to rewind to (``"early"``
      only; :meth:`check_rewind_step` checks it against the cycle's length).
    lr_rewind: restart the learning-rate schedule each cycle (the official
      code does: its iteration counter restarts every training run).
    nm: an optional final N:M pattern ``(n, m)``, 0 < N < M, applied by
      :func:`prune_cycle` after the last cycle's pruning
      (:func:`ricci_jax.pruning.nm_masks`, contraction axis).
  """

  cycles: int
  rate: float
  method: str = "magnitude"
  scope: str = "global"
  ap_share: float = 0.0
  ap_start_cycle: int = 1
  ap_candidates: str = "negative"
  ap_score: str = "change"
  ap_scope: str = "global"
  rewind: str = "init"
  rewind_step: int = 0
  lr_rewind: bool = True
  nm: tuple[int, int] | None = None

  def __post_init__(self):
    _check_int("cycles", self.cycles, 1)
    if isinstance(self.rate, bool) or not isinstance(self.rate, numbers.Real) or not 0.0 < self.rate < 1.0:
      raise ValueError(f"PruningSchedule.rate (the share of the alive prunable weights removed per cycle) "
                       f"must be in (0, 1), got {self.rate!r}")
    _check_choice("method", self.method, SCORES)
    check_scope(self.scope, "PruningSchedule.scope")
    if isinstance(self.ap_share, bool) or not isinstance(self.ap_share, numbers.Real) or self.ap_share < 0:
      raise ValueError(f"PruningSchedule.ap_share must be in [0, rate] = [0, {self.rate}], got {self.ap_share!r}")
    if self.ap_share > self.rate:
      raise ValueError(f"PruningSchedule: an AP share larger than the cycle's rate (ap_share {self.ap_share} > "
                       f"rate {self.rate}); AP's share is part of the rate: allowed [0, {self.rate}]")
    _check_int("ap_start_cycle", self.ap_start_cycle, 1)
    if self.ap_share > 0 and self.ap_start_cycle > self.cycles:
      raise ValueError(f"PruningSchedule.ap_start_cycle {self.ap_start_cycle} is after the last cycle "
                       f"({self.cycles}): AP would never run; allowed 1..{self.cycles}, or ap_share=0")
    check_ap_options(self.ap_candidates, self.ap_score, self.ap_scope)
    _check_choice("rewind", self.rewind, REWINDS)
    _check_int("rewind_step", self.rewind_step, 0)
    if self.rewind != "early" and self.rewind_step != 0:
      raise ValueError(f"PruningSchedule.rewind_step is used only with rewind='early', got rewind_step="
                       f"{self.rewind_step} with rewind={self.rewind!r}")
    if not isinstance(self.lr_rewind, bool):
      raise ValueError(f"PruningSchedule.lr_rewind must be True or False, got {self.lr_rewind!r}")
    if self.nm is not None:
      try:
        n, m = self.nm
      except (TypeError, ValueError):
        raise ValueError(f"PruningSchedule.nm must be None or a pair (N, M) with 0 < N < M, got {self.nm!r}") from None
      object.__setattr__(self, "nm", check_nm(n, m))

  @classmethod
  def official_ap(cls, cycles: int = 24, **changes) -> PruningSchedule:
    """The official AP code's setting (``resnet_20.py`` at 95a063b, AP notes §5.1, §5.4, §8).

    Global magnitude pruning of 20% of the alive weights per cycle, of which
    AP's 2% (of the alive weights before the host prunes), AP from the first
    pruning cycle (``threshold = -1``) on negative weights by the smallest
    change, one global ranking, ``rewind="reinit"`` (its default
    ``--prune_type``; ``"init"`` is its ``lt`` mode) and the learning-rate
    schedule restarted every training run. 24 pruning cycles after the dense
    one (``--prune_iterations 25``). Its scope includes the stem, the
    classifier and the BN scales: pair it with
    ``PruneRule(layers="all", extra=(r".*/scale",))``
    (:data:`ricci_jax.pruning.OFFICIAL_AP_RULE`). ``changes`` override fields.
    """
    fields = dict(cycles=cycles, rate=0.2, method="magnitude", scope="global", ap_share=0.02, ap_start_cycle=1,
                  ap_candidates="negative", ap_score="change", ap_scope="global", rewind="reinit",
                  rewind_step=0, lr_rewind=True, nm=None)
    return cls(**{**fields, **changes})

  @classmethod
  def to_reach(cls, target_sparsity: float, rate: float = 0.2, **fields) -> PruningSchedule:
    """A schedule with the fewest cycles (at least one) whose (1 - rate)^k <= 1 - target_sparsity.

    Raises:
      ValueError: ``target_sparsity`` outside [0, 1), or any field's error.
    """
    target = check_sparsity(target_sparsity, "target_sparsity")
    probe = cls(cycles=1, rate=rate, **fields)  # validates rate and the other fields
    cycles = 1
    while probe.remaining(cycles) > 1.0 - target + 1e-12:
      cycles += 1
    return dataclasses.replace(probe, cycles=cycles)

  def check_rewind_step(self, steps_per_cycle: int) -> None:
    """Raises a ValueError unless 0 <= rewind_step < steps_per_cycle (the dense training's steps)."""
    _check_int("check_rewind_step's steps_per_cycle", steps_per_cycle, 1)
    if not 0 <= self.rewind_step < steps_per_cycle:
      raise ValueError(f"PruningSchedule.rewind_step {self.rewind_step} is after the cycle's end: a cycle "
                       f"trains {steps_per_cycle} steps, allowed 0..{steps_per_cycle - 1}")

  def ap_active(self, cycle: int) -> bool:
    """Whether AP prunes in ``cycle`` (1-based)."""
    return self.ap_share > 0 and cycle >= self.ap_start_cycle

  def remaining(self, cycle: int, total: int | None = None) -> float:
    """The fraction of the prunable weights alive after ``cycle`` cycles.

    Without ``total``, (1 - rate)^cycle. With ``total`` (the number of
    prunable weights), the counts :func:`prune_cycle` removes, rounded as
    it rounds them (assuming AP always finds its candidates). The final N:M
    pattern is not included.
    """
    _check_int("remaining's cycle", cycle, 0)
    if total is None:
      return (1.0 - self.rate) ** cycle
    _check_int("remaining's total", total, 1)
    alive = int(total)
    for _ in range(cycle):
      alive -= rounded_count(self.rate * alive)
    return alive / total

  def to_json(self) -> dict[str, Any]:
    """A JSON-able dict; :meth:`from_json` inverts it."""
    out = dataclasses.asdict(self)
    out["nm"] = None if self.nm is None else list(self.nm)
    return out

  @classmethod
  def from_json(cls, data: Mapping[str, Any]) -> PruningSchedule:
    data = dict(data)
    if data.get("nm") is not None:
      data["nm"] = tuple(data["nm"])
    return cls(**data)


def host_scores(method: str, params: Any, masks: Any, key: jax.Array | None) -> Any:
  """The host's scores of ``params`` by ``method`` (one of :data:`ricci_jax.pruning.scores.SCORES`)."""
  if method == "magnitude":
    return magnitude_scores(params)
  if method == "lamp":
    return lamp_scores(params, masks)
  if method == "random":
    if key is None:
      raise ValueError("PruningSchedule(method='random') needs a PRNG key: prune_cycle(..., key=key)")
    return random_scores(params, key)
  raise ValueError(f"unknown pruning method {method!r}; allowed: {', '.join(SCORES)}")


def prune_cycle(schedule: PruningSchedule, cycle: int, masks: Any, params_end: Any, params_start: Any,
                prunable: Any, key: jax.Array | None = None) -> tuple[Any, dict[str, Any]]:
  """One cycle's pruning: the host, then AP, then (last cycle) the N:M pattern.

  Args:
    schedule: the :class:`PruningSchedule`.
    cycle: this cycle's number, 1..schedule.cycles.
    masks: the masks before this cycle's pruning.
    params_end: the weights at the end of the cycle's training (scored).
    params_start: the weights at its start (AP's change score).
    prunable: a tree of Python bools (:meth:`ricci_jax.pruning.PruneRule.prunable`).
    key: a PRNG key; needed when the host method or AP's score is random.

  Returns:
    ``(new_masks, stats)`` with Python numbers: cycle, alive_before,
    host_removed, ap_budget, ap_removed, nm_removed, alive_after and
    sparsity (global over the prunable leaves). The module docstring gives
    the counts.
  """
  if not isinstance(schedule, PruningSchedule):
    raise ValueError(f"prune_cycle needs a PruningSchedule, got {schedule!r}")
  if isinstance(cycle, bool) or not isinstance(cycle, numbers.Integral) or not 1 <= cycle <= schedule.cycles:
    raise ValueError(f"cycle must be an integer in 1..{schedule.cycles} (the schedule's cycles), got {cycle!r}")
  host_key = ap_key = None
  if key is not None:
    host_key, ap_key = jax.random.split(key)
  alive_before = count_alive(masks, prunable)
  total = rounded_count(schedule.rate * alive_before)
  ap_budget = rounded_count(schedule.ap_share * alive_before) if schedule.ap_active(cycle) else 0
  host = total - ap_budget
  scores = host_scores(schedule.method, params_end, masks, host_key)
  masks = prune_lowest(scores, masks, prunable, host, schedule.scope)
  ap_removed = 0
  if ap_budget:
    masks, ap_removed = ap_prune(masks, params_end, params_start, prunable, ap_budget,
                                 candidates=schedule.ap_candidates, score=schedule.ap_score,
                                 scope=schedule.ap_scope, key=ap_key)
  nm_removed = 0
  if schedule.nm is not None and cycle == schedule.cycles:
    before = count_alive(masks, prunable)
    masks = nm_masks(params_end, masks, prunable, *schedule.nm)
    nm_removed = before - count_alive(masks, prunable)
  stats = sparsity(masks, prunable)["global"]
  return masks, {"cycle": int(cycle), "alive_before": alive_before, "host_removed": host, "ap_budget": ap_budget,
                 "ap_removed": ap_removed, "nm_removed": nm_removed, "alive_after": stats["alive"],
                 "sparsity": stats["sparsity"]}
