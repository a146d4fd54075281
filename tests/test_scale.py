"""Correctness at scale: a 16-host x 4-rank job launches completely and stops completely.

Timing is not asserted here (that is bench/launch_scaling.py's job); what is checked is that the
parallel fan-out neither drops a host nor leaves a process behind when many hosts answer at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.conftest import SSH_PORT, Fab, live_pids, master_port, sessions, wait_until

HOSTS, RANKS = 16, 4


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """16 fake hosts on 127.0.0.101-116, each sshd at OpenSSH's default MaxStartups."""
    with Cluster(tmp_path_factory.mktemp("big"), HOSTS, port=SSH_PORT + 2, base=101, max_startups="10:30:100") as c:
        yield c


def test_a_16_host_4_rank_job_starts_every_session_and_stop_leaves_nothing(
        big: Cluster, tmp_path: Path, job: str) -> None:
    fab = Fab(big, tmp_path)
    fab.write("gpus", *[name for _ in range(RANKS) for name in big.names])  # hosts interleaved, as ranks go
    try:
        launched = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "sleep", "600")
        assert launched.returncode == 0, launched.stdout + launched.stderr

        states = json.loads(fab("status", "--json", "--job", job).stdout)
        assert sorted(s["rank"] for s in states) == list(range(HOSTS * RANKS))
        assert {s["state"] for s in states} == {"running"}
        assert {s["host"] for s in states} == set(big.names)
        found = sessions(big, f"{job}-rank-")
        assert all(len(found[name]) == RANKS for name in big.names), found
        sleepers = wait_until(lambda: [p for p in live_pids(job)
                                       if Path(f"/proc/{p}/comm").read_text().strip() == "sleep"], 30)
        assert len(sleepers) == HOSTS * RANKS

        stopped = fab("stop", "--job", job, "--grace", "1")
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert live_pids(job) == []
        assert sessions(big, f"{job}-rank-") == {name: [] for name in big.names}
    finally:
        fab("stop", "--job", job, "--grace", "0")


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
