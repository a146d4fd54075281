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


class Executor(fabric.Executor):
    """Fabric's executor, minus its handling of the `--` remainder (the tasks read it themselves)."""

    def expand_calls(self, calls: Any, apply_hosts: bool = True) -> Any:
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
