"""Text the commands print and the names they make: plain-text tables and file-name slugs."""
from __future__ import annotations

import re
from collections.abc import Sequence


def slug(text: str, fill: str = "-") -> str:
    """``text`` safe as a file or directory name: every run of characters other than letters, digits,
    ``_``, ``.`` and ``-`` becomes ``fill``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", fill, text)


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]], right_align: bool = False) -> str:
    """A plain-text table: the header, a rule, the rows; columns as wide as their widest cell, body cells
    left-aligned (or right-aligned: numbers)."""
    cells = [[str(c) for c in header], *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str], right: bool = False) -> str:
        return "  ".join(c.rjust(w) if right else c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([line(cells[0]), line(["-" * w for w in widths]), *(line(r, right_align) for r in cells[1:])])
