"""Plain-text tables for people: columns padded to their widest cell, one function for every table."""
from __future__ import annotations

from typing import Sequence


def render_table(header: Sequence[str], rows: Sequence[Sequence[object]], *, align_left: int = 1,
                 left: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell under a dashed rule; trailing blanks stripped.

    The first ``align_left`` columns, and the columns listed in ``left``, are left-aligned; the rest
    (numbers, sizes) right-aligned. Cells are str()-ed.
    """
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lefts = set(range(align_left)) | set(left)

    def line(cells: Sequence[object]) -> str:
        return "  ".join(
            str(c).ljust(w) if i in lefts else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths).rstrip()
    return "\n".join([line(header), rule, *(line(r) for r in rows)])
