"""Metrics as an aligned text table, the way ``preftune eval``, ``preftune score`` and the demo print them."""

from __future__ import annotations

from collections.abc import Mapping


def _cell(value) -> str:
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.4g}"
    return "—" if value is None else str(value)


def format_table(rows: Mapping[str, Mapping]) -> str:
    """An aligned text table: one column per entry of ``rows`` (e.g. ``{"SFT": m1, "DPO": m2}``), one row
    per metric (union of keys, first-seen order; non-scalar values such as ``per_sample`` are skipped)."""
    columns = list(rows)
    metrics: list[str] = []
    for values in rows.values():
        scalars = (k for k, v in values.items() if v is None or isinstance(v, (int, float, str)))
        metrics += [k for k in scalars if k not in metrics]
    table = [["metric", *columns]] + [[m, *(_cell(rows[c].get(m)) for c in columns)] for m in metrics]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
