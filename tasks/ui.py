"""Terminal output: progress over hosts, result tables, dry-run listings.

rich is imported lazily so that `fab -l` and `fab --help` start fast.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

_console: Any = None
_err_console: Any = None


def console(stderr: bool = False) -> Any:
    """The shared rich consoles (stdout for results, stderr for progress and errors)."""
    global _console, _err_console
    from rich.console import Console

    if stderr:
        _err_console = _err_console or Console(stderr=True, highlight=False)
        return _err_console
    if _console is None:
        _console = Console(highlight=False)
        if not _console.is_terminal:  # piped or captured: 80 columns would cut every table
            _console.width = max(_console.width, 160)
    return _console


@contextmanager
def progress(description: str, total: int) -> Iterator[Any]:
    """A progress bar over hosts on stderr; yields a function to advance it by one."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console(stderr=True), transient=True)
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda *_: bar.advance(task)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], styles: Sequence[str] = ()) -> None:
    """Print a table; `styles` gives a rich style per row (e.g. red for failures)."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column, overflow="fold")
    for i, row in enumerate(rows):
        t.add_row(*(str(cell) for cell in row), style=styles[i] if i < len(styles) else None)
    console().print(t)


def say(message: str, style: str | None = None, stderr: bool = False) -> None:
    console(stderr).print(message, style=style, markup=False)


def show_text(title: str, text: str) -> None:
    """Print a block of text (a script, a command) verbatim under a heading."""
    from rich.rule import Rule

    out = console()
    out.print(Rule(title, align="left"))
    out.print(text, markup=False, highlight=False)
