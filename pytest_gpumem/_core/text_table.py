"""Plain-text tables for people: columns padded to their widest cell (one function for every table), lines wrapped."""
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


def wrap_lines(lines: Sequence[str], width: int | None) -> list[str]:
    """Each line wrapped to ``width`` columns (continuations indented two spaces); None leaves them whole."""
    if width is None:
        return list(lines)
    import textwrap  # only the fitted --gpumem-report wraps

    return [w for line in lines for w in textwrap.wrap(line, width, subsequent_indent="  ", break_on_hyphens=False)]


def shorten_left(text: str, width: int) -> str:
    """``text`` cut to ``width`` characters from the left ('…' + the end), keeping a test's name visible."""
    return text if len(text) <= width else "\u2026" + text[len(text) - width + 1:]
