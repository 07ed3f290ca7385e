"""The paper's tables as runnable presets: the row registry, the harness, its output and its errors."""

import json
import pathlib

import numpy as np
import pytest

from experiments import paper_tables, reproduce
from ricci_jax import train

FASHION = pathlib.Path("/usr/share/datasets/fashion-mnist")


def test_every_table_has_its_rows_and_every_runnable_row_validates(tmp_path):
  counts = {t: len(rows) for t, rows in paper_tables.ROWS.items()}
  assert counts == {"1": 12, "2": 10, "3": 5, "4": 21, "6b": 12}
  for table, rows in paper_tables.ROWS.items():
    assert len({r.key for r in rows}) == len(rows), f"duplicate row names in table {table}"
    for key in paper_tables.TABLE_INFO[table].quick_rows:
      assert paper_tables.get_row(table, key).runnable
    for row in rows:
      if row.runnable:
        config = row.config()
        train.schema.validate(config, tmp_path)
        assert config.dataset.name == row.dataset and config.model.name == row.model
        expect_layers = "none" if row.method == "float" else row.layers
        assert config.quant.layers == expect_layers
        if row.method != "float":
          assert (config.quant.weight_bits, config.quant.act_bits) == (row.weight_bits, row.act_bits)
      else:
        assert "paper number only" in row.reason
        with pytest.raises(ValueError, match="cannot run"):
          row.config()


@pytest.mark.parametrize("table,key,top1,std,top5,fp", [
    ("1", "resnet20-rfdnn", 89.83, 0.23, None, 91.50),
    ("1", "resnet32-multifcg", 89.63, 0.38, None, 92.13),
    ("2", "resnet56-dorefa", 66.71, 2.32, None, 71.22),
    ("2", "resnet110-fcgrad", 68.74, 0.36, None, 72.54),
    ("3", "rfdnn", 60.83, 0.41, 83.54, 69.76),
    ("4", "resnet18-w1a32-md", 66.78, None, 87.01, 69.76),
    ("4", "mobilenet-w8a8-rfdnn", 70.76, None, 89.54, 70.61),
    ("4", "resnet50-w8a8-int8", 75.87, None, None, 76.13),
    ("6b", "resnet44-w8", 93.6, None, None, 93.56),
])
def test_the_registry_holds_the_papers_numbers(table, key, top1, std, top5, fp):
  row = paper_tables.get_row(table, key)
  assert (row.top1, row.top1_std, row.top5, row.fp_top1) == (top1, std, top5, fp)
  assert row.approximate == (table == "6b")


def test_which_rows_run():
  runnable = {t: sorted(r.paper_method for r in rows if r.runnable) for t, rows in paper_tables.ROWS.items()}
  assert set(runnable["1"]) == {"FP", "Dorefa", "RF-DNN"}
  assert set(runnable["3"]) == {"FP", "Dorefa", "RF-DNN"}
  assert set(runnable["4"]) == {"Original", "RF-DNN", "MD"}
  t4 = {r.key: r for r in paper_tables.ROWS["4"]}
  assert not t4["alexnet-w6a32-rfdnn"].runnable and "AlexNet" in t4["alexnet-w6a32-rfdnn"].reason
  assert t4["resnet18-w1a32-md"].method == "md_tanh" and t4["resnet18-w1a32-md"].pretrained
  assert not t4["resnet18-fp"].pretrained
  config = t4["resnet18-w4a4-rfdnn"].config()
  assert config.optimizer.name == "rf_sgd" and config.quant.act_bits == 4 and config.quant.layers == "inner"


def _run(capsys, args):
  rc = reproduce.main(args)
  out, err = capsys.readouterr()
  return rc, out, err


def _table_lines(text):
  return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
          for line in text.splitlines() if line.startswith("| ") and not line.startswith("| row")}


def test_quick_mock_table1_runs_a_row_and_prints_the_table(tmp_path, capsys):
  pytest.importorskip("tensorflow_datasets")
  rc, out, err = _run(capsys, ["--table", "1", "--rows", "resnet20-dorefa", "--quick", "--mock",
                               "--workdir", str(tmp_path)])
  assert rc == 0, err
  md = (tmp_path / "table1.md").read_text()
  assert md in out and "NOT a reproduction" in md and "Smoke run (quick+mock)" in md
  rows = _table_lines(md)
  assert len(rows) == 12
  dorefa = rows["resnet20-dorefa"]
  assert dorefa[5] == "88.28 ± 0.81" and dorefa[6] == "n/a (mock data)" and dorefa[7] == "91.50"
  assert "±" in dorefa[4] and dorefa[8].startswith("ran: quick+mock")
  assert rows["resnet20-multifcg"][8].startswith("not implemented (paper number only)")
  assert rows["resnet20-multifcg"][5] == "88.94 ± 0.46"
  assert rows["resnet20-rfdnn"][4] == "—" and "not run" in rows["resnet20-rfdnn"][8]
  record = json.loads((tmp_path / "table1.json").read_text())
  assert record["mode"] == "quick+mock" and record["reproduction"] is False
  ran = [r for r in record["rows"] if r["ours"]]
  assert [r["row"] for r in ran] == ["resnet20-dorefa"]
  assert ran[0]["ours"]["raw"]["steps"] == [3] and ran[0]["config"]["dataset"]["source"] == "tfds"


def test_quick_mock_table2_on_cifar100(tmp_path, capsys):
  pytest.importorskip("tensorflow_datasets")
  # ResNet-20 instead of the row's ResNet-56 keeps the compile short; the row, data and table are Table 2's.
  # (An RF-DNN row costs 3x the compile of a Dorefa one here; tests/test_train.py runs RF-DNN on mock CIFAR.)
  rc, out, err = _run(capsys, ["--table", "2", "--rows", "resnet56-dorefa", "--quick", "--mock",
                               "--workdir", str(tmp_path), "model.name=resnet20"])
  assert rc == 0, err
  rows = _table_lines((tmp_path / "table2.md").read_text())
  assert rows["resnet56-dorefa"][5] == "66.71 ± 2.32" and "±" in rows["resnet56-dorefa"][4]
  assert rows["resnet56-rfdnn"][5] == "68.56 ± 0.32" and rows["resnet56-rfdnn"][4] == "—"
  assert rows["resnet110-fcgrad"][5] == "68.74 ± 0.36"
  record = json.loads((tmp_path / "table2.json").read_text())
  ran = next(r for r in record["rows"] if r["ours"])
  assert ran["config"]["dataset"]["name"] == "cifar100" and ran["config"]["quant"]["weight_method"] == "dorefa"


def test_quick_mock_table3_imagenet_resnet18_one_step(tmp_path, capsys):
  pytest.importorskip("tensorflow_datasets")
  # One step at batch 2 on 224x224 mock ImageNet; the RF-DNN row's program is Table 1's on a bigger net.
  rc, out, err = _run(capsys, ["--table", "3", "--rows", "dorefa", "--quick", "--mock",
                               "--workdir", str(tmp_path), "dataset.train_limit=2"])
  assert rc == 0, err
  rows = _table_lines((tmp_path / "table3.md").read_text())
  assert rows["dorefa"][5] == "58.34 ± 2.07" and rows["dorefa"][8] == "81.47 ± 1.56"
  assert "±" in rows["dorefa"][4] and "±" in rows["dorefa"][7]  # ours, top-1 and top-5
  assert rows["dorefa"][10] == "69.76/89.08"
  assert rows["rfdnn"][5] == "60.83 ± 0.41"
  record = json.loads((tmp_path / "table3.json").read_text())
  ran = next(r for r in record["rows"] if r["ours"])
  assert ran["ours"]["raw"]["steps"] == [1] and ran["ours"]["top5"] is not None


def test_list_prints_every_row_with_the_papers_numbers_and_runs_nothing(tmp_path, capsys):
  rc, out, _ = _run(capsys, ["--table", "4", "--list", "--workdir", str(tmp_path)])
  assert rc == 0 and not (tmp_path / "table4.md").exists()
  rows = _table_lines(out)
  assert len(rows) == 21
  assert rows["resnet18-w1a32-rfdnn"][5] == "67.05" and rows["resnet18-w1a32-rfdnn"][8] == "88.09"
  assert rows["alexnet-w6a32-rfdnn"][-1].startswith("not implemented (paper number only)")
  assert rows["resnet50-w8a8-int8"][8] == "—"
  rc, out, _ = _run(capsys, ["--table", "6b", "--list"])
  assert "≈89.80" in out and "approximate" in out


def test_render_marks_pretrained_rows_and_real_differences(tmp_path):
  row = paper_tables.get_row("4", "resnet18-w1a32-rfdnn")
  config = reproduce.build_config(row, quick=False, mock=False, seeds=[0, 1], overrides=[], init_from={})
  stat = {"mean": 0.6, "std": 0.01, "seeds": 2, "per_seed": [0.6, 0.6]}
  result = {"top1": stat, "top5": {**stat, "mean": 0.85}, "steps": [1, 1], "epochs_done": [100, 100]}
  text, records = reproduce.render("4", {row.key: result}, {row.key: config}, "full", [0, 1], "cmd")
  cells = _table_lines(text)[row.key]
  assert cells[4] == "60.00 ± 1.00" and cells[6] == "-7.05" and cells[9] == "-3.09"
  assert "trained from scratch (the paper starts from a pretrained model" in cells[-1]
  assert "Smoke run" not in text
  config.init_from = "runs/r18"
  text, _ = reproduce.render("4", {row.key: result}, {row.key: config}, "full", [0, 1], "cmd")
  assert "initialised from runs/r18" in _table_lines(text)[row.key][-1]


@pytest.mark.parametrize("args,match", [
    (["--table", "5"], "invalid choice: '5'"),
    (["--table", "1", "--rows", "resnet21-rfdnn"], "unknown row 'resnet21-rfdnn' for table 1; rows: resnet20-fp"),
    (["--table", "1", "--rows", "resnet20-multifcg"], "cannot run: not implemented .*Runnable rows: resnet20-fp"),
    (["--table", "1", "--init-from", "x"], "--init-from applies to Table 4"),
    (["--table", "4", "--rows", "resnet18-w1a32-rfdnn", "--init-from", "/nonexistent"], "holds no checkpoints"),
    (["--table", "4", "--rows", "resnet18-w1a32-rfdnn", "--init-from", "resnet50=/x"],
     "model.s. resnet50 that no selected pretrained row uses"),
    (["--table", "1", "--rows", "resnet20-rfdnn", "epoch=3"], "unknown config key 'epoch'"),
    (["--table", "1", "--rows", "resnet20-rfdnn", "--bogus"], "unknown option '--bogus'"),
    (["--table", "1", "--seeds", "a"], "invalid literal"),
])
def test_bad_input_fails_with_a_clear_message(tmp_path, capsys, args, match):
  try:
    rc = reproduce.main(args + ["--workdir", str(tmp_path)])
  except SystemExit as e:  # argparse
    rc = e.code
  _, err = capsys.readouterr()
  assert rc == 2
  assert __import__("re").search(match, err), err


def test_missing_data_fails_before_training_and_suggests_mock(tmp_path, capsys):
  rc, _, err = _run(capsys, ["--table", "1", "--rows", "resnet20-rfdnn", "--workdir", str(tmp_path),
                             f"dataset.data_dir={tmp_path}", "dataset.source=files"])
  assert rc == 2 and "cifar10 (train) not found" in err and "--mock" in err


@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_init_from_starts_a_binarized_run_from_a_float_run(tmp_path):
  from experiments.configs import presets  # noqa: PLC0415

  def small(method, **kw):
    c = presets.fashion_mnist(method, model="mlp", epochs=1)
    train.schema.apply_overrides(c, ["dataset.train_limit=256", "dataset.test_limit=128", "batch_size=64",
                                     "progress=False", "plots=False", "log_every_steps=2"])
    for k, v in kw.items():
      c[k] = v
    return c

  train.train(small("float"), tmp_path / "fp")
  fp = train.load_checkpoint(tmp_path / "fp")
  train.train(small("clipped_ste", init_from=str(tmp_path / "fp")), tmp_path / "bin")
  start = train.load_checkpoint(tmp_path / "bin", step=0)
  for a, b in zip(__import__("jax").tree.leaves(fp["params"]), __import__("jax").tree.leaves(start["params"])):
    np.testing.assert_array_equal(a, b)
  bad = small("clipped_ste", init_from=str(tmp_path / "fp"))
  bad.model.name = "lenet5"
  with pytest.raises(ValueError, match="does not fit model 'lenet5'"):
    train.train(bad, tmp_path / "bad")


def test_rows_of_an_earlier_invocation_stay_in_the_table(tmp_path):
  row = paper_tables.get_row("4", "resnet18-fp")
  config = reproduce.build_config(row, quick=True, mock=True, seeds=[0], overrides=[], init_from={})
  stat = {"mean": 0.5, "std": 0.0, "seeds": 1, "per_seed": [0.5], "values": [0.5]}
  result = {"top1": stat, "top5": stat, "steps": [1], "epochs_done": [1]}
  _, records = reproduce.render("4", {row.key: result}, {row.key: config}, "quick+mock", [0], "cmd")
  (tmp_path / "table4.json").write_text(json.dumps({"mode": "quick+mock", "rows": records}))
  assert reproduce.earlier_results(tmp_path, "4", "full") == {}  # another mode: not mixed in
  earlier = reproduce.earlier_results(tmp_path, "4", "quick+mock")
  assert list(earlier) == ["resnet18-fp"] and earlier["resnet18-fp"][1].model.name == "resnet18"
  text, _ = reproduce.render("4", {k: {**r, "earlier": True} for k, (r, _) in earlier.items()},
                             {k: c for k, (_, c) in earlier.items()}, "quick+mock", [0], "cmd")
  assert "ran: quick+mock (an earlier invocation)" in _table_lines(text)["resnet18-fp"][-1]
