"""The installed package: import name `fablaunch`, no top-level `tasks`, one version, a quiet CLI in pipes.

Invoke's convention puts a `tasks.py` or `tasks/` in the user's project; fablaunch must never shadow it
or be shadowed by it.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fablaunch
from tests.conftest import REPO

FABLAUNCH = str(Path(sys.executable).with_name("fablaunch"))
FAB = str(Path(sys.executable).with_name("fab"))


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("layout", ["tasks.py", "tasks/__init__.py"])
def test_a_project_with_its_own_tasks_keeps_them_and_fablaunch_still_works(tmp_path: Path, layout: str) -> None:
    own = tmp_path / layout
    own.parent.mkdir(parents=True, exist_ok=True)
    own.write_text("MINE = 'the user'\n")
    mine = run([sys.executable, "-c", "import tasks, fablaunch.tasks; print(tasks.MINE, fablaunch.tasks.ns.name)"],
               tmp_path)
    assert mine.returncode == 0 and mine.stdout.split()[:2] == ["the", "user"], mine.stderr
    for args in ([FABLAUNCH, "-l"], [FAB, "-r", str(REPO), "-l"]):
        listed = run(args, tmp_path)
        assert listed.returncode == 0 and "launch-gpus" in listed.stdout, (args, listed.stderr)
    with_path = run([FABLAUNCH, "-l"], tmp_path)  # PYTHONPATH=. must not swap the collection for the user's
    assert "launch-gpus" in with_path.stdout


def test_no_top_level_tasks_package_is_installed(tmp_path: Path) -> None:
    found = run([sys.executable, "-c", "import importlib.util; print(importlib.util.find_spec('tasks'))"], tmp_path)
    assert found.stdout.strip() == "None", found.stdout  # from anywhere but the repository itself


def test_the_version_comes_from_the_distribution_metadata() -> None:
    assert fablaunch.__version__ == importlib.metadata.version("fablaunch")
    shown = run([FABLAUNCH, "--version"], Path.cwd())
    assert fablaunch.__version__ in shown.stdout


def test_a_listing_cut_short_by_its_reader_ends_quietly(tmp_path: Path) -> None:
    piped = subprocess.run(f"{FABLAUNCH} -l | head -n 1", shell=True, cwd=tmp_path, capture_output=True, text=True,
                           timeout=60)
    assert piped.stdout.strip() and "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr
