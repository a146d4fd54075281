"""fablaunch's Fabric/Invoke task collection (installed as `fablaunch.tasks`): flags, help and printing."""

from invoke import Collection

from .doctor import doctor_
from .dump import dump_
from .hosts import hosts_
from .jobs import attach, errors_, logs, status, stop, wait
from .launch import launch_gpus, launch_torchrun
from .prune import prune
from .relaunch import relaunch_
from .sync import sync_
from .top import top_

ns = Collection(launch_gpus, launch_torchrun, status, logs, attach, stop, wait, errors_, top_, dump_, doctor_,
                prune, relaunch_, sync_, hosts_)
