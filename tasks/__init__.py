"""fablaunch's Fabric/Invoke task collection (installed as `fablaunch.tasks`): flags, help and printing."""

from invoke import Collection

from .doctor import doctor_
from .dump import dump_
from .jobs import attach, errors_, logs, status, stop, wait
from .launch import launch_gpus, launch_torchrun
from .prune import prune
from .top import top_

ns = Collection(launch_gpus, launch_torchrun, status, logs, attach, stop, wait, errors_, top_, dump_, doctor_,
                prune)
