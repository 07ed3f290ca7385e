"""reporting.provenance: where runs came from, against hand counts."""

from ricci_jax import reporting


def test_provenance_counts_commits_devices_and_dirty_runs_by_hand():
  records = [
      {"source": {"commit": "bbb", "dirty": False}, "device": "cpu"},
      {"source": {"commit": "aaa", "dirty": True, "changes": [" M results/x.json", " M a.py"]}, "device": "cpu"},
      {"source": {"commit": "aaa", "dirty": True}, "device": "gpu"},  # dirty, from before paths were recorded
      {"source": None, "device": None},
  ]
  p = reporting.provenance(records)
  assert p == {"commits": ["aaa", "bbb", "unrecorded"], "devices": ["cpu", "gpu", "unrecorded"], "runs": 4,
               "dirty": 2, "changes": [" M a.py", " M results/x.json"], "unrecorded_changes": 1}
  assert reporting.provenance([])["runs"] == 0
