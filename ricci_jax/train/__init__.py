"""The training program: from a config to a trained, evaluated, checkpointed run.

* :mod:`~ricci_jax.train.schema`: the config (``ml_collections``), its overrides and its validation;
* :mod:`~ricci_jax.train.builders`: config -> quantization rule, model, schedules, optimizer;
* :mod:`~ricci_jax.train.steps`: :class:`TrainState`, :class:`Program`, the jitted train and eval steps;
* :mod:`~ricci_jax.train.placement`: data parallelism with ``jax.jit`` and shardings, one host or many;
* :mod:`~ricci_jax.train.ranges`: the valid values of every numeric config key;
* :mod:`~ricci_jax.train.checkpoints`: verified Orbax save, restore and load;
* :mod:`~ricci_jax.train.run_folder`: a run's identity (``config.json``), what a resume may change, :func:`load_run`;
* :mod:`~ricci_jax.train.interrupts`: stopping cleanly on SIGINT / SIGTERM;
* :mod:`~ricci_jax.train.loop`: :func:`train` (one seed);
* :mod:`~ricci_jax.train.cycles`: :func:`train_pruned` (a dense run, then pruning cycles);
* :mod:`~ricci_jax.train.seeds`: :func:`train_seeds` (every seed, pruned or not, and the statistic across them).
"""

from ricci_jax.train import (
    builders, checkpoints, cycles, interrupts, loop, placement, ranges, run_folder, schema, seeds, steps)
from ricci_jax.train.builders import (
    FLOAT_BITS,
    build_model,
    build_optimizer,
    build_quant_rule,
    estimator_schedules,
    learning_rate_schedule,
)
from ricci_jax.train.checkpoints import CheckpointError, load_checkpoint
from ricci_jax.train.interrupts import Interrupted, stop_on_signals
from ricci_jax.train.cycles import train_pruned
from ricci_jax.train.loop import NonFiniteLossError, Start, describe_devices, train
from ricci_jax.train.run_folder import Run, RunMismatchError, load_run
from ricci_jax.train.seeds import train_seeds
from ricci_jax.train.placement import DataParallel
from ricci_jax.train.steps import Program, TrainState, build_program, eval_step, train_step

__all__ = [
    "FLOAT_BITS", "CheckpointError", "DataParallel", "Interrupted", "NonFiniteLossError", "Program", "Run",
    "RunMismatchError", "Start", "TrainState", "build_model", "build_optimizer", "build_program",
    "build_quant_rule", "builders", "checkpoints", "cycles", "describe_devices", "estimator_schedules",
    "eval_step", "interrupts", "learning_rate_schedule", "load_checkpoint", "load_run", "loop", "placement",
    "ranges", "run_folder", "schema", "seeds", "steps", "stop_on_signals", "train", "train_pruned", "train_seeds",
    "train_step",
]
