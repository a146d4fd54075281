"""fablaunch: launch and manage multi-node PyTorch jobs in tmux over SSH, as Fabric tasks."""

from invoke import Collection

from .doctor import doctor_
from .dump import dump_
from .jobs import attach, errors_, logs, status, stop, wait
from .launch import launch_gpus, launch_torchrun
from .top import top_

__version__ = "0.1.0"

ns = Collection(launch_gpus, launch_torchrun, status, logs, attach, stop, wait, errors_, top_, dump_, doctor_)
