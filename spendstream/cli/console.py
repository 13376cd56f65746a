"""The consoles every command group prints to: results on stdout, messages and errors on stderr."""

from __future__ import annotations

import csv
import io
import json

from rich.console import Console
from rich.table import Table

from stream_processors.store import QueryResult

__all__ = ["console", "err", "render", "say"]

console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


def say(message: str) -> None:
    """A progress line on stderr (stdout stays for results)."""
    err.print(f"[dim]›[/dim] {message}")


def render(result: QueryResult, fmt: str) -> str | Table:
    """Query rows as a table (text), JSON or CSV."""
    if fmt == "json":
        return json.dumps([dict(zip(result.columns, r, strict=True)) for r in result.rows], default=str)
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(result.columns)
        writer.writerows(result.rows)
        return buf.getvalue().rstrip("\n")
    table = Table(*result.columns, show_lines=False)
    for row in result.rows:
        table.add_row(*("NULL" if v is None else str(v) for v in row))
    return table
