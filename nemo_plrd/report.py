"""Plain-text tables for the terminal (benchmarks, plans, family summaries)."""

from __future__ import annotations

from typing import Iterable, Sequence


def format_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """Right-aligned columns separated by two spaces, header first."""
    rows = [tuple(map(str, row)) for row in rows]
    header = tuple(map(str, header))
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in (header, *rows))
