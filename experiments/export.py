"""Pack a finished run into a bit-packed file, or evaluate a packed file on a dataset's test split.

    python -m experiments.export pack runs/fm runs/fm/model.npz        # the run's latest verified checkpoint
    python -m experiments.export evaluate runs/fm/model.npz --dataset fashion_mnist

``pack`` rebuilds the run's model from its folder (``ricci_jax.train.load_run``), packs it
(``ricci_jax.export.pack``: every quantized kernel checked bit for bit) and saves it; a pruning run packs
its last cycle. ``evaluate`` serves the file (``ricci_jax.inference.Predictor``) on the test split and
prints the accuracy, which equals the run's own evaluation of the same examples.
"""

from __future__ import annotations

import json
import pathlib
import sys

from experiments import cli


def pack(run: str, out: str) -> dict:
  from ricci_jax import export, train  # noqa: PLC0415

  config, model, variables = train.load_run(run)
  packed = export.pack(variables, model)
  nbytes = export.save(packed, out)
  checkpoint = sum(p.stat().st_size for p in train.run_folder.resolve_run_dir(run).joinpath("checkpoints").rglob("*")
                   if p.is_file())
  return {"run": run, "file": out, "model": config.model.name, "bytes": nbytes, "checkpoints_bytes": checkpoint}


def evaluate(path: str, dataset: str, data_dir: str | None, limit: int, batch_size: int) -> dict:
  import numpy as np  # noqa: PLC0415

  from ricci_jax import data, inference  # noqa: PLC0415

  predictor = inference.Predictor(path)
  test = data.load(dataset, "test", batch_size=batch_size, drop_remainder=False, data_dir=data_dir, limit=limit or None)
  correct = count = 0
  for batch in test.epoch(0):
    logits = predictor(data.preprocess(dataset, batch["image"]))
    correct += int(np.sum((np.argmax(logits, -1) == batch["label"]) * batch["mask"]))
    count += int(np.sum(batch["mask"]))
  return {"file": path, "dataset": dataset, "examples": count, "accuracy": correct / max(count, 1)}


def main(argv=None) -> int:
  parser = cli.parser(__doc__)
  commands = parser.add_subparsers(dest="command", required=True)
  p = commands.add_parser("pack", help="pack a finished run")
  p.add_argument("run", help="the run's folder (its --workdir)")
  p.add_argument("out", help="the packed file to write (.npz)")
  e = commands.add_parser("evaluate", help="test accuracy of a packed file")
  e.add_argument("file", help="a packed file")
  e.add_argument("--dataset", default="fashion_mnist", help="whose test split (default fashion_mnist)")
  e.add_argument("--data-dir", default=None, help="where its files are (default: the usual places)")
  e.add_argument("--limit", type=int, default=0, help="the first N test examples (default: all)")
  e.add_argument("--batch-size", type=int, default=256)
  args = parser.parse_args(argv)
  if args.command == "pack":
    result = pack(args.run, args.out)
  else:
    result = evaluate(args.file, args.dataset, args.data_dir, args.limit, args.batch_size)
  print(json.dumps(result, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(cli.run(main))
