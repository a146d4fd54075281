"""Command-line plumbing: the `--` command passes through verbatim, and the `fablaunch` script.

Out of the box, `fab TASK -- args` treats the text after `--` as a shell command for `-H` hosts and
Invoke joins it with spaces, losing quoting. The launch tasks read the tokens from `sys.argv`
instead, so this executor only has to keep Fabric from acting on the remainder itself.
"""

from __future__ import annotations

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

    from . import __version__, ns

    Fab(name="fablaunch", version=__version__, namespace=ns, executor_class=Executor,
        config_class=fabric.Config).run()
