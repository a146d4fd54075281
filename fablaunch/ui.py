"""Terminal output: progress over hosts, result tables, dry-run listings.

Every table goes through `TableSpec` and `emit`, which pick how it is shown: on a terminal, a boxed
table whose key columns (host, rank, state, exit...) are never squeezed while the long text columns
wrap in what is left, or, where even that does not fit, a narrow layout with the other columns under
each row; when stdout is not a terminal (piped, captured), plain lines, one per row, nothing cut,
no box characters, no colour. Live displays and progress bars only ever go to a terminal.

rich is imported lazily so that `fab -l` and `fab --help` start fast.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import Any

_console: Any = None
_err_console: Any = None

GAP = "  "  # between the fields of plain lines and of the narrow layout
INDENT = 4  # the narrow layout's lines under a row
FREE_MIN = 30  # a long text column narrower than this reads badly: the narrow layout is used instead


def console(stderr: bool = False) -> Any:
    """The shared rich consoles (stdout for results, stderr for progress and errors)."""
    global _console, _err_console
    from rich.console import Console

    if stderr:
        _err_console = _err_console or Console(stderr=True, highlight=False)
        return _err_console
    if _console is None:
        _console = Console(highlight=False)
        if not _console.is_terminal:  # piped or captured: tables are plain lines, rules and text not cut at 80
            _console.width = max(_console.width, 160)
    return _console


def is_terminal(stderr: bool = False) -> bool:
    """Whether that stream is a terminal: live displays, progress bars and boxed tables only go to one."""
    return bool(console(stderr).is_terminal)


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 session`, `2 sessions`, `0 hosts`, `3 processes`: a count with its noun in the right number."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {many or (word + 'es' if word.endswith(('s', 'x', 'ch', 'sh')) else word + 's')}"


@contextmanager
def progress(description: str, total: int) -> Iterator[Any]:
    """A progress bar over hosts on stderr; yields a function to advance it by one.

    Where stderr is not a terminal (a log file, CI) nothing is shown.
    """
    if not is_terminal(stderr=True):
        yield lambda *_: None
        return
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


class _NoLive:
    """Stands in for rich's Live where the stream is not a terminal: shows nothing."""

    def update(self, renderable: Any, refresh: bool = False) -> None:
        pass

    def stop(self) -> None:
        pass


@contextmanager
def live(stderr: bool = False, transient: bool = True) -> Iterator[Any]:
    """A rich Live display on that stream (`update(renderable, refresh=True)`, `stop()`), if it is a terminal."""
    if not is_terminal(stderr):
        yield _NoLive()
        return
    from rich.live import Live

    with Live(console=console(stderr), auto_refresh=False, transient=transient) as display:
        yield display


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


def one_line(text: str) -> str:
    """Text for a plain line: control characters visible, and tabs and newlines as `\\t` and `\\n`."""
    return visible(text).replace("\t", "\\t").replace("\n", "\\n")


def _width(text: Any) -> int:
    from rich.cells import cell_len

    return max((cell_len(line) for line in text.plain.split("\n")), default=0)


class TableSpec:
    """A table, shown by `emit` as a boxed table, a narrow layout or plain lines (see the module).

    Cells are literal text (`ui.literal`), or rich markup where `markup` says the caller built them
    so (escaped). `key_columns` are never squeezed, and in the narrow layout they make each row's
    first line (default: the first column). `free_columns` hold long text (a log line, a result, a
    reason): they wrap or fold in what the others leave (default: the last column, if not a key).
    Other columns keep their width and join a row's first line in the narrow layout as room allows;
    what does not fit goes on indented lines under the row, as `column: value`.
    `styles` gives a rich style per row; `sections` the rows a rule goes above.
    """

    def __init__(self, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
                 styles: Sequence[str | None] = (), key_columns: Collection[str] | None = None,
                 free_columns: Collection[str] | None = None, markup: bool = False, sections: Collection[int] = (),
                 title_style: str | None = None) -> None:
        from rich.text import Text

        self.title = title
        self.columns = list(columns)
        self.key = [i for i, c in enumerate(self.columns)
                    if c in (key_columns if key_columns is not None else self.columns[:1])]
        free = free_columns if free_columns is not None else self.columns[-1:]
        self.free = [i for i, c in enumerate(self.columns) if c in free and i not in self.key]
        self.rows = [[Text.from_markup(visible(str(cell))) if markup else literal(cell) for cell in row]
                     for row in rows]
        self.styles = [styles[i] if i < len(styles) else None for i in range(len(self.rows))]
        self.sections = set(sections)
        self.title_style = title_style

    def natural(self) -> list[int]:
        """Each column's width with nothing wrapped: its widest cell or its name."""
        from rich.cells import cell_len

        return [max([cell_len(name), *(_width(row[i]) for row in self.rows)]) for i, name in enumerate(self.columns)]

    def fit(self, width: int) -> list[int] | None:
        """Column widths for a boxed table `width` wide, or None if only the narrow layout fits.

        Every column but the long text ones gets its natural width; those share the rest, the
        narrowest first, each at least FREE_MIN (or its natural width, if less).
        """
        from rich.cells import cell_len

        natural = self.natural()
        widths = list(natural)
        room = width - (3 * len(self.columns) + 1) - sum(w for i, w in enumerate(natural) if i not in self.free)
        least = [min(natural[i], max(FREE_MIN, cell_len(self.columns[i]))) for i in self.free]
        if room < sum(least):
            return None
        pending = sorted(self.free, key=lambda i: natural[i])
        for n, i in enumerate(pending):
            widths[i] = min(natural[i], room // (len(pending) - n))
            room -= widths[i]
        return widths

    def boxed(self, widths: list[int]) -> Any:
        """The rich Table with these column widths."""
        from rich.table import Table

        table = Table(title=literal(self.title), title_justify="left", title_style=self.title_style)
        for i, name in enumerate(self.columns):
            free = i in self.free
            table.add_column(name, width=widths[i], min_width=None if free else widths[i], no_wrap=not free,
                             overflow="fold")
        for n, (row, style) in enumerate(zip(self.rows, self.styles, strict=True)):
            if n in self.sections and n:
                table.add_section()
            table.add_row(*row, style=style)
        return table

    def narrow(self, width: int) -> Iterator[Any]:
        """Each row as a line of its key columns (and the others that fit), the rest indented under it."""
        from rich.padding import Padding
        from rich.text import Text

        natural = self.natural()
        lead = list(self.key)
        used = sum(natural[i] for i in lead) + len(GAP) * (len(lead) - 1)
        for i in range(len(self.columns)):
            if i not in lead and i not in self.free and used + len(GAP) + natural[i] <= width:
                lead.append(i)
                used += len(GAP) + natural[i]
        lead.sort()
        under = [i for i in range(len(self.columns)) if i not in lead]

        def line(cells: list[Any], style: str | None) -> Any:
            text = Text(style=style or "", overflow="fold")
            for n, (i, cell) in enumerate(zip(lead, cells, strict=True)):
                text.append_text(cell)
                if n < len(lead) - 1:
                    text.append(" " * (natural[i] - _width(cell)) + GAP)
            text.rstrip()
            return text

        yield Text(visible(self.title), style=self.title_style or "table.title", overflow="fold")
        yield line([Text(self.columns[i]) for i in lead], "table.header")
        room = max(1, width - INDENT)
        for row, style in zip(self.rows, self.styles, strict=True):
            yield line([row[i] for i in lead], style)
            pairs = [Text.assemble((f"{self.columns[i]}: ", "dim"), row[i]) for i in under if row[i].plain]
            current: list[Any] = []
            for pair in [*pairs, None]:  # pairs packed into lines; a long one on lines of its own, folded
                fits = pair is not None and sum(_width(p) + len(GAP) for p in current) + _width(pair) <= room
                if current and not fits:
                    joined = Text(GAP, style=style or "", overflow="fold").join(current)
                    yield Padding(joined, (0, 0, 0, INDENT), expand=False)
                    current = []
                if pair is not None:
                    current.append(pair)

    def plain_lines(self) -> list[str]:
        """The title, the column names and one line per row: fields aligned, two spaces apart, nothing cut."""
        from rich.cells import cell_len

        cells = [self.columns, *([one_line(c.plain) or "-" for c in row] for row in self.rows)]
        widths = [max(cell_len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [one_line(self.title)]
        for row in cells:
            lines.append(GAP.join(c + " " * (w - cell_len(c)) for c, w in zip(row, widths, strict=True)).rstrip())
        return lines

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        widths = self.fit(options.max_width)
        if widths is not None:
            yield self.boxed(widths)
        else:
            yield from self.narrow(options.max_width)


class Blocks:
    """Tables and lines of text shown one under the other (a view made of parts, as `fab top`'s)."""

    def __init__(self, *parts: Any) -> None:
        self.parts = parts

    def plain_lines(self) -> list[str]:
        return [line for part in self.parts for line in plain_lines(part)]

    def __rich_console__(self, console: Any, options: Any) -> Iterator[Any]:
        yield from self.parts


def plain_lines(renderable: Any) -> list[str]:
    """A table, blocks or text as plain lines (what a pipe gets)."""
    if hasattr(renderable, "plain_lines"):
        return list(renderable.plain_lines())
    text = renderable.plain if hasattr(renderable, "plain") else str(renderable)
    return [visible(line) for line in text.split("\n")]


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], styles: Sequence[str | None] = (),
          markup: bool = False, key_columns: Collection[str] | None = None,
          free_columns: Collection[str] | None = None) -> None:
    """Print a table (see TableSpec); `styles` gives a rich style per row (e.g. red for failures).

    Cells are literal text unless `markup` says the caller built them as rich markup (escaped).
    """
    emit_table(TableSpec(title, columns, rows, styles, key_columns, free_columns, markup))


def emit_table(spec: Any, stderr: bool = False) -> None:
    """Print a TableSpec (or Blocks): boxed or narrow on a terminal, plain lines otherwise."""
    emit(spec, stderr)


def emit(renderable: Any, stderr: bool = False, **kwargs: Any) -> None:
    """Print, surviving a terminal that went away (SIGHUP, a closed pipe): output is best effort.

    This is where the form of output is chosen: where the stream is not a terminal, tables come as
    plain lines and text is never wrapped at the console's width.
    """
    from rich.text import Text

    out = console(stderr)
    with suppress(OSError, ValueError):
        if out.is_terminal:
            out.print(renderable, **kwargs)
        elif isinstance(renderable, (TableSpec, Blocks)):
            for line in renderable.plain_lines():
                out.print(Text(line), soft_wrap=True)
        else:
            out.print(renderable, **{"soft_wrap": True, **kwargs})


def say(message: str, style: str | None = None, stderr: bool = False) -> None:
    """Print one message literally (it may hold host names, paths or a rank's text)."""
    emit(literal(message), stderr, style=style)


def show_text(title: str, text: str) -> None:
    """Print a block of text (a script, a command) verbatim under a heading."""
    from rich.rule import Rule

    out = console()
    with suppress(OSError, ValueError):
        out.print(Rule(literal(title), align="left"))
        out.print(literal(text), highlight=False, soft_wrap=not out.is_terminal)
