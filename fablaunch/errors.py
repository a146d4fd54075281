"""The few exceptions fablaunch raises, each carrying what a user needs to fix the problem."""

from __future__ import annotations

from typing import Any


class UsageError(Exception):
    """Bad input: a host file, spec, flag or name that cannot be used.

    Tasks turn it into exit code 2 before anything is launched or changed, so it carries the place
    (file and line, flag or spec key) and what is wrong with it.
    """

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"{where}: {problem}")
        self.where = where
        self.problem = problem


class LaunchError(Exception):
    """A launch that did not start: why, the exit code the CLI gives, and what each host answered.

    `outcomes` (host spec -> executor Outcome) and `notes` (host spec -> what the rollback did) are
    what the results table shows; `title` heads it and `passed` is what it says of a host that
    answered well (`started`, or `ready` after a failed preflight, where nothing started). Nothing
    of the job is left running unless the message says so (`--no-rollback`, or a rollback that could not be verified).
    """

    def __init__(self, message: str, code: int = 1, *, title: str = "", outcomes: dict[str, Any] | None = None,
                 notes: dict[str, str] | None = None, passed: str = "started") -> None:
        super().__init__(message)
        self.code = code
        self.title = title
        self.passed = passed
        self.outcomes = outcomes or {}
        self.notes = notes or {}


class JobNotFound(Exception):
    """No host that answered knows the job (some did not answer, so it may be there): carries the name."""

    def __init__(self, job: str, message: str) -> None:
        super().__init__(message)
        self.job = job


class HostError(Exception):
    """Hosts that did not do what was asked (unreachable, timed out, a process that survived a stop).

    `hosts` maps each such host spec to why, so a caller can retry or report host by host.
    """

    def __init__(self, message: str, hosts: dict[str, str]) -> None:
        super().__init__(message)
        self.hosts = hosts
