"""The notebooks run top to bottom in small mode, and their committed outputs hold real plots."""

import base64
import os
import pathlib
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")
SMALL_BUDGET_S = 400  # the four together, in small mode (300 s for the first three, the limit for CI)

nbformat = pytest.importorskip("nbformat")
_elapsed: dict[str, float] = {}


def test_the_notebooks_exist():
  assert [p.name for p in NOTEBOOKS] == [
      "01_lne_metric_and_ricci_flow.ipynb", "02_estimator_zoo.ipynb", "03_fashion_mnist_rfdnn.ipynb",
      "04_nnx_rfdnn.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_outputs_show_real_plots_and_no_errors(path):
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.get("execution_count") for c in code), "commit the notebook executed top to bottom"
  outputs = [o for c in code for o in c.get("outputs", [])]
  assert not [o for o in outputs if o.output_type == "error"]
  pngs = [base64.b64decode(o.data["image/png"]) for o in outputs
          if o.output_type in ("display_data", "execute_result") and "image/png" in o.get("data", {})]
  assert len(pngs) >= 2 and all(p.startswith(b"\x89PNG") and len(p) > 10_000 for p in pngs)
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "default mode" in text, "the committed outputs must be the default mode's, not the small mode's"
  assert path.stat().st_size < 600_000, "keep committed outputs small"
  assert any(c.cell_type == "markdown" and "Eq." in c.source for c in nb.cells)


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom_in_small_mode(path, monkeypatch):
  nbclient = pytest.importorskip("nbclient")
  pytest.importorskip("ipykernel")
  monkeypatch.setenv("RICCI_JAX_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("JAX_PLATFORMS", os.environ.get("JAX_PLATFORMS", "cpu"))
  # the kernel imports this checkout first (the notebooks put the repository root on sys.path)
  nb = nbformat.read(path, as_version=4)
  start = time.perf_counter()
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(path.parent)}})
  client.execute()  # raises CellExecutionError, with the cell and its traceback, on any error
  _elapsed[path.name] = time.perf_counter() - start
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                 if o.output_type == "stream")
  assert "SMALL mode" in text and f"ricci_jax from {REPO / 'ricci_jax'}" in text
  images = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if "image/png" in o.get("data", {})]
  assert len(images) >= 2
  if len(_elapsed) == len(NOTEBOOKS):
    total = sum(_elapsed.values())
    print(f"notebooks in small mode: {', '.join(f'{k} {v:.0f} s' for k, v in _elapsed.items())}; total {total:.0f} s")
    assert total < SMALL_BUDGET_S, f"the notebooks took {total:.0f} s in small mode (budget {SMALL_BUDGET_S} s)"
