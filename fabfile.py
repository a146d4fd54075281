"""Fabric entry point: `fab -l` lists fablaunch's tasks (the `tasks/` collection, installed as
`fablaunch.tasks`)."""

from fablaunch.tasks import ns  # noqa: F401
