"""Every row of the RF-DNN paper's Tables 1-4 and Fig. 6(b), with the paper's numbers, as data.

"Learning Discretized Neural Networks under Ricci Flow" (Chen et al., arXiv
2302.03390); the numbers are those of v3, copied as printed (see
``shared/reference/rf-dnn-notes.md`` §5). Fig. 6(b) gives no table: its values
are read off the plot by eye and are marked approximate.

Each :class:`PaperRow` holds the paper's numbers (top-1, its std, top-5 where
given, the full-precision baseline of its block), where they come from, the
protocol, and how we run it: a ``method`` of ``experiments.configs.presets``
(``None`` for a baseline we do not implement: its number is kept, marked
"paper number only") and :meth:`PaperRow.config`, the training program's
configuration for the row (the paper's protocol, from ``presets.cifar_paper``
and ``presets.imagenet_paper``).

    from experiments import paper_tables
    row = paper_tables.get_row("1", "resnet20-rfdnn")
    row.top1, row.top1_std          # 89.83, 0.23
    config = row.config()           # 200 epochs, batch 128, ... (ml_collections)
"""

from __future__ import annotations

import dataclasses

import ml_collections

from experiments.configs import presets

TABLES = ("1", "2", "3", "4", "6b")

FLOAT_BITS = 32


@dataclasses.dataclass(frozen=True)
class TableInfo:
  """One table (or figure) of the paper.

  Attributes:
    title: what the paper's caption says it shows.
    protocol: how the paper's numbers were obtained (and our reading of it).
    statistic: the paper's statistic for the table.
    quick_rows: the rows ``--quick`` runs when no ``--rows`` are given.
  """

  title: str
  protocol: str
  statistic: str
  quick_rows: tuple[str, ...]


_CIFAR_PROTOCOL = (
    "from scratch; 200 epochs, batch 128, SGD Nesterov 0.9, lr 0.1 ÷10 at epochs 80/150/190, weight decay "
    "5e-4, 45k/5k train/validation split, crop and flip; every conv and dense layer binarized (MetaQuant's "
    "setting, whose baselines the table reuses), activations in float (RF-DNN §7.1)")
_IMAGENET_PROTOCOL = (
    "from scratch; 100 epochs, batch 128, SGD Nesterov 0.9, cosine lr (initial value not given: ours 0.05), "
    "weight decay 1e-4, 224x224 single crop (RF-DNN §7.1)")

TABLE_INFO: dict[str, TableInfo] = {
    "1": TableInfo(
        "Table 1: CIFAR-10, weights in {-1, +1}, trained from scratch",
        _CIFAR_PROTOCOL, "mean ± std of the test accuracy over the last 10 epochs of 5 runs",
        ("resnet20-dorefa", "resnet20-rfdnn")),
    "2": TableInfo(
        "Table 2: CIFAR-100, weights in {-1, +1}, trained from scratch",
        _CIFAR_PROTOCOL, "mean ± std of the test accuracy over the last 10 epochs of 5 runs",
        ("resnet56-dorefa", "resnet56-rfdnn")),
    "3": TableInfo(
        "Table 3: ImageNet, ResNet-18, weights in {-1, +1}, trained from scratch",
        _IMAGENET_PROTOCOL + "; every layer binarized as in Tables 1-2",
        "mean ± std of top-1 / top-5 over the last 5 epochs of 5 runs",
        ("dorefa", "rfdnn")),
    "4": TableInfo(
        "Table 4: ImageNet, from a pre-trained full-precision model",
        "the paper fine-tunes from pretrained full-precision models and gives no schedule, epochs or lr; ours: "
        "the ImageNet protocol of Table 3 (first and last layers in float), from a run given with --init-from "
        "(e.g. a float run of ours) or else from scratch; k-bit weights and activations by Eq. 38",
        "one number per row (no std given)",
        ("resnet18-w1a32-rfdnn", "resnet18-w1a32-md")),
    "6b": TableInfo(
        "Fig. 6(b): RF-DNN on CIFAR-10 at 1/2/4/8-bit weights (values read off the plot: approximate)",
        _CIFAR_PROTOCOL.replace("binarized", "quantized (Eq. 38 for k > 1)"),
        "mean of the plotted band; the bands are roughly ±0.1-0.3 wide",
        ("resnet20-w1", "resnet20-w2")),
}


@dataclasses.dataclass(frozen=True)
class PaperRow:
  """One row of a paper table, its numbers, and how we run it.

  Attributes:
    table: "1", "2", "3", "4" or "6b".
    key: the row's name within its table (``--rows``), e.g. ``"resnet20-rfdnn"``.
    network: the paper's network label, e.g. ``"ResNet20"``.
    paper_method: the paper's method label, e.g. ``"RF-DNN"``, ``"MultiFCG"``.
    dataset: our dataset name (``cifar10``, ``cifar100``, ``imagenet2012``).
    model: our model name (``ricci_jax.models.MODELS``), or the paper's where we have none.
    weight_bits, act_bits: W and A (32 = float).
    top1: the paper's test (top-1) accuracy, %.
    top1_std: its standard deviation, if given.
    top5, top5_std: the paper's top-5 accuracy and std, if given.
    fp_top1, fp_top5: the paper's full-precision baseline of the row's network.
    method: our method (a key of ``presets.METHODS``), ``None`` if we do not implement it.
    reason: why the row cannot run (``method`` None or no model), else "".
    source: where the paper's number comes from.
    pretrained: the paper starts this row from a pretrained float model (Table 4).
    approximate: the number is read off a plot (Fig. 6(b)).
    layers: which layers are quantized (``quant.layers``).
    note: anything else worth printing beside the row.
  """

  table: str
  key: str
  network: str
  paper_method: str
  dataset: str
  model: str
  weight_bits: int
  act_bits: int
  top1: float
  top1_std: float | None = None
  top5: float | None = None
  top5_std: float | None = None
  fp_top1: float | None = None
  fp_top5: float | None = None
  method: str | None = None
  reason: str = ""
  source: str = ""
  pretrained: bool = False
  approximate: bool = False
  layers: str = "all"
  note: str = ""

  @property
  def runnable(self) -> bool:
    return self.method is not None and not self.reason

  @property
  def bits(self) -> str:
    return f"{self.weight_bits}/{self.act_bits}"

  def config(self) -> ml_collections.ConfigDict:
    """The training program's configuration for this row (the paper's protocol).

    Raises:
      ValueError: for a row we cannot run (a baseline we do not implement).
    """
    if not self.runnable:
      raise ValueError(f"table {self.table} row {self.key!r} cannot run: {self.reason}")
    if self.dataset == "imagenet2012":
      c = presets.imagenet_paper(self.model, self.method, self.weight_bits, self.act_bits, layers=self.layers)
    else:
      c = presets.cifar_paper(self.dataset, self.model, self.method, self.weight_bits, self.act_bits,
                              layers=self.layers)
    c.name = f"table{self.table}_{self.key}"
    return c


_METAQUANT = "MetaQuant (Chen, Wang, Pan, NeurIPS 2019), reused by RF-DNN: MetaQuant's own protocol"
_NOT_IMPL = "not implemented (paper number only)"


def _baseline(name: str) -> str:
  return f"{_NOT_IMPL}: {name} is a baseline ricci-jax does not implement"


def _cifar_rows(table: str, dataset: str, blocks) -> list[PaperRow]:
  rows = []
  for network, model, fp, entries in blocks:
    rows.append(PaperRow(table, f"{model}-fp", network, "FP", dataset, model, FLOAT_BITS, FLOAT_BITS, fp,
                         fp_top1=fp, method="float", source="the table's FP column, reported by MetaQuant",
                         note="the table's full-precision column, run as a row"))
    for paper_method, key, top1, std, method, source in entries:
      reason = "" if method else _baseline(paper_method)
      rows.append(PaperRow(table, f"{model}-{key}", network, paper_method, dataset, model, 1, FLOAT_BITS, top1,
                           std, fp_top1=fp, method=method, reason=reason, source=source))
  return rows


_DOREFA_OWN = "RF-DNN's authors (matches no MetaQuant entry: presumably their own runs)"
_RFDNN = "RF-DNN (the paper's method)"

TABLE1 = _cifar_rows("1", "cifar10", [
    ("ResNet20", "resnet20", 91.50, [
        ("Dorefa", "dorefa", 88.28, 0.81, "dorefa", _DOREFA_OWN),
        ("MultiFCG", "multifcg", 88.94, 0.46, None, _METAQUANT + " (88.942 ± 0.466, SGD)"),
        ("RF-DNN", "rfdnn", 89.83, 0.23, "rfdnn", _RFDNN)]),
    ("ResNet32", "resnet32", 92.13, [
        ("Dorefa", "dorefa", 90.23, 0.63, "dorefa", _DOREFA_OWN),
        ("MultiFCG", "multifcg", 89.63, 0.38, None, _METAQUANT + " (89.637 ± 0.380, SGD)"),
        ("RF-DNN", "rfdnn", 90.75, 0.19, "rfdnn", _RFDNN)]),
    ("ResNet44", "resnet44", 93.56, [
        ("Dorefa", "dorefa", 90.71, 0.58, "dorefa", _DOREFA_OWN),
        ("MultiFCG", "multifcg", 90.54, 0.21, None, _METAQUANT + " (90.546 ± 0.218, SGD)"),
        ("RF-DNN", "rfdnn", 91.63, 0.11, "rfdnn", _RFDNN)]),
])

TABLE2 = _cifar_rows("2", "cifar100", [
    ("ResNet56", "resnet56", 71.22, [
        ("Dorefa", "dorefa", 66.71, 2.32, "dorefa", _DOREFA_OWN),
        ("MultiFCG", "multifcg", 66.58, 0.37, None, _METAQUANT + " (66.588, Adam)"),
        ("FCGrad", "fcgrad", 66.56, 0.35, None, _METAQUANT + " (66.564, Adam)"),
        ("RF-DNN", "rfdnn", 68.56, 0.32, "rfdnn", _RFDNN)]),
    ("ResNet110", "resnet110", 72.54, [
        ("Dorefa", "dorefa", 68.15, 0.50, "dorefa", _DOREFA_OWN),
        ("MultiFCG", "multifcg", 68.27, 0.14, None, _METAQUANT + " (68.269, SGD)"),
        ("FCGrad", "fcgrad", 68.74, 0.36, None, _METAQUANT + " (68.741, Adam)"),
        ("RF-DNN", "rfdnn", 69.20, 0.28, "rfdnn", _RFDNN)]),
])

_IMAGENET_FP = dict(fp_top1=69.76, fp_top5=89.08)
TABLE3 = [
    PaperRow("3", "fp", "ResNet18", "FP", "imagenet2012", "resnet18", FLOAT_BITS, FLOAT_BITS, 69.76, None,
             89.08, None, method="float", source="the table's FP column (torchvision's ResNet-18, via MetaQuant)",
             note="the table's full-precision column, run as a row", **_IMAGENET_FP),
    PaperRow("3", "dorefa", "ResNet18", "Dorefa", "imagenet2012", "resnet18", 1, FLOAT_BITS, 58.34, 2.07, 81.47,
             1.56, method="dorefa", source=_METAQUANT + " (dorefa-STE-Adam, 30 epochs)", **_IMAGENET_FP),
    PaperRow("3", "multifcg", "ResNet18", "MultiFCG", "imagenet2012", "resnet18", 1, FLOAT_BITS, 59.47, 0.02,
             82.41, 0.01, reason=_baseline("MultiFCG"), source=_METAQUANT, **_IMAGENET_FP),
    PaperRow("3", "fcgrad", "ResNet18", "FCGrad", "imagenet2012", "resnet18", 1, FLOAT_BITS, 59.83, 0.36, 82.67,
             0.23, reason=_baseline("FCGrad"), source=_METAQUANT, **_IMAGENET_FP),
    PaperRow("3", "rfdnn", "ResNet18", "RF-DNN", "imagenet2012", "resnet18", 1, FLOAT_BITS, 60.83, 0.41, 83.54,
             0.18, method="rfdnn", source=_RFDNN, **_IMAGENET_FP),
]


def _t4(key, network, paper_method, model, w, a, top1, top5, fp1, fp5, method=None, reason="", source="",
        note=""):
  is_fp = w == FLOAT_BITS and a == FLOAT_BITS
  if not method and not reason:
    reason = _baseline(paper_method)
  return PaperRow("4", key, network, paper_method, "imagenet2012", model, w, a, top1, None, top5, None,
                  fp1, fp5, method=method, reason=reason, source=source, pretrained=not is_fp, layers="inner",
                  note=note)


_NO_ALEXNET = f"{_NOT_IMPL}: ricci_jax.models has no AlexNet"
_ELHOUSHI = "reported by Elhoushi et al. 2019 (DeepShift), as the paper cites"
_FP_NOTE = "paper: a pretrained torchvision model; ours: trained from scratch under the ImageNet protocol"
_A, _R18, _R50, _MB = (56.52, 79.07), (69.76, 89.08), (76.13, 92.86), (70.61, 89.47)
TABLE4 = [
    _t4("alexnet-fp", "AlexNet", "Original", "alexnet", 32, 32, *_A, *_A, reason=_NO_ALEXNET, source=_ELHOUSHI),
    _t4("alexnet-w6a32-rfdnn", "AlexNet", "RF-DNN", "alexnet", 6, 32, 56.39, 78.78, *_A, reason=_NO_ALEXNET,
        source=_RFDNN),
    _t4("alexnet-w6a32-deepshift", "AlexNet", "DeepShift", "alexnet", 6, 32, 54.97, 78.26, *_A,
        source="Elhoushi et al. 2019"),
    _t4("resnet18-fp", "ResNet18", "Original", "resnet18", 32, 32, *_R18, *_R18, method="float",
        source=_ELHOUSHI, note=_FP_NOTE),
    _t4("resnet18-w1a32-rfdnn", "ResNet18", "RF-DNN", "resnet18", 1, 32, 67.05, 88.09, *_R18, method="rfdnn",
        source=_RFDNN),
    _t4("resnet18-w1a32-md", "ResNet18", "MD", "resnet18", 1, 32, 66.78, 87.01, *_R18, method="md_tanh",
        source="Ajanthan et al. 2021 (mirror descent), as reported", note="ours: MD-tanh (β ×1.01 every 100 steps)"),
    _t4("resnet18-w1a32-elq", "ResNet18", "ELQ", "resnet18", 1, 32, 66.21, 86.43, *_R18, source="ELQ, as reported"),
    _t4("resnet18-w1a32-admm", "ResNet18", "ADMM", "resnet18", 1, 32, 64.80, 86.20, *_R18,
        source="ADMM (Leng et al.), as reported"),
    _t4("resnet18-w1a32-qn", "ResNet18", "QN", "resnet18", 1, 32, 66.50, 87.30, *_R18,
        source="QN (Yang et al.), as reported"),
    _t4("resnet18-w1a32-metaquant", "ResNet18", "MetaQuant", "resnet18", 1, 32, 63.44, 84.77, *_R18,
        source="MetaQuant, as reported"),
    _t4("resnet18-w4a4-rfdnn", "ResNet18", "RF-DNN", "resnet18", 4, 4, 66.75, 87.02, *_R18, method="rfdnn",
        source=_RFDNN),
    _t4("resnet18-w4a4-rq-st", "ResNet18", "RQ ST", "resnet18", 4, 4, 62.46, 84.78, *_R18,
        source="relaxed quantization (Louizos et al.), as reported"),
    _t4("resnet50-fp", "ResNet50", "Original", "resnet50", 32, 32, *_R50, *_R50, method="float",
        source=_ELHOUSHI, note=_FP_NOTE),
    _t4("resnet50-w8a8-rfdnn", "ResNet50", "RF-DNN", "resnet50", 8, 8, 76.07, 92.87, *_R50, method="rfdnn",
        source=_RFDNN),
    _t4("resnet50-w8a8-int8", "ResNet50", "INT8", "resnet50", 8, 8, 75.87, None, *_R50,
        source="INT8 post-training quantization, as reported"),
    _t4("mobilenet-fp", "MobileNet", "Original", "mobilenet_v1", 32, 32, *_MB, *_MB, method="float",
        source=_ELHOUSHI, note=_FP_NOTE),
    _t4("mobilenet-w5a5-rfdnn", "MobileNet", "RF-DNN", "mobilenet_v1", 5, 5, 61.32, 84.08, *_MB,
        method="rfdnn", source=_RFDNN),
    _t4("mobilenet-w5a5-sr-dr", "MobileNet", "SR+DR", "mobilenet_v1", 5, 5, 59.39, 82.35, *_MB,
        source="SR+DR (Gysel et al.), as reported"),
    _t4("mobilenet-w5a5-rq-st", "MobileNet", "RQ ST", "mobilenet_v1", 5, 5, 56.85, 80.35, *_MB,
        source="relaxed quantization, as reported"),
    _t4("mobilenet-w8a8-rfdnn", "MobileNet", "RF-DNN", "mobilenet_v1", 8, 8, 70.76, 89.54, *_MB,
        method="rfdnn", source=_RFDNN),
    _t4("mobilenet-w8a8-rq", "MobileNet", "RQ", "mobilenet_v1", 8, 8, 70.43, 89.42, *_MB,
        source="relaxed quantization, as reported"),
]

_FIG6B = [  # network, model, FP (Table 1), RF-DNN at 1/2/4/8-bit weights as read off the plot
    ("ResNet20", "resnet20", 91.50, (89.8, 90.4, 91.4, 91.85)),
    ("ResNet32", "resnet32", 92.13, (90.75, 91.1, 91.85, 92.1)),
    ("ResNet44", "resnet44", 93.56, (91.6, 92.3, 93.1, 93.6)),
]


def _fig6b_rows() -> list[PaperRow]:
  return [PaperRow("6b", f"{model}-w{bits}", network, "RF-DNN", "cifar10", model, bits, FLOAT_BITS, value,
                   fp_top1=fp, method="rfdnn", approximate=True, source="read off Fig. 6(b) by eye (approximate)",
                   note="≈ read off the plot")
          for network, model, fp, values in _FIG6B for bits, value in zip((1, 2, 4, 8), values)]


FIG6B = _fig6b_rows()

ROWS: dict[str, list[PaperRow]] = {"1": TABLE1, "2": TABLE2, "3": TABLE3, "4": TABLE4, "6b": FIG6B}
"""Every row of every table, in the paper's order."""


def check_table(table: str) -> str:
  """Returns ``table`` as a key of :data:`ROWS`, or raises a ``ValueError`` naming the valid ones."""
  table = str(table).lower().removeprefix("table").removeprefix("fig").strip(". ")
  if table not in ROWS:
    raise ValueError(f"unknown table {table!r}; valid: {', '.join(TABLES)} (6b is Fig. 6(b))")
  return table


def get_row(table: str, key: str) -> PaperRow:
  """The row ``key`` of ``table``, or a ``ValueError`` listing the table's rows."""
  table = check_table(table)
  for row in ROWS[table]:
    if row.key == key:
      return row
  raise ValueError(f"unknown row {key!r} for table {table}; rows: {', '.join(r.key for r in ROWS[table])}")


def runnable_rows(table: str) -> list[PaperRow]:
  return [r for r in ROWS[check_table(table)] if r.runnable]
