"""Run the RF-DNN paper's tables and print our numbers beside the paper's.

    python -m experiments.reproduce --table 1                       # every runnable row, 5 seeds, the paper's protocol
    python -m experiments.reproduce --table 2 --rows resnet56-rfdnn,resnet56-dorefa --seeds 0,1
    python -m experiments.reproduce --table 3 --list                # the rows, the paper's numbers, what runs
    python -m experiments.reproduce --table 1 --quick --mock        # a smoke run: a few steps on mock data
    python -m experiments.reproduce --table 4 --rows resnet18-w1a32-rfdnn --init-from resnet18=runs/r18_fp

Tables: 1, 2, 3, 4 and 6b (Fig. 6(b)); the rows and the paper's numbers are in
``experiments/paper_tables.py``. Each runnable row trains through the training
program (``ricci_jax.train``) into ``WORKDIR/table<N>/<row>/`` (a rerun resumes
there), then a markdown table is printed and written to ``WORKDIR/table<N>.md``
with ``WORKDIR/table<N>.json``: per row, our result (the paper's statistic:
mean ± std of the test accuracy over the last epochs, pooled over seeds), the
paper's number, the difference, and the paper's full-precision baseline.
Rows run by earlier invocations into the same WORKDIR (in the same mode) stay
in the table, so rows can be run one at a time.
Baselines ricci-jax does not implement (MultiFCG, FCGrad, MetaQuant, DeepShift,
ELQ, ADMM, QN, RQ, INT8, SR+DR) keep their paper number, marked "not
implemented (paper number only)".

``--quick`` runs a subset of rows (or ``--rows``) for one epoch on a few dozen
images at a tiny batch: it checks that every piece starts and the table comes
out, on a user's accelerator or here. ``--mock`` replaces the data by random
images from ``tensorflow_datasets.testing.mock_data`` (nothing is downloaded).
Results of either are labelled as such: they are not reproductions.

Table 4 starts from pretrained full-precision models in the paper; with no
``--init-from`` its rows train from scratch, and the output says so. Give a
finished run of ours (``--init-from DIR`` or ``--init-from MODEL=DIR``, e.g.
this table's ``resnet18-fp`` row) to start from its weights.

``key=value`` overrides (dotted config keys, as for ``experiments.train``)
apply to every row that runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import sys
import time

from experiments import cli, paper_tables
from experiments.paper_tables import PaperRow

DEFAULT_SEEDS = "0,1,2,3,4"  # the paper's 5 runs
QUICK_SEEDS = "0"
MOCK_EXAMPLES = 32  # examples per split that mock_data makes
QUICK_OVERRIDES = {  # one epoch, a few steps at a tiny batch
    "small": ["epochs=1", "batch_size=8", "dataset.train_limit=24", "dataset.test_limit=16"],
    "imagenet2012": ["epochs=1", "batch_size=2", "dataset.train_limit=4", "dataset.test_limit=2"],
    "common": ["last_epochs=1", "log_every_steps=1", "checkpoint_every_steps=1000", "progress=False",
               "plots=False", "rfdnn.fraction=0.5"],
}
NOT_IMPLEMENTED = "not implemented (paper number only)"


def parse(argv=None) -> tuple[argparse.Namespace, list[str]]:
  parser = cli.parser(__doc__)
  parser.add_argument("--table", required=True, choices=paper_tables.TABLES,
                      help="which table: 1, 2, 3, 4, or 6b (Fig. 6(b))")
  parser.add_argument("--rows", default=None,
                      help="comma-separated row names, or 'all' (default: all runnable rows; with --quick a "
                           "small subset); --list shows them")
  parser.add_argument("--seeds", default=None,
                      help=f"comma-separated seeds (default {DEFAULT_SEEDS}, the paper's 5 runs; --quick: {QUICK_SEEDS})")
  parser.add_argument("--workdir", default=None,
                      help="output directory (default runs/reproduce, or runs/reproduce_quick with --quick)")
  parser.add_argument("--quick", action="store_true",
                      help="a smoke run: one epoch on a few dozen images, tiny batch; NOT a reproduction")
  parser.add_argument("--mock", action="store_true",
                      help="mock data (random images from tensorflow_datasets.testing.mock_data); NOT a reproduction")
  parser.add_argument("--init-from", action="append", default=[], metavar="[MODEL=]DIR",
                      help="Table 4: a finished run (e.g. our float run) whose weights start the rows of its "
                           "model; repeat for several models")
  parser.add_argument("--list", action="store_true", help="print the table's rows and the paper's numbers; run nothing")
  args, rest = parser.parse_known_args(argv)
  return args, cli.command_line_overrides(parser, rest)


def select_rows(table: str, rows: str | None, quick: bool) -> list[PaperRow]:
  """The rows to run: ``rows`` (comma-separated, or ``all``), else all runnable ones (``quick``: the subset)."""
  if rows is None:
    if quick:
      return [paper_tables.get_row(table, k) for k in paper_tables.TABLE_INFO[table].quick_rows]
    return paper_tables.runnable_rows(table)
  keys = [k.strip() for k in rows.split(",") if k.strip()]
  if keys == ["all"]:
    return paper_tables.runnable_rows(table)
  if not keys:
    raise ValueError("--rows is empty; give row names or 'all'")
  selected = [paper_tables.get_row(table, k) for k in keys]
  for row in selected:
    if not row.runnable:
      runnable = ", ".join(r.key for r in paper_tables.runnable_rows(table))
      raise ValueError(f"row {row.key!r} of table {table} cannot run: {row.reason}. Runnable rows: {runnable}")
  return selected


def parse_init_from(values: list[str]) -> dict[str, str]:
  """``MODEL=DIR`` or ``DIR`` (every model: key ``*``) -> {model: dir}."""
  out = {}
  for value in values:
    model, sep, path = value.partition("=")
    if not sep:
      model, path = "*", value
    if not path:
      raise ValueError(f"--init-from {value!r} names no directory; use DIR or MODEL=DIR")
    out[model.strip()] = path
  return out


def build_config(row: PaperRow, quick: bool, mock: bool, seeds: list[int], overrides: list[str],
                 init_from: dict[str, str]):
  """The row's configuration with the quick/mock settings, the seeds, ``--init-from`` and the overrides."""
  from ricci_jax import train  # noqa: PLC0415

  config = row.config()
  if quick:
    size = "imagenet2012" if row.dataset == "imagenet2012" else "small"
    train.schema.apply_overrides(config, QUICK_OVERRIDES[size] + QUICK_OVERRIDES["common"])
  if mock:
    train.schema.apply_overrides(config, ["dataset.source=tfds"])
  if row.pretrained:
    path = init_from.get(row.model, init_from.get("*", ""))
    config.init_from = path
  config.seeds = tuple(seeds)
  train.schema.apply_overrides(config, overrides)
  return config


def check_data(configs: dict, mock: bool):
  """Fails now, with the data module's message, if a dataset the rows need is missing."""
  from ricci_jax import data as data_lib  # noqa: PLC0415

  seen = set()
  for config in configs.values():
    d = config.dataset
    if (d.name, d.source, d.data_dir) in seen:
      continue
    seen.add((d.name, d.source, d.data_dir))
    with _mock_data(mock):
      try:
        data_lib.load(d.name, "train", batch_size=1, source=d.source, data_dir=d.data_dir or None)
      except FileNotFoundError as e:
        raise ValueError(f"{e} (or pass --mock for a smoke run on mock data)") from None


def _mock_data(mock: bool):
  if not mock:
    return contextlib.nullcontext()
  import tensorflow_datasets as tfds  # noqa: PLC0415

  return tfds.testing.mock_data(num_examples=MOCK_EXAMPLES)


def _run_dirs(workdir: pathlib.Path, seeds: list[int]) -> list[pathlib.Path]:
  return [workdir / f"seed_{s}" for s in seeds] if len(seeds) > 1 else [workdir]


def run_row(config, workdir: pathlib.Path, mock: bool) -> dict:
  """Trains every seed of one row and returns our statistics (fractions, not %)."""
  from ricci_jax import reporting, train  # noqa: PLC0415

  start = time.perf_counter()
  with _mock_data(mock):
    summary = train.train_seeds(config, workdir)
  seeds = list(config.seeds) or [config.seed]
  top5 = []
  for run in _run_dirs(workdir, seeds):
    values = [r["top5_accuracy"] for r in reporting.read_jsonl(run / "eval.jsonl") if "top5_accuracy" in r]
    if values:
      top5.append(reporting.last_epochs_statistic(values, config.last_epochs))
  return {
      "top1": summary["across_seeds"],
      "top5": reporting.across_seeds(top5) if len(top5) == len(seeds) else None,
      "steps": [r["steps"] for r in summary["runs"]],
      "epochs_done": [r["epochs_done"] for r in summary["runs"]],
      "seconds": time.perf_counter() - start,
  }


def earlier_results(workdir: pathlib.Path, table: str, mode: str) -> dict:
  """Rows that an earlier invocation ran into ``workdir`` in the same mode: {row: (result, config)}."""
  import ml_collections  # noqa: PLC0415

  path = workdir / f"table{table}.json"
  if not path.exists():
    return {}
  try:
    record = json.loads(path.read_text())
  except json.JSONDecodeError:
    return {}
  if record.get("mode") != mode:
    return {}
  out = {}
  for row in record.get("rows", []):
    ours = row.get("ours")
    if ours and ours.get("raw") and row.get("config"):
      result = {k: v for k, v in ours["raw"].items() if k != "earlier"}
      out[row["row"]] = (result, ml_collections.ConfigDict(row["config"]))
  return out


# ----------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------


def _pm(mean: float | None, std: float | None = None, approximate: bool = False) -> str:
  if mean is None:
    return "—"
  text = f"{'≈' if approximate else ''}{mean:.2f}"
  return text + (f" ± {std:.2f}" if std is not None else "")


def _ours(stat: dict | None) -> tuple[float, float] | None:
  if not stat or stat.get("seeds", 0) == 0 or not math.isfinite(stat["mean"]):
    return None
  return 100 * stat["mean"], 100 * stat["std"]


def _status(row: PaperRow, result: dict | None, mode: str, init_from: str) -> str:
  if not row.runnable:
    return row.reason
  if result is None:
    if mode == "list":
      return f"runnable: method {row.method}" + (
          "; from scratch unless --init-from gives a run to start from" if row.pretrained else "") + (
          f"; {row.note}" if row.note else "")
    return "runnable, not run" + (" (not in the --quick subset)" if mode != "full" else "")
  parts = [f"ran: {mode}" + (" (an earlier invocation)" if result.get("earlier") else "")]
  parts.append(f"{len(result['top1'].get('per_seed', []))} seed(s), {result['epochs_done'][0]} epoch(s)")
  if row.pretrained:
    parts.append(f"initialised from {init_from}" if init_from else
                 "trained from scratch (the paper starts from a pretrained model; none given with --init-from)")
  if row.note:
    parts.append(row.note)
  return "; ".join(parts)


def render(table: str, rows_run: dict[str, dict], configs: dict, mode: str, seeds: list[int],
           command: str) -> tuple[str, list[dict]]:
  """The markdown table of every row of ``table`` and the same as records for the JSON file."""
  from ricci_jax import reporting  # noqa: PLC0415

  info = paper_tables.TABLE_INFO[table]
  rows = paper_tables.ROWS[table]
  has_top5 = any(r.top5 is not None for r in rows)
  mock = "mock" in mode
  header = ["row", "network", "method", "W/A", "ours top-1 (%)", "paper top-1 (%)", "ours − paper"]
  if has_top5:
    header += ["ours top-5 (%)", "paper top-5 (%)", "ours − paper (top-5)"]
  header += ["paper FP top-1" + ("/top-5" if has_top5 else ""), "status"]
  lines, records = [], []
  for row in rows:
    result = rows_run.get(row.key)
    config = configs.get(row.key)
    ours1 = _ours(result["top1"]) if result else None
    ours5 = _ours(result["top5"]) if result and result["top5"] else None

    def diff(ours, paper):
      if ours is None or paper is None:
        return "—"
      return "n/a (mock data)" if mock else f"{ours[0] - paper:+.2f}"

    cells = [row.key, row.network, row.paper_method, row.bits,
             _pm(*ours1) if ours1 else "—", _pm(row.top1, row.top1_std, row.approximate), diff(ours1, row.top1)]
    if has_top5:
      cells += [_pm(*ours5) if ours5 else "—", _pm(row.top5, row.top5_std), diff(ours5, row.top5)]
    fp = _pm(row.fp_top1) + (f"/{row.fp_top5:.2f}" if has_top5 and row.fp_top5 is not None else "")
    init = config.init_from if config is not None else ""
    cells += [fp, _status(row, result, mode, init)]
    lines.append(cells)
    records.append({
        "row": row.key, "network": row.network, "paper_method": row.paper_method, "method": row.method,
        "dataset": row.dataset, "model": row.model, "weight_bits": row.weight_bits, "act_bits": row.act_bits,
        "paper": {"top1": row.top1, "top1_std": row.top1_std, "top5": row.top5, "top5_std": row.top5_std,
                  "fp_top1": row.fp_top1, "fp_top5": row.fp_top5, "approximate": row.approximate,
                  "source": row.source, "pretrained": row.pretrained},
        "runnable": row.runnable, "reason": row.reason,
        "ours": None if result is None else {
            "top1": ours1 and {"mean": ours1[0], "std": ours1[1]},
            "top5": ours5 and {"mean": ours5[0], "std": ours5[1]},
            "raw": result, "init_from": init, "mode": mode},
        "config": None if config is None else config.to_dict(),
    })
  table_md = reporting.markdown_table(header, lines)
  ran = [configs[k] for k in rows_run]
  window = ran[0].last_epochs if ran else None
  banner = ""
  if mode not in ("full", "list"):
    banner = (f"> **Smoke run ({mode}): {'random mock images, ' if mock else ''}one epoch of a few steps. These "
              "numbers only show that the rows start, train and report; they are NOT a reproduction of the "
              "paper.**\n\n")
  statistic = (f"Ours: mean ± std of the test accuracy over the last {window} epoch(s), pooled over seeds "
               f"{', '.join(map(str, seeds))}." if ran else "Ours: nothing ran.")
  text = (f"# {info.title}\n\n{banner}"
          f"RF-DNN (Chen et al., arXiv 2302.03390 v3). Paper's statistic: {info.statistic}. {statistic}\n\n"
          f"Protocol (paper, and our reading): {info.protocol}.\n\n{table_md}\n"
          f"Baselines marked \"{NOT_IMPLEMENTED}\" are not in ricci-jax; their numbers are the paper's. Where "
          "they come from: `experiments/paper_tables.py` (`source` of each row) and the JSON file.\n\n"
          f"Command: `{command}`\n")
  return text, records


def main(argv=None) -> int:
  args, overrides = parse(argv)
  from ricci_jax import train  # noqa: PLC0415 - after argument errors

  table = args.table
  mode = "full" if not (args.quick or args.mock) else "+".join(
      m for m, on in (("quick", args.quick), ("mock", args.mock)) if on)
  seeds_text = args.seeds or (QUICK_SEEDS if args.quick else DEFAULT_SEEDS)
  workdir = pathlib.Path(args.workdir or ("runs/reproduce_quick" if args.quick or args.mock else "runs/reproduce"))
  try:
    seeds = [int(s) for s in seeds_text.split(",") if s.strip()]
    if not seeds:
      raise ValueError("--seeds is empty")
    init_from = parse_init_from(args.init_from)
    if init_from and not any(r.pretrained for r in paper_tables.ROWS[table]):
      raise ValueError(f"--init-from applies to Table 4's rows (they start from pretrained models), "
                       f"not to table {table}")
    rows = [] if args.list else select_rows(table, args.rows, args.quick)
    models = {r.model for r in rows if r.pretrained}
    unused = sorted(set(init_from) - models - {"*"})
    if rows and unused:
      raise ValueError(f"--init-from names model(s) {', '.join(unused)} that no selected pretrained row uses "
                       f"(selected: {', '.join(sorted(models)) or 'none'})")
    configs = {}
    for row in rows:  # every configuration is checked before the first one trains
      config = build_config(row, args.quick, args.mock, seeds, overrides, init_from)
      train.schema.validate(config, workdir / f"table{table}" / row.key)
      configs[row.key] = config
    if configs:
      check_data(configs, args.mock)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (SyntaxError, TypeError) as e:
    print(f"error: bad value: {e}", file=sys.stderr)
    return 2

  results = {}
  for key, config in configs.items():
    print(f"== table {table}, row {key}: {config.name} ({mode}), seeds {seeds}", flush=True)
    results[key] = run_row(config, workdir / f"table{table}" / key, args.mock)
  if not args.list:  # rows of earlier invocations into the same workdir and mode stay in the table
    for key, (result, config) in earlier_results(workdir, table, mode).items():
      if key not in results:
        results[key], configs[key] = {**result, "earlier": True}, config

  command = "python -m experiments.reproduce " + " ".join(
      [f"--table {table}"] + ([f"--rows {args.rows}"] if args.rows else [])
      + ([f"--seeds {args.seeds}"] if args.seeds else []) + (["--quick"] if args.quick else [])
      + (["--mock"] if args.mock else []) + [f"--init-from {v}" for v in args.init_from]
      + (["--list"] if args.list else []) + [f"--workdir {workdir}"] + overrides)
  text, records = render(table, results, configs, "list" if args.list else mode, seeds, command)
  print("\n" + text)
  if args.list:
    return 0
  workdir.mkdir(parents=True, exist_ok=True)
  from ricci_jax import reporting  # noqa: PLC0415

  (workdir / f"table{table}.md").write_text(text)
  (workdir / f"table{table}.json").write_text(json.dumps(reporting.to_jsonable({
      "table": table, "title": paper_tables.TABLE_INFO[table].title, "mode": mode,
      "reproduction": mode == "full", "seeds": seeds, "command": command, "rows": records}), indent=2))
  print(f"written: {workdir / f'table{table}.md'}, {workdir / f'table{table}.json'}")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from ricci_jax import runtime
  runtime.configure_cpu()  # process-wide CPU settings, before JAX starts: a program's choice, never the library's
  sys.exit(cli.run(main))
