"""Our ResNet-20 train step and inference against the same network in PyTorch, on this CPU.

    python -m benchmarks.train_step_vs_pytorch [--rounds 10] [--quick] [--stock]
        [--out benchmarks/results/train_step_vs_pytorch.json]
    python -m benchmarks.train_step_vs_pytorch --check      # float64: JAX == PyTorch
    python -m benchmarks.train_step_vs_pytorch --equality   # tuned == stock settings, 20 steps

Needs the ``bench`` extra (``pip install -e '.[bench]'``: ``torch==2.13.0``).

Both networks are the CIFAR ResNet-20 (option-A shortcuts), batch 128, SGD
with Nesterov momentum 0.9, weight decay 5e-4, learning rate 0.1; binarized:
``sign(W)`` with the clipped STE in every block conv, ``conv_init`` and
``head`` in float (``QuantRule(layers="inner")``). The JAX model is
``rj.models.create("resnet20", ...)``; the PyTorch one is
``benchmarks/torch_resnet.py``, written plainly (NCHW, autograd). ``--check``
verifies in float64 that logits, gradients and weights after two steps agree.

Timed in one process, interleaved: every round draws a fresh random batch and
runs each case once (JAX and PyTorch alternately, the order reversed every
other round), timing the call and its completion (``block_until_ready``).
Reported per case: median and minimum over rounds, and JAX/PyTorch ratios of
medians and of minima. Cases:

* ``train_float``, ``train_binary_ste``: the train step (forward, backward,
  optimizer update, BatchNorm statistics);
* ``train_rfdnn_default`` (``fraction=0.125``) and ``train_rfdnn_paper``
  (``fraction=1``, the paper's four full-batch translated passes): the whole
  RF-DNN step with ``rj.rf_sgd``, against PyTorch's binarized STE step (PyTorch
  has no RF-DNN) and against our own STE step;
* ``infer_float``, ``infer_binary``: inference at batch 512 (running statistics);
* with ``--stock``: our binarized STE step and binarized inference compiled
  without the runtime's XLA options, interleaved with the others (the malloc setting is process-wide:
  see ``benchmarks/cpu_settings_ablation.py``).

The JAX steps are jitted with donated state and ``ricci_jax.runtime``'s
settings (``configure_cpu()`` first, ``compiler_options()`` per jit): the
same as the training program.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import time
from collections.abc import Callable

from ricci_jax import runtime

runtime.configure_cpu()  # before JAX starts its backend (malloc arenas)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import ricci_jax as rj  # noqa: E402
from ricci_jax import models  # noqa: E402
from benchmarks.common import save_json  # noqa: E402

LR = 0.1


# ----------------------------------------------------------------------------
# The JAX side.
# ----------------------------------------------------------------------------


def make_model(binary: bool, dtype=jnp.float32):
  rule = None
  if binary:
    rule = models.QuantRule(layers="inner", weight=rj.TensorQuant(bits=1, estimator="clipped_ste"))
  return models.create("resnet20", num_classes=10, quant=rule, dtype=dtype)


def init_variables(model, seed: int = 0, dtype=jnp.float32):
  variables = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3), dtype), train=False)
  return jax.tree.map(lambda a: a.astype(dtype), variables)


def sgd() -> optax.GradientTransformation:
  """SGD, Nesterov 0.9, weight decay 5e-4: PyTorch's ``SGD(..., nesterov=True, weight_decay=5e-4)``."""
  return optax.chain(optax.add_decayed_weights(5e-4), optax.trace(0.9, nesterov=True),
                     optax.scale(-LR))


def loss_fn(model, params, batch_stats, images, labels):
  logits, new_vars = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                 mutable=["batch_stats"])
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss, new_vars["batch_stats"]


def sgd_step(model, tx, params, opt_state, batch_stats, images, labels):
  """One step: (params, opt_state, batch_stats, loss)."""
  (loss, stats), grads = jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True)(
      params, batch_stats, images, labels)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state, stats, loss


def rfdnn_step(model, tx, fraction, params, opt_state, batch_stats, images, labels):
  """One RF-DNN step: gradients, the four translated gradients, ``rf_sgd``'s update."""
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True)
  (loss, stats), grads = grad_fn(params, batch_stats, images, labels)

  def plain(p, batch):
    return loss_fn(model, p, batch_stats, batch["image"], batch["label"])[0]

  shifted = rj.translated_grads(plain, params, {"image": images, "label": labels}, fraction=fraction)
  updates, opt_state = tx.update(grads, opt_state, params, translated_grads=shifted)
  return optax.apply_updates(params, updates), opt_state, stats, loss


def jit_step(fn: Callable, options: dict | None = None) -> Callable:
  """``jax.jit`` with the state (params, opt_state, batch_stats) donated and our XLA options."""
  opts = runtime.compiler_options() if options is None else options
  return jax.jit(fn, donate_argnums=(0, 1, 2), compiler_options=opts)


class JaxTrainer:
  """A jitted JAX train step with its state, called on host batches."""

  def __init__(self, binary: bool, method: str = "sgd", fraction: float = 0.125, seed: int = 0,
               options: dict | None = None):
    self.model = make_model(binary)
    variables = init_variables(self.model, seed)
    params = variables["params"]
    if method == "rfdnn":
      x = jnp.zeros((1, 32, 32, 3))
      mask = rj.layers.quantized_kernel_mask(params, rj.quantized_kernels(self.model, x, train=False))
      tx = rj.rf_sgd(LR, quantized=mask)
      fn = functools.partial(rfdnn_step, self.model, tx, fraction)
    else:
      tx = sgd()
      fn = functools.partial(sgd_step, self.model, tx)
    self.step = jit_step(fn, options)
    self.state = jax.tree.map(lambda a: jnp.array(a, copy=True),
                              (params, tx.init(params), variables["batch_stats"]))
    self.variables = variables

  def __call__(self, images: np.ndarray, labels: np.ndarray) -> float:
    x, y = jnp.asarray(images), jnp.asarray(labels)
    self._last_batch = (x, y)
    t0 = time.perf_counter()
    *self.state, loss = self.step(*self.state, x, y)
    jax.block_until_ready((self.state, loss))
    self.loss = loss
    return time.perf_counter() - t0

  def compiled_text(self) -> str:
    """The optimised HLO of the step (for per-op profiles)."""
    return self.step.lower(*self.state, *self._last_batch).compile().as_text()


class JaxInference:
  """Our jitted inference (running statistics) on host batches."""

  def __init__(self, binary: bool, seed: int = 0, options: dict | None = None):
    self.model = make_model(binary)
    self.variables = init_variables(self.model, seed)
    opts = runtime.compiler_options() if options is None else options
    self.fn = jax.jit(lambda v, x: self.model.apply(v, x, train=False), compiler_options=opts)

  def __call__(self, images: np.ndarray, labels: np.ndarray) -> float:
    x = jnp.asarray(images)
    t0 = time.perf_counter()
    jax.block_until_ready(self.fn(self.variables, x))
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------
# The PyTorch side.
# ----------------------------------------------------------------------------


def _torch():
  import torch  # noqa: PLC0415 - benchmark-only dependency

  from benchmarks import torch_resnet  # noqa: PLC0415

  torch.set_num_threads(os.cpu_count() or 1)
  return torch, torch_resnet


def _torch_net(binary: bool, variables=None):
  """(torch, torch_resnet, a PyTorch ResNet-20 holding ``variables`` if given)."""
  torch, torch_resnet = _torch()
  net = torch_resnet.ResNet20(binary=binary)
  if variables is not None:
    torch_resnet.load_flax_variables(net, variables["params"], variables["batch_stats"])
  return torch, torch_resnet, net


class TorchTrainer:
  """PyTorch's train step (zero_grad, forward, cross-entropy, backward, SGD step)."""

  def __init__(self, binary: bool, variables=None):
    self.torch, torch_resnet, self.net = _torch_net(binary, variables)
    self.net.train()
    self.opt = torch_resnet.sgd(self.net, LR)

  def __call__(self, images: np.ndarray, labels: np.ndarray) -> float:
    torch = self.torch
    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    y = torch.from_numpy(labels.astype(np.int64))
    t0 = time.perf_counter()
    self.opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(self.net(x), y)
    loss.backward()
    self.opt.step()
    self.loss = float(loss.detach())  # synchronous on the CPU; outside nothing is pending
    return time.perf_counter() - t0


class TorchInference:
  """PyTorch inference in eval mode under ``torch.inference_mode()``."""

  def __init__(self, binary: bool, variables=None):
    self.torch, _, self.net = _torch_net(binary, variables)
    self.net.eval()

  def __call__(self, images: np.ndarray, labels: np.ndarray) -> float:
    x = self.torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    t0 = time.perf_counter()
    with self.torch.inference_mode():
      self.net(x)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------
# Interleaved timing.
# ----------------------------------------------------------------------------


def _stats(times: list[float]) -> dict:
  return {"median_s": float(np.median(times)), "min_s": float(np.min(times)), "n": len(times),
          "times_s": [round(t, 5) for t in times]}


def run_interleaved(cases: dict[str, Callable], batch_of: dict[str, int], rounds: int, seed: int = 0,
                    warmup: int = 2) -> dict[str, list[float]]:
  """Times every case once per round on a fresh batch (order reversed every other round)."""
  rng = np.random.default_rng(seed)
  names = list(cases)

  def batch(n):
    return rng.standard_normal((n, 32, 32, 3), dtype=np.float32), rng.integers(0, 10, n).astype(np.int32)

  for _ in range(warmup):  # compile and warm up (allocator, thread pools)
    for name in names:
      cases[name](*batch(batch_of[name]))
  times: dict[str, list[float]] = {name: [] for name in names}
  for r in range(rounds):
    batches = {n: batch(n) for n in sorted(set(batch_of.values()))}
    for name in (names if r % 2 == 0 else names[::-1]):
      times[name].append(cases[name](*batches[batch_of[name]]))
    print(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in times.items()),
          flush=True)
  return times


def _machine() -> dict:
  import torch  # noqa: PLC0415

  info = {"platform": platform.platform(), "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "devices": [str(d) for d in jax.devices()]}
  try:
    info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                       if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return info


def benchmark(rounds: int, batch_size: int, infer_batch: int, stock: bool, rfdnn: bool) -> dict:
  """Builds every case, times them interleaved, and returns the results dict."""
  cases: dict[str, Callable] = {}
  batch_of: dict[str, int] = {}
  pairs = {}  # row -> (jax case, torch case)

  def add(name, fn, n):
    cases[name], batch_of[name] = fn, n

  for binary, row in ((False, "train_float"), (True, "train_binary_ste")):
    jt = JaxTrainer(binary)
    add(f"{row}/jax", jt, batch_size)
    add(f"{row}/torch", TorchTrainer(binary, jt.variables), batch_size)
    pairs[row] = (f"{row}/jax", f"{row}/torch")
  if stock:
    add("train_binary_ste_stock_xla/jax", JaxTrainer(True, options={}), batch_size)
    pairs["train_binary_ste_stock_xla"] = ("train_binary_ste_stock_xla/jax", "train_binary_ste/torch")
  if rfdnn:
    for row, fraction in (("train_rfdnn_default", 0.125), ("train_rfdnn_paper", 1.0)):
      add(f"{row}/jax", JaxTrainer(True, "rfdnn", fraction), batch_size)
      pairs[row] = (f"{row}/jax", "train_binary_ste/torch")
  for binary, row in ((False, "infer_float"), (True, "infer_binary")):
    ji = JaxInference(binary)
    add(f"{row}/jax", ji, infer_batch)
    add(f"{row}/torch", TorchInference(binary, ji.variables), infer_batch)
    pairs[row] = (f"{row}/jax", f"{row}/torch")
  if stock:
    add("infer_binary_stock_xla/jax", JaxInference(True, options={}), infer_batch)
    pairs["infer_binary_stock_xla"] = ("infer_binary_stock_xla/jax", "infer_binary/torch")

  load_before = os.getloadavg()
  times = run_interleaved(cases, batch_of, rounds)
  load_after = os.getloadavg()
  stats = {name: _stats(t) for name, t in times.items()}
  rows = {}
  for row, (j, t) in pairs.items():
    rows[row] = {"jax": stats[j], "torch": stats[t], "torch_case": t,
                 "ratio_median": stats[j]["median_s"] / stats[t]["median_s"],
                 "ratio_min": stats[j]["min_s"] / stats[t]["min_s"],
                 "batch_size": batch_of[j]}
  ste = stats["train_binary_ste/jax"]
  for row in ("train_rfdnn_default", "train_rfdnn_paper", "train_binary_ste_stock_xla"):
    if row in rows:
      rows[row]["ratio_to_our_ste_median"] = rows[row]["jax"]["median_s"] / ste["median_s"]
      rows[row]["ratio_to_our_ste_min"] = rows[row]["jax"]["min_s"] / ste["min_s"]
  return {"machine": _machine(), "load_average_before": load_before, "load_average_after": load_after,
          "settings": {"runtime": runtime.configure_cpu(), "xla_flags_env": os.environ.get("XLA_FLAGS", "")},
          "rounds": rounds, "rows": rows}


def print_table(result: dict) -> None:
  print(f"{'case':<28}{'JAX median':>11}{'min':>8}{'PyTorch median':>16}{'min':>8}"
        f"{'ratio med':>11}{'ratio min':>10}")
  for row, r in result["rows"].items():
    extra = ""
    if "ratio_to_our_ste_median" in r:
      extra = f"   ({r['ratio_to_our_ste_median']:.2f}x our STE step)"
    print(f"{row:<28}{r['jax']['median_s']:>10.3f}s{r['jax']['min_s']:>7.3f}s"
          f"{r['torch']['median_s']:>15.3f}s{r['torch']['min_s']:>7.3f}s"
          f"{r['ratio_median']:>11.2f}{r['ratio_min']:>10.2f}{extra}")
  lb, la = result["load_average_before"], result["load_average_after"]
  print(f"load average (1, 5, 15 min) before {lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f}, "
        f"after {la[0]:.2f} {la[1]:.2f} {la[2]:.2f} on {os.cpu_count()} cores")


# ----------------------------------------------------------------------------
# Checks: JAX == PyTorch in float64; tuned == stock settings.
# ----------------------------------------------------------------------------


def check_against_torch(batch_size: int = 32, steps: int = 2) -> dict:
  """float64: logits, gradients and weights after ``steps`` SGD steps, JAX against PyTorch.

  Needs ``jax_enable_x64`` set before any JAX computation (``main`` does it).
  """
  torch, torch_resnet = _torch()
  model = make_model(True, jnp.float64)
  variables = init_variables(model, 0, jnp.float64)
  net = torch_resnet.ResNet20(binary=True).double()
  torch_resnet.load_flax_variables(net, variables["params"], variables["batch_stats"])
  net.train()
  opt = torch_resnet.sgd(net, LR)
  tx = sgd()
  params, stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  rng = np.random.default_rng(1)
  out = {}
  grad_fn = jax.jit(jax.value_and_grad(functools.partial(loss_fn, model), has_aux=True))
  for step in range(steps):
    images = rng.standard_normal((batch_size, 32, 32, 3))
    labels = rng.integers(0, 10, batch_size)
    logits = model.apply({"params": params, "batch_stats": stats}, images, train=True,
                         mutable=["batch_stats"])[0]
    (_, new_stats), grads = grad_fn(params, stats, images, labels)
    opt.zero_grad(set_to_none=True)
    tlogits = net(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
    torch.nn.functional.cross_entropy(tlogits, torch.from_numpy(labels)).backward()
    tgrads = {n: m.weight.grad.numpy() for n, m in net.layers.items()}
    g_diff = 0.0
    for name, g in tgrads.items():
      k = grads[name]["kernel"] if "kernel" in grads[name] else grads[name]["scale"]
      k = np.asarray(k)
      k = k.transpose(3, 2, 0, 1) if k.ndim == 4 else (k.T if k.ndim == 2 else k)
      g_diff = max(g_diff, float(np.max(np.abs(k - g))))
    out[f"step{step}_logits_max_abs_diff"] = float(np.max(np.abs(np.asarray(logits) - tlogits.detach().numpy())))
    out[f"step{step}_grads_max_abs_diff"] = g_diff
    updates, opt_state = tx.update(grads, opt_state, params)
    params, stats = optax.apply_updates(params, updates), new_stats
    opt.step()
  w_diff = 0.0
  for name, m in net.layers.items():
    k = np.asarray(params[name]["kernel"] if "kernel" in params[name] else params[name]["scale"])
    k = k.transpose(3, 2, 0, 1) if k.ndim == 4 else (k.T if k.ndim == 2 else k)
    w_diff = max(w_diff, float(np.max(np.abs(k - m.weight.detach().numpy()))))
  out["weights_after_steps_max_abs_diff"] = w_diff
  return out


def equality(steps: int = 20, batch_size: int = 128, dtype=jnp.float32) -> dict:
  """Losses over ``steps`` steps: our step with the runtime's XLA options against without.

  Also returns the float32 noise floor: the same stock step started from
  weights one ulp away (``nextafter`` towards +inf). Binarized training is
  chaotic (a last-bit difference flips a sign(W) sooner or later), so float32
  trajectories part at the same rate whatever changes the rounding; in
  float64 the two settings agree to the last bits.
  """
  model = make_model(True, dtype)
  variables = init_variables(model, 0, dtype)
  tx = sgd()
  fn = functools.partial(sgd_step, model, tx)
  tuned = jax.jit(fn, compiler_options=runtime.compiler_options())
  stock = jax.jit(fn)
  params = variables["params"]
  nudged = jax.tree.map(lambda a: jnp.nextafter(a, jnp.asarray(np.inf, a.dtype)), params)
  runs = {"stock": (stock, params), "tuned": (tuned, params), "stock_1ulp": (stock, nudged)}
  state = {k: (p, tx.init(p), variables["batch_stats"]) for k, (_, p) in runs.items()}
  rng = np.random.default_rng(2)
  losses: dict[str, list[float]] = {k: [] for k in runs}
  for _ in range(steps):
    images = jnp.asarray(rng.standard_normal((batch_size, 32, 32, 3)), dtype)
    labels = jnp.asarray(rng.integers(0, 10, batch_size))
    for k, (f, _) in runs.items():
      *st, loss = f(*state[k], images, labels)
      state[k] = tuple(st)
      losses[k].append(float(loss))
  diff = lambda a, b: float(np.max(np.abs(np.subtract(losses[a], losses[b]))))  # noqa: E731
  return {"dtype": jnp.dtype(dtype).name, "steps": steps, "batch_size": batch_size, "losses": losses,
          "max_abs_loss_diff_tuned_vs_stock": diff("tuned", "stock"),
          "max_abs_loss_diff_1ulp_vs_stock": diff("stock_1ulp", "stock"),
          "first_step_loss_diff_tuned_vs_stock": abs(losses["tuned"][0] - losses["stock"][0])}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--infer-batch", type=int, default=512)
  parser.add_argument("--quick", action="store_true", help="3 rounds, no RF-DNN cases")
  parser.add_argument("--stock", action="store_true", help="also time our STE step without the XLA options")
  parser.add_argument("--check", action="store_true", help="float64 equivalence with PyTorch, then exit")
  parser.add_argument("--equality", action="store_true",
                      help="20-step losses, tuned against stock settings (float32 and float64), then exit")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<mode>.json)")
  args = parser.parse_args(argv)
  results = pathlib.Path("benchmarks/results")

  if args.check or args.equality:
    jax.config.update("jax_enable_x64", True)
    out = {}
    if args.check:
      out["jax_vs_torch_float64"] = check_against_torch()
      print("JAX vs PyTorch, float64:", json.dumps(out["jax_vs_torch_float64"], indent=2))
    if args.equality:
      for dtype, steps, n in ((jnp.float32, 20, args.batch_size), (jnp.float64, 20, 32)):
        eq = equality(steps, n, dtype)
        out[f"tuned_vs_stock_{eq['dtype']}"] = eq
        print(f"{eq['dtype']}, {steps} steps, batch {n}: max |loss diff| tuned vs stock "
              f"{eq['max_abs_loss_diff_tuned_vs_stock']:.3g} (first step "
              f"{eq['first_step_loss_diff_tuned_vs_stock']:.3g}); stock vs stock from weights 1 ulp away "
              f"{eq['max_abs_loss_diff_1ulp_vs_stock']:.3g}")
    path = pathlib.Path(args.out or results / "train_step_equality.json")
    save_json(out, path)
    return

  rounds = 3 if args.quick else args.rounds
  result = benchmark(rounds, args.batch_size, args.infer_batch, args.stock, rfdnn=not args.quick)
  print_table(result)
  path = pathlib.Path(args.out or results / "train_step_vs_pytorch.json")
  save_json(result, path)


if __name__ == "__main__":
  main()
