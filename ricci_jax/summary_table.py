"""The text of a model summary (:func:`ricci_jax.summary.summary`): the per-layer table and the totals.

Split from :mod:`ricci_jax.summary`, which computes the numbers; this module
only lays them out. The layer table of an unpruned model is unchanged by the
pruning section, which is printed only when some weight is pruned (see
:mod:`ricci_jax.summary` for how pruned weights, their MACs and their packed
memory are counted).
"""

from __future__ import annotations

from typing import Any

from ricci_jax.quant_config import TensorQuant




def _bits(spec: TensorQuant | None) -> str:
  return "float" if spec is None else str(spec.bits)


def _quantizer(spec: TensorQuant | None) -> str:
  if spec is None:
    return "-"
  return spec.method if spec.method == "ridge" else f"{spec.method}/{spec.estimator}"


def _human(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n:.0f} B"


def _mega(n: int) -> str:
  return f"{n / 1e6:.2f} M"


def _share(part: int, whole: int) -> str:
  return f"{100 * part / whole:.2f}%" if whole else "-"


_COLUMNS = (
    # header, width, align, value
    ("layer", None, "<", lambda r: r.name),
    ("type", 13, "<", lambda r: r.type),
    ("W", 5, ">", lambda r: _bits(r.weight) if r.macs or r.weight else "-"),
    ("A", 5, ">", lambda r: _bits(r.act) if r.macs or r.act else "-"),
    ("W quantizer", 22, "<", lambda r: _quantizer(r.weight)),
    ("A quantizer", 22, "<", lambda r: _quantizer(r.act)),
    ("scale", 7, "<", lambda r: r.weight.scale if r.weight is not None else "-"),
    ("params", 9, ">", lambda r: f"{r.params:,}"),
    ("float32 B", 11, ">", lambda r: f"{r.float32_bytes:,}"),
    ("packed B", 10, ">", lambda r: f"{r.packed_bytes:,}"),
    ("MACs", 12, ">", lambda r: f"{r.macs:,}" if r.mac_precision else "-"),
    ("MACs as", 7, "<", lambda r: r.mac_precision or "-"),
)


def format_summary(s: Any) -> str:
  """The table and the totals of a :class:`ricci_jax.summary.Summary`, as printed (``str(summary)``)."""
  name_width = max([len("layer"), len("total")] + [len(r.name) for r in s.rows])
  widths = [name_width if w is None else w for _, w, _, _ in _COLUMNS]

  def line(cells):
    return "  ".join(f"{c:{a}{w}}" for c, (_, _, a, _), w in zip(cells, _COLUMNS, widths)).rstrip()

  header = line([h for h, _, _, _ in _COLUMNS])
  rule = "-" * len(header)
  macs = s.macs
  total_macs = sum(macs.values())
  t = s.totals()
  total = line(["total", "", "", "", "", "", "", f"{s.params:,}", f"{s.float32_bytes:,}", f"{s.packed_bytes:,}",
                f"{total_macs:,}", ""])
  shape = "x".join(str(d) for d in s.input_shape)
  lines = [
      f"Model summary: {s.model}, input {shape}, compute dtype {s.dtype}",
      rule, header, rule, *(line([f(r) for _, _, _, f in _COLUMNS]) for r in s.rows), rule, total, "",
      f"parameters:               {s.params:,}: {s.quantized_params:,} in quantized kernels "
      f"({_share(s.quantized_params, s.params)}), {s.params - s.quantized_params:,} float",
      f"batch-norm statistics:    {s.stats_count:,} values, {s.stats_bytes:,} B (float32 in both)",
      f"memory, parameters:       float32 {s.float32_bytes:,} B ({_human(s.float32_bytes)}), packed "
      f"{s.packed_bytes:,} B ({_human(s.packed_bytes)}): {t['compression']:.2f}x smaller",
      f"memory, with statistics:  float32 {t['float32_bytes_with_stats']:,} B "
      f"({_human(t['float32_bytes_with_stats'])}), packed {t['packed_bytes_with_stats']:,} B "
      f"({_human(t['packed_bytes_with_stats'])}): {t['compression_with_stats']:.2f}x smaller",
      f"MACs per example:         {total_macs:,} ({_mega(total_macs)}): "
      + ", ".join(f"{k} {macs[k]:,} ({_share(macs[k], total_macs)})" for k in macs),
      "",
      "MACs are binary when kernel and input are both 1-bit, k-bit when both are quantized, float otherwise",
      "(a quantized kernel on a float input included). Packed: the bytes ricci_jax.export.pack stores (kernels",
      "at their bit width with their scales, the rest as it is), without the file's header.",
  ]
  if s.pruned:  # only then: an unpruned model's table is as it always was
    lines += ["", *_pruning_lines(s)]
  return "\n".join(lines)


def _pruning_lines(s: Any) -> list[str]:
  """The pruning section: per pruned layer, then the totals."""
  p = s.pruning()
  width = max(len("layer"), *(len(r.name) for r in s.rows))
  head = (f"{'layer':<{width}}  {'kernel':>9}  {'pruned':>9}  {'sparsity':>8}  {'MACs saved':>12}  "
          f"{'packed B':>9}  {'unpruned B':>10}")
  rows = [f"{r.name:<{width}}  {r.kernel_params:>9,}  {r.pruned:>9,}  {100 * r.sparsity:>7.2f}%  "
          f"{r.macs_saved:>12,}  {r.packed_bytes:>9,}  {r.dense_packed_bytes:>10,}" for r in s.rows if r.pruned]
  total_macs = sum(s.macs.values())
  saved = p["pruning_bytes_saved"]
  return [
      "Pruned weights (exact zeros: they quantize to 0 and cost no MAC)", "-" * len(head), head, "-" * len(head),
      *rows, "-" * len(head),
      f"pruned weights:           {s.pruned:,} of {s.prunable_params:,} in conv / dense kernels "
      f"({_share(s.pruned, s.prunable_params)})",
      f"MACs after pruning:       {p['macs_after_pruning']:,} ({_mega(p['macs_after_pruning'])}) of {total_macs:,}: "
      f"{s.macs_saved:,} saved ({_share(s.macs_saved, total_macs)})",
      f"memory, parameters:       packed {s.packed_bytes:,} B with the masks, {s.dense_packed_bytes:,} B unpruned: "
      + (f"{saved:,} B saved" if saved >= 0 else f"{-saved:,} B more"),
      "A pruned quantized kernel is packed as a mask (1 bit per weight) and the codes of its kept weights; a",
      "float kernel is stored as it is, zeros included (ricci_jax.export.tensors).",
  ]
