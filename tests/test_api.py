"""The Python API against the fake cluster and on localhost: the same jobs `fab` launches, as objects."""

from __future__ import annotations

from pathlib import Path

import pytest

import fablaunch
from tests.conftest import Fab, live_pids, master_port, sessions, wait_until


@pytest.fixture
def here(fab: Fab, monkeypatch: pytest.MonkeyPatch) -> Fab:
    """The API works where it is called from, like `fab`: host files, records and workdir are relative."""
    monkeypatch.chdir(fab.cwd)
    return fab


def test_a_job_launched_from_python_can_be_watched_read_and_waited_for(here: Fab, job: str) -> None:
    here.write("gpus", "node1", "node2", "node1")
    launched = fablaunch.launch_gpus(["behave.py", "0=exit:0", "1=exit:3", "2=sleep"], job=job, port=master_port(),
                                     env={"DELAY_1": "1"}, ssh_config=str(here.ssh_config))
    assert isinstance(launched, fablaunch.Job) and launched.name == job
    assert [h.spec for h in launched.hosts] == ["node1", "node2"]
    assert sorted(len(s) for s in sessions(here.cluster, job).values()) == [0, 1, 2]

    wait_until(lambda: sum(s["state"] == "failed" for s in launched.status()) == 1, timeout=40, interval=0.5)
    states = {s["rank"]: s for s in fablaunch.status(job, ssh_config=str(here.ssh_config))}
    assert (states[1]["state"], states[1]["exit_code"], states[2]["state"]) == ("failed", 3, "running")
    assert launched.wait(timeout=2, interval=0.5) == 124  # rank 2 still sleeps
    assert "[node2 rank 1] rank 1 on node2 does exit 3" in launched.logs(rank=1)

    again = fablaunch.Job(job, ssh_config=str(here.ssh_config))  # found again by name, from the records
    assert [h.spec for h in again.hosts] == ["node1", "node2"]
    assert again.wait(fail_fast=True, interval=0.5) == 3
    assert not live_pids(job)


def test_api_errors_carry_data_and_launch_nothing(here: Fab, job: str) -> None:
    here.write("gpus", "node1", "node2")
    with pytest.raises(fablaunch.UsageError) as bad:
        fablaunch.launch_gpus(["sleeper.py"], job=job, env={"RANK": "7"}, ssh_config=str(here.ssh_config))
    assert bad.value.where.startswith("--env") or "RANK" in str(bad.value)
    with pytest.raises(fablaunch.UsageError):
        fablaunch.launch_gpus("sleeper.py", job=job, ssh_config=str(here.ssh_config))  # type: ignore[arg-type]
    here.write("bad-gpus", "node1", "node2")
    with pytest.raises(fablaunch.LaunchError) as failed:
        fablaunch.launch_gpus(["sleeper.py"], gpus="bad-gpus", job=job, workdir="/nonexistent/dir",
                              port=master_port(), ssh_config=str(here.ssh_config))
    assert failed.value.code == 1 and set(failed.value.outcomes) == {"node1", "node2"}
    assert "does not exist" in failed.value.outcomes["node1"].why()
    assert not live_pids(job) and not any(sessions(here.cluster, job).values())


def test_stop_from_python_leaves_nothing_and_says_which_hosts_failed(here: Fab, job: str) -> None:
    here.write("gpus", "node1", "node3")
    launched = fablaunch.launch_gpus(["sleeper.py"], job=job, port=master_port(), ssh_config=str(here.ssh_config))
    wait_until(lambda: len(live_pids(job)) >= 4, timeout=30)
    launched.stop(grace=1)
    assert not live_pids(job)
    here.cluster.stop_host("node3")
    try:
        with pytest.raises(fablaunch.HostError) as down:
            launched.stop(grace=1)
        assert list(down.value.hosts) == ["node3"] and "unreachable" in down.value.hosts["node3"]
    finally:
        here.cluster.start_host("node3")


def test_a_job_on_localhost_needs_no_ssh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, job: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpus").write_text("localhost\nlocalhost\n")
    launched = fablaunch.launch_gpus(["bash", "-c", 'echo "hello from $RANK of $WORLD_SIZE"; exit $RANK'], job=job,
                                     port=master_port())
    assert launched.wait(interval=0.5) == 1  # rank 1 exits 1: the first failure's code
    out = launched.logs()
    assert "[localhost rank 0] hello from 0 of 2" in out and "[localhost rank 1] hello from 1 of 2" in out
    assert [s["state"] for s in launched.status()] == ["succeeded", "failed"]
