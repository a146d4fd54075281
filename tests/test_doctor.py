"""`fab doctor` and the launch preflight's port check against a real cluster of fake hosts (issue 4).

The fake hosts share this machine's network namespace and filesystem: a port taken on the master's
address is taken for doctor's probe too, and a working directory missing "on one host" is missing on all.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fablaunch.tasks.doctor import CHECKS
from tests.conftest import FAB, REPO, Fab, live_pids, master_port, sessions, wait_until
from tests.test_doctor_checks import listening

MASTER = "127.0.0.11"  # node1, the first host
STATUSES = {"ok", "warn", "fail", "skip"}


def output(result: subprocess.CompletedProcess[str]) -> str:
    """stdout and stderr, whitespace collapsed so table wrapping never matters."""
    return " ".join((result.stdout + "\n" + result.stderr).split())


def doctor(fab: Fab, *flags: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    return fab("doctor", "--port", str(port or master_port()), *flags, timeout=300)


def doctor_json(fab: Fab, *flags: str, port: int | None = None) -> tuple[int, dict[str, dict]]:
    result = doctor(fab, "--json", *flags, port=port)
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, {item["host"]: item for item in json.loads(result.stdout)}


def listeners_left() -> list[int]:
    """Processes of doctor's temporary listener still alive (their argv carries doctor's token)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"fablaunch-doctor-" in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
    return found


def assert_listener_gone(port: int) -> None:
    wait_until(lambda: not listening(port) and not listeners_left(), timeout=30)
    with socket.socket() as s:  # and the port is really free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))


@contextlib.contextmanager
def taken(port: int, address: str = MASTER) -> Iterator[None]:
    """Another process's listener on the master's MASTER_PORT."""
    with socket.socket() as s:
        s.bind((address, port))
        s.listen()
        yield


# --- doctor ---------------------------------------------------------------------------------------------------


def test_a_healthy_cluster_passes_and_the_test_listener_is_gone_afterwards(fab: Fab) -> None:
    fab.write("gpus", "node1", "node2", "node3", "node1")
    port = master_port()
    result = doctor(fab, port=port)
    assert result.returncode == 0, output(result)
    text = output(result)
    for host in ("node1", "node2", "node3"):
        assert host in text
    assert "FAIL" not in text and f"master {MASTER}:{port}" in text
    assert_listener_gone(port)


def test_json_gives_every_check_of_every_host(fab: Fab) -> None:
    fab.write("gpus", "node1", "node2", "node3")
    port = master_port()
    code, hosts = doctor_json(fab, port=port)
    assert code == 0
    assert list(hosts) == ["node1", "node2", "node3"]
    for name, item in hosts.items():
        assert set(item) == {"host", "master", *CHECKS}
        assert item["master"] == (name == "node1")
        for check in CHECKS:
            assert item[check]["status"] in STATUSES and set(item[check]) == {"status", "value", "message"}
        for check in ("ssh", "tmux", "workdir", "python", "torch", "tcp", "clock"):
            assert item[check]["status"] == "ok", (name, check, item[check])
        assert item["workdir"]["value"] == str(fab.cwd) and item["tcp"]["value"] == f"{MASTER}:{port}"
        assert item["gpus"]["status"] == "ok"  # no nvidia-smi here: "no GPU", not a failure
        assert isinstance(item["clock"]["value"], float) and item["ssh"]["value"] > 0
    assert hosts["node1"]["port"] == {"status": "ok", "value": port, "message": ""}
    assert hosts["node2"]["port"]["status"] == "skip" and hosts["node2"]["job"]["status"] == "skip"
    versions = {(h["python"]["value"], h["torch"]["value"]) for h in hosts.values()}
    assert len(versions) == 1


def test_a_host_whose_sshd_is_down_fails_by_name_and_the_rest_is_checked(fab: Fab) -> None:
    fab.write("gpus", "node1", "node2", "node3")
    port = master_port()
    fab.cluster.stop_host("node3")
    try:
        result = doctor(fab, port=port)
        code, hosts = doctor_json(fab, port=master_port())
    finally:
        fab.cluster.start_host("node3")
    assert result.returncode == 1
    assert "FAIL node3 ssh: unreachable: connection refused" in output(result)
    assert "node3" in result.stderr
    assert code == 1 and hosts["node3"]["ssh"]["status"] == "fail"
    assert hosts["node3"]["torch"]["status"] == "skip"
    assert hosts["node1"]["tcp"]["status"] == hosts["node2"]["tcp"]["status"] == "ok"
    assert_listener_gone(port)


def test_a_taken_master_port_fails_on_the_master(fab: Fab) -> None:
    fab.write("gpus", "node1", "node2")
    port = master_port()
    with taken(port):
        result = doctor(fab, port=port)
        code, hosts = doctor_json(fab, port=port)
    assert result.returncode == 1
    assert f"FAIL node1 port: port {port} is in use on node1" in output(result)
    assert code == 1 and hosts["node1"]["port"]["status"] == "fail"
    assert hosts["node2"]["tcp"]["status"] == "skip"  # doctor's own listener could not open
    assert not listeners_left()


def test_a_missing_interpreter_fails_on_every_host(fab: Fab) -> None:
    fab.write("gpus", "node1", "node2")
    port = master_port()
    result = doctor(fab, "--python", "/nonexistent/bin/python", port=port)
    assert result.returncode == 1
    text = output(result)
    for host in ("node1", "node2"):
        assert f"FAIL {host} python: interpreter /nonexistent/bin/python not found" in text
    assert_listener_gone(port)  # the listener fell back to the hosts' own python


def test_a_missing_working_directory_fails_on_every_host(fab: Fab) -> None:
    fab.write("gpus", "node1", "node2")
    result = doctor(fab, "--workdir", "/nonexistent/workdir")
    assert result.returncode == 1
    text = output(result)
    for host in ("node1", "node2"):
        assert f"FAIL {host} workdir: working directory /nonexistent/workdir does not exist" in text


def test_a_running_job_of_the_name_fails(fab: Fab, job: str) -> None:
    fab.write("gpus", "node2")
    launched = fab("launch-gpus", "--job", job, "--port", str(master_port()), "--", "behave.py", "*=sleep")
    assert launched.returncode == 0, output(launched)
    wait_until(lambda: live_pids(job), timeout=60)
    result = doctor(fab, "--job", job)
    assert result.returncode == 1
    assert f"FAIL node2 job: job {job} is already running here" in output(result)


def test_spec_and_hosts_file_are_read_as_launch_reads_them(fab: Fab) -> None:
    fab.write("hosts", "node2 slots=2", "node3")  # no ./gpus: ./hosts is the default
    port = master_port()
    fab.write("job.yaml", f"port: {port}", "python: /nonexistent/py", "command: [train.py]")
    result = fab("doctor", "--spec", "job.yaml", "--json", timeout=300)
    hosts = {item["host"]: item for item in json.loads(result.stdout)}
    assert result.returncode == 1 and list(hosts) == ["node2", "node3"]
    assert hosts["node2"]["port"]["value"] == port and hosts["node2"]["master"]
    assert hosts["node3"]["python"]["status"] == "fail" and "/nonexistent/py" in hosts["node3"]["python"]["message"]
    assert_listener_gone(port)


@pytest.mark.parametrize(("flags", "lines", "message"), [
    (["--gpus", "gpus"], ["node1", "node 2"], "gpus:2: 'node 2' is not a valid host: whitespace"),
    (["--gpus", "missing"], None, "missing: no such file"),
    (["--gpus", "gpus", "--hosts", "gpus"], ["node1"], "--gpus/--hosts: give one host file, not both"),
    (["--gpus", "gpus", "--port", "x"], ["node1"], "--port: 'x' is not an integer"),
    (["--gpus", "gpus", "--job", "a.b"], ["node1"], "--job: 'a.b' is not a valid job name"),
    (["--gpus", "gpus", "--spec", "bad.yaml"], ["node1"], "bad.yaml: key 'port': must be an integer"),
])
def test_bad_input_exits_2_naming_the_place(fab: Fab, flags: list[str], lines: list[str] | None,
                                            message: str) -> None:
    if lines:
        fab.write("gpus", *lines)
    fab.write("bad.yaml", "port: five")
    result = fab("doctor", *flags)
    assert result.returncode == 2, output(result)
    assert message in result.stderr and "Traceback" not in result.stderr


def test_ctrl_c_while_hosts_reach_the_master_removes_the_listener(fab: Fab, tmp_path: Path) -> None:
    """A local host whose connection test hangs holds doctor in the listener phase; then Ctrl-C."""
    shim_dir = tmp_path / "shim"
    shim_dir.mkdir()
    pid_file = tmp_path / "hung.pid"
    real = subprocess.run(["bash", "-c", "command -v timeout"], capture_output=True, text=True).stdout.strip()
    (shim_dir / "timeout").write_text(
        "#!/bin/bash\n"
        f'case "$*" in *dev/tcp*) echo $$ > {pid_file}; exec sleep 120;; esac\n'
        f'exec {real} "$@"\n')
    (shim_dir / "timeout").chmod(0o755)
    fab.write("gpus", "node1", "node2", "localhost")
    port = master_port()
    env = {**fab.env, "PATH": f"{shim_dir}:{fab.env['PATH']}"}
    proc = subprocess.Popen([FAB, "-r", str(REPO), "-S", str(fab.cluster.ssh_config), "doctor", "--port", str(port)],
                            cwd=fab.cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        wait_until(lambda: pid_file.exists() and pid_file.read_text().strip(), timeout=240)
        assert listening(port) and listeners_left()
        proc.send_signal(signal.SIGINT)
        assert_listener_gone(port)
    finally:
        with contextlib.suppress(OSError, ValueError):  # the hung connection test is ours to end
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert proc.returncode == 130, out + err
    assert "interrupted" in err


def test_doctor_flags_have_help() -> None:
    out = subprocess.run(["fab", "-r", str(REPO), "--help", "doctor"], capture_output=True, text=True).stdout
    options = out.split("Options:", 1)[1].splitlines()
    flags = [line for line in options if line.strip().startswith("-")]
    assert len(flags) >= 10
    for line in flags:
        assert len(line.strip().split("  ", 1)) == 2 or options[options.index(line) + 1].startswith(" " * 10), line


# --- the launch preflight -----------------------------------------------------------------------------------


def test_a_taken_master_port_fails_the_preflight_and_nothing_is_launched(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    port = master_port()
    with taken(port):
        result = fab("launch-gpus", "--job", job, "--port", str(port), "--", "behave.py", "*=sleep")
        replaced = fab("launch-gpus", "--job", job, "--port", str(port), "--replace", "--", "behave.py", "*=sleep")
    for attempt in (result, replaced):
        assert attempt.returncode == 1, output(attempt)
        assert f"port {port} is in use on node1" in output(attempt)
        assert "nothing was launched" in attempt.stderr
    assert not any(sessions(fab.cluster, job).values()) and not live_pids(job)


def test_no_preflight_skips_the_checks_and_launches(fab: Fab, job: str) -> None:
    fab.write("gpus", "node1", "node2")
    port = master_port()
    with taken(port):  # the preflight would refuse this; behave.py never binds the port
        result = fab("launch-gpus", "--job", job, "--port", str(port), "--no-preflight", "--", "behave.py", "*=sleep")
    assert result.returncode == 0, output(result)
    wait_until(lambda: len(live_pids(job)) >= 2, timeout=60)
    assert sessions(fab.cluster, job) == {"node1": [f"{job}-rank-0"], "node2": [f"{job}-rank-1"], "node3": []}
    again = fab("launch-gpus", "--job", job, "--port", str(port), "--no-preflight", "--replace", "--",
                "behave.py", "*=sleep")
    assert again.returncode == 0, output(again)
    wait_until(lambda: len(sessions(fab.cluster, job)["node1"]) == 1 and len(live_pids(job)) >= 2, timeout=60)
    assert "Launched" in again.stdout
