"""The training program's configuration: schema, command-line overrides, validation.

A run is described by one ``ml_collections.ConfigDict`` whose keys are those
of :func:`default_config` (config files in ``experiments/configs/`` start from
it). :func:`apply_overrides` applies ``key=value`` overrides from the command
line, and :func:`validate` rejects anything wrong before a single step runs:
an unknown key (the error names the closest valid ones), a value outside its
range (:data:`RANGES`: the key, the value and the allowed interval), an
unknown model, estimator, method or schedule, an estimator hyperparameter the
estimator does not have, a batch size the devices cannot share, an output
directory that cannot be written.
"""

from __future__ import annotations

import ast
import difflib
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import ml_collections

from ricci_jax import data as data_lib
from ricci_jax import lne, ricci_flow, transform
from ricci_jax.quant_config import METHODS as QUANT_METHODS
from ricci_jax.estimators import ESTIMATORS, get_estimator
from ricci_jax.quantizers import SCALE_MODES, check_bits
from ricci_jax.train.ranges import RANGES, check_ranges

OPTIMIZERS = ("sgd", "rf_sgd", "adam")
LR_SCHEDULES = ("multistep", "cosine", "constant")
ESTIMATOR_SCHEDULES = ("auto", "none")
LAYER_RULES = ("inner", "all", "none")
FLOAT_BITS = 32
MODEL_APIS = ("linen", "nnx")
NNX_MODELS = ("lenet5", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")
"""The zoo models ``model.api="nnx"`` builds from :mod:`ricci_jax.nnx.zoo`."""


def default_config() -> ml_collections.ConfigDict:
  """Every key the training program understands, with its default."""
  c = ml_collections.ConfigDict()
  c.name = ""  # a label for tables and plots

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "fashion_mnist"
  c.dataset.source = "auto"  # auto | files | tfds
  c.dataset.data_dir = ""  # "" = the default places
  c.dataset.holdout_validation = False  # True: train without the validation split (CIFAR: 45k/5k, the paper's)
  c.dataset.eval_split = "test"  # test | validation
  c.dataset.train_limit = 0  # 0 = all training examples
  c.dataset.test_limit = 0
  c.dataset.augment = "default"  # default (the dataset's standard) | none | crop_flip

  c.model = ml_collections.ConfigDict()
  c.model.name = "lenet5"
  c.model.api = "linen"  # linen | nnx (the NNX zoo: lenet5, resnet20 ... resnet110; same layers, same results)
  c.model.bireal = False  # ResNets: a shortcut around every conv (Bi-Real Net)
  c.model.order = "conv_bn_relu"  # conv_bn_relu (He et al.) | conv_relu_bn (ReSTE's; needed for 1-bit activations)
  c.model.dtype = "float32"  # compute dtype

  c.quant = ml_collections.ConfigDict()
  c.quant.layers = "inner"  # inner (all but first conv and last dense) | all | none
  c.quant.weight_bits = 1  # 32 = float weights
  c.quant.act_bits = 32  # 32 = float activations
  c.quant.weight_method = "uniform"  # uniform (Eqs. 37-38) | dorefa | ridge
  c.quant.act_method = "uniform"  # uniform | staircase | ridge
  c.quant.estimator = "clipped_ste"
  c.quant.act_estimator = ""  # "" = the weight estimator (clipped_relu for staircase)
  c.quant.hparams = ml_collections.ConfigDict()  # initial estimator hyperparameters, e.g. {"clip": 1.0}
  c.quant.scale = "none"  # none | tensor | channel
  c.quant.schedule = "auto"  # auto: the estimator's published schedule (reste o, ede t, md_tanh beta) | none
  c.quant.ede_t_min = 0.1  # the IR-Net paper's; its CIFAR code starts near 1e-3

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"  # sgd | rf_sgd | adam
  c.optimizer.learning_rate = 0.1
  c.optimizer.schedule = "multistep"  # multistep | cosine | constant
  c.optimizer.boundaries = (0.4, 0.75, 0.95)  # multistep, as fractions of training (80/150/190 of 200 epochs)
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_epochs = 0
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4

  c.rfdnn = ml_collections.ConfigDict()
  c.rfdnn.metric = "rank1"  # rank1 (Eq. 16 as printed) | hessian_diagonal (Eq. 14's Hessian, diag(1 - t^2))
  c.rfdnn.block = "layer"  # layer | out_channel | kernel | a number of weights per block (as a string)
  c.rfdnn.tau = "auto"  # "auto" | "std" | a number (as a string, e.g. "0.05")
  c.rfdnn.tau_scale = 0.5  # c of tau="auto", kappa of tau="std"
  c.rfdnn.alpha = 1.0  # the regulariser's raw weight (unused when rho is set)
  c.rfdnn.rho = None  # a float: alpha per layer and step so that |alpha grad N| = rho |d|
  c.rfdnn.epsilon = math.inf  # the gate's absolute bound on N (inf: the gate cannot close)
  c.rfdnn.epsilon_relative = None  # a float: the gate also closes when N > this x the running median of N
  c.rfdnn.median_window = 100  # steps in that running median
  c.rfdnn.control = "none"  # none | match_norm (update rescaled to |d|) | random_direction (the null control)
  c.rfdnn.approx = "weak"  # weak | exact | diagonal (= hessian_diagonal + exact) | none
  c.rfdnn.fraction = 0.125  # share of the batch for the four translated passes (1 = the paper's cost)
  c.rfdnn.shifts = (1, -1, 1, -1)  # k1, k2, j1, j2
  c.rfdnn.translation = "roll"  # roll | pad
  c.rfdnn.reading = "lag"  # lag | current | two_step
  c.rfdnn.normalize = False

  c.pruning = ml_collections.ConfigDict()  # iterative pruning, optionally with AP (docs/pruning.md)
  c.pruning.cycles = 0  # pruning cycles after the dense training; 0 (and no target_sparsity): no pruning
  c.pruning.target_sparsity = None  # instead of cycles: the fewest cycles reaching this sparsity, in [0, 1)
  c.pruning.rate = 0.2  # share of the alive prunable weights removed per cycle (host and AP together)
  c.pruning.method = "magnitude"  # magnitude | lamp | random
  c.pruning.scope = "global"  # global | layer
  c.pruning.ap_share = 0.0  # AP's part of the rate (the official code: 0.02 of 0.2)
  c.pruning.ap_start_cycle = 1
  c.pruning.ap_candidates = "negative"  # negative | any
  c.pruning.ap_score = "change"  # change (|w_end - w_start|) | magnitude | random
  c.pruning.ap_scope = "global"  # global | layer
  c.pruning.rewind = "init"  # init (lottery ticket) | early (to rewind_step) | none (learning-rate rewinding) | reinit
  c.pruning.rewind_step = 0  # rewind="early": the dense run's step to rewind to
  c.pruning.layers = "inner"  # prunable kernels: inner (not the first and last layer) | all
  c.pruning.exclude = ()  # regexes of layer paths kept dense, e.g. ("conv1",)
  c.pruning.extra = ()  # regexes of further prunable leaves, e.g. (".*/scale",) for BN scales (the official code)
  c.pruning.nm = ""  # a final N:M pattern after the last cycle, e.g. "2:4"

  c.dnr = ml_collections.ConfigDict()  # dead-neuron rates of the ReLUs (ricci_jax.dead_neurons)
  c.dnr.every_steps = 0  # dynamic DNR on the training batch every this many steps (0: off)
  c.dnr.test = False  # DNR on the evaluation set (eval mode) after training

  c.batch_size = 128  # global, whatever the device count
  c.epochs = 10
  c.seed = 0
  c.seeds = ()  # several seeds: one run each, then statistics across them
  c.eval_every_epochs = 1
  c.last_epochs = 10  # the paper's statistic: mean and std of test accuracy over the last epochs
  c.log_every_steps = 50
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.resume = True
  c.max_consecutive_nonfinite = 20
  c.progress = True  # tqdm progress bar
  c.plots = True
  c.stop_after_steps = 0  # > 0: stop (as if interrupted) after this many steps; for tests
  c.init_from = ""  # a finished run's workdir (e.g. a float run): its params and BN statistics start this run
  c.allow_changes = ()  # keys of RESUMABLE_KEYS this invocation may change in a resumed run, e.g. ("epochs",)
  return c


OPERATIONAL_KEYS = frozenset({
    "name", "seeds", "progress", "plots", "stop_after_steps", "resume", "allow_changes", "keep_checkpoints",
    "checkpoint_every_steps", "log_every_steps"})
"""Keys that change how a run is shown, logged and checkpointed, never what it computes: not part of a run's
identity (:mod:`ricci_jax.train.run_folder`)."""

RESUMABLE_KEYS = frozenset({
    "epochs", "max_consecutive_nonfinite", "eval_every_epochs", "last_epochs", "dnr.every_steps", "dnr.test"})
"""Keys a resumed run may change when ``allow_changes`` names them (the change is recorded).

``epochs`` lengthens (or shortens) the run; the learning-rate and estimator schedules, which are fractions
of training, are then recomputed for the new length from the resumed step on: recorded, not hidden."""


def flatten_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """The dotted names of every leaf key of ``cfg`` (``optimizer.learning_rate``, ...)."""
  keys = []
  for k, v in cfg.items():
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(flatten_keys(v, f"{prefix}{k}."))
    else:
      keys.append(prefix + k)
  return keys


def unknown_key_error(key: str, valid: Sequence[str]) -> ValueError:
  """``unknown config key 'epoch'; did you mean 'epochs'?``: the closest valid names, never the whole list.

  Close by the whole dotted name (a typo) or by its last part (``learning_rate`` for
  ``optimizer.learning_rate``, a key in the wrong section).
  """
  close = difflib.get_close_matches(key, valid, n=2, cutoff=0.75)
  leaf = key.rsplit(".", 1)[-1]
  by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid}
  close = close or [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=2, cutoff=0.8)]
  if close:
    return ValueError(f"unknown config key {key!r}; did you mean {' or '.join(map(repr, close))}?")
  return ValueError(f"unknown config key {key!r}; no valid key is close to it (every key with its default: "
                    "ricci_jax.train.schema.default_config())")


def _parse_value(text: str, current: Any) -> Any:
  if isinstance(current, str):
    return text
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    value = text
  if isinstance(current, bool) and isinstance(value, str) and value.lower() in ("true", "false"):
    value = value.lower() == "true"
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, float) and isinstance(value, str) and value.lower() in ("inf", "infinity"):
    value = math.inf
  if isinstance(current, tuple) and isinstance(value, (list, int, float)):
    value = tuple(value) if isinstance(value, list) else (value,)
  if isinstance(current, tuple) and isinstance(value, str):  # a bare comma-separated list: allow_changes=epochs
    value = tuple(part.strip() for part in value.split(",") if part.strip())
  return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies ``key=value`` overrides (dotted keys), checking each key exists.

  Values are Python literals (``0.1``, ``(1, -1, 1, -1)``, ``True``) or bare
  strings. An unknown key raises a ``ValueError`` naming the closest valid keys.
  """
  valid = flatten_keys(config)
  for item in overrides:
    key, sep, text = item.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep:
      raise ValueError(f"an override must look like key=value, got {item!r}")
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
      if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
        raise unknown_key_error(key, valid)
      node = node[part]
    leaf = parts[-1]
    if isinstance(node, ml_collections.ConfigDict) and key.startswith("quant.hparams."):
      value = _parse_value(text, 0.0)
      if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} = {text!r} is not a number (estimator hyperparameters are numbers)")
      node[leaf] = float(value)
      continue
    if leaf not in node or isinstance(node[leaf], ml_collections.ConfigDict):
      raise unknown_key_error(key, valid)
    value = _parse_value(text, node[leaf])
    try:
      node[leaf] = value
    except TypeError:
      expected = RANGES[key].describe() if key in RANGES else f"a {type(node[leaf]).__name__}"
      raise ValueError(f"{key} = {text!r} is not {expected}") from None
  return config


def check_known_keys(config: ml_collections.ConfigDict):
  """Raises if ``config`` has a key the program does not know (e.g. a typo in a config file)."""
  valid = flatten_keys(default_config())
  for key in flatten_keys(config):
    if key == "pmap":
      raise ValueError("config key 'pmap' was removed: data parallelism is jax.jit over a sharded batch on "
                       "every device of every process, with nothing to choose; delete the key")
    if key not in valid and not key.startswith("quant.hparams."):
      raise unknown_key_error(key, valid)


def resolve_init_dir(path: str | os.PathLike, seed: int = 0) -> pathlib.Path:
  """The run directory that ``init_from=path`` names for ``seed``.

  ``path`` is a run's working directory (it holds ``checkpoints/``), or that of
  a several-seed run: then its ``seed_<seed>`` run, or else the first
  ``seed_*`` run with checkpoints.
  """
  p = pathlib.Path(path).expanduser()
  if (p / "checkpoints").is_dir():
    return p
  if (p / f"seed_{seed}" / "checkpoints").is_dir():
    return p / f"seed_{seed}"
  runs = sorted(q for q in p.glob("seed_*") if (q / "checkpoints").is_dir())
  if runs:
    return runs[0]
  raise ValueError(
      f"init_from {str(path)!r} holds no checkpoints (looked for checkpoints/ and seed_*/checkpoints/ "
      "there); pass the working directory of a finished run, e.g. a float run of the same model")


def rfdnn_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config.rfdnn`` as keyword arguments of :func:`ricci_jax.transform.rf_sgd`.

  ``tau`` becomes a float unless it is a mode ("auto", "std"); ``block``
  becomes an int when it is a number of weights. The block and tau are checked
  here (:func:`ricci_jax.lne.check_block`), so a bad one fails before training.
  """
  r = config.rfdnn
  tau = r.tau
  if tau not in lne.TAU_MODES:
    try:
      tau = float(tau)
    except ValueError:
      raise ValueError(f"rfdnn.tau must be a positive number or one of {', '.join(lne.TAU_MODES)}, "
                       f"got {r.tau!r}") from None
  block = r.block
  if isinstance(block, str) and block.isdigit():
    block = int(block)
  try:
    lne.check_block(block)
  except ValueError as e:
    raise ValueError(f"rfdnn.block: {e}") from None
  return dict(
      tau=tau, tau_scale=r.tau_scale, alpha=r.alpha, rho=r.rho, epsilon=r.epsilon,
      epsilon_relative=r.epsilon_relative, median_window=r.median_window, approx=r.approx, metric=r.metric,
      block=block, reading=r.reading, normalize=r.normalize, control=r.control,
      shifts=ricci_flow.Shifts(*map(int, r.shifts)))


def _choice(name: str, value, allowed):
  if value not in allowed:
    raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(map(str, allowed))}")


def validate(config: ml_collections.ConfigDict, workdir: str | os.PathLike | None = None,
             device_count: int | None = None):
  """Rejects a bad configuration before any training work.

  Args:
    config: the run's configuration.
    workdir: the output directory; it must be creatable and writable.
    device_count: local devices the batch is split over (default: all).
  """
  from ricci_jax import models  # noqa: PLC0415 - models import flax modules

  check_known_keys(config)
  check_ranges(config)
  wrong = sorted(set(config.allow_changes) - RESUMABLE_KEYS)
  if wrong:
    raise ValueError(f"allow_changes: {', '.join(wrong)} cannot change in a resumed run (it would mix two "
                     f"configurations); keys that can: {', '.join(sorted(RESUMABLE_KEYS))}")
  _choice("dataset", config.dataset.name, tuple(data_lib.DATASETS))
  _choice("data source", config.dataset.source, ("auto", "files", "tfds"))
  _choice("augmentation", config.dataset.augment, ("default", "none", "crop_flip"))
  _choice("evaluation split", config.dataset.eval_split, ("test", "validation"))
  _choice("model", config.model.name, tuple(models.MODELS))
  _choice("layer order", config.model.order, tuple(models.ORDERS))
  _choice("model API", config.model.api, MODEL_APIS)
  _choice("model dtype", config.model.dtype, ("float32", "bfloat16", "float16"))
  if config.model.api == "nnx":
    _choice("NNX zoo model", config.model.name, NNX_MODELS)
    if config.model.bireal:
      raise ValueError("model.bireal: the NNX zoo's ResNets have no Bi-Real shortcuts; use model.api='linen'")
  _choice("quantized-layer rule", config.quant.layers, LAYER_RULES)
  _choice("weight method", config.quant.weight_method, tuple(m for m in QUANT_METHODS if m != "staircase"))
  _choice("activation method", config.quant.act_method, QUANT_METHODS)
  _choice("estimator", config.quant.estimator, tuple(ESTIMATORS))
  if config.quant.act_estimator:
    _choice("activation estimator", config.quant.act_estimator, tuple(ESTIMATORS))
  _choice("scale mode", config.quant.scale, SCALE_MODES)
  _choice("estimator schedule", config.quant.schedule, ESTIMATOR_SCHEDULES)
  for name in ("weight_bits", "act_bits"):
    bits = config.quant[name]
    if bits != FLOAT_BITS:
      check_bits(bits)
  _choice("optimizer", config.optimizer.name, OPTIMIZERS)
  _choice("learning-rate schedule", config.optimizer.schedule, LR_SCHEDULES)
  _choice("RF-DNN approximation", config.rfdnn.approx, tuple(a for a in lne.APPROXIMATIONS if a != "strong"))
  _choice("RF-DNN reading", config.rfdnn.reading, ricci_flow.READINGS)
  _choice("translation", config.rfdnn.translation, ricci_flow.TRANSLATION_MODES)
  _choice("RF-DNN control", config.rfdnn.control, transform.CONTROLS)
  r = rfdnn_options(config)
  try:
    metric, _ = lne.resolve_metric(r["metric"], r["approx"])
    lne.check_tau(r["tau"], metric)
  except ValueError as e:
    raise ValueError(f"rfdnn: {e}") from None
  try:
    ricci_flow.Shifts(*map(int, config.rfdnn.shifts))
  except (TypeError, ValueError) as e:
    raise ValueError(f"rfdnn.shifts = {tuple(config.rfdnn.shifts)!r}: {e}") from None
  boundaries = config.optimizer.boundaries
  if config.optimizer.schedule == "multistep" and not all(
      isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b < 1 for b in boundaries):
    raise ValueError(f"optimizer.boundaries = {tuple(boundaries)!r}: fractions of training in (0, 1) expected")
  if config.optimizer.warmup_epochs >= config.epochs:
    raise ValueError(f"optimizer.warmup_epochs = {config.optimizer.warmup_epochs} must be below epochs = "
                     f"{config.epochs}")
  if config.quant.weight_bits != FLOAT_BITS or config.quant.act_bits != FLOAT_BITS:
    try:  # unknown names (a typo) and values out of the estimator's own range
      get_estimator(config.quant.estimator).resolve(dict(config.quant.hparams))
    except ValueError as e:
      raise ValueError(f"quant.hparams: {e}") from None
  if config.init_from:
    resolve_init_dir(config.init_from, config.seed)
  pruning_schedule(config)
  prune_rule(config)
  if config.optimizer.name == "rf_sgd" and config.quant.layers == "none":
    raise ValueError("optimizer rf_sgd needs quantized layers (quant.layers is 'none')")

  import jax  # noqa: PLC0415

  n_dev = jax.local_device_count() if device_count is None else device_count
  per_host = config.batch_size // jax.process_count()
  if config.batch_size % jax.process_count() or per_host % n_dev:
    raise ValueError(
        f"batch_size {config.batch_size} must split evenly over {jax.process_count()} host(s) and "
        f"{n_dev} device(s) per host; use a multiple of {jax.process_count() * n_dev}")

  if workdir is not None:
    path = pathlib.Path(workdir)
    if path.exists() and not path.is_dir():
      raise ValueError(f"the output directory {str(path)!r} is a file; pass a folder (--workdir)")
    try:
      path.mkdir(parents=True, exist_ok=True)
      probe = path / f".write_probe.{os.getpid()}"  # per process: the processes of one run share the folder
      probe.write_text("ok")
      probe.unlink()
    except OSError as e:
      raise ValueError(f"the output directory {str(path)!r} cannot be written ({e.strerror or e}); "
                       "pass a writable folder (--workdir)") from None


def pruning_schedule(config: ml_collections.ConfigDict):
  """``config.pruning`` as a :class:`ricci_jax.pruning.PruningSchedule`; ``None`` when the run does not prune.

  Raises:
    ValueError: a bad field (a sparsity outside [0, 1), an AP share larger
      than the rate, a rewind step without ``rewind="early"``, a bad N:M
      pattern, ...), with the library's message prefixed by ``pruning:``.
  """
  from ricci_jax import pruning  # noqa: PLC0415

  p = config.pruning
  if p.cycles == 0 and p.target_sparsity is None:
    return None
  nm = None
  if p.nm:
    try:
      nm = pruning.nm.parse_sparsity(p.nm)
    except ValueError as e:
      raise ValueError(f"pruning.nm: {e}") from None
  fields = dict(rate=p.rate, method=p.method, scope=p.scope, ap_share=p.ap_share, ap_start_cycle=p.ap_start_cycle,
                ap_candidates=p.ap_candidates, ap_score=p.ap_score, ap_scope=p.ap_scope, rewind=p.rewind,
                rewind_step=p.rewind_step, nm=nm)
  try:
    if p.target_sparsity is not None:
      if p.cycles:
        raise ValueError(f"give cycles ({p.cycles}) or target_sparsity ({p.target_sparsity}), not both")
      return pruning.PruningSchedule.to_reach(p.target_sparsity, **fields)
    return pruning.PruningSchedule(cycles=p.cycles, **fields)
  except ValueError as e:
    raise ValueError(f"pruning: {e}") from None


def prune_rule(config: ml_collections.ConfigDict):
  """``config.pruning``'s :class:`ricci_jax.pruning.PruneRule` (which leaves may be pruned)."""
  from ricci_jax import pruning  # noqa: PLC0415

  try:
    return pruning.PruneRule(layers=config.pruning.layers, extra=tuple(config.pruning.extra),
                             overrides=tuple((pattern, False) for pattern in config.pruning.exclude))
  except ValueError as e:
    raise ValueError(f"pruning: {e}") from None
