"""Terminal output: progress over hosts, result tables, dry-run listings.

rich is imported lazily so that `fab -l` and `fab --help` start fast.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
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
    with suppress(OSError, ValueError):
        bar.start()
    try:
        task = bar.add_task(description, total=total)
        yield lambda *_: bar.advance(task)
    finally:
        # A terminal gone (SIGHUP) must not turn the signal being handled into an OSError here.
        with suppress(OSError, ValueError):
            bar.stop()


def literal(value: object, style: str = "") -> Any:
    """Text shown exactly as it is: never read as markup, control characters made visible.

    Everything a host or a rank sends (log lines, error messages, paths) goes through here: PyTorch
    prefixes lines with `[rank0]:` and gloo writes `[/path/pair.cc:553]`, which rich would read
    as markup (and drop, or fail on), and a terminal escape in a log must not repaint the screen.
    """
    from rich.text import Text

    return Text(visible(str(value)), style=style)


_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F] if c not in (0x09, 0x0A)}


def visible(text: str) -> str:
    """Control characters (escape, backspace, carriage return, NUL...) as `\\xNN`; tabs and newlines kept."""
    return text.translate(_CONTROL)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], styles: Sequence[str] = (),
          markup: bool = False) -> None:
    """Print a table; `styles` gives a rich style per row (e.g. red for failures).

    Cells are literal text unless `markup` says the caller built them as rich markup (escaped).
    """
    from rich.table import Table

    t = Table(title=literal(title), title_justify="left")
    for column in columns:
        t.add_column(column, overflow="fold")
    for i, row in enumerate(rows):
        cells = [str(cell) if markup else literal(cell) for cell in row]
        t.add_row(*cells, style=styles[i] if i < len(styles) else None)
    emit(t)


def emit(renderable: Any, stderr: bool = False, **kwargs: Any) -> None:
    """Print, surviving a terminal that went away (SIGHUP, a closed pipe): output is best effort."""
    with suppress(OSError, ValueError):
        console(stderr).print(renderable, **kwargs)


def say(message: str, style: str | None = None, stderr: bool = False) -> None:
    """Print one message literally (it may hold host names, paths or a rank's text)."""
    emit(literal(message), stderr, style=style)


def show_text(title: str, text: str) -> None:
    """Print a block of text (a script, a command) verbatim under a heading."""
    from rich.rule import Rule

    out = console()
    out.print(Rule(literal(title), align="left"))
    out.print(literal(text), highlight=False)
