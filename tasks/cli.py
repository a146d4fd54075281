"""Command-line plumbing: the `--` command passes through verbatim, and the `fablaunch` script.

Out of the box, `fab TASK -- args` treats the text after `--` as a shell command for `-H` hosts and
Invoke joins it with spaces, losing quoting. The launch tasks read the tokens from `sys.argv`
instead, so this executor only has to keep Fabric from acting on the remainder itself.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import fabric
from invoke import Exit


def command_argv() -> list[str]:
    """The tokens after `--`, exactly as the shell passed them (see Executor); the only reader of sys.argv."""
    argv = sys.argv
    return argv[argv.index("--") + 1:] if "--" in argv else []


class Executor(fabric.Executor):
    """Fabric's executor, minus its handling of the `--` remainder (the tasks read it themselves)."""

    def expand_calls(self, calls: Any, apply_hosts: bool = True) -> Any:
        if apply_hosts and self.core[0].args.hosts.value:
            # Fabric would run each task once per -H host: a whole launch per host. fablaunch's tasks
            # reach every host themselves, named by their own flags.
            raise Exit("fablaunch: -H/--hosts before the task is not used by fablaunch's tasks (each would run "
                       "once per host); name the hosts with the task's --gpus or --hosts instead", code=2)
        remainder, self.core.remainder = self.core.remainder, ""
        try:
            return super().expand_calls(calls, apply_hosts)
        finally:
            self.core.remainder = remainder


def main() -> None:
    """Run the fablaunch tasks from any directory, as `fab` would from this repository."""
    from fabric.main import Fab

    from fablaunch import __version__

    from . import ns

    try:
        Fab(name="fablaunch", version=__version__, namespace=ns, executor_class=Executor,
            config_class=fabric.Config).run()
    except BrokenPipeError:
        # A reader that stopped early (`fablaunch -l | head`) is no error worth a traceback; stdout goes
        # to /dev/null so that Python's own flush at exit does not fail on it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
