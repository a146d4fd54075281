"""Correctness at scale: a 64-host x 8-rank job launches completely and stops completely.

Timing is not asserted here (that is bench/launch_scaling.py's job, up to 256 hosts); what is checked
is that the parallel fan-out neither drops a host nor leaves a process behind when many hosts answer
at once: all 512 sessions run, and after `stop` nothing started on any of the 64 hosts is alive,
by the test's own reading of /proc.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.conftest import SSH_PORT, Fab, live_pids, master_port, sessions, wait_until

HOSTS, RANKS = 64, 8


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """64 fake hosts on 127.0.0.101-164, on their own port, each sshd at OpenSSH's default MaxStartups."""
    with Cluster(tmp_path_factory.mktemp("big"), HOSTS, port=SSH_PORT + 2, base=101, max_startups="10:30:100") as c:
        yield c


def on_hosts(cluster: Cluster) -> list[int]:
    """Live processes started on any of the cluster's hosts: everything sshd ran there carries its TMUX_TMPDIR.

    That covers the remote shells, the tmux servers and every process of every session, whoever
    started them; sshd's own processes do not carry it. Zombies (waiting for a slow reaper) run nothing.
    """
    marks = [f"TMUX_TMPDIR={cluster.tmux_dir(name)}".encode() for name in cluster.names]
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            values = set(environ.read_bytes().split(b"\0"))
            state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(m in values for m in marks):
            found.append(int(environ.parent.name))
    return found


def test_a_64_host_8_rank_job_starts_every_session_and_stop_leaves_nothing(
        big: Cluster, tmp_path: Path, job: str) -> None:
    fab = Fab(big, tmp_path)
    fab.write("gpus", *[name for _ in range(RANKS) for name in big.names])  # hosts interleaved, as ranks go
    assert on_hosts(big) == []
    try:
        launched = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleep", "600")
        assert launched.returncode == 0, launched.stdout + launched.stderr
        assert f"{HOSTS * RANKS} sessions on {HOSTS} hosts" in launched.stdout

        states = json.loads(fab("status", "--json", "--job", job).stdout)
        assert sorted(s["rank"] for s in states) == list(range(HOSTS * RANKS))
        assert {s["state"] for s in states} == {"running"}
        assert {s["host"] for s in states} == set(big.names)
        found = sessions(big, f"{job}-rank-")
        assert all(len(found[name]) == RANKS for name in big.names), found
        sleepers = wait_until(lambda: [p for p in live_pids(job)
                                       if Path(f"/proc/{p}/comm").read_text().strip() == "sleep"], 60)
        assert len(sleepers) == HOSTS * RANKS

        stopped = fab("stop", "--job", job, "--grace", "1")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert live_pids(job) == []
        assert sessions(big, f"{job}-rank-") == {name: [] for name in big.names}
        # Nothing at all is left on the hosts: no rank, no tee, no tmux server, no remote shell. The
        # shells of the last `fab` end as its connections close, just after it exits: allow them a moment.
        end = time.monotonic() + 30
        while on_hosts(big) and time.monotonic() < end:
            time.sleep(0.2)
        assert on_hosts(big) == []
    finally:
        fab("stop", "--job", job, "--grace", "0")
        # A failed stop must not leave 512 ranks to the next run, which would find the job running.
        for pid in live_pids(job):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def test_many_aliases_behind_one_default_sshd_all_launch_despite_dropped_handshakes(
        tmp_path_factory: pytest.TempPathFactory, job: str) -> None:
    """48 host names for one sshd at OpenSSH's default MaxStartups (10:30:100), as behind a bastion.

    32 handshakes at once overflow it, so some are dropped; retries with back-off must absorb that,
    and every alias must get its sessions.
    """
    aliases = 48
    root = tmp_path_factory.mktemp("alias")
    with Cluster(root / "c", 1, port=SSH_PORT + 3, base=121, max_startups="10:30:100") as one:
        block = one.ssh_config.read_text().split("\n", 1)[1]
        config = root / "ssh_config"
        config.write_text("".join(f"Host alias{i}\n{block}\n" for i in range(aliases)))
        fab = Fab(one, root, ssh_config=config)  # the same sshd under 48 names
        fab.write("gpus", *[f"alias{i}" for i in range(aliases)])
        try:
            launched = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleep", "600")
            assert launched.returncode == 0, launched.stdout + launched.stderr
            tagged = one.tmux("node1", "ls", "-F", "#{@fablaunch_host} #{@fablaunch_rank}").stdout.split("\n")
            assert sorted(t for t in tagged if t) == sorted(f"alias{i} {i}" for i in range(aliases))
            stopped = fab("stop", "--job", job, "--grace", "0")
            assert stopped.returncode == 0, stopped.stdout + stopped.stderr
            assert live_pids(job) == []
        finally:
            fab("stop", "--job", job, "--grace", "0")
