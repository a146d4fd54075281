"""The keeper of connections and shells for read-only calls (fablaunch/keeper.py), against the real cluster.

Each test has a keeper directory of its own (FABLAUNCH_KEEPER_DIR), so it sees only its own keepers and
never another test run's. The keeper's own counters (`stats`: handshakes, shells, requests) prove what
went through it; its answers are compared with those of direct connections.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fabric
import pytest

from fablaunch import keeper
from fablaunch.executor import REMOTE_SHELL, Executor
from fablaunch.hostfile import parse_host
from tests.cluster import Cluster
from tests.conftest import Fab, alive, master_port, wait_until

NOBODY = 65534


@pytest.fixture
def kdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test's keeper directory, with the keeper switched on here and in `fab` runs; stopped afterwards."""
    path = tmp_path / "keepers"
    monkeypatch.setenv("FABLAUNCH_KEEPER", "1")
    monkeypatch.setenv("FABLAUNCH_KEEPER_DIR", str(path))
    yield path
    subprocess.run([sys.executable, "-m", "fablaunch.keeper", "stop"], capture_output=True, timeout=30)
    for pid in keeper_pids(path):
        wait_until(lambda pid=pid: not alive(pid), 15)


@pytest.fixture
def kfab(fab: Fab, kdir: Path, monkeypatch: pytest.MonkeyPatch) -> Fab:
    """`fab` with the keeper on; this test then works where `fab` runs (the directory is part of the key)."""
    fab.env.update(FABLAUNCH_KEEPER="1", FABLAUNCH_KEEPER_DIR=str(kdir))
    monkeypatch.chdir(fab.cwd)
    return fab


def keeper_pids(kdir: Path) -> list[int]:
    """Live keeper processes serving this directory, read from /proc."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"fablaunch.keeper\0serve" in cmdline and f"FABLAUNCH_KEEPER_DIR={kdir}".encode() in environ
                and alive(int(proc.name))):
            found.append(int(proc.name))
    return found


def config(cluster: Cluster, timeout: float | None = None) -> Any:
    cfg = fabric.Config(runtime_ssh_path=str(cluster.ssh_config))
    if timeout is not None:
        cfg.connect_kwargs.timeout = timeout
    return cfg


def stats(cluster: Cluster) -> dict[str, Any]:
    client = keeper.Client.for_config(config(cluster))
    assert client is not None
    answer = client.request("stats")
    assert answer is not None, "no keeper answers"
    return answer


def hosts(cluster: Cluster) -> list[Any]:
    return [parse_host(name, "test") for name in cluster.names]


def run(cluster: Cluster, payload: str, use_keeper: bool, deadline: float = 20,
        only: list[str] | None = None) -> dict[str, tuple[int | None, str, str, str | None]]:
    """Every host's (exit code, stdout, stderr, error) for a read-only payload, through the keeper or not."""
    with Executor(config(cluster), 8, deadline=deadline, keeper=use_keeper) as ex:
        out = ex.run({h: (REMOTE_SHELL, payload) for h in hosts(cluster) if not only or h.spec in only},
                     read_only=True)
    return {spec: (o.exit_code, o.stdout, o.stderr, o.error) for spec, o in out.items()}


def steady(states: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Sessions without the fields that change from one look to the next (how long ago, how long running)."""
    return [{k: v for k, v in s.items() if k not in ("log_age", "runtime")} for s in states]


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


# --- it is used, and says what a direct connection says ------------------------------------------------------------


def test_a_second_status_goes_through_the_kept_connections_and_says_what_a_direct_one_says(
        kfab: Fab, kdir: Path, cluster: Cluster, job: str) -> None:
    ok(kfab("launch-gpus", "--job", job, "--gpus", "node[1-3]", "--port", str(master_port()), "--",
            "behave.py", "0=exit:0", "1=exit:3", "2=sleep"))
    assert not list(kdir.glob("*.sock")), "a launch never goes through (or starts) a keeper"
    wait_until(lambda: {s["state"] for s in json.loads(kfab("status", "--json", "--job", job, "--no-keeper").stdout)}
               == {"succeeded", "failed", "running"})
    assert not list(kdir.glob("*.sock"))
    first = json.loads(ok(kfab("status", "--json", "--job", job)).stdout)
    assert (stats(cluster)["handshakes"], stats(cluster)["shells"], stats(cluster)["requests"]) == (3, 3, 3)
    second = json.loads(ok(kfab("status", "--json", "--job", job)).stdout)
    after = stats(cluster)
    assert (after["handshakes"], after["shells"], after["requests"]) == (3, 3, 6)  # no handshake, no new shell
    direct = json.loads(ok(kfab("status", "--json", "--job", job, "--no-keeper")).stdout)
    kfab.env["FABLAUNCH_KEEPER"] = "0"
    off = json.loads(ok(kfab("status", "--json", "--job", job)).stdout)
    assert stats(cluster)["requests"] == 6  # neither --no-keeper nor FABLAUNCH_KEEPER=0 asked it
    assert steady(first) == steady(second) == steady(direct) == steady(off)
    assert {s["state"] for s in second} == {"succeeded", "failed", "running"}
    kfab.env["FABLAUNCH_KEEPER"] = "1"
    ok(kfab("stop", "--job", job))
    assert stats(cluster)["requests"] == 6  # a stop acts over its own connections, never the keeper's


def test_wait_and_logs_through_the_keeper_match_direct_ones(kfab: Fab, cluster: Cluster, job: str) -> None:
    ok(kfab("launch-gpus", "--job", job, "--gpus", "node[1-3]", "--port", str(master_port()), "--",
            "behave.py", "0=exit:0", "1=exit:3", "2=exit:0"))
    kept = kfab("wait", "--job", job, "--json")
    direct = kfab("wait", "--job", job, "--json", "--no-keeper")
    assert kept.returncode == direct.returncode == 3
    assert steady(json.loads(kept.stdout)["sessions"]) == steady(json.loads(direct.stdout)["sessions"])
    logs = ok(kfab("logs", "--job", job))
    # Hosts answer in any order, each host's lines in theirs.
    assert sorted(logs.stdout.splitlines()) == sorted(ok(kfab("logs", "--job", job, "--no-keeper")).stdout.splitlines())
    assert "[node2 rank 1] rank 1 on node2 does exit 3" in logs.stdout
    assert stats(cluster)["handshakes"] == 3


def test_settings_that_differ_never_share_a_keeper(kdir: Path, cluster: Cluster, tmp_path: Path) -> None:
    base = keeper.Client.for_config(config(cluster))
    other_timeout = keeper.Client.for_config(config(cluster, timeout=7))
    copy = tmp_path / "ssh_config"
    copy.write_text(cluster.ssh_config.read_text())
    other_file = keeper.Client.for_config(fabric.Config(runtime_ssh_path=str(copy)))
    assert base and other_timeout and other_file
    assert len({base.socket, other_timeout.socket, other_file.socket}) == 3
    before = base.key
    copy.write_text(cluster.ssh_config.read_text() + "\n# edited\n")
    edited = keeper.Client.for_config(fabric.Config(runtime_ssh_path=str(copy)))
    assert edited and edited.key != other_file.key and base.key == before
    cfg = config(cluster)
    cfg.connect_kwargs.password = "secret"  # a config the keeper cannot express: never kept
    assert keeper.Client.for_config(cfg) is None


# --- framing: output is data --------------------------------------------------------------------------------------

TRICKY = r"""
printf '\036FLK 0\n\0360123456789abcdef0123456789abcdef 0\nfl_m\nZWNobyBoaQo=\n'
printf 'bytes: \001\002\377\376 and \036 alone\n' >&2
printf '\036deadbeefdeadbeefdeadbeefdeadbeef\n' >&2
read -r next             # reads its own stdin, as under a direct `bash -s`: the script's next line
echo "read: $next"
printf 'no newline at the end'
exit 7
"""


def test_output_that_looks_like_framing_comes_back_byte_for_byte_as_a_direct_call_gives_it(
        kdir: Path, cluster: Cluster) -> None:
    direct = run(cluster, TRICKY, use_keeper=False)
    run(cluster, "true\n", use_keeper=True)  # the kept shells are up; the tricky payload reuses them
    kept = run(cluster, TRICKY, use_keeper=True)
    assert kept == direct
    assert kept["node1"][0] == 7 and kept["node1"][1].endswith("no newline at the end")
    assert stats(cluster)["shells"] == 3 and stats(cluster)["fallbacks"] == 0
    assert run(cluster, "echo still fine\n", use_keeper=True)["node2"] == (0, "still fine\n", "", None)


def test_a_payload_that_leaves_a_writer_behind_gets_its_answer_and_its_shell_is_not_reused(
        kdir: Path, cluster: Cluster) -> None:
    late = "(sleep 0.5; echo late) &\necho now\n"
    assert run(cluster, late, use_keeper=True, only=["node1"])["node1"] == (0, "now\n", "", None)
    time.sleep(1)  # "late" now waits in the kept shell's stream
    assert run(cluster, "echo next\n", use_keeper=True, only=["node1"])["node1"] == (0, "next\n", "", None)
    assert stats(cluster)["shells"] == 2  # the polluted shell was dropped, not read from


# --- deadlines ------------------------------------------------------------------------------------------------------


def test_a_payload_past_its_deadline_times_out_without_holding_up_the_other_hosts(kdir: Path, cluster: Cluster) -> None:
    run(cluster, "true\n", use_keeper=True)
    payload = 'case "$TMUX_TMPDIR" in */node2/*) echo before; sleep 30;; esac\necho done\n'  # node2 hangs
    start = time.monotonic()
    out = run(cluster, payload, use_keeper=True, deadline=2)
    assert time.monotonic() - start < 5
    assert out["node2"] == (None, "before\n", "", "timed out after 2s")
    assert out["node1"] == out["node3"] == (0, "done\n", "", None)
    assert stats(cluster)["timeouts"] == 1
    assert run(cluster, "echo back\n", use_keeper=True, only=["node2"])["node2"] == (0, "back\n", "", None)


def sshd_tree(cluster: Cluster, name: str) -> list[int]:
    """A fake host's sshd listener and every process under it (its connections and their shells)."""
    root = cluster.sshd_pid(name)
    assert root is not None
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def test_a_kept_host_that_hangs_is_reported_timed_out_within_the_deadline_and_the_others_answer(
        kfab: Fab, cluster: Cluster) -> None:
    ok(kfab("status", "--json", "--hosts", "node[1-3]"))
    tree = sshd_tree(cluster, "node2")
    for pid in tree:
        os.kill(pid, signal.SIGSTOP)  # the host stops answering, its kept connection still open
    try:
        start = time.monotonic()
        result = kfab("-T", "3", "status", "--json", "--hosts", "node[1-3]")
        took = time.monotonic() - start
    finally:
        for pid in tree:
            os.kill(pid, signal.SIGCONT)
    assert result.returncode == 1 and took < 3 + 5, (took, result.stderr)
    assert "node2" in result.stderr and "node1" not in result.stderr and "node3" not in result.stderr
    assert stats(cluster)["timeouts"] == 1
    ok(kfab("status", "--json", "--hosts", "node[1-3]"))  # back: connected again


def test_a_kept_host_that_died_is_reported_unreachable_at_once(kfab: Fab, cluster: Cluster) -> None:
    ok(kfab("status", "--json", "--hosts", "node[1-3]"))
    tree = sshd_tree(cluster, "node3")
    for pid in tree:
        os.kill(pid, signal.SIGKILL)  # the host is gone: kept connection reset, nothing listening
    try:
        wait_until(lambda: not any(alive(p) for p in tree), 10)
        start = time.monotonic()
        result = kfab("status", "--hosts", "node[1-3]")
        assert time.monotonic() - start < 10
        assert result.returncode == 1 and "node3: unreachable (unreachable: connection refused)" in result.stdout
        assert stats(cluster)["requests"] == 6  # answered by the keeper, which saw its connection gone
    finally:
        cluster.start_host("node3")


REFUSED = "session signalling requires privilege separation"  # sshd (< 10.0, root login) refusing a KILL


def test_a_caller_that_goes_away_takes_its_payload_with_it(kdir: Path, cluster: Cluster, tmp_path: Path) -> None:
    """Ctrl-C or SIGTERM ends `with Executor`: the keeper then ends that call's remote command, as a direct
    call's is ended (sshd is asked to KILL it; one that refuses says so in its log, and the channel closes)."""
    run(cluster, "true\n", use_keeper=True, only=["node1"])
    log = cluster.host_dir("node1") / "sshd.log"
    refused = log.read_text(errors="replace").count(REFUSED)
    pid_file = tmp_path / "pid"
    ex = Executor(config(cluster), 2, deadline=60, keeper=True)
    call = threading.Thread(target=ex.run_one, args=(parse_host("node1", "test"), REMOTE_SHELL,
                                                      f"echo $$ > {pid_file}; exec sleep 60\n"),
                            kwargs={"read_only": True}, daemon=True)
    call.start()
    wait_until(lambda: pid_file.exists() and pid_file.read_text().strip())
    remote = int(pid_file.read_text())
    ex.close()
    call.join(10)
    assert not call.is_alive()
    wait_until(lambda: not alive(remote) or log.read_text(errors="replace").count(REFUSED) > refused, 10)
    assert stats(cluster)["timeouts"] == 1  # ended by the keeper, not left to its 60 s deadline
    with contextlib.suppress(ProcessLookupError):
        os.kill(remote, signal.SIGKILL)  # (where sshd refused: the test's own cleanup)


# --- fallback: never a keeper in doubt ------------------------------------------------------------------------------


def test_a_keeper_killed_mid_call_falls_back_silently_with_the_right_answer(kdir: Path, cluster: Cluster) -> None:
    run(cluster, "true\n", use_keeper=True)
    pid = stats(cluster)["pid"]
    threading.Timer(0.5, os.kill, (pid, signal.SIGKILL)).start()
    start = time.monotonic()
    out = run(cluster, "sleep 1; echo $((6 * 7))\n", use_keeper=True, deadline=20)
    assert out == {name: (0, "42\n", "", None) for name in cluster.names}
    assert time.monotonic() - start < 15
    # The socket it left is stale: the next call starts a new keeper in its place, silently.
    assert run(cluster, "echo again\n", use_keeper=True)["node1"] == (0, "again\n", "", None)
    assert stats(cluster)["pid"] != pid and stats(cluster)["handshakes"] == 3


def test_a_stale_socket_file_is_ignored_and_replaced(kdir: Path, cluster: Cluster) -> None:
    client = keeper.Client.for_config(config(cluster))
    assert client is not None
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(client.socket))  # a socket file nobody listens on: its keeper died
    stale.close()
    os.chmod(client.socket, 0o600)
    assert run(cluster, "echo fine\n", use_keeper=True)["node1"] == (0, "fine\n", "", None)
    assert stats(cluster)["requests"] == 3


class Impostor:
    """A listening socket at the keeper's path that answers every request with a forged outcome."""

    def __init__(self, path: Path, as_uid: int | None = None) -> None:
        self.path = path
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        os.chmod(path, 0o600)
        self.listener = listener
        self.child: int | None = None
        self.contacts: list[int] = []
        if as_uid is None:
            listener.listen(8)
            threading.Thread(target=self.serve, daemon=True).start()
            return
        ready_r, ready_w = os.pipe()
        self.child = os.fork()
        if self.child == 0:  # listen() as that uid: SO_PEERCRED then names it to whoever connects
            try:
                os.setgid(as_uid)
                os.setuid(as_uid)
                listener.listen(8)
                os.write(ready_w, b"x")
                self.serve()
            finally:
                os._exit(0)
        os.read(ready_r, 1)

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.contacts.append(1)
            forged = json.dumps({"kind": "done", "exit_code": 0, "stdout": base64.b64encode(b"FORGED\n").decode(),
                                 "stderr": ""}).encode()
            conn.sendall(struct.pack(">I", len(forged)) + forged)
            conn.close()

    def close(self) -> None:
        if self.child:
            os.kill(self.child, signal.SIGKILL)
            os.waitpid(self.child, 0)
        self.listener.close()


@pytest.mark.parametrize("how", ["owned by nobody", "open to others", "answered by nobody", "directory open"])
def test_a_socket_that_is_not_this_users_private_one_is_never_used(kdir: Path, cluster: Cluster, how: str) -> None:
    client = keeper.Client.for_config(config(cluster))
    assert client is not None
    impostor = Impostor(client.socket, as_uid=NOBODY if how == "answered by nobody" else None)
    try:
        if how == "owned by nobody":
            os.chown(client.socket, NOBODY, NOBODY)
        elif how == "open to others":
            os.chmod(client.socket, 0o666)
        elif how == "directory open":
            os.chmod(kdir, 0o755)
        out = run(cluster, "echo real\n", use_keeper=True)
    finally:
        impostor.close()
    assert out == {name: (0, "real\n", "", None) for name in cluster.names}
    assert impostor.contacts == [] and keeper_pids(kdir) == []  # not asked, not replaced, nothing started


# --- idle: nothing left ---------------------------------------------------------------------------------------------


def held_shells(cluster: Cluster) -> list[int]:
    """`bash -s` processes running on the fake hosts (the kept shells), read from /proc."""
    dirs = {f"TMUX_TMPDIR={cluster.tmux_dir(n)}".encode() for n in cluster.names}
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if (proc / "cmdline").read_bytes() != b"bash\0-s\0":
                continue
            environ = set((proc / "environ").read_bytes().split(b"\0"))
        except OSError:
            continue
        if environ & dirs and alive(int(proc.name)):
            found.append(int(proc.name))
    return found


def test_an_idle_keeper_closes_everything_removes_its_socket_and_exits(
        kdir: Path, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FABLAUNCH_KEEPER_IDLE", "2")
    run(cluster, "true\n", use_keeper=True)
    pid = stats(cluster)["pid"]
    assert keeper_pids(kdir) == [pid] and len(held_shells(cluster)) >= 3
    time.sleep(1.2)
    run(cluster, "true\n", use_keeper=True)  # a request restarts the idle clock
    assert alive(pid)
    wait_until(lambda: not alive(pid), 10)
    assert not kdir.exists()  # socket, lock file and the (then empty) directory are gone
    wait_until(lambda: held_shells(cluster) == [], 10)  # and so are the shells it kept on the hosts
