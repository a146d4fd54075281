"""Flag values as the tasks receive them, checked, and usage errors turned into exit code 2.

Invoke hands flags without a default over as strings and lets any exception escape as a traceback.
Every task checks its numbers here and raises `UsageError`, which `usage_errors` turns into a
one-line message naming the flag and exit code 2, so bad input never launches or changes anything.
"""

from __future__ import annotations

import functools
from typing import Any

from invoke import Exit

from .errors import UsageError
from .spec import DEFAULT_PARALLEL


def usage_error(exc: UsageError) -> Exit:
    """The Exit a task raises for bad input: message on stderr, exit code 2."""
    return Exit(f"fablaunch: {exc}", code=2)


def usage_errors(fn: Any) -> Any:
    """Decorate a task so that a UsageError anywhere in it exits 2 with its message."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            raise usage_error(exc) from None

    return wrapper


def int_flag(value: Any, flag: str, default: int | None = None) -> int | None:
    """An integer flag (None when not given and no default)."""
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise UsageError(flag, f"{value!r} is not an integer") from None


def seconds_flag(value: Any, flag: str, default: float | None = None) -> float | None:
    """A non-negative number of seconds (None when not given and no default)."""
    if value is None:
        return default
    try:
        result = float(value)
    except ValueError:
        raise UsageError(flag, f"{value!r} is not a number") from None
    if result < 0:
        raise UsageError(flag, f"must not be negative, not {value}")
    return result


def parallel_flag(value: Any) -> int:
    """--parallel: hosts contacted at once, at least 1."""
    count = int_flag(value, "--parallel", DEFAULT_PARALLEL) or DEFAULT_PARALLEL
    if count < 1:
        raise UsageError("--parallel", f"must be at least 1, not {value}")
    return count
