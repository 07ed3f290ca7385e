"""Train a discretized network from a config file.

    python -m experiments.train --config experiments/configs/<name>.py[:arg] [--workdir DIR] [key=value ...]

Overrides are dotted config keys, with or without a ``--config.`` prefix:

    python -m experiments.train --config experiments/configs/fashion_mnist.py:rfdnn \\
        --config.epochs=5 optimizer.learning_rate=0.05 seeds="(0, 1, 2)"

Everything is checked before training starts: an unknown key names the closest valid ones, a value out of
its range names the range. A run's folder keeps the config it was created with (config.json); running
again on the folder resumes from its newest intact checkpoint, and a changed config is refused unless
the change is one a resume may make and is named, e.g. allow_changes=epochs (recorded in resumes.jsonl).
Ctrl-C or SIGTERM stops after the current step with a checkpoint; the same command resumes.

On several hosts (or several processes of one host), every process runs the same command with
``--distributed``; each reads only its own rows of every batch, and process 0 writes the logs, plots and
results (checkpoints are written jointly by Orbax, once):

    # Slurm, a TPU pod, Open MPI, ...: jax.distributed.initialize() finds its peers itself
    srun python -m experiments.train --config ... --distributed
    # anywhere else: say who is who (process i of n; the coordinator is process 0's host:port)
    python -m experiments.train --config ... --distributed \\
        --coordinator 10.0.0.1:1234 --num-processes 2 --process-id $I

CPU processes exchange their collectives through gloo.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

from experiments import cli


def parse(argv=None):
  parser = cli.parser(__doc__)
  parser.add_argument("--config", required=True, help="config file, optionally path.py:arg")
  parser.add_argument("--workdir", default=None, help="output directory (default runs/<config name>)")
  parser.add_argument("--distributed", action="store_true",
                      help="join a multi-process run: jax.distributed.initialize() before anything else")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0 (with --distributed; "
                      "default: the cluster's auto-detection, or JAX_COORDINATOR_ADDRESS)")
  parser.add_argument("--num-processes", type=int, default=None, help="number of processes (with --distributed)")
  parser.add_argument("--process-id", type=int, default=None, help="this process, 0 .. n-1 (with --distributed)")
  args, rest = parser.parse_known_args(argv)
  explicit = [args.coordinator, args.num_processes, args.process_id]
  if not args.distributed and any(x is not None for x in explicit):
    parser.error("--coordinator, --num-processes and --process-id need --distributed")
  if args.num_processes is not None and args.num_processes < 1:
    parser.error(f"--num-processes must be at least 1, got {args.num_processes}")
  if args.process_id is not None and not 0 <= args.process_id < (args.num_processes or 1 << 30):
    parser.error(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
  return args, cli.command_line_overrides(parser, rest)


def initialize_distributed(coordinator: str | None, num_processes: int | None, process_id: int | None):
  """Joins the processes of a multi-process run (before any JAX computation).

  With no arguments, ``jax.distributed.initialize`` detects Slurm, Open MPI,
  TPU pods and the like. CPU processes need a collectives implementation:
  gloo, set process-wide here (a command-line program may).
  """
  import jax  # noqa: PLC0415

  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id)


def main(argv=None) -> int:
  args, overrides = parse(argv)
  from ricci_jax import runtime, train  # noqa: PLC0415 - after argument errors

  config = cli.load_config_file(args.config)
  train.schema.check_known_keys(config)
  train.schema.apply_overrides(config, overrides)
  workdir = pathlib.Path(args.workdir or pathlib.Path("runs") / (config.name or pathlib.Path(args.config.split(":")[0]).stem))
  if args.distributed:
    initialize_distributed(args.coordinator, args.num_processes, args.process_id)
  runtime.configure_cpu()  # process-wide CPU settings, before JAX starts: a program's choice, not the library's
  train.schema.validate(config, workdir)
  summary = train.train_seeds(config, workdir)  # the folders of every seed are checked before any trains
  for run in summary["runs"]:
    if run.get("cycles"):
      print(f"seed {run['seed']}:\n{train.cycles.cycle_table(run['cycles'])}")
  stats = summary["across_seeds"]
  print(json.dumps({"name": summary["name"], "across_seeds": stats}, indent=2))
  print(f"test accuracy over the last {config.last_epochs} epochs: "
        f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f} % ({stats['seeds']} seed(s)); outputs in {workdir}")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.exit(cli.run(main))
