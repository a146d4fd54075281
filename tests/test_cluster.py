"""The fake cluster behaves like separate hosts: own address, own tmux server, own sshd."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.cluster import Cluster
from tests.conftest import SSH_PORT


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """Two fake hosts on the port after the shared test cluster's, so the two never collide."""
    with Cluster(tmp_path_factory.mktemp("cluster"), 2, port=SSH_PORT + 1) as c:
        yield c


def test_each_alias_reaches_its_own_address(cluster: Cluster) -> None:
    for name, address in [("node1", "127.0.0.11"), ("node2", "127.0.0.12")]:
        assert cluster.address(name) == address
        result = cluster.ssh(name, "echo $SSH_CONNECTION")
        assert result.returncode == 0, result.stderr
        # SSH_CONNECTION = client_ip client_port server_ip server_port
        assert result.stdout.split()[2:] == [address, str(SSH_PORT + 1)]


def test_each_host_has_its_own_tmux_server(cluster: Cluster) -> None:
    result = cluster.ssh("node1", "tmux new-session -d -s probe sleep 60")
    assert result.returncode == 0, result.stderr
    try:
        assert "probe" in cluster.tmux("node1", "ls").stdout
        # node2 has no server at all, or one without that session.
        assert "probe" not in cluster.tmux("node2", "ls").stdout
    finally:
        cluster.tmux("node1", "kill-session", "-t", "=probe")
    assert "probe" not in cluster.tmux("node1", "ls").stdout


def test_stopped_host_refuses_ssh_until_started_again(cluster: Cluster) -> None:
    cluster.stop_host("node2")
    try:
        assert cluster.ssh("node2", "true").returncode != 0
        assert cluster.ssh("node1", "true").returncode == 0
    finally:
        cluster.start_host("node2")
    result = cluster.ssh("node2", "echo back")
    assert (result.returncode, result.stdout) == (0, "back\n"), result.stderr


def test_stop_is_idempotent_and_leaves_nothing_listening(tmp_path_factory: pytest.TempPathFactory) -> None:
    c = Cluster(tmp_path_factory.mktemp("short"), 1, port=SSH_PORT + 1, base=21).start()
    assert c.ssh("node1", "tmux new-session -d -s s sleep 60").returncode == 0
    c.stop()
    c.stop()
    assert c.ssh("node1", "true").returncode != 0
    assert c.tmux("node1", "ls").returncode != 0
