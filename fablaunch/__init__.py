"""fablaunch: launch and manage multi-node PyTorch jobs in tmux over SSH.

The engine (host files, specs, plans, the scripts that run on hosts, the executor, surveys) and its
Python API (`launch_gpus`, `launch_torchrun`, `Job`, `status`); the Fabric/Invoke task collection
built on it is `fablaunch.tasks` (the repository's `tasks/`).
"""

from importlib.metadata import PackageNotFoundError, version

from .api import Job, launch_gpus, launch_torchrun, status
from .errors import HostError, JobNotFound, LaunchError, UsageError

try:
    __version__ = version("fablaunch")
except PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["HostError", "Job", "JobNotFound", "LaunchError", "UsageError", "__version__", "launch_gpus",
           "launch_torchrun", "status"]
