"""Every benchmark in one table: reads ``benchmarks/results/*.json`` and rewrites the table in ``benchmarks/README.md``.

    python -m benchmarks.report            # table from the saved JSON files
    python -m benchmarks.report --run      # run every benchmark first (about 25 minutes on 2 cores), then the table

The table sits between the two marker lines in ``benchmarks/README.md``; the
text around it is left as it is. A benchmark whose JSON file is missing is
listed as not run. Each row names the JSON file it comes from, so every number
traces back to a run (machine, load average and raw times are in the file).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent
RESULTS = ROOT / "results"
README = ROOT / "README.md"
BEGIN, END = "<!-- benchmark table: begin -->", "<!-- benchmark table: end -->"

# (module, arguments): the order they run in with --run; the PyTorch comparison first, on a quiet machine.
BENCHMARKS = (
    ("benchmarks.train_step_vs_pytorch", ["--stock"]),
    ("benchmarks.train_step_vs_pytorch", ["--check", "--equality"]),
    ("benchmarks.profile_train_step", []),
    ("benchmarks.ricci_transform", []),
    ("benchmarks.train_throughput", []),
    ("benchmarks.input_pipeline", []),
    ("benchmarks.export_inference", []),
    ("benchmarks.cpu_settings_ablation", []),
    ("benchmarks.dead_neurons_cost", []),
)


def _load(name: str) -> dict | None:
  path = RESULTS / name
  return json.loads(path.read_text()) if path.is_file() else None


def _ms(s: float) -> str:
  return f"{1e3 * s:.0f} ms" if s >= 0.01 else f"{1e3 * s:.2f} ms"


def rows_vs_pytorch(d: dict) -> list[list[str]]:
  src = "train_step_vs_pytorch.json"
  targets = {"train_binary_ste": "<= 1.0x (stretch 0.8x)", "infer_binary": "<= 0.8x", "infer_float": "<= 0.8x"}
  out = []
  for row, r in d["rows"].items():
    jax_t, torch_t = r["jax"]["median_s"], r["torch"]["median_s"]
    what = f"{row}: JAX {_ms(jax_t)} / PyTorch {_ms(torch_t)} (batch {r.get('batch_size', '?')})"
    measured = f"{r['ratio_median']:.2f}x (min-ratio {r['ratio_min']:.2f}x)"
    if "ratio_to_our_ste_median" in r:
      measured += f"; {r['ratio_to_our_ste_median']:.2f}x our STE step"
    out.append(["JAX / PyTorch, CPU", what, measured, targets.get(row, ""), src])
  return out


def rows_equality(d: dict) -> list[list[str]]:
  src = "train_step_equality.json"
  out = []
  if "jax_vs_torch_float64" in d:
    c = d["jax_vs_torch_float64"]
    out.append(["same model as PyTorch", "float64: logits, gradients, weights after 2 steps (max abs diff)",
                f"{max(c.values()):.1e}", "1e-13", src])
  for key, e in d.items():
    if key.startswith("tuned_vs_stock"):
      out.append(["CPU settings keep results", f"{e['dtype']}, {e['steps']} steps, batch {e['batch_size']}: "
                  "max abs(loss tuned - loss stock)", f"{e['max_abs_loss_diff_tuned_vs_stock']:.2g} (weights 1 ulp "
                  f"apart: {e['max_abs_loss_diff_1ulp_vs_stock']:.2g})", "as 1 ulp", src])
  return out


def rows_ricci_transform(d: dict) -> list[list[str]]:
  src = "ricci_transform.json"
  out = []
  targets = {"rfdnn_fraction_1": "<= 5.5x", "rfdnn_fraction_0.125": "<= 1.5x"}
  for name, r in d["steps"].items():
    if name != "ste":
      out.append(["RF-DNN step / our STE step", f"{name} (ResNet-20, batch {d['batch_size']})",
                  f"{r['ratio_to_ste']:.2f}x ({_ms(r['median_s'])})", targets.get(name, ""), src])
  u = d["transform_update"]
  out.append(["rf_sgd update alone", "fraction of the STE train step", f"{100 * u['fraction_of_ste_step']:.2f}% "
              f"({_ms(u['median_s'])})", "< 3%", src])
  sb = d["state_bytes"]
  out.append(["rf_sgd state", "bytes per quantized weight", f"{sb['rf_sgd_bytes_per_quantized_weight']:.1f} B",
              "", src])
  out.append(["flow residual N", "log-log slope of time vs weights (>= 1e5)",
              f"{d['residual_scaling']['loglog_slope_n_ge_1e5']:.2f}", "1 (linear)", src])
  return out


def rows_throughput(d: dict) -> list[list[str]]:
  src = "train_throughput.json"
  out = [["training program step", f"{m} (ResNet-20, batch {d['batch_size']})",
          f"{r['images_per_second']:.0f} images/s ({r['relative_to_float']:.2f}x float)", "", src]
         for m, r in d["steps"].items()]
  pipe = d.get("input_pipeline_cifar10_subset")
  if pipe:
    out.append(["input pipeline", "CIFAR-10 subset, host + device augmentation",
                f"{pipe['host_plus_augment_images_per_s']:,.0f} images/s "
                f"({pipe['headroom_over_slowest_step']:,.0f}x the slowest step)", "> 1x", src])
  return out


def rows_input_pipeline(d: dict) -> list[list[str]]:
  src = "input_pipeline.json"
  out = []
  for r in d["results"]:
    if "host_images_per_s" in r:
      out.append(["input pipeline", f"{r['dataset']} {r['split']} (batch {r['batch_size']})",
                  f"{r['host_images_per_s']:,.0f} images/s host; {r['host_plus_augment_images_per_s']:,.0f} "
                  f"with augmentation", "", src])
    else:
      out.append(["input pipeline", r["dataset"], f"{r['train_images_per_s_one_thread']} train / "
                  f"{r['eval_images_per_s_one_thread']} eval images/s, one thread", "", src])
  return out


def rows_export(d: dict) -> list[list[str]]:
  src = "export_inference.json"
  out = []
  for r in d["size_ratios"]:
    out.append(["packed export size", f"{r['model']}: {r['reference']}", f"1/{r['ratio']:.1f}", "1/25", src])
  for case, v in d["inference"].items():
    t = v["timing"]
    base = t.get("float model", {}).get("median_s")
    for name, tv in t.items():
      if name != "float model" and base:
        out.append(["packed inference", f"{case}: {name}", f"{_ms(tv['median_s'])} ({tv['median_s'] / base:.2f}x "
                    "float model)", "", src])
  return out


def rows_profile(d: dict) -> list[list[str]]:
  src = "profile_train_step.json"
  out = []
  for label, p in d["profiles"].items():
    cats = ", ".join(f"{k} {v:.0f}" for k, v in p["categories_ms"].items() if v >= 1)
    out.append(["per-op profile (traced)", f"{label} binarized step, batch {d['batch_size']}: thread ms per step",
                f"wall {p['wall_ms_median']:.0f} ms; {cats}", "", src])
  return out


def rows_ablation(d: dict) -> list[list[str]]:
  src = "cpu_settings_ablation.json"
  settings = d["settings"]
  base = settings["stock"]["wall_s"]["median"]
  return [["CPU settings ablation", f"{name} ({d['model']} ResNet-20 step)",
           f"{v['wall_s']['median']:.3f} s ({v['wall_s']['median'] / base:.2f}x stock; "
           f"{v['minor_faults']['median']:,.0f} page faults)", "", src] for name, v in settings.items()]


def rows_dead_neurons(d: dict) -> list[list[str]]:
  src = "dead_neurons_cost.json"
  labels = {"measure": "`relu_activity`, train mode", "measure_and_summarize": "the same + `add_counts` + `summarize`"}
  base = d["cases"]["train_step"]["median_s"]
  out = [["dead-neuron rate cost", f"{label} (binarized LeNet-5, batch {d['batch_size']})",
          f"{_ms(d['cases'][case]['median_s'])} ({d['cases'][case]['ratio_to_train_step_median']:.2f}x a "
          f"{_ms(base)} train step)", "", src] for case, label in labels.items()]
  k = d["overhead_every_k_steps"]
  out.append(["dead-neuron rate cost", "measured every K steps: share of the training time",
              ", ".join(f"K={n}: {100 * v:.2g}%" for n, v in k.items()), "", src])
  return out


SECTIONS = (
    ("train_step_vs_pytorch.json", rows_vs_pytorch),
    ("train_step_equality.json", rows_equality),
    ("profile_train_step.json", rows_profile),
    ("ricci_transform.json", rows_ricci_transform),
    ("train_throughput.json", rows_throughput),
    ("input_pipeline.json", rows_input_pipeline),
    ("export_inference.json", rows_export),
    ("cpu_settings_ablation.json", rows_ablation),
    ("dead_neurons_cost.json", rows_dead_neurons),
)


def table() -> str:
  from ricci_jax import reporting  # noqa: PLC0415

  rows, missing = [], []
  for name, fn in SECTIONS:
    d = _load(name)
    if d is None:
      missing.append(name)
      continue
    rows.extend(fn(d))
  text = reporting.markdown_table(["benchmark", "case", "measured", "target", "from"], rows)
  if missing:
    text += "\nNot run yet: " + ", ".join(missing) + " (`python -m benchmarks.report --run`).\n"
  return text


def write(readme: pathlib.Path = README) -> None:
  text = readme.read_text()
  if BEGIN not in text or END not in text:
    raise ValueError(f"{readme} has no benchmark table markers ({BEGIN!r} ... {END!r})")
  head, rest = text.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  readme.write_text(f"{head}{BEGIN}\n{table()}{END}{tail}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--run", action="store_true", help="run every benchmark first (slow; needs torch)")
  args = parser.parse_args(argv)
  if args.run:
    for module, extra in BENCHMARKS:
      print(f"== python -m {module} {' '.join(extra)}", flush=True)
      subprocess.run([sys.executable, "-m", module, *extra], check=True)
  write()
  print(table())
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
