"""Text tables for the command line (runs, compare, sweep), drawn by rich.

A header, a rule of dashes, one line per row; cells never wrap, so a row stays one line that
`split()` takes apart. Plain text unless stdout is a terminal, where the header is bold.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Collection, Sequence

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Only the rule under the header: no frame, no lines between columns or rows.
_HEADER_RULE = box.Box(
    "    \n"
    "    \n"
    " -  \n"
    "    \n"
    "    \n"
    "    \n"
    "    \n"
    "    \n",
    ascii=True,
)


def format_table(columns: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Collection[int] = (), styled: bool | None = None) -> str:
    """The table as text; `right` holds the indexes of right-aligned (number) columns and
    `styled` (default: whether stdout is a terminal) allows a bold header."""
    if styled is None:
        styled = sys.stdout.isatty()
    table = Table(box=_HEADER_RULE, show_edge=False, pad_edge=False, highlight=False,
                  header_style="bold" if styled else "")
    for i, column in enumerate(columns):
        table.add_column(Text(column), justify="right" if i in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # Text: a '[' in a run name is no markup
    out = io.StringIO()
    # Wide enough that no cell is ever cut: the table takes only the width it needs.
    console = Console(file=out, width=1_000_000, force_terminal=styled, highlight=False,
                      emoji=False, markup=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())
