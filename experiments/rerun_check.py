"""Re-trains finished runs from their own ``config.json`` with the code of a given checkout, and checks that
the new run is bit-identical to the recorded one (per-epoch test accuracy and final parameters).

    python -m experiments.rerun_check --code /path/to/checkout RUN_DIR [RUN_DIR ...] --out check.json

CPU training here is deterministic (``results/rf_readings/determinism.json``), so a run whose record says
its tree was dirty, re-trained from a clean checkout of its recorded commit, reproduces bit for bit if and
only if the dirt did not change what was trained. The re-run happens in a temporary folder, in a fresh
process whose ``ricci_jax`` is the checkout's (``--code``); the checkout must be clean and at the run's
recorded commit (checked first).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile

from experiments import cli

TRAIN_FROM_JSON = """
import json, sys
import ml_collections
from ricci_jax import train
config = ml_collections.ConfigDict(json.loads(open(sys.argv[1]).read()))
config.progress, config.plots = False, False
train.train(config, sys.argv[2])
"""

DIGEST = """
import hashlib, json, sys
import jax, numpy as np
from ricci_jax import train
saved = train.load_checkpoint(sys.argv[1])
h = hashlib.sha256()
for leaf in jax.tree.leaves(saved["params"]):
  h.update(np.ascontiguousarray(leaf).tobytes())
print(json.dumps({"step": int(saved["step"]), "params_sha256": h.hexdigest()}))
"""


def _git(code: pathlib.Path, *args: str) -> str:
  return subprocess.run(["git", *args], cwd=code, capture_output=True, text=True, check=True).stdout.strip()


def _python(code: pathlib.Path, script: str, *args: str) -> str:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env.update(PYTHONPATH=str(code), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  proc = subprocess.run([sys.executable, "-c", script, *args], cwd=code, env=env, capture_output=True, text=True)
  if proc.returncode:
    raise RuntimeError(f"the checkout's code failed:\n{proc.stderr[-3000:]}")
  return proc.stdout


def _accuracies(run: pathlib.Path) -> list[float]:
  return [json.loads(line)["accuracy"] for line in (run / "eval.jsonl").read_text().splitlines() if line.strip()]


def check(run: pathlib.Path, code: pathlib.Path) -> dict:
  """Re-trains ``run`` with ``code`` in a temporary folder; the comparison as a dict."""
  recorded = json.loads((run / "results.json").read_text())
  commit = (recorded.get("source") or {}).get("commit")
  head, status = _git(code, "rev-parse", "HEAD"), _git(code, "status", "--porcelain")
  if commit != head or status:
    raise ValueError(f"{code} must be a clean checkout of the run's commit {commit}; it is at {head}"
                     f"{' with uncommitted changes' if status else ''}")
  with tempfile.TemporaryDirectory() as tmp:
    _python(code, TRAIN_FROM_JSON, str(run / "config.json"), tmp)
    again = json.loads(_python(code, DIGEST, tmp))
    acc_again = _accuracies(pathlib.Path(tmp))
  before = json.loads(_python(code, DIGEST, str(run)))
  acc = _accuracies(run)
  return {"run": str(run), "recorded_source": recorded.get("source"), "rerun_code": head,
          "accuracy_per_epoch": acc, "rerun_accuracy_per_epoch": acc_again,
          "accuracies_identical": acc == acc_again, "params_sha256": before["params_sha256"],
          "rerun_params_sha256": again["params_sha256"], "params_identical": before == again}


def main(argv=None) -> int:
  parser = cli.parser(__doc__)
  parser.add_argument("runs", nargs="+", help="finished run folders (config.json, results.json, checkpoints/)")
  parser.add_argument("--code", required=True, help="a clean checkout of the runs' recorded commit")
  parser.add_argument("--out", default=None, help="write the comparison here as JSON")
  args = parser.parse_args(argv)
  code = pathlib.Path(args.code).resolve()
  try:
    out = [check(pathlib.Path(r), code) for r in args.runs]
  except (ValueError, RuntimeError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  for r in out:
    print(f"{r['run']}: accuracies {'identical' if r['accuracies_identical'] else 'DIFFER'}, "
          f"parameters {'identical' if r['params_identical'] else 'DIFFER'}")
  if args.out:
    from ricci_jax import reporting  # noqa: PLC0415
    pathlib.Path(args.out).write_text(json.dumps({"checker": reporting.source_version(), "runs": out}, indent=1))
  return 0 if all(r["accuracies_identical"] and r["params_identical"] for r in out) else 1


if __name__ == "__main__":
  sys.exit(cli.run(main))
