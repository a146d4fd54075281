"""Fabric entry point: `fab -l` lists fablaunch's tasks (they live in the `tasks` package)."""

from tasks import ns  # noqa: F401
