"""Flag values as the tasks receive them, checked, and usage errors turned into exit code 2.

Invoke hands flags without a default over as strings and lets any exception escape as a traceback.
Every task checks its numbers here and raises `UsageError`, which `usage_errors` turns into a
one-line message naming the flag and exit code 2, so bad input never launches or changes anything.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import invoke
from invoke import Exit

from fablaunch.errors import UsageError
from fablaunch.spec import DEFAULT_PARALLEL, MAX_PARALLEL

# Longest wait any seconds flag accepts: one week. Beyond it a typo (or `inf`, `1e300`) is far likelier
# than intent, and an unbounded value overflows the shell's integer arithmetic on the hosts.
MAX_SECONDS = 7 * 24 * 3600

# ASCII only: Python's int() and float() also take full-width and other Unicode digits, surrounding
# whitespace and '_' separators, none of which a user means or the shell tools on the hosts accept.
_INTEGER = re.compile(r"-?[0-9]+")
_DECIMAL = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")
_MAX_DIGITS = 1000  # int() refuses over 4300 digits with a ValueError; no flag needs a tenth of this


def task(*args: Any, **kwargs: Any) -> Any:
    """Invoke's `@task`, without the short flags Invoke would make up from each flag's first letter.

    Made-up short flags collide with habits and differ between tasks (`-h` was `--preflight`,
    `--hosts` or `--host`, so `fab status -h` failed instead of showing help). With none, `-h` after
    any task is help, and every flag is spelled out the same way on every task.
    """
    return invoke.task(*args, auto_shortflags=False, **kwargs)


def usage_error(exc: UsageError) -> Exit:
    """The Exit a task raises for bad input: message on stderr, exit code 2."""
    return Exit(f"fablaunch: {exc}", code=2)


def usage_errors(fn: Any) -> Any:
    """Decorate a task so that a UsageError anywhere in it exits 2 with its message, and Ctrl-C exits 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UsageError as exc:
            raise usage_error(exc) from None
        except KeyboardInterrupt:  # Ctrl-C: one line and the shell's 130, never a traceback
            raise Exit("fablaunch: interrupted", code=130) from None

    return wrapper


def int_flag(value: Any, flag: str, default: int | None = None, *,
             minimum: int | None = None, maximum: int | None = None) -> int | None:
    """An integer flag written in ASCII digits (None when not given and no default), within the bounds given."""
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _INTEGER.fullmatch(value):
        if len(value) > _MAX_DIGITS:
            raise UsageError(flag, f"has {len(value)} digits, more than any {flag} can use")
        number = int(value)
    else:
        raise UsageError(flag, f"{value!r} is not an integer (write it in the digits 0-9)")
    if minimum is not None and number < minimum:
        raise UsageError(flag, f"must be at least {minimum}, not {value}")
    if maximum is not None and number > maximum:
        raise UsageError(flag, f"must be at most {maximum}, not {value}")
    return number


def seconds_flag(value: Any, flag: str, default: float | None = None) -> float | None:
    """A number of seconds from 0 to a week, e.g. `10` or `2.5` (None when not given and no default)."""
    if value is None:
        return default
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number and not (isinstance(value, str) and _DECIMAL.fullmatch(value)):
        raise UsageError(flag, f"{value!r} is not a number of seconds (write e.g. 10 or 2.5)")
    result = float(value)
    if not math.isfinite(result):
        raise UsageError(flag, f"must be a finite number of seconds, not {value}")
    if result < 0:
        raise UsageError(flag, f"must not be negative, not {value}")
    if result > MAX_SECONDS:
        raise UsageError(flag, f"must be at most {MAX_SECONDS} seconds (one week), not {value}")
    return result


_DURATION = re.compile(r"([0-9]+)([smhdw]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def age_flag(value: Any, flag: str) -> float | None:
    """An age such as `90`, `30m`, `12h`, `7d` or `2w`, in seconds (None when not given)."""
    if value is None:
        return None
    match = _DURATION.fullmatch(str(value))
    if not match or len(match.group(1)) > 9:
        raise UsageError(flag, f"{value!r} is not an age (write e.g. 3600, 30m, 12h, 7d or 2w)")
    return float(int(match.group(1)) * _UNIT[match.group(2)])


def parallel_flag(value: Any) -> int:
    """--parallel: hosts contacted at once, from 1 to MAX_PARALLEL (0 is an error, not the default)."""
    count = int_flag(value, "--parallel", minimum=1, maximum=MAX_PARALLEL)
    return DEFAULT_PARALLEL if count is None else count
