"""The pruning core against independent references: plain NumPy (float64) loops and hand counts.

Selection (global, per leaf, ties, no revival), LAMP, N:M, AP (exact count, negative, smallest change,
short of candidates), one cycle's totals and the remaining fraction, masks that hold through 50 optimizer
steps (and the official code's bug B3 without keep_pruned), rewinding, PruneRule on LeNet-5, the schedule's
validation and jit.
"""

import fractions
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ricci_jax as rj
from ricci_jax import pruning, quantizers

# ---------------------------------------------------------------------------
# A small params tree and NumPy references.
# ---------------------------------------------------------------------------

PRUNABLE = {"bn": {"bias": False, "scale": False}, "conv": {"bias": False, "kernel": True},
            "dense": {"kernel": True}, "head": {"bias": False, "kernel": True}}
SHAPES = {"bn": {"bias": (4,), "scale": (4,)}, "conv": {"bias": (4,), "kernel": (3, 3, 4, 4)},
          "dense": {"kernel": (8, 6)}, "head": {"bias": (3,), "kernel": (6, 3)}}


def _is_shape(x):
  return isinstance(x, tuple)


def _params(seed=0, decimals=None):
  """Random float32 params; ``decimals`` rounds them so that many magnitudes tie."""
  rng = np.random.default_rng(seed)

  def draw(shape):
    x = rng.normal(size=shape)
    return jnp.asarray(np.round(x, decimals) if decimals is not None else x, jnp.float32)

  return jax.tree.map(draw, SHAPES, is_leaf=_is_shape)


def _masks(seed=1, dead=0.3):
  """Masks with a share ``dead`` of each prunable leaf already pruned; the rest all True."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s, f: jnp.asarray(rng.random(s) >= dead if f else np.ones(s, bool)),
                      SHAPES, PRUNABLE, is_leaf=_is_shape)


def _flat(tree):
  """Leaves as float64/bool NumPy arrays in jax.tree order, with their '/'-joined paths."""
  out = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out.append(("/".join(k.key for k in path), np.asarray(x)))
  return out


def _half_up(x):
  return int(math.floor(x + 0.5))


def _reference_lowest(scores, masks, prunable, count, scope):
  """Removed positions {(leaf index, flat index)} by a direct sort of (score, global flat index)."""
  s, m, f = _flat(scores), _flat(masks), jax.tree.leaves(prunable)
  entries = []  # (score, global index, leaf, flat index)
  offset = 0
  for leaf, ((_, sv), (_, mv), flag) in enumerate(zip(s, m, f)):
    if flag:
      for i, (v, alive) in enumerate(zip(sv.astype(np.float64).ravel(), mv.ravel())):
        if alive:
          entries.append((float(v), offset + i, leaf, i))
      offset += mv.size
  if scope == "global":
    return {(e[2], e[3]) for e in sorted(entries)[:count]}
  leaves = sorted({e[2] for e in entries})
  sizes = {leaf: sum(1 for e in entries if e[2] == leaf) for leaf in leaves}
  total = sum(sizes.values())
  exact = {leaf: fractions.Fraction(count * sizes[leaf], total) for leaf in leaves}
  quota = {leaf: math.floor(exact[leaf]) for leaf in leaves}
  by_remainder = sorted(leaves, key=lambda leaf: (-(exact[leaf] - quota[leaf]), leaf))
  for leaf in by_remainder[:count - sum(quota.values())]:
    quota[leaf] += 1
  out = set()
  for leaf in leaves:
    out |= {(e[2], e[3]) for e in sorted(x for x in entries if x[2] == leaf)[:quota[leaf]]}
  return out


def _removed(old, new):
  return {(leaf, i) for leaf, ((_, a), (_, b)) in enumerate(zip(_flat(old), _flat(new)))
          for i in np.flatnonzero(a.ravel() & ~b.ravel())}


def _check_never_revived(old, new):
  for (path, a), (_, b) in zip(_flat(old), _flat(new)):
    assert b.dtype == np.bool_ and not np.any(b & ~a), path


# ---------------------------------------------------------------------------
# Masks and counts.
# ---------------------------------------------------------------------------


def test_masks_counts_and_apply_by_hand():
  params, masks = _params(), _masks()
  init = pruning.init_masks(params)
  assert all(np.asarray(m).dtype == np.bool_ and np.all(m) for m in jax.tree.leaves(init))
  dead = {p: int((~m).sum()) for p, m in _flat(masks)}
  assert dead["bn/scale"] == dead["head/bias"] == 0
  alive = {p: int(m.sum()) for p, m in _flat(masks)}
  want = alive["conv/kernel"] + alive["dense/kernel"] + alive["head/kernel"]
  assert pruning.count_alive(masks, PRUNABLE) == want
  stats = pruning.sparsity(masks, PRUNABLE)
  assert set(stats) == {"conv/kernel", "dense/kernel", "head/kernel", "global"}
  assert stats["dense/kernel"] == {"alive": alive["dense/kernel"], "total": 48,
                                   "sparsity": 1 - alive["dense/kernel"] / 48}
  assert stats["global"]["alive"] == want and stats["global"]["total"] == 144 + 48 + 18
  assert isinstance(stats["global"]["sparsity"], float) and isinstance(stats["global"]["alive"], int)
  out = pruning.apply_masks(params, masks)
  for (p, w), (_, m), (_, o) in zip(_flat(params), _flat(masks), _flat(out)):
    np.testing.assert_array_equal(o, np.where(m, w, 0.0), err_msg=p)


def test_apply_masks_mask_gradients_and_keep_pruned_jit():
  params, masks = _params(), _masks()
  np.testing.assert_array_equal(jax.jit(pruning.apply_masks)(params, masks)["dense"]["kernel"],
                                pruning.apply_masks(params, masks)["dense"]["kernel"])
  g = jax.jit(pruning.mask_gradients)(params, masks)
  assert np.all(np.asarray(g["conv"]["kernel"])[~np.asarray(masks["conv"]["kernel"])] == 0)
  tx = pruning.keep_pruned()
  updates, _ = jax.jit(lambda u, s, p, m: tx.update(u, s, p, masks=m))(params, tx.init(params), params, masks)
  np.testing.assert_array_equal(updates["dense"]["kernel"],
                                np.where(masks["dense"]["kernel"], params["dense"]["kernel"],
                                         -np.asarray(params["dense"]["kernel"])))
  with pytest.raises(ValueError, match="needs the pruning masks"):
    tx.update(params, tx.init(params), params)
  with pytest.raises(ValueError, match="needs the current params"):
    tx.update(params, tx.init(params), masks=masks)


# ---------------------------------------------------------------------------
# Selection.
# ---------------------------------------------------------------------------


def test_split_count_by_hand():
  assert pruning.split_count(5, [5, 3, 2]) == [3, 1, 1]  # 2.5, 1.5, 1.0: the tie goes to the first
  assert pruning.split_count(3, [1, 1, 1, 1]) == [1, 1, 1, 0]
  assert pruning.split_count(7, [10, 0, 4]) == [5, 0, 2]  # 5.0, 0, 2.0
  assert pruning.split_count(0, [3, 4]) == [0, 0]
  assert pruning.rounded_count(2.5) == 3 and pruning.rounded_count(3.5) == 4 and pruning.rounded_count(2.49) == 2


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("count", [0, 1, 17, 60, 140])
@pytest.mark.parametrize("decimals", [None, 1])  # 1 decimal: many ties
def test_prune_lowest_matches_the_numpy_reference(scope, count, decimals):
  params, masks = _params(decimals=decimals), _masks()
  scores = pruning.magnitude_scores(params)
  new = pruning.prune_lowest(scores, masks, PRUNABLE, count, scope)
  _check_never_revived(masks, new)
  got = _removed(masks, new)
  assert len(got) == count
  assert got == _reference_lowest(scores, masks, PRUNABLE, count, scope)
  for (path, a), (_, b), flag in zip(_flat(masks), _flat(new), jax.tree.leaves(PRUNABLE)):
    if not flag:
      np.testing.assert_array_equal(a, b, err_msg=path)


def test_ties_go_to_the_lower_flat_index_and_pruned_weights_are_never_counted():
  params = jax.tree.map(lambda s: jnp.ones(s, jnp.float32), SHAPES, is_leaf=_is_shape)
  masks = pruning.init_masks(params)
  masks["conv"]["kernel"] = masks["conv"]["kernel"].at[0, 0, 0, :2].set(False)
  new = pruning.prune_lowest(pruning.magnitude_scores(params), masks, PRUNABLE, 3)
  # all scores tie: the first three alive entries of conv/kernel (the first prunable leaf) go
  flat = np.asarray(new["conv"]["kernel"]).ravel()
  np.testing.assert_array_equal(flat[:6], [False, False, False, False, False, True])
  assert pruning.count_alive(new, PRUNABLE) == pruning.count_alive(masks, PRUNABLE) - 3
  # a pruned weight with the lowest score is neither revived nor counted
  scores = pruning.magnitude_scores(params)
  scores["dense"]["kernel"] = scores["dense"]["kernel"].at[0, 0].set(-5.0)
  masks["dense"]["kernel"] = masks["dense"]["kernel"].at[0, 0].set(False)
  again = pruning.prune_lowest(scores, masks, PRUNABLE, 1)
  assert not again["dense"]["kernel"][0, 0] and len(_removed(masks, again)) == 1


def test_layer_scope_splits_the_count_by_alive_counts():
  params, masks = _params(), _masks(dead=0.0)  # alive 144, 48, 18 (sum 210)
  new = pruning.prune_lowest(pruning.magnitude_scores(params), masks, PRUNABLE, 21, "layer")
  removed = {p: int((a & ~b).sum()) for (p, a), (_, b) in zip(_flat(masks), _flat(new))}
  # 14.4, 4.8, 1.8: floors 14, 4, 1 (19), the two largest remainders get one more
  assert (removed["conv/kernel"], removed["dense/kernel"], removed["head/kernel"]) == (14, 5, 2)


def test_prune_fraction_rounds_half_up_and_bad_counts_raise():
  params = _params()
  masks = pruning.init_masks(params)
  masks["head"]["kernel"] = jnp.zeros((6, 3), bool)
  masks["dense"]["kernel"] = jnp.zeros(48, bool).at[:7].set(True).reshape(8, 6)
  prunable = {**PRUNABLE, "conv": {"bias": False, "kernel": False}}  # 7 alive prunable weights
  new = pruning.prune_fraction(pruning.magnitude_scores(params), masks, prunable, 0.5)
  assert pruning.count_alive(new, prunable) == 3  # round(3.5) = 4 removed
  scores = pruning.magnitude_scores(params)
  with pytest.raises(ValueError, match="only 7 alive prunable weights"):
    pruning.prune_lowest(scores, masks, prunable, 8)
  with pytest.raises(ValueError, match="non-negative integer"):
    pruning.prune_lowest(scores, masks, prunable, -1)
  with pytest.raises(ValueError, match="fraction must be in"):
    pruning.prune_fraction(scores, masks, prunable, 1.5)
  with pytest.raises(ValueError, match="unknown scope 'row'"):
    pruning.prune_lowest(scores, masks, prunable, 1, "row")
  scores["dense"]["kernel"] = scores["dense"]["kernel"].at[0, 1].set(jnp.nan)
  with pytest.raises(ValueError, match="NaN score.*dense/kernel"):
    pruning.prune_lowest(scores, masks, prunable, 1)


# ---------------------------------------------------------------------------
# Scores.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("decimals", [None, 1])
def test_lamp_scores_match_a_double_loop(decimals):
  params, masks = _params(decimals=decimals), _masks()
  params["dense"]["kernel"] = params["dense"]["kernel"].at[0, :3].set(0.0)
  got = pruning.lamp_scores(params, masks)
  for (path, w), (_, m), (_, s) in zip(_flat(params), _flat(masks), _flat(got)):
    w, m = w.astype(np.float64).ravel(), m.ravel()
    want = np.full(w.size, np.inf)
    for u in range(w.size):
      if m[u]:
        denom = sum(w[v] ** 2 for v in range(w.size) if m[v] and abs(w[v]) >= abs(w[u]))
        want[u] = w[u] ** 2 / denom if denom > 0 else 0.0
    np.testing.assert_allclose(s.ravel(), want, rtol=1e-12, err_msg=path)
  # each leaf's largest alive weight scores 1
  assert np.max(np.asarray(got["dense"]["kernel"])[np.asarray(masks["dense"]["kernel"])]) == 1.0


def test_random_scores_are_a_reproducible_draw():
  params = _params()
  a, b = pruning.random_scores(params, jax.random.key(3)), pruning.random_scores(params, jax.random.key(3))
  for (_, x), (_, y), (_, p) in zip(_flat(a), _flat(b), _flat(params)):
    np.testing.assert_array_equal(x, y)
    assert x.shape == p.shape and np.all((x >= 0) & (x < 1))
  assert not np.array_equal(a["conv"]["kernel"], pruning.random_scores(params, jax.random.key(4))["conv"]["kernel"])


# ---------------------------------------------------------------------------
# N:M.
# ---------------------------------------------------------------------------


def _nm_reference(w, mask, n, m, axis=-2):
  w, mask = np.moveaxis(np.abs(np.asarray(w, np.float64)), axis, -1), np.moveaxis(np.asarray(mask), axis, -1)
  keep = np.zeros(w.shape, bool)
  for idx in np.ndindex(w.shape[:-1]):
    for g in range(0, w.shape[-1], m):
      score = [(-(w[idx][g + j] if mask[idx][g + j] else -1.0), j) for j in range(m)]
      for _, j in sorted(score)[:n]:
        keep[idx + (g + j,)] = mask[idx][g + j]
  return np.moveaxis(keep, -1, axis)


@pytest.mark.parametrize("n,m", [(2, 4), (1, 3)])
def test_nm_masks_match_a_numpy_loop(n, m):
  shapes = {"conv": {"kernel": (3, 3, 12, 4)}, "dense": {"kernel": (12, 5)}, "bn": {"scale": (5,)}}
  rng = np.random.default_rng(5)
  params = jax.tree.map(lambda s: jnp.asarray(np.round(rng.normal(size=s), 1), jnp.float32), shapes,
                        is_leaf=_is_shape)
  masks = jax.tree.map(lambda s: jnp.asarray(rng.random(s) > 0.2), shapes, is_leaf=_is_shape)
  prunable = {"conv": {"kernel": True}, "dense": {"kernel": True}, "bn": {"scale": True}}
  new = pruning.nm_masks(params, masks, prunable, n, m)
  for key in ("conv", "dense"):
    want = _nm_reference(params[key]["kernel"], masks[key]["kernel"], n, m)
    np.testing.assert_array_equal(new[key]["kernel"], want, err_msg=key)
  np.testing.assert_array_equal(new["bn"]["scale"], masks["bn"]["scale"])  # 1-D leaves keep their mask
  full = pruning.nm_masks(params, pruning.init_masks(params), prunable, n, m)
  per_group = np.asarray(full["dense"]["kernel"]).reshape(12 // m, m, 5).sum(axis=1)
  np.testing.assert_array_equal(per_group, n)


def test_nm_masks_bad_pattern_raises():
  params = {"dense": {"kernel": jnp.ones((10, 3))}}
  masks, prunable = pruning.init_masks(params), {"dense": {"kernel": True}}
  with pytest.raises(ValueError, match=r"leaf 'dense/kernel' has length 10 along axis -2 \(M = 4\)"):
    pruning.nm_masks(params, masks, prunable, 2, 4)
  for n, m in [(4, 4), (0, 2), (3, 2)]:
    with pytest.raises(ValueError, match="0 < N < M"):
      pruning.nm_masks(params, masks, prunable, n, m)


def test_quantizers_reexport_the_nm_mask():
  assert quantizers.nm_sparsity_mask is pruning.nm_sparsity_mask
  x = jnp.array([[0.1, -3.0, 2.0, 0.5]]).T
  np.testing.assert_array_equal(quantizers.nm_sparsity_mask(x, 2, 4)[:, 0], [0, 1, 1, 0])


# ---------------------------------------------------------------------------
# AP.
# ---------------------------------------------------------------------------


def _ap_reference(masks, end, start, prunable, count, candidates="negative", score="change"):
  """{(leaf, flat index)}: the ``count`` smallest scores among the candidates, lower global index first."""
  entries, offset = [], 0
  for leaf, ((_, m), (_, e), (_, s), flag) in enumerate(zip(_flat(masks), _flat(end), _flat(start),
                                                            jax.tree.leaves(prunable))):
    if not flag:
      continue
    e64, s64 = e.astype(np.float64).ravel(), s.astype(np.float64).ravel()
    for i in range(e64.size):
      if m.ravel()[i] and (candidates == "any" or e64[i] < 0):
        value = abs(e64[i] - s64[i]) if score == "change" else abs(e64[i])
        entries.append((value, offset + i, leaf, i))
    offset += m.size
  return {(x[2], x[3]) for x in sorted(entries)[:count]}, len(entries)


@pytest.mark.parametrize("candidates,score", [("negative", "change"), ("any", "change"), ("negative", "magnitude")])
@pytest.mark.parametrize("decimals", [None, 1])
def test_ap_prunes_exactly_the_k_smallest_among_the_candidates(candidates, score, decimals):
  start, end, masks = _params(0, decimals), _params(7, decimals), _masks()
  new, pruned = pruning.ap_prune(masks, end, start, PRUNABLE, 13, candidates=candidates, score=score)
  _check_never_revived(masks, new)
  got = _removed(masks, new)
  want, _ = _ap_reference(masks, end, start, PRUNABLE, 13, candidates, score)
  assert pruned == 13 and len(got) == 13 and got == want
  if candidates == "negative":
    flat_end = [v for _, v in _flat(end)]
    assert all(flat_end[leaf].ravel()[i] < 0 for leaf, i in got)


def test_ap_with_fewer_candidates_than_the_budget_prunes_them_all():
  start, masks = _params(0), _masks()
  end = jax.tree.map(jnp.abs, _params(7))
  end["head"]["kernel"] = end["head"]["kernel"].at[0, :2].set(-1.0).at[1, 0].set(-2.0)
  end["dense"]["kernel"] = end["dense"]["kernel"].at[3, 3].set(-0.5)
  _, n_candidates = _ap_reference(masks, end, start, PRUNABLE, 0)
  assert 0 < n_candidates < 10
  for scope in ("global", "layer"):
    new, pruned = pruning.ap_prune(masks, end, start, PRUNABLE, 10, scope=scope)
    assert pruned == n_candidates == len(_removed(masks, new))
    assert not any(np.any(m & (e < 0)) for (_, m), (_, e), f in zip(_flat(new), _flat(end),
                                                                     jax.tree.leaves(PRUNABLE)) if f)


def test_ap_layer_scope_and_random_score():
  start, end, masks = _params(0), _params(7), _masks()
  new, pruned = pruning.ap_prune(masks, end, start, PRUNABLE, 10, scope="layer")
  assert pruned == 10
  negatives = {p: int((m & (e < 0)).sum()) for (p, m), (_, e) in zip(_flat(masks), _flat(end))}
  sizes = [negatives["conv/kernel"], negatives["dense/kernel"], negatives["head/kernel"]]
  removed = {p: int((a & ~b).sum()) for (p, a), (_, b) in zip(_flat(masks), _flat(new))}
  assert [removed["conv/kernel"], removed["dense/kernel"], removed["head/kernel"]] == pruning.split_count(10, sizes)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    pruning.ap_prune(masks, end, start, PRUNABLE, 3, score="random")
  a, n = pruning.ap_prune(masks, end, start, PRUNABLE, 3, score="random", key=jax.random.key(0))
  assert n == 3 and len(_removed(masks, a)) == 3
  with pytest.raises(ValueError, match="unknown AP candidates 'positive'; allowed: negative, any"):
    pruning.ap_prune(masks, end, start, PRUNABLE, 3, candidates="positive")


# ---------------------------------------------------------------------------
# One cycle, and cycles.
# ---------------------------------------------------------------------------


def _train(params, seed):
  """A stand-in for training: a random move of every weight."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: jnp.asarray(np.asarray(p) + 0.3 * rng.normal(size=p.shape), jnp.float32), params)


@pytest.mark.parametrize("method", ["magnitude", "lamp", "random"])
def test_prune_cycle_totals_and_the_remaining_fraction(method):
  schedule = pruning.PruningSchedule(cycles=6, rate=0.2, method=method, ap_share=0.02, ap_start_cycle=3)
  params = _params()
  masks = pruning.init_masks(params)
  total = pruning.count_alive(masks, PRUNABLE)
  for cycle in range(1, schedule.cycles + 1):
    start = pruning.apply_masks(params, masks)
    end = pruning.apply_masks(_train(start, cycle), masks)
    alive_before = pruning.count_alive(masks, PRUNABLE)
    new, stats = pruning.prune_cycle(schedule, cycle, masks, end, start, PRUNABLE, jax.random.key(cycle))
    _check_never_revived(masks, new)
    budget = _half_up(0.02 * alive_before) if cycle >= 3 else 0
    assert stats["alive_before"] == alive_before
    assert stats["ap_budget"] == stats["ap_removed"] == budget
    assert stats["host_removed"] + stats["ap_removed"] == _half_up(0.2 * alive_before)
    assert stats["alive_after"] == pruning.count_alive(new, PRUNABLE) == alive_before - _half_up(0.2 * alive_before)
    assert stats["sparsity"] == pytest.approx(1 - stats["alive_after"] / total)
    assert all(isinstance(v, (int, float)) for v in stats.values())
    masks, params = new, end
    assert stats["alive_after"] / total == pytest.approx(0.8**cycle, abs=cycle / total)
    assert stats["alive_after"] / total == schedule.remaining(cycle, total)


def test_prune_cycle_ap_removes_negative_weights_that_moved_least():
  schedule = pruning.PruningSchedule(cycles=2, rate=0.2, ap_share=0.05)
  start, masks = _params(0), _masks()
  end = _params(7)
  new, stats = pruning.prune_cycle(schedule, 1, masks, end, start, PRUNABLE)
  after_host = pruning.prune_lowest(pruning.magnitude_scores(end), masks, PRUNABLE, stats["host_removed"])
  want, _ = _ap_reference(after_host, end, start, PRUNABLE, stats["ap_budget"])
  assert _removed(after_host, new) == want and len(want) == stats["ap_removed"] > 0


def test_prune_cycle_applies_the_final_nm_pattern():
  schedule = pruning.PruningSchedule(cycles=1, rate=0.1, nm=(2, 4))
  params = _params()
  prunable = {**PRUNABLE, "head": {"bias": False, "kernel": False}}  # head's input axis (6) is not a multiple of 4
  masks, stats = pruning.prune_cycle(schedule, 1, pruning.init_masks(params), params, params, prunable)
  assert stats["nm_removed"] > 0
  assert np.all(np.asarray(masks["dense"]["kernel"]).reshape(2, 4, 6).sum(axis=1) <= 2)
  assert np.all(np.moveaxis(np.asarray(masks["conv"]["kernel"]), 2, -1).reshape(3, 3, 4, 1, 4).sum(-1) <= 2)


def test_schedule_presets_remaining_and_json():
  official = pruning.PruningSchedule.official_ap()
  assert (official.cycles, official.rate, official.ap_share, official.method, official.scope) == (
      24, 0.2, 0.02, "magnitude", "global")
  assert (official.ap_start_cycle, official.ap_candidates, official.ap_score, official.ap_scope, official.rewind) == (
      1, "negative", "change", "global", "reinit")
  assert pruning.OFFICIAL_AP_RULE == pruning.PruneRule(layers="all", extra=(r".*/scale",))
  grid = [80.0, 64.0, 51.2, 41.0, 32.8, 26.2, 21.0, 16.8, 13.4, 10.7]  # the notes' §5.1 grid
  assert [round(100 * official.remaining(k), 1) for k in range(1, 11)] == grid
  assert official.remaining(2, total=100) == 0.64 and official.remaining(3, total=10) == 0.5  # 10 -> 8 -> 6 -> 5
  assert pruning.PruningSchedule.to_reach(0.9).cycles == 11  # 0.8^10 = 0.107, 0.8^11 = 0.086
  s = pruning.PruningSchedule(cycles=3, rate=0.3, rewind="early", rewind_step=5, nm=(2, 4), method="lamp")
  assert pruning.PruningSchedule.from_json(json.loads(json.dumps(s.to_json()))) == s
  s.check_rewind_step(6)


@pytest.mark.parametrize("fields,match", [
    (dict(cycles=0), r"cycles must be an integer >= 1"),
    (dict(rate=0.0), r"rate .* must be in \(0, 1\)"),
    (dict(rate=1.0), r"rate .* must be in \(0, 1\)"),
    (dict(rate=1.5), r"rate .* must be in \(0, 1\)"),
    (dict(ap_share=0.3), r"an AP share larger than the cycle's rate"),
    (dict(ap_share=-0.01), r"ap_share must be in \[0, rate\]"),
    (dict(method="l1"), r"unknown PruningSchedule.method 'l1'; allowed: magnitude, lamp, random"),
    (dict(scope="row"), r"allowed: global, layer"),
    (dict(rewind="lt"), r"unknown PruningSchedule.rewind 'lt'; allowed: init, early, none, reinit"),
    (dict(rewind_step=10), r"rewind_step is used only with rewind='early'"),
    (dict(ap_share=0.02, ap_start_cycle=5), r"ap_start_cycle 5 is after the last cycle"),
    (dict(ap_score="gradient"), r"unknown AP score 'gradient'"),
    (dict(nm=(4, 4)), r"0 < N < M"),
    (dict(nm=(0, 4)), r"0 < N < M"),
    (dict(nm="2:4"), r"nm must be None or a pair \(N, M\)"),
    (dict(lr_rewind="yes"), r"lr_rewind must be True or False"),
])
def test_schedule_bad_input_raises(fields, match):
  with pytest.raises(ValueError, match=match):
    pruning.PruningSchedule(**{"cycles": 3, "rate": 0.2, **fields})


def test_sparsity_rewind_step_and_cycle_errors():
  for bad in (1.0, -0.1, 1.5):
    with pytest.raises(ValueError, match=r"target_sparsity must be a sparsity in \[0, 1\)"):
      pruning.PruningSchedule.to_reach(bad)
  with pytest.raises(ValueError, match=r"sparsity in \[0, 1\)"):
    pruning.check_sparsity(1.0)
  early = pruning.PruningSchedule(cycles=3, rate=0.2, rewind="early", rewind_step=100)
  with pytest.raises(ValueError, match=r"rewind_step 100 is after the cycle's end: a cycle trains 100 steps"):
    early.check_rewind_step(100)
  early.check_rewind_step(101)
  params = _params()
  schedule = pruning.PruningSchedule(cycles=3, rate=0.2, method="random")
  for cycle in (0, 4):
    with pytest.raises(ValueError, match=r"cycle must be an integer in 1..3"):
      pruning.prune_cycle(schedule, cycle, pruning.init_masks(params), params, params, PRUNABLE)
  with pytest.raises(ValueError, match="needs a PRNG key"):
    pruning.prune_cycle(schedule, 1, pruning.init_masks(params), params, params, PRUNABLE)


# ---------------------------------------------------------------------------
# Masks hold through optimizers; the official code's B3.
# ---------------------------------------------------------------------------

KERNELS = {"conv": {"kernel": True, "bias": False}, "dense": {"kernel": True}}


def _problem():
  rng = np.random.default_rng(0)
  params = {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)) * 0.3, jnp.float32),
                     "bias": jnp.zeros(4, jnp.float32)},
            "dense": {"kernel": jnp.asarray(rng.normal(size=(8, 3)) * 0.3, jnp.float32)}}
  masks = pruning.prune_fraction(pruning.magnitude_scores(params), pruning.init_masks(params), KERNELS, 0.5)
  return pruning.apply_masks(params, masks), masks


def _bits_zero(params, masks):
  for (path, p), (_, m) in zip(_flat(params), _flat(masks)):
    assert np.all(p[~m].view(np.uint32) == 0), path  # +0.0, bit for bit


@pytest.mark.parametrize("optimizer", ["rf_sgd", "sgd"])
def test_masks_hold_bit_exactly_through_50_steps(optimizer):
  params, masks = _problem()
  if optimizer == "rf_sgd":
    inner = rj.rf_sgd(0.1, momentum=0.9, weight_decay=5e-4, quantized=KERNELS)
  else:
    inner = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  tx = optax.chain(inner, pruning.keep_pruned())

  @jax.jit
  def step(params, state, key):
    k1, k2 = jax.random.split(key)
    grads = jax.tree.map(lambda p: jax.random.normal(k1, p.shape), params)
    shifted = jax.tree.map(lambda p: jax.random.normal(k2, (4,) + p.shape), params)
    updates, state = tx.update(grads, state, params, masks=masks, translated_grads=shifted)
    return optax.apply_updates(params, updates), state

  state, start = tx.init(params), params
  for i in range(50):
    params, state = step(params, state, jax.random.key(i))
  _bits_zero(params, masks)
  moved = np.asarray(params["dense"]["kernel"]) != np.asarray(start["dense"]["kernel"])
  assert np.all(moved[np.asarray(masks["dense"]["kernel"])])  # the alive weights trained
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(params))


def test_official_bug_b3_momentum_revives_pruned_weights_without_keep_pruned():
  """The official code: masked gradients (where the weight is 0), the optimizer kept across the prune."""
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)}
  sgd = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.1, momentum=0.9))
  grads = [{"w": jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)} for _ in range(6)]
  state = sgd.init(params)
  for g in grads[:3]:  # dense training fills the momentum buffer
    updates, state = sgd.update(g, state, params)
    params = optax.apply_updates(params, updates)
  masks = pruning.prune_fraction(pruning.magnitude_scores(params), pruning.init_masks(params), {"w": True}, 0.5)
  pruned = ~np.asarray(masks["w"])
  start = pruning.apply_masks(params, masks)

  plain, plain_state = start, state
  for g in grads[3:]:
    live = {"w": jnp.where(plain["w"] == 0, 0.0, g["w"])}  # the code masks where the weight is exactly 0
    updates, plain_state = sgd.update(live, plain_state, plain)
    plain = optax.apply_updates(plain, updates)
  assert np.all(np.asarray(plain["w"])[pruned] != 0)  # every pruned weight is back

  keep = optax.chain(sgd, pruning.keep_pruned())
  kept, keep_state = start, (state, optax.EmptyState())
  for g in grads[3:]:
    updates, keep_state = keep.update(pruning.mask_gradients(g, masks), keep_state, kept, masks=masks)
    kept = optax.apply_updates(kept, updates)
  _bits_zero(kept, masks)


# ---------------------------------------------------------------------------
# Rewinding.
# ---------------------------------------------------------------------------


def test_rewind_and_reinit_restore_under_the_mask_and_zero_elsewhere():
  now, theta0, masks = _params(7), _params(0), _masks()
  out = pruning.rewind(now, jax.tree.map(lambda x: x.astype(jnp.bfloat16), theta0), masks)
  for (path, o), (_, t), (_, m), (_, n) in zip(_flat(out), _flat(theta0), _flat(masks), _flat(now)):
    assert o.dtype == n.dtype, path
    want = np.where(m, np.asarray(jnp.asarray(t, jnp.bfloat16).astype(jnp.float32)), 0.0)
    np.testing.assert_array_equal(o, want, err_msg=path)
    assert np.all(o[~m].view(np.uint32) == 0)
  fresh = _params(11)
  re = pruning.reinit(fresh, masks)
  np.testing.assert_array_equal(re["dense"]["kernel"], np.where(masks["dense"]["kernel"], fresh["dense"]["kernel"], 0))
  with pytest.raises(ValueError, match="params_rewind must have the structure of params_now"):
    pruning.rewind(now, {"conv": theta0["conv"]}, masks)
  bad = {**theta0, "dense": {"kernel": jnp.zeros((6, 8))}}
  with pytest.raises(ValueError, match=r"'dense/kernel' has shape \(6, 8\)"):
    pruning.rewind(now, bad, masks)


# ---------------------------------------------------------------------------
# PruneRule on a model.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet():
  model = rj.models.create("lenet5", num_classes=10)
  x = jnp.zeros((1, 28, 28, 1))
  params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)["params"]
  return pruning.layer_paths(model, x, train=False), params


def _true_paths(tree):
  return sorted(p for p, f in _flat(tree) if f)


def test_prune_rule_selects_layers_on_lenet5(lenet):
  layers, params = lenet
  assert layers == ["conv_init", "conv1", "dense1", "dense2", "head"]
  assert _true_paths(pruning.PruneRule().prunable(params, layers)) == [
      "conv1/kernel", "dense1/kernel", "dense2/kernel"]  # first and last excluded
  assert _true_paths(pruning.PruneRule(layers="all").prunable(params, layers)) == [
      "conv1/kernel", "conv_init/kernel", "dense1/kernel", "dense2/kernel", "head/kernel"]
  rule = pruning.PruneRule(overrides=[("conv_init", True), (r"dense.*", False), (r"dense1", True)])
  assert _true_paths(rule.prunable(params, layers)) == ["conv1/kernel", "conv_init/kernel"]  # first match wins
  official = pruning.OFFICIAL_AP_RULE.prunable(params, layers)
  assert _true_paths(official) == sorted(["bn1/scale", "bn_dense1/scale", "bn_dense2/scale", "bn_init/scale",
                                          "conv1/kernel", "conv_init/kernel", "dense1/kernel", "dense2/kernel",
                                          "head/kernel"])
  assert all(isinstance(f, bool) for f in jax.tree.leaves(official))
  assert jax.tree.structure(official) == jax.tree.structure(params)


def test_prune_rule_errors_and_json(lenet):
  layers, params = lenet
  with pytest.raises(ValueError, match=r"selects no params leaf; the layers given: \['conv_init', 'conv1'"):
    pruning.PruneRule(overrides={".*": False}).prunable(params, layers)
  with pytest.raises(ValueError, match=r"layer path\(s\) \['stem'\] have no 'kernel' leaf"):
    pruning.PruneRule().prunable(params, ["stem"] + layers)
  with pytest.raises(ValueError, match="unknown PruneRule.layers 'none'; allowed: inner, all"):
    pruning.PruneRule(layers="none")
  with pytest.raises(ValueError, match=r"PruneRule.overrides: bad regular expression '\('"):
    pruning.PruneRule(overrides={"(": True})
  with pytest.raises(ValueError, match=r"must be True \(prunable\) or False \(not\)"):
    pruning.PruneRule(overrides={"conv1": "yes"})
  with pytest.raises(ValueError, match="PruneRule.extra: bad regular expression"):
    pruning.PruneRule(extra=("[",))
  with pytest.raises(ValueError, match="sequence of regular expressions, got the string"):
    pruning.PruneRule(extra=r".*/scale")
  rule = pruning.PruneRule(layers="all", overrides={"head": False}, extra=(r".*/scale",))
  assert pruning.PruneRule.from_json(json.loads(json.dumps(rule.to_json()))) == rule
  hash(rule)


def test_nnx_layer_paths_in_call_order():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.out = nnx.Linear(8, 3, rngs=rngs)  # defined first, called last
      self.inp = nnx.Linear(4, 8, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.inp(x)))

  net = Net(nnx.Rngs(0))
  layers = pruning.nnx_layer_paths(net, jnp.zeros((1, 4)))
  assert layers == ["inp", "out"]
  params = nnx.to_pure_dict(nnx.state(net, nnx.Param))
  assert _true_paths(pruning.PruneRule(layers="all", overrides={"out": False}).prunable(params, layers)) == [
      "inp/kernel"]
