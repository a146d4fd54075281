"""Flag values: integers and seconds as a user types them, bounds, and usage errors as exit code 2."""

from __future__ import annotations

import re
import subprocess

import pytest
from invoke import Exit

from fablaunch.errors import UsageError
from fablaunch.spec import DEFAULT_PARALLEL, MAX_PARALLEL
from fablaunch.tasks.flags import MAX_SECONDS, int_flag, parallel_flag, seconds_flag, usage_errors
from tests.conftest import FAB, REPO

# Python's int() and float() accept every one of these; a user never means them, and the tools on
# the hosts (ssh, tail, bash arithmetic) would not read them the same way.
NOT_ASCII_NUMBERS = [" 12 ", "12 ", "\t12", "1_000", "\uff11\uff12", "\u0661\u0662", "\U0001d7d9", "1\uff12", "+12"]


# --- integers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "number"), [("0", 0), ("12", 12), ("-3", -3), ("007", 7), ("1" * 30, int("1" * 30))])
def test_int_flag_reads_ascii_decimal(text: str, number: int) -> None:
    assert int_flag(text, "--n") == number


@pytest.mark.parametrize("text", [*NOT_ASCII_NUMBERS, "", "x", "1.5", "1e3", "0x10", "--1", "nan"])
def test_int_flag_refuses_anything_but_ascii_digits_naming_the_flag(text: str) -> None:
    with pytest.raises(UsageError) as info:
        int_flag(text, "--n")
    assert info.value.where == "--n"
    assert repr(text) in info.value.problem and "0-9" in info.value.problem


def test_int_flag_with_thousands_of_digits_is_a_usage_error_not_a_traceback() -> None:
    with pytest.raises(UsageError, match="--n: has 5000 digits"):
        int_flag("1" * 5000, "--n")  # int() itself raises ValueError past 4300 digits


def test_int_flag_not_given_is_the_default() -> None:
    assert int_flag(None, "--n") is None
    assert int_flag(None, "--n", 50) == 50


def test_int_flag_takes_an_int_as_it_is_but_not_a_bool() -> None:
    assert int_flag(7, "--n") == 7
    with pytest.raises(UsageError, match="--n"):
        int_flag(True, "--n")


def test_int_flag_bounds_name_the_bound_and_the_value() -> None:
    assert int_flag("5", "--n", minimum=5, maximum=5) == 5
    with pytest.raises(UsageError, match="--n: must be at least 1, not 0"):
        int_flag("0", "--n", minimum=1)
    with pytest.raises(UsageError, match="--n: must be at most 9, not 10"):
        int_flag("10", "--n", maximum=9)


# --- --parallel --------------------------------------------------------------------------------------------


def test_parallel_not_given_is_the_default() -> None:
    assert parallel_flag(None) == DEFAULT_PARALLEL


@pytest.mark.parametrize("text", ["1", "8", str(MAX_PARALLEL)])
def test_parallel_in_range_is_accepted(text: str) -> None:
    assert parallel_flag(text) == int(text)


@pytest.mark.parametrize(("text", "problem"), [
    ("0", "must be at least 1, not 0"),  # it used to become the default, 32
    ("-1", "must be at least 1"),
    (str(MAX_PARALLEL + 1), f"must be at most {MAX_PARALLEL}"),
    ("9" * 25, f"must be at most {MAX_PARALLEL}"),
    ("\uff18", "is not an integer"),
])
def test_parallel_out_of_range_is_an_error_not_the_default(text: str, problem: str) -> None:
    with pytest.raises(UsageError) as info:
        parallel_flag(text)
    assert info.value.where == "--parallel"
    assert problem in info.value.problem


# --- seconds -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("0", 0.0), ("10", 10.0), ("2.5", 2.5), (".5", 0.5), ("3.", 3.0),
                                               (str(MAX_SECONDS), float(MAX_SECONDS))])
def test_seconds_flag_reads_plain_decimal_seconds(text: str, seconds: float) -> None:
    assert seconds_flag(text, "--grace") == seconds


@pytest.mark.parametrize("text", ["nan", "NaN", "inf", "-inf", "Infinity", "1e300", "1e3", *NOT_ASCII_NUMBERS, "",
                                  "x", "1.2.3", "5s"])
def test_seconds_flag_refuses_non_numbers_and_non_finite_values(text: str) -> None:
    with pytest.raises(UsageError) as info:
        seconds_flag(text, "--grace")
    assert info.value.where == "--grace"


@pytest.mark.parametrize(("value", "problem"), [
    (str(MAX_SECONDS + 1), f"at most {MAX_SECONDS} seconds (one week)"),
    ("99999999999999999999", "at most"),
    ("-1", "must not be negative"),
    (float("nan"), "finite"),
    (float("inf"), "finite"),
    (1e300, "at most"),
])
def test_seconds_flag_bounds_name_the_flag_and_the_limit(value: object, problem: str) -> None:
    with pytest.raises(UsageError) as info:
        seconds_flag(value, "--timeout")
    assert info.value.where == "--timeout"
    assert problem in info.value.problem


def test_seconds_flag_not_given_is_the_default() -> None:
    assert seconds_flag(None, "--grace") is None
    assert seconds_flag(None, "--grace", 10.0) == 10.0


# --- usage errors become exit code 2 -----------------------------------------------------------------------


def test_usage_errors_turns_a_usage_error_into_exit_2_with_its_place() -> None:
    @usage_errors
    def task() -> None:
        int_flag("x", "--rank")

    with pytest.raises(Exit) as info:
        task()
    assert info.value.code == 2
    assert str(info.value.message).startswith("fablaunch: --rank: 'x' is not an integer")


# --- the CLI's flags -------------------------------------------------------------------------------------------

TASKS = ["launch-gpus", "launch-torchrun", "status", "logs", "attach", "stop", "wait", "errors", "top", "dump",
         "doctor"]


@pytest.mark.parametrize("name", TASKS)
def test_dash_h_after_any_task_is_its_help_and_no_task_has_made_up_short_flags(name: str) -> None:
    shown = subprocess.run([FAB, "-r", str(REPO), name, "-h"], capture_output=True, text=True, timeout=60,
                           stdin=subprocess.DEVNULL)
    assert shown.returncode == 0 and shown.stdout.startswith("Usage: fab"), shown.stdout + shown.stderr
    options = shown.stdout.split("Options:", 1)[1]
    assert not re.search(r"^\s+-[A-Za-z][ ,=]", options, re.M), options  # every flag is spelled out
