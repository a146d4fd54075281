"""The few exceptions fablaunch raises, each carrying what a user needs to fix the problem."""

from __future__ import annotations


class UsageError(Exception):
    """Bad input: a host file, spec, flag or name that cannot be used.

    Tasks turn it into exit code 2 before anything is launched or changed, so it carries the place
    (file and line, flag or spec key) and what is wrong with it.
    """

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem
