"""The package's shape: no import circle, no module over 500 lines, no private name used across modules,
only ``ricci_jax`` installed, and no warning on a normal training run."""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ricci_jax"
MODULES = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
           for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
  if node.level == 0:
    return node.module or ""
  base = module.split(".")
  if not MODULES[module].name == "__init__.py":
    base = base[:-1]
  base = base[:len(base) - node.level + 1]
  return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> dict[str, set[str]]:
  """{imported ricci_jax module: names imported from it} for every import anywhere in ``module``."""
  out: dict[str, set[str]] = {}
  for node in ast.walk(ast.parse(MODULES[module].read_text())):
    if isinstance(node, ast.Import):
      for a in node.names:
        if a.name.startswith("ricci_jax"):
          out.setdefault(a.name, set())
    elif isinstance(node, ast.ImportFrom):
      source = _resolve(module, node)
      if not source.startswith("ricci_jax"):
        continue
      for a in node.names:
        sub = f"{source}.{a.name}"
        if sub in MODULES:  # from ricci_jax import train: the module itself
          out.setdefault(sub, set())
        else:
          out.setdefault(source, set()).add(a.name)
  return out


def _edges() -> dict[str, set[str]]:
  """Module -> the ricci_jax modules it imports (a package's __init__ is where the package is)."""
  return {m: {t for t in _imports(m) if t in MODULES and t != m} for m in MODULES}


def test_the_module_list_is_real():
  assert {"ricci_jax", "ricci_jax.lne", "ricci_jax.transform", "ricci_jax.models.inspect"} <= MODULES.keys()
  assert "ricci_jax.models.inspect" in _edges()["ricci_jax"] or any(
      "ricci_jax.models" in e for e in _edges()["ricci_jax"])


def test_no_import_circle_inside_the_package():
  """Counting every import, lazy ones inside functions too: a circle hidden in a function is still one.
  A package's ``__init__`` re-exporting its own submodules is not a circle."""
  edges = _edges()

  def inside(pkg, mod):
    return mod.startswith(pkg + ".") and MODULES[pkg].name == "__init__.py"

  graph = {m: {t for t in ts if not inside(m, t)} for m, ts in edges.items()}
  state: dict[str, int] = {}
  cycles = []

  def visit(m, stack):
    state[m] = 1
    for t in sorted(graph[m]):
      if state.get(t) == 1:
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t, stack + [t])
    state[m] = 2

  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_a_circle_would_be_found():  # the detector itself, on a made-up graph
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}}
  seen, found = set(), []

  def visit(m, stack):
    seen.add(m)
    for t in graph[m]:
      if t in stack:
        found.append(t)
      elif t not in seen:
        visit(t, stack + [t])

  visit("a", ["a"])
  assert found == ["a"]


def test_no_module_over_500_lines():
  long = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
  assert not {m: n for m, n in long.items() if n > 500}


def test_no_private_name_is_used_outside_its_module():
  offenders = []
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text())
    aliases = {}
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom) and _resolve(module, node).startswith("ricci_jax"):
        for a in node.names:
          if a.name.startswith("_"):
            offenders.append(f"{module}: from {_resolve(module, node)} import {a.name}")
          if f"{_resolve(module, node)}.{a.name}" in MODULES:
            aliases[a.asname or a.name] = f"{_resolve(module, node)}.{a.name}"
      elif isinstance(node, ast.Import):
        for a in node.names:
          if a.name.startswith("ricci_jax"):
            aliases[a.asname or a.name] = a.name
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
          and isinstance(node.value, ast.Name) and node.value.id in aliases
          and aliases[node.value.id] != module):
        offenders.append(f"{module}: {node.value.id}.{node.attr}")
  for folder in ("experiments", "benchmarks"):  # the programs too use public seams only
    for path in sorted((REPO / folder).rglob("*.py")):
      for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ricci_jax"):
          offenders += [f"{path.name}: import {a.name}" for a in node.names if a.name.startswith("_")]
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and isinstance(node.value, ast.Name)
            and node.value.id in {"train", "export", "data", "data_lib", "layers", "models", "summary",
                                  "inference", "transform", "lne", "ricci_flow", "quantizers", "runtime",
                                  "reporting", "train_config", "inspect"}):
          offenders.append(f"{path.relative_to(REPO)}: {node.value.id}.{node.attr}")
  assert not offenders, offenders


def test_only_the_library_is_installed(tmp_path):
  """Outside the checkout, ``experiments`` (a generic name) is not importable; ``ricci_jax`` is."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  for code, ok in (("import ricci_jax", True), ("import experiments", False), ("import benchmarks", False)):
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert (proc.returncode == 0) == ok, (code, proc.stderr[-500:])


@pytest.mark.skipif(not pathlib.Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="no Fashion-MNIST")
def test_a_normal_training_run_prints_no_warning(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config", "experiments/configs/fashion_mnist.py:rfdnn",
       "--workdir", str(tmp_path / "run"), "dataset.train_limit=256", "dataset.test_limit=128", "epochs=1",
       "batch_size=64", "progress=False", "plots=False"],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Warning" not in proc.stderr and "warn" not in proc.stderr.lower(), proc.stderr[-2000:]
  assert "test accuracy over the last" in proc.stdout
